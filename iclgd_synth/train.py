"""Training Transformers on the in-context regression objective.

Loss: half-MSE of the query prediction, 0.5 * mean (y_hat - y_q)^2, on fresh tasks every step
("Transformers learn in-context by gradient descent", section 4). The optimiser is AdamW (b1 0.9, b2 0.98, no
weight decay by default) behind global-norm gradient clipping.

Speed and reproducibility:
- on accelerators, whole chunks of ``chunk_steps`` steps are one jit-compiled ``lax.scan``; on CPU, one jitted step
  per call (:func:`step_loop`), each step's tasks drawn on every host device at once when the CPU is split into
  several (:func:`sharded_step_loop`, the same numbers bit for bit); either way tasks are sampled from
  ``fold_in(data_key, step)`` (task i from ``fold_in`` of that, :mod:`iclgd_synth.rng`), so step s always sees the
  same tasks, whatever the chunking, the batch's device or interruptions;
- several seeds train at once under ``vmap`` (leading seed axis S on every parameter);
- checkpoints (parameters, optimiser state, per-step losses, cumulative training seconds) are written atomically
  every ``checkpoint_every`` steps and on Ctrl-C; ``train`` resumes from the last one and reaches the identical
  result, and its reported training time covers every step, before and after the interruption;
- a non-finite loss stops training with :class:`TrainingDiverged`, naming the step and what to change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iclgd_synth import rng
from iclgd_synth.config import NO_HASH, hash_dict
from iclgd_synth.losses import half_mse
from iclgd_synth.gpt import GPTConfig, gpt_loss, init_gpt
from iclgd_synth.model import ModelConfig, TransformerParams, init_params, predict
from iclgd_synth.tasks import TASK_PRESETS, TaskConfig, sample, sample_bytes, pool_bytes
from iclgd_synth.storage import CheckpointError, load_checkpoint as _load_tree, save_checkpoint as _save_tree
from iclgd_synth.storage import stable_hash, write_bytes_atomic
from iclgd_synth.validation import check_choice, check_float, check_int, check_memory, warn_slow_compile

SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_constant")
OBJECTIVES = ("icl", "next_token")


class TrainingDiverged(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and its run-directory hash).

    Attributes:
      task: how tasks are drawn (:class:`TaskConfig`). Default: the ``vonoswald`` preset (d = N = 10).
      model: the architecture (:class:`ModelConfig`). Default: 1 linear-attention layer.
      batch_size: tasks per step. Default 2048.
      n_steps: optimiser steps. Default 5000.
      lr: peak learning rate. Default 1e-3 (the reference paper uses 5e-4 for depth >= 3).
      b1, b2: Adam moment decay rates, each in [0, 1) (at 1 Adam's bias correction divides by 0). Default 0.9,
        0.98.
      weight_decay: AdamW decoupled weight decay. Default 0.
      clip_norm: global gradient-norm clip; None disables. Default 10 (the paper's text; its code uses 1e-3).
      schedule: "constant", "cosine" (decay to 0 at ``n_steps``), "warmup_cosine" (linear warm-up from 0 to ``lr``
        over ``warmup_steps``, then cosine decay to 0 at ``n_steps``) or "warmup_constant" (the same warm-up, then
        ``lr`` to the end: for studies of late training, e.g. transience). Default "constant".
      warmup_steps: linear warm-up length in steps; only for the two "warmup_*" schedules, where it must be in
        [0, n_steps - 1] (0: no warm-up). Default 0.
      seeds: seeds trained together under vmap (init and data differ per seed): a tuple of different integers
        >= 0, e.g. (0, 1, 2). Default (0,).
      objective: what the loss reads: "icl" (the query only: the reference paper's in-context objective) or
        "next_token" (every label y_i predicted from its prefix, averaged over positions, as the GPT-style regression
        testbeds train; needs a :class:`~iclgd_synth.gpt.GPTConfig` model). Default "icl".
      chunk_steps: steps per jit-compiled scan chunk (progress and divergence checks happen between chunks); does
        not change results, so it is not part of the hash. Default 250.
      checkpoint_every: steps between checkpoints (rounded up to whole chunks); not part of the hash. Default 2500.
    """

    task: TaskConfig = TASK_PRESETS["vonoswald"]
    model: ModelConfig | GPTConfig = ModelConfig()
    batch_size: int = 2048
    n_steps: int = 5000
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.0
    clip_norm: float | None = 10.0
    schedule: str = "constant"
    warmup_steps: int = 0
    seeds: tuple[int, ...] = (0,)
    objective: str = "icl"
    chunk_steps: int = dataclasses.field(default=250, metadata=NO_HASH)
    checkpoint_every: int = dataclasses.field(default=2500, metadata=NO_HASH)

    def __post_init__(self):
        if not isinstance(self.task, TaskConfig):
            hint = (f"; for the preset write task=TASK_PRESETS[{self.task!r}]" if self.task in TASK_PRESETS else
                    f"; presets: TASK_PRESETS[name] for name in {sorted(TASK_PRESETS)}")
            raise TypeError(f"task must be an iclgd_synth.TaskConfig, got {self.task!r} of type "
                            f"{type(self.task).__name__}{hint}")
        check_int("batch_size", self.batch_size, min_value=1)
        check_int("n_steps", self.n_steps, min_value=1)
        check_float("lr", self.lr, min_value=0.0, strict_min=True)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            check_float(name, value)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (a moment decay rate: at 1 Adam never updates its "
                                 f"estimate and its bias correction divides by 0), got {value!r}")
        check_float("weight_decay", self.weight_decay, min_value=0.0)
        if self.clip_norm is not None:
            check_float("clip_norm", self.clip_norm, min_value=0.0, strict_min=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.schedule.startswith("warmup_"):
            # optax needs a positive decay phase after the warm-up ("requires positive decay_steps"); a warm-up as
            # long as the training would never reach lr.
            w = check_int("warmup_steps", self.warmup_steps, min_value=0)
            if w >= self.n_steps:
                raise ValueError(f"warmup_steps must be in [0, n_steps - 1] = [0, {self.n_steps - 1}] for "
                                 f"schedule={self.schedule!r} (at least one step after the warm-up), got {w}")
        elif check_int("warmup_steps", self.warmup_steps, min_value=0) > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) only applies to schedule='warmup_cosine' or "
                             f"'warmup_constant' (in [0, n_steps - 1]); got schedule={self.schedule!r}")
        if isinstance(self.seeds, (str, bytes)) or not hasattr(self.seeds, "__iter__"):
            raise TypeError(f"seeds must be a sequence of different integers >= 0 such as (0, 1, 2), got "
                            f"{self.seeds!r}" + (f"; for {self.seeds} seeds write seeds=tuple(range({self.seeds}))"
                                                 if isinstance(self.seeds, int) and self.seeds > 0 else ""))
        if not isinstance(self.seeds, tuple) or not self.seeds:
            object.__setattr__(self, "seeds", tuple(self.seeds) if self.seeds else ())
            if not self.seeds:
                raise ValueError("seeds must be a non-empty sequence of integers >= 0")
        for s in self.seeds:
            check_int("seeds[i]", s, min_value=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be different integers (a repeated seed trains the same model twice), got "
                             f"{list(self.seeds)}")
        check_int("chunk_steps", self.chunk_steps, min_value=1)
        check_int("checkpoint_every", self.checkpoint_every, min_value=1)
        if not isinstance(self.model, (ModelConfig, GPTConfig)):
            raise TypeError(f"model must be a ModelConfig (linear/softmax attention on (x, y) tokens) or a GPTConfig "
                            f"(GPT-style regression model), got {type(self.model).__name__}")
        check_choice("objective", self.objective, OBJECTIVES)
        if self.objective == "next_token" and not isinstance(self.model, GPTConfig):
            raise ValueError("objective='next_token' needs a GPT-style model (model=GPTConfig(...)): the (x, y)-token "
                             "models predict the query only")
        if isinstance(self.model, GPTConfig) and self.model.n_context < self.task.n_context:
            raise ValueError(f"model.n_context ({self.model.n_context}) must be at least task.n_context "
                             f"({self.task.n_context}): the GPT model's positions cover 2 N + 1 tokens")
        if self.model.dim != self.task.dim or self.model.out_dim != self.task.out_dim:
            raise ValueError(f"model.dim/out_dim ({self.model.dim}, {self.model.out_dim}) must match task.dim/out_dim "
                             f"({self.task.dim}, {self.task.out_dim})")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of the fields that change results (names run directories and guards resumption)."""
        return stable_hash(hash_dict(self))

    def compute_key(self) -> "TrainConfig":
        """This config with the fields that do not change the compiled step set to fixed values: the seeds (traced
        data), the chunking and checkpointing, and n_steps when the learning rate does not depend on it."""
        n = {"constant": 1, "warmup_constant": self.warmup_steps + 1}.get(self.schedule, self.n_steps)
        return dataclasses.replace(self, n_steps=n, seeds=(0,), chunk_steps=1, checkpoint_every=1)


@dataclasses.dataclass
class TrainResult:
    """Trained parameters (leading seed axis S), per-step training losses (S, n_steps) and timings.

    ``train_seconds`` is the time spent in training chunks (compilation of the first chunk included) over the
    ``timed_steps`` steps it covers: all steps done so far, also across interruptions (the checkpoint carries the time
    of the steps before it); only a checkpoint written before that was recorded covers fewer.
    """

    config: TrainConfig
    params: TransformerParams
    losses: np.ndarray
    train_seconds: float
    resumed_from: int = 0
    timed_steps: int | None = None

    def __post_init__(self):
        if self.timed_steps is None:
            self.timed_steps = self.config.n_steps

    def seed_params(self, i: int = 0) -> TransformerParams:
        """Parameters of the i-th seed (no seed axis)."""
        return jax.tree.map(lambda a: a[i], self.params)

    @property
    def tasks_per_second(self) -> float:
        """Training throughput over the timed steps, all seeds counted; NaN when no step was timed."""
        if not self.timed_steps or self.train_seconds <= 0:
            return float("nan")
        return self.timed_steps * self.config.batch_size * len(self.config.seeds) / self.train_seconds


def learning_rate_schedule(config: TrainConfig) -> Callable[[Any], Any]:
    """The learning rate as a function of the step (0-based), as the optimiser applies it."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, config.n_steps)
    if config.schedule == "warmup_constant":
        if config.warmup_steps == 0:
            return optax.constant_schedule(config.lr)
        return optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.n_steps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW behind optional global-norm clipping, with the configured learning-rate schedule."""
    lr: Any = config.lr if config.schedule == "constant" else learning_rate_schedule(config)
    adam = optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    if config.clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


def loss_fn(params: TransformerParams, batch) -> jax.Array:
    """Half-MSE of the query prediction (only the query token is computed in the last layer)."""
    return half_mse(predict(params, batch), batch.y_query)


def objective_loss(config: TrainConfig) -> Callable:
    """The training loss ``(params, batch) -> scalar`` of ``config``'s model and objective."""
    if isinstance(config.model, GPTConfig):
        return functools.partial(gpt_loss, objective=config.objective)
    return loss_fn


