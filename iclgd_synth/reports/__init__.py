"""Reports and figures of the studies, rendered from their metrics (presentation, apart from the science).

One module per study family (:mod:`~iclgd_synth.reports.gd_comparison`, ...), each with
``render(config, metrics, run_dir) -> markdown``; :mod:`~iclgd_synth.reports.expectations` holds what the reference
paper leads us to expect; ``iclgd report RUN_DIR`` (:mod:`~iclgd_synth.reports.command`) re-renders a finished run.
"""
