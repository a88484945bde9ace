"""Order sensitivity: does reordering the demonstrations move a predictor the way it moves causal in-context learning?

"Do pretrained Transformers Learn In-Context by Gradient Descent?" argues: if an algorithm A is equivalent to ICL,
reordering the demonstrations must change both by the same amount. Full-batch GD (and GD++) is exactly invariant to
the order; SGD with small batches and Adam on minibatches are not; ICL in a *causal* model is not.

On the same test tasks and the same P orderings for every predictor this study measures the **spread** across
orderings, the **relative spread** and the **order correlation** with each order-sensitive causal model (definitions
in :mod:`iclgd_synth.critiques.order`), and a sweep of the spread over the number of demonstrations N for the explicit
learners and the causal hand constructions.

Predictors: full-batch GD (1 step) and GD++; online SGD (batch 1, one pass in the given order, and several epochs)
and Adam (batch 1, several epochs) on the in-context loss, all step sizes tuned on separate tasks in their given
order; Transformers trained on the ICL objective: the non-causal reference model ``train.model`` (order-invariant by
construction), causal LSAs of 2+ layers and a causal softmax model (a 1-layer causal model would be invariant: the
query sees every key); the hand-constructed GD weights run with a causal mask
(:func:`iclgd_synth.constructions.causal_hand_params`), their step size tuned for the causal model itself.

Headline (``headline``, per order-sensitive causal model): its order correlation with one-pass SGD beside two nulls,
SGD's order effects re-paired at random within each task and an order-sensitive learner with another update rule
(Adam), and its correlation with SGD's closed-form second-order order term Q
(:func:`iclgd_synth.critiques.order.sgd_order_term`), which is the whole order dependence of the 2-layer causal hand
model (checked on the test tasks: ``closed_form``). The invariance checks (``checks``) and the closed-form check hold
by construction: they test the code, not ICL.

Every trained model is trained for every seed of ``train.seeds`` (vmapped) and evaluated per seed: its numbers are
means over seeds with a 95% interval (``ci``). The explicit learners and the hand constructions do not depend on the
training seed (their tuning and test tasks are drawn from fixed keys), so they are evaluated once. Everything is
evaluated in float64 (trained parameters are cast), so "invariant" means a spread at rounding level.

Science only: :func:`compute` returns the metrics and saves the training curves; the report and figures are rendered
by :mod:`iclgd_synth.reports.order`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from iclgd_synth.constructions import causal_hand_params
from iclgd_synth.critiques.order import (adam_name, order_correlation, order_spread, ordered_order_terms,
                                         ordered_predictions, random_orderings, sgd_name, shuffled_correlation,
                                         tune_adam, tune_causal_hand, tune_sgd, tuned_learners)
from iclgd_synth.intervals import mean_ci
from iclgd_synth.learners import SGD, Adam, GD, tune_gd
from iclgd_synth.model import ModelConfig, TransformerParams
from iclgd_synth.precision import float64, to_float64
from iclgd_synth.studies.protocol import Run, Study
from iclgd_synth.tasks import TaskConfig, sample
from iclgd_synth.train import TrainConfig, train
from iclgd_synth.validation import check_int

TUNE_SEED, EVAL_SEED, PERM_SEED = 3_000_017, 4_000_037, 5_000_011
GD_NAME = "GD (full batch, 1 step)"


@dataclasses.dataclass(frozen=True)
class OrderConfig:
    """Settings of the order-sensitivity study.

    Attributes:
      train: training of every model (AdamW, clip 10): its task law is also the test law; ``train.model`` is the
        non-causal reference model; its seeds are the study's seeds. Default: d = 10, N = 8, x ~ U(-0.5, 0.5),
        noiseless; a 1-layer LSA; 4000 steps of 512 tasks, lr 1e-3, seeds 0-4 (trained together).
      n_orderings: P, orderings per test task (the same for every predictor). Default 10.
      n_tasks: test tasks. Default 2000.
      tune_tasks: tasks for tuning the learners' step sizes (separate from the test tasks). Default 2000.
      n_sweep: context sizes N of the sweep (explicit learners and causal hand constructions). Default (4, 8, 16, 32).
      sweep_tasks: test tasks per N in the sweep. Default 1000.
      causal_depths: layers of the trained causal LSAs, one model each. Default (2, 3).
      softmax_depth: layers of the trained causal softmax model. Default 2.
      softmax_heads: heads of the trained causal softmax model. Default 2.
      hand_depths: layers of the causal hand constructions, one each. Default (1, 2, 3).
      sgd_epochs: passes of the online SGD learners (batch 1), one learner each. Default (1, 5).
      adam_epochs: passes of Adam (batch 1). Default 5.
      gdpp_steps: steps of GD++. Default 2.
    """

    train: TrainConfig = TrainConfig(task=TaskConfig(dim=10, n_context=8), model=ModelConfig(dim=10),
                                     batch_size=512, n_steps=4000, lr=1e-3, seeds=(0, 1, 2, 3, 4), chunk_steps=250,
                                     checkpoint_every=1000)
    n_orderings: int = 10
    n_tasks: int = 2000
    tune_tasks: int = 2000
    n_sweep: tuple[int, ...] = (4, 8, 16, 32)
    sweep_tasks: int = 1000
    causal_depths: tuple[int, ...] = (2, 3)
    softmax_depth: int = 2
    softmax_heads: int = 2
    hand_depths: tuple[int, ...] = (1, 2, 3)
    sgd_epochs: tuple[int, ...] = (1, 5)
    adam_epochs: int = 5
    gdpp_steps: int = 2

    def __post_init__(self):
        m = self.train.model
        if m.causal or m.attention != "linear":
            raise ValueError("train.model is the non-causal reference model and must be linear attention without a "
                             f"causal mask (got attention={m.attention!r}, causal={m.causal}); the causal models are "
                             "set by causal_depths, softmax_depth and softmax_heads")
        check_int("n_orderings", self.n_orderings, min_value=2)
        check_int("n_tasks", self.n_tasks, min_value=2)
        check_int("tune_tasks", self.tune_tasks, min_value=1)
        check_int("sweep_tasks", self.sweep_tasks, min_value=2)
        check_int("softmax_depth", self.softmax_depth, min_value=1)
        check_int("softmax_heads", self.softmax_heads, min_value=1)
        check_int("adam_epochs", self.adam_epochs, min_value=1)
        check_int("gdpp_steps", self.gdpp_steps, min_value=1)
        for name, min_value, allow_empty in (("n_sweep", 2, False), ("causal_depths", 1, True),
                                             ("hand_depths", 1, False), ("sgd_epochs", 1, False)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values and not allow_empty:
                raise ValueError(f"{name} must hold at least one integer >= {min_value}")
            for v in values:
                check_int(f"{name}[i]", v, min_value=min_value)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must hold different integers, got {list(values)}")

    def replace(self, **changes) -> "OrderConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "OrderConfig":
        """A CI-sized version: 100 steps of 128 tasks, the first 2 seeds, 300 tasks, fewer models (same code)."""
        t = self.train.replace(n_steps=min(self.train.n_steps, 100), batch_size=min(self.train.batch_size, 128),
                               seeds=self.train.seeds[:2], chunk_steps=min(self.train.chunk_steps, 100),
                               checkpoint_every=100)
        return dataclasses.replace(self, train=t, n_tasks=300, tune_tasks=300, n_sweep=(4, 8), sweep_tasks=200,
                                   causal_depths=(2,), hand_depths=(1, 2), sgd_epochs=(1, 3), adam_epochs=3)

    def models(self) -> dict[str, ModelConfig]:
        """Label -> architecture of every trained model (each trained with ``train``'s settings)."""
        m = self.train.model
        out = {f"LSA, non-causal, {m.n_layers} layer{'s' * (m.n_layers > 1)} (trained)": m}
        for k in self.causal_depths:
            out[f"LSA, causal, {k} layer{'s' * (k > 1)} (trained)"] = m.replace(n_layers=k, causal=True)
        label = f"softmax, causal, {self.softmax_depth} layers, {self.softmax_heads} heads (trained)"
        out[label] = m.replace(n_layers=self.softmax_depth, n_heads=self.softmax_heads, attention="softmax",
                               causal=True)
        return out


def hand_name(k: int) -> str:
    return f"hand GD, causal, {k} layer{'s' * (k > 1)}"


def compute(config: OrderConfig, run: Run) -> dict[str, Any]:
    """Train every model for every seed (checkpoints under ``run.dir``), tune the learners, measure the spreads,
    order correlations and the N sweep in float64; returns the metrics (see the module docstring)."""
    trained: dict[str, list[TransformerParams]] = {}
    train_rows: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for i, (label, model) in enumerate(config.models().items()):
        cfg = config.train.replace(model=model)
        result = train(cfg, run.dir / f"ckpt_{i}", progress=run.progress)
        n_seeds = len(cfg.seeds)
        trained[label] = [result.seed_params(s) for s in range(n_seeds)]
        final = [float(np.mean(result.losses[s, -50:])) for s in range(n_seeds)]
        train_rows[label] = {"train_seconds": result.train_seconds, "final_train_loss": float(np.mean(final)),
                             "final_train_loss_ci": mean_ci(final)}
        arrays[f"losses/{label}"] = np.asarray(result.losses)
    run.save_arrays("arrays", **arrays)

    with float64():
        metrics = _evaluate(config, trained)
    for label, info in train_rows.items():
        row = metrics["predictors"][label]
        row["ci"]["final_train_loss"] = info.pop("final_train_loss_ci")
        row.update(info)
    return {"seeds": list(config.train.seeds), "n_seeds": len(config.train.seeds), **metrics}


def _evaluate(config: OrderConfig, trained: Mapping[str, Sequence[TransformerParams]]) -> dict[str, Any]:
    """Spreads, correlations, checks and the N sweep (call under float64). ``trained``: label -> params per seed."""
    task = config.train.task
    d, n = task.dim, task.n_context
    tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, config.tune_tasks)
    test = sample(jax.random.PRNGKey(EVAL_SEED), task, config.n_tasks)
    perms = random_orderings(jax.random.PRNGKey(PERM_SEED), config.n_tasks, n, config.n_orderings)

    t0 = time.perf_counter()
    learners, hyper = tuned_learners(tune_batch, config.sgd_epochs, config.adam_epochs, config.gdpp_steps)
    tune_seconds = time.perf_counter() - t0
    hand_eta = {k: tune_causal_hand(tune_batch, k) for k in config.hand_depths}
    hand_eta_noncausal = {k: tune_gd(tune_batch, k).eta for k in config.hand_depths}
    hand = {}
    for k in config.hand_depths:
        hand[hand_name(k)], hyper[hand_name(k)] = causal_hand_params(d, hand_eta[k], k, n), {"eta": hand_eta[k]}

    # Predictions per predictor: one array for a seed-independent predictor, one per seed for a trained model.
    preds: dict[str, list[np.ndarray]] = {}
    for name, f in learners.items():
        preds[name] = [ordered_predictions(f, test, perms)]
    for label, params_S in trained.items():
        preds[label] = [ordered_predictions(to_float64(p), test, perms) for p in params_S]
    for name, f in hand.items():
        preds[name] = [ordered_predictions(f, test, perms)]
    seeded = set(trained)

    y_q = np.asarray(test.y_query, np.float64)
    rows: dict[str, dict[str, Any]] = {}
    for name, p_S in preds.items():
        per_seed = [_spread_row(p, y_q) for p in p_S]
        rows[name] = _over_seeds(per_seed) if name in seeded else per_seed[0]
        rows[name].update(hyper.get(name, {}))
    references = [m for m in preds if "causal" in m and "non-causal" not in m and rows[m]["relative_spread"] > 1e-8]
    correlations = {ref: {name: _correlation(preds[ref], p_S, seeded=ref in seeded or name in seeded)
                          for name, p_S in preds.items()} for ref in references}
    q = ordered_order_terms(test, perms)
    headline = _headline(config, preds, references, seeded, q)
    closed_form = {"sgd_vs_second_order_term": order_correlation(preds[sgd_name(config.sgd_epochs[0])][0], q)}
    if 2 in config.hand_depths:
        # Implementation check: the 2-layer causal hand model's order effects are exactly (eta/N)^2 times those of Q.
        dev = lambda a: a - a.mean(1, keepdims=True)  # noqa: E731
        dh, dq = dev(preds[hand_name(2)][0]), dev(q) * (hand_eta[2] / n) ** 2
        closed_form["causal_hand_2_order_effects_minus_closed_form"] = {
            "max_abs_error": float(np.abs(dh - dq).max()), "scale": float(np.abs(dh).max())}
    sweep = _sweep(config, rows)
    return {"predictors": rows, "correlations": correlations, "references": references, "headline": headline,
            "closed_form": closed_form,
            "sweep": {"n_context": list(config.n_sweep), "predictors": sweep}, "checks": _checks(rows),
            "hand_eta": {str(k): v for k, v in hand_eta.items()},
            "hand_eta_noncausal_gd": {str(k): v for k, v in hand_eta_noncausal.items()}, "tune_seconds": tune_seconds}


