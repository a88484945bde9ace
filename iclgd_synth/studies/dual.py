"""The dual form of linear attention, ICL against fine-tuning, and momentum attention.

Claims of "Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as Meta-Optimizers",
tested on in-context linear regression:

1. linear attention over demonstrations is a zero-shot model plus implicit weights Delta W_ICL built like a gradient
   update (the dual form, :mod:`iclgd_synth.dual_form`): checked on every trained model (reconstruction of each
   layer's query update) and, for the hand-constructed GD layer, against eta * grad L(W0); exported to
   ``dual_form.npz``;
2. ICL behaves like fine-tuning (SimAOU, SimAM before/after and SimAM_delta, Kendall, Rec2FTP;
   :mod:`iclgd_synth.critiques.dual`), on a trained 1-layer LSA whose query is a key (and one with d_out > 1 outputs),
   a K-layer one for the attention maps, and the hand layer as a known answer; fine-tuning full-batch and in the
   paper's sequential protocol; every metric beside its nulls (random direction, another task's FT and ICL, the
   oracle, ridge and a GD step, shuffled influences, the selection-corrected Rec2FTP) and the same protocol on the
   untrained model (this seed's initialisation);
3. momentum attention is the analogue of GD with momentum: the exact relations of
   :mod:`iclgd_synth.critiques.momentum` in float64, and vanilla against momentum attention trained alike.

Every model is trained with ``train`` (its ``model`` changed per model) for every seed of ``train.seeds`` (vmapped)
and evaluated per seed in float64. Per-seed numbers are combined leaf by leaf: floats are means over seeds (the
reconstruction errors and the momentum relations' errors are maxima, their distance to plain GD a minimum), integer
counts are summed over seeds; headline numbers also get a mean with a 95% interval under ``ci``. With one seed every
number is that seed's value. The exported dual forms are those of the first seed's models. ``headline`` holds, per
fine-tuning variant, every metric against every null as a mean with a 95% interval over seeds and the paired test of
FT minus the null over seeds. Each seed's evaluation is kept as ``eval_seed<s>.json``: an interrupted run resumes
after the last evaluated seed (training resumes from its checkpoints).

Science only: :func:`compute` returns the metrics and saves the arrays the figures need; the report and figures are
rendered by :mod:`iclgd_synth.reports.dual`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Sequence

import jax
import numpy as np

from iclgd_synth.constructions import gd_params
from iclgd_synth.critiques import dual as D
from iclgd_synth.dual_form import dual_form, export_dual_forms, reconstruction_error
from iclgd_synth.intervals import combine_seeds, mean_ci, paired_test
from iclgd_synth.learners import tune_gd
from iclgd_synth.metrics import loss as model_loss
from iclgd_synth.model import ModelConfig, TransformerParams
from iclgd_synth.precision import float64, to_float64
from iclgd_synth.storage import read_json, to_json, write_json
from iclgd_synth.studies.protocol import Run, Study
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, sample
from iclgd_synth.train import TrainConfig, init_state, train
from iclgd_synth.validation import check_float, check_int

TUNE_SEED, EVAL_SEED = 6_000_011, 7_000_003
#: The 1-layer model of the ICL-vs-FT metrics (the query is a key, so the zero-shot copy has one).
IQ_LABEL = "LSA, query is a key (for ICL vs FT)"


def vector_label(out_dim: int) -> str:
    """The 1-layer query-as-key LSA trained on tasks with d_out = ``out_dim`` outputs (ICL vs FT, vector outputs)."""
    return f"LSA, query is a key, d_out = {out_dim} (ICL vs FT)"


def multilayer_label(k: int) -> str:
    """The K-layer query-as-key model on which SimAM_delta is measured at layers >= 2."""
    return f"LSA, {k} layers, query is a key (SimAM_delta)"


@dataclasses.dataclass(frozen=True)
class DualConfig:
    """Settings of the dual-form / ICL-vs-FT / momentum study.

    Attributes:
      train: training of every model (AdamW, batch, steps, lr, seeds ...); ``train.model`` is the plain 1-layer LSA,
        and every other model is it with ``.replace`` (momentum, query as a key, depth, causal mask). Default: the
        ``vonoswald`` task (d = N = 10, x ~ U(-0.5, 0.5)), 3000 steps of 512 tasks, lr 1e-3, clip 10, seeds 0-4.
      eval_tasks: held-out tasks on which every metric is measured (tasks). Default 2000.
      tune_tasks: separate tasks for tuning step sizes, GD's eta and the fine-tuning lr (tasks). Default 1000.
      ft_steps: numbers of full-batch fine-tuning GD steps compared (steps). Default (1, 10).
      sequential_passes: passes of the paper's sequential fine-tuning (one SGD step per demonstration, in order,
        batch 1, W_K and W_V) compared beside the full-batch variants; empty skips it (passes). Default (1,).
      vector_out_dim: d_out of a second query-as-key LSA trained on vector-output tasks, on which the ICL-vs-FT
        metrics are measured too (with one output channel SimAOU is close to a sign test); 0 skips it (outputs).
        Default 3.
      untrained_control: also measure every ICL-vs-FT metric on an untrained (initialised) copy of the query-as-key
        LSA, per seed (flag). Default True.
      rec2ftp_bins: quantile bins of the zero-shot error for the selection-corrected Rec2FTP (bins). Default 5.
      ft_lr_points: points of the log grid 1e-2..10^2.5 over which every fine-tuning step size is tuned (points).
        Default 19.
      beta: momentum-attention decay, in [0, 1] (dimensionless). Default 0.5.
      causal_depth: layers of a causal pair (vanilla and values momentum) trained beside the others; 0 skips the pair
        (layers). Default 2.
      multilayer_depth: layers K of a query-as-key LSA on which SimAM_delta is measured at layers 2..K (undefined at
        layer 1); 0 skips it (layers). Default 2.
      export_tasks: evaluation tasks whose dual form (first seed's models and the hand layer) goes to dual_form.npz
        (tasks). Default 8.
      equivalence_trials: random sizes per check of the momentum relations, per seed (trials). Default 5.
    """

    train: TrainConfig = TrainConfig(task=TASK_PRESETS["vonoswald"], model=ModelConfig(dim=10), batch_size=512,
                                     n_steps=3000, lr=1e-3, chunk_steps=250, checkpoint_every=1000,
                                     seeds=(0, 1, 2, 3, 4))
    eval_tasks: int = 2000
    tune_tasks: int = 1000
    ft_steps: tuple[int, ...] = (1, 10)
    sequential_passes: tuple[int, ...] = (1,)
    vector_out_dim: int = 3
    untrained_control: bool = True
    rec2ftp_bins: int = 5
    ft_lr_points: int = 19
    beta: float = 0.5
    causal_depth: int = 2
    multilayer_depth: int = 2
    export_tasks: int = 8
    equivalence_trials: int = 5

    def __post_init__(self):
        object.__setattr__(self, "ft_steps", tuple(self.ft_steps))
        object.__setattr__(self, "sequential_passes", tuple(self.sequential_passes))
        for s in self.sequential_passes:
            check_int("sequential_passes[i]", s, min_value=1)
        if len(set(self.sequential_passes)) != len(self.sequential_passes):
            raise ValueError(f"sequential_passes must be different numbers of passes, got "
                             f"{list(self.sequential_passes)}")
        check_int("vector_out_dim", self.vector_out_dim, min_value=0)
        if self.vector_out_dim == 1:
            raise ValueError("vector_out_dim must be 0 (no vector-output model) or >= 2: the main model already has "
                             "d_out = 1")
        check_int("rec2ftp_bins", self.rec2ftp_bins, min_value=1)
        check_int("ft_lr_points", self.ft_lr_points, min_value=2)
        if not isinstance(self.untrained_control, bool):
            raise ValueError(f"untrained_control must be true or false, got {self.untrained_control!r}")
        if not self.ft_steps:
            raise ValueError("ft_steps must hold at least one number of fine-tuning steps")
        for s in self.ft_steps:
            check_int("ft_steps[i]", s, min_value=1)
        if len(set(self.ft_steps)) != len(self.ft_steps):
            raise ValueError(f"ft_steps must be different numbers of steps, got {list(self.ft_steps)}")
        check_int("eval_tasks", self.eval_tasks, min_value=2)
        check_int("tune_tasks", self.tune_tasks, min_value=1)
        check_float("beta", self.beta, min_value=0.0, max_value=1.0)
        check_int("causal_depth", self.causal_depth, min_value=0)
        if check_int("multilayer_depth", self.multilayer_depth, min_value=0) == 1:
            raise ValueError("multilayer_depth must be 0 (no SimAM_delta model) or >= 2: SimAM_delta is undefined at "
                             "layer 1, so a 1-layer model measures nothing")
        check_int("export_tasks", self.export_tasks, min_value=1)
        check_int("equivalence_trials", self.equivalence_trials, min_value=1)
        m = self.train.model
        if not isinstance(m, ModelConfig):
            raise ValueError(f"train.model must be a ModelConfig (a linear-attention model has a dual form), got "
                             f"{type(m).__name__}")
        if getattr(self.train, "objective", "icl") != "icl":
            raise ValueError(f"train.objective must be 'icl' (the models are compared on the in-context objective), "
                             f"got {self.train.objective!r}")
        plain = {"attention": (m.attention, "linear"), "n_layers": (m.n_layers, 1), "recurrent": (m.recurrent, False),
                 "causal": (m.causal, False), "include_query": (m.include_query, False), "momentum": (m.momentum, None),
                 "layout": (m.layout, "concat"), "layer_norm": (m.layer_norm, False), "mlp": (m.mlp, False)}
        for name, (value, want) in plain.items():
            if value != want:
                raise ValueError(f"train.model.{name} must be {want!r}, got {value!r}: train.model is the plain "
                                 "1-layer linear-attention model from which the study derives the others (momentum, "
                                 "query as a key, depth, causal mask are set per model)")
        if self.train.task.out_dim != 1:
            raise ValueError(f"train.task.out_dim must be 1 (the main models have scalar outputs; vector outputs are "
                             f"the separate model of vector_out_dim), got {self.train.task.out_dim}")

    def replace(self, **changes) -> "DualConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "DualConfig":
        """A CI-sized version: the first 2 seeds (so that intervals exist), 100 steps of 128 tasks, 200 tasks,
        fine-tuning 1 and 5 steps, no causal pair, 2 trials of the momentum relations (same code path)."""
        t = self.train.replace(n_steps=min(self.train.n_steps, 100), batch_size=min(self.train.batch_size, 128),
                               seeds=self.train.seeds[:2])
        return dataclasses.replace(self, train=t, eval_tasks=200, tune_tasks=200, ft_steps=(1, 5), causal_depth=0,
                                   equivalence_trials=2)

    def variants(self) -> list[tuple[str, int]]:
        """(protocol, steps) of every fine-tuning variant: full-batch GD, then the paper's sequential SGD."""
        return ([("full_batch", s) for s in self.ft_steps]
                + [("sequential", s) for s in self.sequential_passes])

    def lr_grid(self) -> np.ndarray:
        """The fine-tuning step sizes tried when tuning."""
        return np.logspace(-2, 2.5, self.ft_lr_points)

    def models(self) -> dict[str, ModelConfig]:
        """label -> architecture of every trained model, each derived from ``train.model``."""
        base, b = self.train.model, self.beta
        out = {"LSA": base,
               f"LSA + momentum (values, beta {b})": base.replace(momentum=b, momentum_kind="values"),
               f"LSA + momentum (dual, beta {b})": base.replace(momentum=b, momentum_kind="dual")}
        if self.causal_depth:
            k = self.causal_depth
            out[f"causal LSA, {k} layers"] = base.replace(n_layers=k, causal=True)
            out[f"causal LSA, {k} layers + momentum (values, beta {b})"] = base.replace(
                n_layers=k, causal=True, momentum=b, momentum_kind="values")
        out[IQ_LABEL] = base.replace(include_query=True)
        if self.vector_out_dim:
            out[vector_label(self.vector_out_dim)] = base.replace(include_query=True, out_dim=self.vector_out_dim)
        if self.multilayer_depth:
            out[multilayer_label(self.multilayer_depth)] = base.replace(n_layers=self.multilayer_depth,
                                                                        include_query=True)
        return out


def compute(config: DualConfig, run: Run) -> dict[str, Any]:
    """Train every model (every seed), evaluate each seed in float64, run the hand controls and the momentum
    relations; returns the metrics (see the module docstring) and saves the figures' arrays."""
    task = config.train.task
    d, n = task.dim, task.n_context
    results = {label: train(config.train.replace(model=model, task=task.replace(out_dim=model.out_dim)),
                            run.dir / f"ckpt_{i}", progress=run.progress)
               for i, (label, model) in enumerate(config.models().items())}
    seeds = list(config.train.seeds)
    ml_label = multilayer_label(config.multilayer_depth) if config.multilayer_depth else None
    vec_label = vector_label(config.vector_out_dim) if config.vector_out_dim else None

    with float64():  # tasks are drawn in float64 too
        tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, config.tune_tasks)
        test = sample(jax.random.PRNGKey(EVAL_SEED), task, config.eval_tasks)
        learners = D.tuned_learners(tune_batch)
        vec = None
        if vec_label is not None:
            vtask = task.replace(out_dim=config.vector_out_dim)
            vtune = sample(jax.random.PRNGKey(TUNE_SEED), vtask, config.tune_tasks)
            vec = (vtune, sample(jax.random.PRNGKey(EVAL_SEED), vtask, config.eval_tasks),
                   D.tuned_learners(vtune))
        eta = tune_gd(tune_batch, 1).eta
        hand = gd_params(d, eta, n_context=n)
        df_hand, meta = D.hand_dual_form(test, eta)
        hand_checks = D.meta_gradient_errors(df_hand, meta, d)
        # Known-answer control: the hand GD layer, its adapter fine-tuned with one step of eta, is ICL exactly.
        hand_ft = D.icl_vs_ft(hand, test, eta, 1, jax.random.PRNGKey(0), param_set="adapters")
        hand_losses, dual_weights = D.hand_momentum_losses(eta, config.beta, tune_batch, test)
        per_seed = []
        iq_train = config.train.replace(model=config.models()[IQ_LABEL])
        for i, seed in enumerate(seeds):
            path = run.dir / f"eval_seed{seed}.json"
            if path.exists():  # an interrupted run resumes after the last evaluated seed
                per_seed.append(read_json(path))
                continue
            if run.progress:
                print(f"dual: evaluating seed {seed} ({i + 1} of {len(seeds)})", file=sys.stderr, flush=True)
            params = {label: to_float64(r.seed_params(i)) for label, r in results.items()}
            losses = {label: np.asarray(r.losses[i]) for label, r in results.items()}
            # The untrained control: the query-as-key LSA as this seed's training started from it.
            untrained = (to_float64(jax.tree.map(lambda a: a[0], init_state(iq_train.replace(seeds=(seed,)))[0]))
                         if config.untrained_control else None)
            entry = json.loads(to_json(_evaluate_seed(params, losses, tune_batch, test, config, learners, ml_label,
                                                      vec_label, vec, untrained)))
            write_json(path, entry)
            per_seed.append(entry)
        equivalence = [D.momentum_equivalence_errors(s, config.equivalence_trials) for s in seeds]
        first = {label: to_float64(r.seed_params(0)) for label, r in results.items()}
        # One archive of scalar-output tasks: the vector-output model (other token width) is left out of it.
        export = {**{k: v for k, v in first.items() if k != vec_label}, f"hand GD (1 step, eta {eta:.4g})": hand}
        export_index = export_dual_forms(run.dir / "dual_form.npz", export,
                                         sample(jax.random.PRNGKey(EVAL_SEED), task, config.export_tasks))
        figure_mats = _dual_form_matrices(df_hand, meta, first, test, d)

    run.save_arrays("arrays", **{f"dual_form/{k}": v for k, v in figure_mats.items()},
                    **{f"losses/{label}": np.asarray(r.losses) for label, r in results.items()})

    recon = {label: max(s["relative_reconstruction_error"][label] for s in per_seed) for label in results}
    momentum_models = combine_seeds([s["momentum_models"] for s in per_seed])
    for label, r in results.items():
        momentum_models[label]["train_seconds"] = r.train_seconds
    metrics: dict[str, Any] = {
        "seeds": seeds, "n_seeds": len(seeds), "gd_eta": eta,
        "learners": {k: _learner_params(v) for k, v in learners.items()},
        "dual_form": {"relative_reconstruction_error": recon, **hand_checks},
        "icl_vs_ft": {"model": IQ_LABEL, "by_steps": combine_seeds([s["icl_vs_ft"] for s in per_seed]),
                      "icl_model_loss": combine_seeds([s["icl_model_loss"] for s in per_seed]),
                      "hand_control": hand_ft},
    }
    if config.untrained_control:
        metrics["icl_vs_ft_untrained"] = {"model": f"untrained {IQ_LABEL}",
                                          "by_steps": combine_seeds([s["icl_vs_ft_untrained"] for s in per_seed])}
    if vec_label is not None:
        metrics["icl_vs_ft_vector"] = {"model": vec_label, "out_dim": config.vector_out_dim,
                                       "by_steps": combine_seeds([s["icl_vs_ft_vector"] for s in per_seed]),
                                       "learners": {k: _learner_params(v) for k, v in vec[2].items()}}
    if ml_label is not None:
        metrics["simam_delta_multilayer"] = {
            "model": ml_label, "n_layers": config.multilayer_depth,
            "by_steps": combine_seeds([s["simam_delta_multilayer"] for s in per_seed])}
    metrics["momentum_equivalence"] = _worst_relation_errors(equivalence)
    metrics["momentum_training"] = {"models": momentum_models, "hand": hand_losses,
                                    "dual_weights": [float(w) for w in dual_weights]}
    metrics["dual_form_export"] = {"file": "dual_form.npz", "n_tasks": config.export_tasks, "seed": seeds[0],
                                   "models": export_index}
    metrics["train_seconds"] = {label: r.train_seconds for label, r in results.items()}
    metrics["resumed_from_step"] = {label: r.resumed_from for label, r in results.items()}
    metrics["ci"] = _seed_ci(per_seed, ml_label is not None)
    metrics["headline"] = _headline_ci(per_seed)
    return json.loads(to_json(metrics))  # str keys and plain numbers: what the report reads back from metrics.json