def init_model(key: jax.Array, model: ModelConfig | GPTConfig):
    """Initial parameters of either kind of model."""
    return init_gpt(key, model) if isinstance(model, GPTConfig) else init_params(key, model)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, data key) of a seed: ``fold_in(PRNGKey(seed), 0)`` and ``fold_in(PRNGKey(seed), 1)``."""
    root = rng.seed_key(seed)
    return rng.derive(root, 0), rng.derive(root, 1)


def make_step(config: TrainConfig, optimizer: optax.GradientTransformation) -> Callable:
    """One optimiser step for one seed: (params, opt_state, data_key, step) -> (params, opt_state, loss)."""

    update = _update_fn(config, optimizer)

    def step_fn(params, opt_state, data_key, step):
        return update(params, opt_state, step_tasks(config.task, data_key, step, config.batch_size))

    return step_fn


def step_tasks(task: TaskConfig, data_key: jax.Array, step: Any, size: int, first: int = 0):
    """The tasks of training step ``step``: rows ``first`` .. ``first + size - 1`` of the batch drawn from
    ``fold_in(data_key, step)``."""
    return sample(jax.random.fold_in(data_key, step), task, size, first=first)


def _update_fn(config: TrainConfig, optimizer: optax.GradientTransformation) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, loss): one optimiser step on ``batch`` for one seed."""

    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(objective_loss(config))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return update