def _spread_row(preds_BxP: np.ndarray, y_q: np.ndarray) -> dict[str, float]:
    s = order_spread(preds_BxP)
    return {"spread": s["spread"], "relative_spread": s["relative"], "scale": s["scale"],
            "max_task_spread": float(s["per_task"].max()),
            "loss": float(np.mean(0.5 * (preds_BxP - y_q[:, None]) ** 2))}


def _over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Each number as its mean over seeds (one seed: the value itself), with a 95% interval in ``ci``."""
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    out["ci"] = {k: mean_ci([r[k] for r in per_seed]) for k in per_seed[0]}
    return out


def _correlation(a_S: Sequence[np.ndarray], b_S: Sequence[np.ndarray], *, seeded: bool) -> dict[str, Any]:
    """:func:`order_correlation` per seed (a seed-independent predictor pairs with every seed of the other).

    One seed: that seed's result. Several: ``mean`` over seeds (seeds where it is undefined left out), ``sem`` the
    task-sampling error within a seed averaged over seeds, ``n`` / ``n_undefined`` counted over all (task, seed)
    pairs; ``ci`` (when a trained model is involved) is the interval of the per-seed means."""
    n_seeds = max(len(a_S), len(b_S))
    per = [order_correlation(a_S[min(s, len(a_S) - 1)], b_S[min(s, len(b_S) - 1)]) for s in range(n_seeds)]
    ci = mean_ci([c["mean"] for c in per])
    if n_seeds == 1:
        out: dict[str, Any] = dict(per[0])
    else:
        sems = [c["sem"] for c in per if np.isfinite(c["sem"])]
        out = {"mean": ci["mean"], "sem": float(np.mean(sems)) if sems else float("nan"),
               "n": sum(c["n"] for c in per), "n_undefined": sum(c["n_undefined"] for c in per)}
    if seeded:
        out["ci"] = ci
    return out


def _headline(config: OrderConfig, preds: Mapping[str, Sequence[np.ndarray]], references: Sequence[str],
              seeded: set, q_BxP: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per order-sensitive causal model: its order correlation with one-pass SGD (batch 1, the first of
    ``sgd_epochs``) beside the nulls and the analytic reference, each per seed with a 95% interval over seeds:

    - ``"sgd"``: the correlation with SGD's order effects;
    - ``"second_order_term"``: with SGD's closed-form second-order order term Q (:func:`sgd_order_term`; the only
      order-dependent part of the 2-layer causal hand model, so 1 there by construction);
    - ``"shuffled_pairing"``: with SGD's order effects re-paired at random within each task (expected 0);
    - ``"unrelated_learner"``: with Adam (batch 1), an order-sensitive learner unrelated to GD's update rule."""
    sgd = sgd_name(config.sgd_epochs[0])
    adam = adam_name(config.adam_epochs)
    out: dict[str, dict[str, Any]] = {}
    for ref in references:
        a_S = preds[ref]
        n = len(a_S)
        per = {"sgd": [order_correlation(a, preds[sgd][0])["mean"] for a in a_S],
               "second_order_term": [order_correlation(a, q_BxP)["mean"] for a in a_S],
               "shuffled_pairing": [shuffled_correlation(a, preds[sgd][0], jax.random.fold_in(
                   jax.random.PRNGKey(PERM_SEED + 1), s))["mean"] for s, a in enumerate(a_S)],
               "unrelated_learner": [order_correlation(a, preds[adam][0])["mean"] for a in a_S]}
        out[ref] = {k: mean_ci(v) for k, v in per.items()}
        out[ref].update(sgd_name=sgd, unrelated_learner_name=adam, seeded=ref in seeded, n_seeds=n)
    return out