def _learner_params(learner: Any) -> dict[str, Any]:
    """A tuned learner's hyper-parameters, for the record."""
    return {"kind": type(learner).__name__, **{k: float(getattr(learner, k)) for k in ("lam", "eta")
                                               if hasattr(learner, k)}}


def _evaluate_seed(params: dict[str, TransformerParams], losses: dict[str, np.ndarray], tune_batch: TaskBatch,
                   test: TaskBatch, config: DualConfig, learners: dict[str, Any], ml_label: str | None,
                   vec_label: str | None, vec: tuple | None, untrained: TransformerParams | None) -> dict[str, Any]:
    """One seed's numbers (float64 parameters): dual-form reconstruction of every model, ICL vs FT (every variant,
    with the nulls; on the untrained copy and the vector-output model too), SimAM_delta and the trained models'
    losses."""
    variants, grid, bins = config.variants(), config.lr_grid(), config.rec2ftp_bins
    recon_batch = {label: (vec[1] if label == vec_label else test) for label in params}
    out: dict[str, Any] = {
        "relative_reconstruction_error": {label: reconstruction_error(p, recon_batch[label])
                                          for label, p in params.items()},
        "icl_vs_ft": D.icl_vs_ft_variants(params[IQ_LABEL], tune_batch, test, variants, learners, lr_grid=grid,
                                           n_bins=bins),
        "icl_model_loss": model_loss(params[IQ_LABEL], test),
        "momentum_models": {label: {"final_train_loss": float(np.mean(losses[label][-50:])),
                                    "test_loss": model_loss(p, recon_batch[label])} for label, p in params.items()}}
    if untrained is not None:
        out["icl_vs_ft_untrained"] = D.icl_vs_ft_variants(untrained, tune_batch, test, variants, learners,
                                                          lr_grid=grid, n_bins=bins)
    if vec_label is not None:
        out["icl_vs_ft_vector"] = D.icl_vs_ft_variants(params[vec_label], vec[0], vec[1], variants, vec[2],
                                                       lr_grid=grid, n_bins=bins)
    if ml_label is not None:
        out["simam_delta_multilayer"] = D.simam_delta_variants(params[ml_label], tune_batch, test, variants,
                                                                 lr_grid=grid)
    return out