def make_chunk(config: TrainConfig, optimizer: optax.GradientTransformation, n: int) -> Callable:
    """``n`` steps for all seeds as one compiled scan: (params_S, opt_S, keys_S, start) -> (..., losses_Sxn)."""
    step_fn = vmapped_step(config, optimizer)

    @jax.jit
    def chunk(params, opt_state, data_keys, start):
        def body(carry, step):
            p, o = carry
            p, o, loss = step_fn(p, o, data_keys, step)
            return (p, o), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), start + jnp.arange(n))
        return params, opt_state, losses.T

    return chunk


def vmapped_step(config: TrainConfig, optimizer: optax.GradientTransformation) -> Callable:
    """:func:`make_step` for all seeds at once: (params_S, opt_S, keys_S, step) -> (params_S, opt_S, losses_S)."""
    return jax.vmap(make_step(config, optimizer), in_axes=(0, 0, 0, None))


def step_loop(step: Callable, n: int) -> Callable:
    """``n`` calls of a jitted ``step`` from Python, with the signature and result of a :func:`make_chunk` chunk.

    The form used on CPU with one device (with several, :func:`sharded_step_loop`). On the 2-core development machine
    it was faster than a scan in some states of the machine (1.25M against 0.84M tasks/s for the ``vonoswald``
    preset) and as fast in others (0.84M against 0.84M, ``iclgd bench``: "per-step calls" vs "scan-jitted chunks");
    it is also the form that lets several host devices work at once. Dispatch is asynchronous, so Python waits only
    when the losses are read. Accelerators keep the scan, which saves a dispatch per step."""

    def chunk(params, opt_state, data_keys, start):
        losses = []
        for i in range(n):
            params, opt_state, loss = step(params, opt_state, data_keys, start + i)
            losses.append(loss)
        return params, opt_state, jnp.stack(losses, axis=1)

    return chunk


