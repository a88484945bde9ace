"""The critiques of "ICL is GD": the library code their studies use (no study runs here).

- :mod:`~iclgd_synth.critiques.order`: orderings of the demonstrations and the order-sensitivity measures
  ("Do pretrained Transformers Learn In-Context by Gradient Descent?");
- :mod:`~iclgd_synth.critiques.finetune`: fine-tuning zero-shot copies of a model (standard and layer-causal);
- :mod:`~iclgd_synth.critiques.alignment`: the ICL-vs-fine-tuning metrics (SimAOU, SimAM_delta, Kendall, Rec2FTP);
- :mod:`~iclgd_synth.critiques.momentum`: momentum attention and heavy-ball constructions.

The studies themselves are :mod:`iclgd_synth.studies.order`, :mod:`~iclgd_synth.studies.dual` and
:mod:`~iclgd_synth.studies.causal`.
"""
