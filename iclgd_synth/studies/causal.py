"""Layer causality: do a trained deep LSA's per-layer ICL updates look more like standard or layer-causal fine-tuning?

"In-context Learning and Gradient Descent Revisited" observes that ICL at layer l only uses layers <= l, while GD
fine-tuning updates layer l with gradients from deeper layers, and finds that a layer-causal variant of fine-tuning
aligns better with ICL. This study trains deep linear self-attention models (one per depth K in ``depths``, every
seed of ``train.seeds``), and per layer compares their ICL change of the query with standard, layer-causal and
forward-order fine-tuning of a zero-shot copy and with the explicit GD steps, beside the hand-constructed K-layer GD
model as an exact control. Definitions and the library functions: :mod:`iclgd_synth.critiques.causality`.

Seeds: every model is evaluated per seed; the per-model numbers in the metrics are means over seeds (counts, such as
diverged fine-tuned copies, are summed over seeds), with the per-seed entries under ``per_seed`` and 95% intervals
under ``ci``. With one seed every number is that seed's value.

Comparisons (``comparisons``): layer-causal (and forward-order) vs standard fine-tuning as paired tests per cell
(depth, parametrisation, steps, layer) over the test tasks, with the mean difference, its interval, t, p and the
effect size d_z; wins and losses count only significant cells (p < 0.05; also after Holm's correction over all cells,
and "consistent": after Holm and with every seed's mean difference of the same sign), broken down by parametrisation
(W_K, W_V: the set the paper fine-tunes; adapters) and steps.

Nulls (``headline`` per depth, means over seeds with 95% intervals): the random-direction baseline, the untrained-model
control (the same protocol on each seed's initialisation, standard fine-tuning), and competent learners that improve
the prediction without being the model (k-nearest neighbours; an oracle moving the prediction to the truth).

Science only: :func:`compute` returns the metrics and saves the training curves; the report and figures are
rendered by :mod:`iclgd_synth.reports.causal`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from iclgd_synth.critiques import causality as CA
from iclgd_synth.intervals import combine_seeds, mean_ci
from iclgd_synth.learners import tune_gd
from iclgd_synth.model import ModelConfig
from iclgd_synth.precision import float64
from iclgd_synth.storage import read_json, write_json
from iclgd_synth.studies.protocol import Run, Study, load_arrays
from iclgd_synth.tasks import TASK_PRESETS, sample
from iclgd_synth.train import TrainConfig, init_state, train
from iclgd_synth.validation import check_float, check_int

TUNE_SEED, EVAL_SEED = 8_000_009, 9_000_011


def _default_lr_grid() -> tuple[float, ...]:
    return tuple(float(v) for v in np.logspace(-1, 3, 9))


@dataclasses.dataclass(frozen=True)
class CausalConfig:
    """Deep LSA models trained on in-context regression, compared layer by layer with fine-tuning and GD steps.

    Attributes:
      train: training settings shared by every model (AdamW, batch, steps, seeds ...). ``train.model`` is the
        architecture; its ``n_layers`` is replaced by each depth in ``depths``, and models with at least
        ``deep_from`` layers also get ``clip=token_clip`` and ``lr=lr_deep``. Default: the ``vonoswald`` task
        (d = N = 10, x ~ U(-0.5, 0.5)), the query as a key (``include_query=True``: needed for fine-tuning W_K, W_V
        of a zero-shot copy to do anything), 4000 steps of 512 tasks, lr 1e-3, seeds 0-4 (trained together).
      depths: layers K of the trained deep LSA models, one model per depth. Default (2, 3, 5).
      deep_from: depth (layers) from which a model is trained with ``lr_deep`` and token clipping. Default 3.
      lr_deep: training learning rate of the deep models (the reference paper's 5e-4). Default 5e-4.
      token_clip: token-value clip of the deep models (None: no clipping). Default 10.
      eval_tasks: held-out evaluation tasks, the pairs of the paired tests (tasks). Default 500.
      tune_tasks: tasks for tuning the fine-tuning step sizes and GD's eta (tasks). Default 250.
      untrained_control: also run the protocol (standard fine-tuning, every parametrisation and step count) on each
        seed's untrained initialisation, the control of "In-context Learning and Gradient Descent Revisited".
        Default True.
      ft_steps: numbers of fine-tuning GD steps (steps). Default (1, 10).
      lr_grid: candidate fine-tuning step sizes (log-spaced). Default 10^(-1 .. 3), 9 values.
    """

    train: TrainConfig = TrainConfig(
        task=TASK_PRESETS["vonoswald"], model=ModelConfig(dim=10, n_layers=2, include_query=True), batch_size=512,
        n_steps=4000, lr=1e-3, seeds=(0, 1, 2, 3, 4), chunk_steps=250, checkpoint_every=1000)
    depths: tuple[int, ...] = (2, 3, 5)
    deep_from: int = 3
    lr_deep: float = 5e-4
    token_clip: float | None = 10.0
    eval_tasks: int = 500
    tune_tasks: int = 250
    untrained_control: bool = True
    ft_steps: tuple[int, ...] = (1, 10)
    lr_grid: tuple[float, ...] = dataclasses.field(default_factory=_default_lr_grid)

    def __post_init__(self):
        for name in ("depths", "ft_steps", "lr_grid"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} must hold at least one value")
        for k in self.depths:
            check_int("depths[i]", k, min_value=1)
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths must be different numbers of layers, got {list(self.depths)}")
        for s in self.ft_steps:
            check_int("ft_steps[i]", s, min_value=1)
        for lr in self.lr_grid:
            check_float("lr_grid[i]", lr, min_value=0.0, strict_min=True)
        check_int("deep_from", self.deep_from, min_value=1)
        check_float("lr_deep", self.lr_deep, min_value=0.0, strict_min=True)
        if self.token_clip is not None:
            check_float("token_clip", self.token_clip, min_value=0.0, strict_min=True)
        check_int("eval_tasks", self.eval_tasks, min_value=1)
        check_int("tune_tasks", self.tune_tasks, min_value=1)
        if self.train.model.attention != "linear" or self.train.model.mlp or self.train.model.layer_norm:
            raise ValueError("train.model must be linear attention without MLP or LayerNorm (the fine-tuned zero-shot "
                             "copies are attention-only linear layers)")

    def replace(self, **changes) -> "CausalConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "CausalConfig":
        """A CI-sized version: one depth (2), 100 steps of 128 tasks, the first 2 seeds, 150 tasks, 2 fine-tuning
        steps, 4 step sizes."""
        t = self.train.replace(n_steps=min(self.train.n_steps, 100), batch_size=min(self.train.batch_size, 128),
                               seeds=self.train.seeds[:2])
        return dataclasses.replace(self, train=t, depths=self.depths[:1], eval_tasks=150, tune_tasks=150,
                                   ft_steps=(2,), lr_grid=tuple(float(v) for v in np.logspace(-1, 2, 4)))

    def is_deep(self, k: int) -> bool:
        return k >= self.deep_from

    def train_for(self, k: int) -> TrainConfig:
        """The training config of the depth-``k`` model (``train`` with its model's depth, clip and lr set)."""
        model = self.train.model.replace(n_layers=k)
        if not self.is_deep(k):
            return self.train.replace(model=model)
        return self.train.replace(model=model.replace(clip=self.token_clip), lr=self.lr_deep)


def compute(config: CausalConfig, run: Run) -> dict[str, Any]:
    """Train a model per depth (every seed), evaluate each seed and its untrained initialisation in float64, and the
    hand control; returns the metrics (see the module docstring)."""
    results = {}
    for k in config.depths:
        results[k] = train(config.train_for(k), run.dir / f"ckpt_{k}", progress=run.progress)
    run.save_arrays("arrays", **{f"losses/{k}": np.asarray(r.losses) for k, r in results.items()})
    seeds = list(config.train.seeds)

    task = config.train.task
    per_task: dict[str, list] = {str(k): [] for k in config.depths}
    with float64():  # tasks are drawn in float64 too
        tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, config.tune_tasks)
        test = sample(jax.random.PRNGKey(EVAL_SEED), task, config.eval_tasks)
        gd_eta = {k: tune_gd(tune_batch, k).eta for k in config.depths}
        per_seed: list[dict[str, Any]] = []
        untrained: list[dict[str, Any]] = []
        for i, seed in enumerate(seeds):
            row, row_u = {}, {}
            for k in config.depths:
                _progress(run, f"evaluating K = {k}, seed {seed}")
                e = _cached(run, f"{k}_seed{seed}", lambda k=k, i=i, seed=seed: CA.evaluate_model(
                    results[k].seed_params(i), tune_batch, test, gd_eta[k], ft_steps=config.ft_steps,
                    lr_grid=config.lr_grid, key=seed))
                per_task[str(k)].append(e.pop("_per_task"))
                row[str(k)] = e
                if config.untrained_control:
                    def untrained_eval(k=k, seed=seed):
                        init, _, _ = init_state(config.train_for(k).replace(seeds=(seed,)))
                        return CA.evaluate_model(jax.tree.map(lambda a: a[0], init), tune_batch, test, gd_eta[k],
                                                 ft_steps=config.ft_steps, lr_grid=config.lr_grid,
                                                 modes=("standard",), key=seed)

                    u = _cached(run, f"{k}_seed{seed}_untrained", untrained_eval)
                    u.pop("_per_task")
                    row_u[str(k)] = u
            per_seed.append(row)
            untrained.append(row_u)
        hand = {str(k): {"eta": gd_eta[k], **CA.hand_control(task.dim, k, gd_eta[k], test, task.n_context)}
                for k in config.depths}

    models: dict[str, Any] = {}
    for k in config.depths:
        entries = [s[str(k)] for s in per_seed]
        r = results[k]
        models[str(k)] = {**combine_seeds(entries), "train_seconds": r.train_seconds,
                          "tasks_per_second": r.tasks_per_second, "resumed_from_step": r.resumed_from,
                          "final_train_loss": float(np.mean(r.losses[:, -10:])), "seeds": seeds,
                          "per_seed": entries, "ci": _model_ci(entries)}
        if config.untrained_control:
            u_entries = [s[str(k)] for s in untrained]
            models[str(k)]["untrained"] = {**combine_seeds(u_entries), "per_seed": u_entries}
    cmp_ = CA.comparisons(models, per_task, config.ft_steps)
    means = {str(k): [CA.mean_simaou(s[str(k)], config.ft_steps) for s in per_seed] for k in config.depths}
    cmp_["mean_simaou_by_depth"] = {k: combine_seeds(v) for k, v in means.items()}
    cmp_["ci"] = {"mean_simaou_by_depth": {k: {col: mean_ci([r[col] for r in v]) for col in v[0]
                                               if not col.endswith("_undefined")} for k, v in means.items()}}
    headline = {}
    for k in config.depths:
        m = {col: ci for col, ci in cmp_["ci"]["mean_simaou_by_depth"][str(k)].items()}
        if config.untrained_control:
            m["untrained_model"] = mean_ci([CA.mean_simaou(s[str(k)], config.ft_steps)["standard"]
                                            for s in untrained])
            m["untrained_model_gd_steps"] = mean_ci([float(np.nanmean(s[str(k)]["gd_steps"]["simaou"]))
                                                     for s in untrained])
            m["untrained_model_simam_delta"] = mean_ci([CA.mean_simaou(s[str(k)], config.ft_steps)[
                "simam_delta_standard"] for s in untrained])
        headline[str(k)] = m
    return {"seeds": seeds, "n_seeds": len(seeds), "models": models, "hand_control": hand, "comparisons": cmp_,
            "headline": headline}


def _cached(run: Run, name: str, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``evaluate()`` once per run directory: its result is kept as ``eval_<name>.json`` (the per-task arrays as
    ``eval_<name>.npz``), so an interrupted run resumes after the last finished (depth, seed) evaluation."""
    path = run.dir / f"eval_{name}.json"
    if path.exists():
        entry = read_json(path)
        entry["_per_task"] = load_arrays(run.dir, f"eval_{name}")
        return entry
    entry = evaluate()
    per_task = entry.pop("_per_task")
    run.save_arrays(f"eval_{name}", **per_task)
    write_json(path, entry)
    entry["_per_task"] = per_task
    return entry


def _progress(run: Run, message: str) -> None:
    if run.progress:
        print(f"[causal] {message}", file=sys.stderr, flush=True)


def _model_ci(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """95% intervals over seeds: the ICL loss, and per layer SimAOU of the GD steps and of every fine-tuning run."""
    def per_layer(values: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        return [mean_ci(layer) for layer in zip(*values)]

    return {"icl_loss": mean_ci([e["icl_loss"] for e in entries]),
            "gd_steps_simaou": per_layer([e["gd_steps"]["simaou"] for e in entries]),
            "simaou": {key: per_layer([e["alignment"][key]["simaou"] for e in entries])
                       for key in entries[0]["alignment"]}}


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.causal import render

    return render(config, metrics, run_dir)


CAUSAL = Study("causal", "Trained deep linear self-attention models: is ICL's per-layer update of the query closer "
                         "to standard or to layer-causal fine-tuning, and to the explicit GD steps?",
               CausalConfig(), compute, _render)