def update_step(config: TrainConfig, optimizer: optax.GradientTransformation) -> Callable:
    """One optimiser step on a batch given in parts (for all seeds): (params_S, opt_S, parts) -> (params_S, opt_S,
    losses_S), ``parts`` a tuple of TaskBatches (leading axes S x B_part), concatenated over tasks in order. With the
    parts of :func:`make_step`'s batch, the same step (bit for bit; tested)."""

    update = _update_fn(config, optimizer)

    def step_fn(params, opt_state, parts):
        batch = jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if len(parts) > 1 else parts[0]
        return update(params, opt_state, batch)

    return jax.vmap(step_fn)


#: Tasks per device below which drawing a step's tasks on several devices is not worth the transfers.
MIN_TASKS_PER_DEVICE = 256


def task_parts(batch_size: int, n_devices: int) -> tuple[tuple[int, int], ...]:
    """(first task, number of tasks) drawn by each device in :func:`sharded_step_loop`: device 0, which also runs
    the update, draws half a share, every other device a full share (all tasks, in order). At most one device per
    CPU core and :data:`MIN_TASKS_PER_DEVICE` tasks per device."""
    n = max(1, min(n_devices, os.cpu_count() or 1, batch_size // MIN_TASKS_PER_DEVICE))
    if n == 1:
        return ((0, batch_size),)
    share = 2 * batch_size / (2 * n - 1)
    # Boundaries on multiples of 128 tasks: XLA's CPU loops draw such blocks faster (683 tasks took 0.72 ms, 768
    # took 0.60 ms).
    bounds = [0] + [min(batch_size, 128 * round((share / 2 + i * share) / 128)) for i in range(n - 1)] + [batch_size]
    return tuple((a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a)


def sharded_step_loop(config: TrainConfig, n: int, devices: Sequence[Any]) -> Callable:
    """``n`` steps, with the signature and result of a :func:`make_chunk` chunk, each step's tasks drawn in parts on
    ``devices`` at once (:func:`task_parts`) and the update on ``devices[0]``; step s + 1's tasks are drawn while
    step s updates.

    The form used on a CPU split into several host devices (the command line gives one per core): drawing the tasks
    is most of a step there, and the host devices run in parallel. Every task comes from its own key, so the batch,
    and every number of the run, is the one :func:`step_loop` gives on one device (tested)."""
    parts = task_parts(config.batch_size, len(devices))
    devices = list(devices)[:len(parts)]
    update = _jitted_update(config.compute_key())
    draw = _jitted_draw(config.task)

    def chunk(params, opt_state, data_keys, start):
        keys = [jax.device_put(data_keys, d) for d in devices]

        def draw_all(step):
            return tuple(jax.device_put(draw(k, step, first, size), devices[0])
                         for k, (first, size) in zip(keys, parts))

        params, opt_state = jax.device_put((params, opt_state), devices[0])
        batch, losses = draw_all(start), []
        for i in range(n):
            # The update is queued first: moving a part to device 0 waits for its draw, while device 0 updates.
            params, opt_state, loss = update(params, opt_state, batch)
            losses.append(loss)
            batch = draw_all(start + i + 1) if i + 1 < n else None
        return params, opt_state, jnp.stack(losses, axis=1)

    return chunk


@functools.lru_cache(maxsize=32)
def _jitted_update(key: TrainConfig) -> Callable:
    return jax.jit(update_step(key, make_optimizer(key)))


@functools.lru_cache(maxsize=32)
def _jitted_draw(task: TaskConfig) -> Callable:
    def draw(data_keys, step, first, size):
        return jax.vmap(lambda k: step_tasks(task, k, step, size, first))(data_keys)

    return jax.jit(draw, static_argnames=("first", "size"))


def training_devices() -> list:
    """The devices :func:`train` draws tasks on: every local device when they are CPU devices (several host devices:
    :func:`sharded_step_loop`), else the default one."""
    devices = jax.local_devices()  # the default backend's
    return devices if jax.default_backend() == "cpu" else devices[:1]


def uses_step_loop() -> bool:
    """Whether training runs chunks as :func:`step_loop` (on the CPU backend) rather than as one scan."""
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=32)
def _jitted_step(key: TrainConfig) -> Callable:
    return jax.jit(vmapped_step(key, make_optimizer(key)))


@functools.lru_cache(maxsize=32)
def _chunk_for_key(key: TrainConfig, n: int) -> Callable:
    if uses_step_loop():
        devices = training_devices()
        if len(task_parts(key.batch_size, len(devices))) > 1:
            return sharded_step_loop(key, n, devices)
        return step_loop(_jitted_step(key), n)
    return make_chunk(key, make_optimizer(key), n)


def _cached_chunk(config: TrainConfig, n: int) -> Callable:
    """The compiled chunk of ``n`` steps, shared by every :func:`train` call whose config computes the same steps
    (:meth:`TrainConfig.compute_key`: other seeds, a different n_steps under a constant or warmup_constant schedule,
    other chunking)."""
    return _chunk_for_key(config.compute_key(), n)


def init_state(config: TrainConfig):
    """Initial parameters and optimiser state for every seed (leading axis S) and the data keys."""
    keys = [seed_keys(s) for s in config.seeds]
    init_keys = jnp.stack([k[0] for k in keys])
    data_keys = jnp.stack([k[1] for k in keys])
    params = jax.vmap(lambda k: init_model(k, config.model))(init_keys)
    opt_state = jax.vmap(make_optimizer(config).init)(params)
    return params, opt_state, data_keys


def train(config: TrainConfig, workdir: str | os.PathLike | None = None, *, progress: bool = True,
          resume: bool = True, stop_after: int | None = None,
          on_chunk: Callable[[int, TransformerParams], None] | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.task``; checkpoints go to ``workdir`` (if given).

    ``stop_after`` ends the run early after that many steps (rounded up to a chunk), as an interruption would;
    a later call resumes from the checkpoint. ``on_chunk(step, params)`` is called after every chunk (params with
    the seed axis), e.g. to record metrics over training; a KeyboardInterrupt raised there (or anywhere in the loop)
    writes a checkpoint at the last finished chunk before propagating. Returns a :class:`TrainResult`.

    Refused before any work: a ``workdir`` that is a file or cannot be created, and a run whose arrays cannot fit in
    this machine's memory (:func:`check_train_memory`). A very deep unrolled model warns that it compiles for long.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be an iclgd_synth.TrainConfig, got {type(config).__name__}")
    if workdir is not None:
        _prepare_workdir(Path(workdir))
    check_train_memory(config)
    _warn_if_slow_compile(config)
    params, opt_state, data_keys = init_state(config)
    losses = np.full((len(config.seeds), config.n_steps), np.nan, np.float32)
    start, seconds, timed_from = 0, 0.0, 0
    ckpt = Path(workdir) / "checkpoint.msgpack" if workdir is not None else None
    if ckpt is not None and resume and ckpt.exists():
        params, opt_state, start, losses, saved_seconds = load_checkpoint(ckpt, config, (params, opt_state))
        if saved_seconds is None:  # a checkpoint written before the time was stored: only new steps are timed
            timed_from = start
        else:
            seconds = saved_seconds
    resumed_from = start
    bar = _progress_bar(config, start, progress)
    last_ckpt = start
    try:
        while start < config.n_steps and (stop_after is None or start < stop_after):
            n = min(config.chunk_steps, config.n_steps - start)
            t0 = time.perf_counter()
            new_params, new_opt, chunk_losses = _cached_chunk(config, n)(params, opt_state, data_keys, start)
            chunk_losses = np.asarray(chunk_losses)
            seconds += time.perf_counter() - t0
            _check_finite(chunk_losses, start, config)
            params, opt_state = new_params, new_opt
            losses[:, start:start + n] = chunk_losses
            start += n
            if bar is not None:
                rate = (start - timed_from) * config.batch_size * len(config.seeds) / max(seconds, 1e-9)
                bar.set_postfix(loss=f"{chunk_losses[:, -1].mean():.4f}", tasks_per_s=f"{rate:.3g}", refresh=False)
                bar.update(n)
            if on_chunk is not None:
                on_chunk(start, params)
            if ckpt is not None and (start - last_ckpt >= config.checkpoint_every or start >= config.n_steps):
                save_checkpoint(ckpt, config, params, opt_state, start, losses, seconds)
                last_ckpt = start
    except KeyboardInterrupt:
        if ckpt is not None and start > last_ckpt:
            save_checkpoint(ckpt, config, params, opt_state, start, losses, seconds)
        raise
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(config=config, params=params, losses=losses, train_seconds=seconds, resumed_from=resumed_from,
                       timed_steps=start - timed_from)


#: Distinct (unrolled) layers above which compiling the training step is expected to take long (about 0.3 s per
#: layer measured on a 2-core CPU: 64 layers compiled in 27 s).
SLOW_COMPILE_LAYERS = 100


def _prepare_workdir(path: Path) -> None:
    """Create the checkpoint folder now, so that a bad ``workdir`` fails before training rather than at the first
    checkpoint."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"workdir {str(path)!r} is a file; give a folder for the checkpoints (or "
                                 "workdir=None for none)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PermissionError(f"cannot create workdir {str(path)!r}: {e.strerror}; give a writable folder") from e
    except OSError as e:  # a parent that is a file, ...
        raise NotADirectoryError(f"cannot create workdir {str(path)!r}: {e.strerror}; give a folder for the "
                                 "checkpoints") from e
    if not os.access(path, os.W_OK):
        raise PermissionError(f"workdir {str(path)!r} is not writable; give a writable folder for the checkpoints")


def train_step_bytes(config: TrainConfig) -> int:
    """A lower bound on the memory of one training step, all seeds: the sampled tasks and, per layer application, the
    tokens kept for the backward pass (about three (T, D) arrays per task), plus the task pool."""
    model, task = config.model, config.task
    itemsize = 4
    if isinstance(model, ModelConfig):
        tokens, width = task.n_context + 1, model.token_dim
        hidden = (model.mlp_width or 4 * width) if model.mlp else 0
    else:  # the GPT-style model: 2 N + 1 tokens of width d_model
        tokens, width = 2 * task.n_context + 1, int(getattr(model, "d_model", task.dim + task.out_dim))
        hidden = int(getattr(model, "mlp_ratio", 0)) * width
    per_task = sample_bytes(task, 1) + tokens * (3 * width + hidden) * itemsize * model.n_layers
    return len(config.seeds) * config.batch_size * per_task + pool_bytes(task)


def check_train_memory(config: TrainConfig) -> None:
    """Refuse, before anything is initialised, a run whose per-step loss array (seeds x n_steps float32) or whose
    training step cannot fit in this machine's memory (MemoryError naming the parameter, with the estimate)."""
    s = len(config.seeds)
    check_memory(f"n_steps = {config.n_steps} for {s} seed{'s' * (s > 1)} (the per-step loss array, seeds x n_steps "
                 "float32)", 4 * s * config.n_steps, "train for fewer n_steps")
    check_memory(f"batch_size = {config.batch_size} tasks x {s} seed{'s' * (s > 1)} (one training step of a "
                 f"{config.model.n_layers}-layer model on N = {config.task.n_context}, d = {config.task.dim})",
                 train_step_bytes(config), "use a smaller batch_size or fewer seeds per run")


def _warn_if_slow_compile(config: TrainConfig) -> None:
    model = config.model
    if isinstance(model, ModelConfig) and not model.recurrent and model.n_layers > SLOW_COMPILE_LAYERS:
        minutes = 0.3 * model.n_layers / 60
        warn_slow_compile(f"n_layers = {model.n_layers} separate layers: the training step is compiled with every "
                          f"layer unrolled, which takes long before the first step (roughly 0.3 s per layer on a "
                          f"2-core CPU: about {minutes:.1f} min); recurrent=True loops one layer and compiles in "
                          "seconds", stacklevel=4)


def _check_finite(chunk_losses: np.ndarray, start: int, config: TrainConfig) -> None:
    bad = ~np.isfinite(chunk_losses)
    if bad.any():
        seed_idx, step_idx = np.argwhere(bad)[np.argmin(np.argwhere(bad)[:, 1])]
        raise TrainingDiverged(
            f"training diverged: loss is {chunk_losses[seed_idx, step_idx]} at step {start + int(step_idx)} "
            f"(seed {config.seeds[int(seed_idx)]}). Try a smaller lr (now {config.lr}), gradient clipping "
            f"(clip_norm, now {config.clip_norm}), clipping token values (model clip=10 for deep models) or a "
            f"smaller init scale (now {getattr(config.model, 'init_scale', getattr(config.model, 'init_std', None))}).")


def _progress_bar(config: TrainConfig, start: int, enabled: bool):
    """A bar over the steps still to do (none when every step is done). Until the first chunk returns it says that
    the step is being compiled, so a long first wait does not read as a bar stuck at its start."""
    if not enabled or start >= config.n_steps:
        return None
    from tqdm.auto import tqdm

    desc = "train" if start == 0 else f"train (resumed at step {start})"
    return tqdm(total=config.n_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, miniters=1,
                postfix="compiling the training step...")


def save_checkpoint(path: Path, config: TrainConfig, params, opt_state, step: int, losses: np.ndarray,
                    train_seconds: float = 0.0) -> None:
    """Write parameters, optimiser state, per-step losses, the step and the cumulative training seconds of steps
    [0, step) atomically (:func:`iclgd_synth.storage.save_checkpoint`)."""
    _save_tree(path, {"params": params, "opt_state": opt_state, "losses": np.asarray(losses)},
               {"step": int(step), "config_hash": config.hash(), "train_seconds": float(train_seconds)})


def load_checkpoint(path: Path, config: TrainConfig, like):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``like`` (params, opt_state).

    Returns (params, opt_state, step, losses, train_seconds). A checkpoint of another config, or one that cannot be
    read, raises :class:`~iclgd_synth.storage.CheckpointError` naming the file and what to do.
    """
    params, opt_state = like
    losses = np.zeros((len(config.seeds), config.n_steps), np.float32)
    tree, meta = _load_tree(path, {"params": params, "opt_state": opt_state, "losses": losses})
    if meta.get("config_hash") != config.hash():
        raise CheckpointError(f"checkpoint {str(path)!r} belongs to another config (hash {meta.get('config_hash')}, "
                              f"expected {config.hash()}); use another workdir, delete it, or run with --force")
    return tree["params"], tree["opt_state"], int(meta["step"]), np.array(tree["losses"]), meta["train_seconds"]


def save_params(path: str | os.PathLike, params: TransformerParams) -> None:
    """Save parameters (arrays + architecture) atomically to an .npz file."""
    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(params.layers)[0]}
    flat["__arch__"] = np.asarray(json.dumps(dataclasses.asdict(params.arch)))
    import io

    buf = io.BytesIO()
    np.savez(buf, **flat)
    write_bytes_atomic(path, buf.getvalue())


def load_params(path: str | os.PathLike) -> TransformerParams:
    """Load parameters saved by :func:`save_params`."""
    from iclgd_synth.model import Arch

    with np.load(path) as z:
        arch = Arch(**json.loads(str(z["__arch__"])))
        layers: dict[int, dict] = {}
        for name in z.files:
            if name == "__arch__":
                continue
            parts = name.split("/")
            node = layers.setdefault(int(parts[0]), {})
            for p in parts[1:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = jnp.asarray(z[name])
    return TransformerParams(layers=tuple(layers[i] for i in sorted(layers)), arch=arch)


def quick_trained_lsa(steps: int = 2000, seed: int = 0, batch_size: int = 2048) -> TransformerParams:
    """A 1-layer LSA trained on the ``vonoswald`` preset (d = N = 10) for ``steps`` steps: a quick trained model."""
    config = TrainConfig(n_steps=steps, seeds=(seed,), batch_size=batch_size)
    return train(config, progress=False).seed_params(0)