def _sweep(config: OrderConfig, rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """Spread against N: explicit learners (re-tuned at every N) and the 2+-layer causal hand constructions."""
    task = config.train.task
    d, n = task.dim, task.n_context
    names = ([GD_NAME] + [sgd_name(e) for e in config.sgd_epochs] + [adam_name(config.adam_epochs)]
             + [hand_name(k) for k in config.hand_depths if k > 1])
    sweep: dict[str, dict[str, list]] = {name: {"relative_spread": [], "spread": [], "loss": []} for name in names}
    for n_ctx in config.n_sweep:
        if n_ctx == n:  # the main test set: reuse its numbers
            for name in names:
                for key in ("relative_spread", "spread", "loss"):
                    sweep[name][key].append(rows[name][key])
            continue
        t_n = task.replace(n_context=n_ctx)
        tb = sample(jax.random.PRNGKey(TUNE_SEED + n_ctx), t_n, config.tune_tasks)
        eb = sample(jax.random.PRNGKey(EVAL_SEED + n_ctx), t_n, config.sweep_tasks)
        pm = random_orderings(jax.random.PRNGKey(PERM_SEED + n_ctx), config.sweep_tasks, n_ctx, config.n_orderings)
        preds_n: dict[str, Any] = {GD_NAME: GD(eta=tune_gd(tb, 1).eta, steps=1)}
        for e in config.sgd_epochs:
            preds_n[sgd_name(e)] = SGD(eta=tune_sgd(tb, e), epochs=e, batch_size=1)
        preds_n[adam_name(config.adam_epochs)] = Adam(lr=tune_adam(tb, config.adam_epochs),
                                                      epochs=config.adam_epochs, batch_size=1)
        for k in config.hand_depths:
            if k > 1:
                preds_n[hand_name(k)] = causal_hand_params(d, tune_causal_hand(tb, k), k, n_ctx)
        y_q = np.asarray(eb.y_query, np.float64)
        for name, f in preds_n.items():
            row = _spread_row(ordered_predictions(f, eb, pm), y_q)
            for key in ("relative_spread", "spread", "loss"):
                sweep[name][key].append(row[key])
    return sweep


def _checks(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The claims the study rests on, as measured numbers with pass/fail (float64 evaluation). A claim about a
    trained model holds when it holds for every seed (``per_seed``); ``relative_spread`` is the mean over seeds."""
    out = {}

    def add(claim, name, ok):
        if name not in rows:
            return
        r = rows[name]
        values = r["ci"]["relative_spread"]["values"] if "ci" in r else [r["relative_spread"]]
        out[claim] = {"predictor": name, "relative_spread": r["relative_spread"],
                      "holds": bool(all(ok(v) for v in values))}
        if "ci" in r:
            out[claim]["per_seed"] = values

    add("full-batch GD is order-invariant (relative spread < 1e-12)", GD_NAME, lambda v: v < 1e-12)
    for name in rows:
        if name.startswith("GD++"):
            add("GD++ is order-invariant (relative spread < 1e-12)", name, lambda v: v < 1e-12)
        if name.startswith("SGD (batch 1, 1 epoch"):
            add("online SGD is order-sensitive (relative spread > 1e-3)", name, lambda v: v > 1e-3)
        if name.startswith("LSA, non-causal"):
            add("the non-causal trained LSA is order-invariant (relative spread < 1e-12)", name, lambda v: v < 1e-12)
        if name == hand_name(1):
            add("a 1-layer causal hand model is order-invariant (relative spread < 1e-12)", name, lambda v: v < 1e-12)
        if name == hand_name(2):
            add("a 2-layer causal hand model is order-sensitive (relative spread > 1e-3)", name, lambda v: v > 1e-3)
    return out


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.order import render

    return render(config, metrics, run_dir)


ORDER = Study("order", "Order sensitivity of full-batch GD, GD++, online SGD, Adam, trained Transformers (non-causal "
              "and causal) and causal hand-constructed GD models: the spread of their predictions across orderings "
              "of the demonstrations and how their order effects correlate with a causal model's.",
              OrderConfig(), compute, _render)