def _dual_form_matrices(df_hand, meta, first: dict[str, TransformerParams], test: TaskBatch, d: int
                        ) -> dict[str, np.ndarray]:
    """The matrices of the dual-form figure, on evaluation task 0 (first seed's models)."""
    hand_delta = np.asarray(df_hand.delta_w_icl[0])
    embedded = np.zeros_like(hand_delta)
    embedded[d:, :d] = np.asarray(meta[0])
    return {"hand GD: Delta W_ICL (task 0)": hand_delta, "eta * grad L(W0), embedded": embedded,
            "trained LSA: Delta W_ICL (task 0)": np.asarray(dual_form(first["LSA"], test).delta_w_icl[0]),
            "query-key LSA: W_ZSL (task 0)": np.asarray(dual_form(first[IQ_LABEL], test).w_zsl[0])}


def _worst_relation_errors(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The momentum relations over every seed's random sizes: the largest error and scale, the smallest distance of
    dual momentum from a plain GD step."""
    out: dict[str, Any] = {}
    for key, v in per_seed[0].items():
        if isinstance(v, dict):
            out[key] = {str(k): max(float(s[key][k]) for s in per_seed) for k in v}
        elif key == "a1_distance_to_plain_gd":
            out[key] = min(float(s[key]) for s in per_seed)
        else:
            out[key] = max(float(s[key]) for s in per_seed)
    return out


def _seed_ci(per_seed: Sequence[dict[str, Any]], multilayer: bool) -> dict[str, Any]:
    """Means with 95% intervals over seeds of the headline numbers."""
    first = per_seed[0]
    out: dict[str, Any] = {"icl_model_loss": mean_ci([s["icl_model_loss"] for s in per_seed]), "icl_vs_ft": {}}
    for st in first["icl_vs_ft"]:
        rows = [s["icl_vs_ft"][st] for s in per_seed]
        out["icl_vs_ft"][st] = {f"loss_{k}": mean_ci([r["loss"][k] for r in rows]) for k in ("icl", "zsl", "ft")}
    if multilayer:
        out["simam_delta_multilayer"] = {
            st: {k: [mean_ci(layer) for layer in zip(*[s["simam_delta_multilayer"][st][k] for s in per_seed])]
                 for k in ("simam_delta", "simaou", "simam_before", "simam_after", "simam_after_random_direction")}
            for st in first["simam_delta_multilayer"]}
    out["momentum_test_loss"] = {label: mean_ci([s["momentum_models"][label]["test_loss"] for s in per_seed])
                                 for label in first["momentum_models"]}
    out["momentum_final_train_loss"] = {
        label: mean_ci([s["momentum_models"][label]["final_train_loss"] for s in per_seed])
        for label in first["momentum_models"]}
    return out


#: Sections of the ICL-vs-FT metrics with headline numbers: (metrics key, words).
HEADLINE_SECTIONS = (("icl_vs_ft", "trained LSA, query is a key (d_out = 1)"),
                     ("icl_vs_ft_vector", "trained LSA, query is a key, vector outputs"))


def _headline_ci(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per section and fine-tuning variant: metric -> comparator -> mean with a 95% interval over seeds, and for
    each null (and the untrained control) the paired comparison FT - null over seeds (:func:`paired_test`)."""
    out: dict[str, Any] = {}
    for section, _ in HEADLINE_SECTIONS:
        if section not in per_seed[0]:
            continue
        out[section] = {}
        for st in per_seed[0][section]:
            nums = [D.headline_numbers(s[section][st]) for s in per_seed]
            if section == "icl_vs_ft" and "icl_vs_ft_untrained" in per_seed[0]:
                for s, n in zip(per_seed, nums):
                    un = D.headline_numbers(s["icl_vs_ft_untrained"][st])
                    for metric, _ in D.HEADLINE_METRICS:
                        n[metric]["untrained model (same protocol)"] = un[metric]["FT"]
            cell: dict[str, Any] = {}
            for metric in nums[0]:
                cell[metric] = {}
                for comp in nums[0][metric]:
                    vals = [n[metric][comp] for n in nums]
                    entry = mean_ci(vals)
                    if metric in dict(D.HEADLINE_METRICS) and comp != "FT":
                        entry["ft_minus"] = paired_test([n[metric]["FT"] for n in nums], vals)
                    cell[metric][comp] = entry
            out[section][st] = cell
    return out


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.dual import render

    return render(config, metrics, run_dir)


DUAL = Study("dual", "The dual form of linear attention (zero-shot weights plus implicit Delta W_ICL), ICL against "
                     "fine-tuning (SimAOU, SimAM_delta, Kendall, Rec2FTP) and momentum attention against GD with "
                     "momentum.", DualConfig(), compute, _render)
