"""Bad inputs, fuzz-style (issue 12): every case ends in a clear error of the stated type whose message names the
parameter (or the file), before any work is done, instead of a raw error from inside JAX, a late failure or silently
meaningless numbers. One parametrized test per class of mistake (the API, accepted-and-meaningless values, sizes that
cannot fit, the command line run in-process), then the run lock and the figures' scales."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclgd_synth import cli, constructions, equivalence, model, plotting, storage, tasks, validation
from iclgd_synth import train as training
from iclgd_synth.learners.gd import GD
from iclgd_synth.studies import protocol

KEY = jax.random.PRNGKey(0)
TINY_TASK = tasks.TaskConfig(dim=4, n_context=6, x_dist="normal")
TINY = training.TrainConfig(task=TINY_TASK, model=model.ModelConfig(dim=4), lr=1e-2, batch_size=128, n_steps=100,
                            chunk_steps=50, checkpoint_every=50)


@pytest.fixture(scope="module")
def batch():
    """Four tasks with N = 5, d = 3, drawn with NumPy (no sampler compilation)."""
    rng = np.random.default_rng(0)
    x, w = rng.uniform(-0.5, 0.5, (4, 6, 3)), rng.standard_normal((4, 3))
    y = np.einsum("bd,bnd->bn", w, x)
    return tasks.TaskBatch.create(x[:, :5], y[:, :5], x[:, 5], y[:, 5], w)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def _widths(batch):
    narrow = constructions.gd_params(3, 1.0).layers[0]  # D = 4
    wide = constructions.gd_params(4, 1.0).layers[0]  # D = 5
    return model.TransformerParams(layers=(narrow, wide))(batch)


def _int_weights(batch):
    layer = {k: jnp.asarray(v, jnp.int32) for k, v in constructions.gd_params(3, 1.0).layers[0].items()}
    return model.TransformerParams(layers=(layer,))(batch)


# (id, call(batch, a_file), error type, regex the message must match: the parameter's name and what is accepted)
API_CASES = [
    ("int key", lambda b, f: tasks.sample_tasks(0, 4, 5, 3), TypeError, r"key must be one JAX PRNG key.*PRNGKey"),
    ("str key", lambda b, f: tasks.sample_tasks("seed", 4, 5, 3), TypeError, r"key must be.*PRNGKey"),
    ("batch of keys", lambda b, f: tasks.sample(jax.random.split(KEY, 3), TINY_TASK, 4), TypeError,
     r"key must be one JAX PRNG key.*shape \(3, 2\)"),
    ("int key init_params", lambda b, f: model.init_params(3, model.ModelConfig(dim=3)), TypeError, r"key must be"),
    ("init_params int dtype", lambda b, f: model.init_params(KEY, model.ModelConfig(dim=3), dtype=jnp.int32),
     TypeError, r"dtype must be a float dtype.*int32"),
    ("gd_params int dtype", lambda b, f: constructions.gd_params(3, 1.0, dtype=jnp.int32), TypeError,
     r"dtype must be a float dtype"),
    ("gdpp_params int dtype", lambda b, f: constructions.gdpp_params(3, 1.0, 0.1, n_context=5, dtype="int32"),
     TypeError, r"dtype must be a float dtype"),
    ("layers of different widths", lambda b, f: _widths(b), ValueError,
     r"params.layers\[1\] works on tokens of size D = 5 but params.layers\[0\] on D = 4"),
    ("integer weights", lambda b, f: _int_weights(b), TypeError, r"params.layers\[0\]\['w_q'\] must hold floats"),
    ("TrainConfig(seeds=3)", lambda b, f: training.TrainConfig(seeds=3), TypeError,
     r"seeds must be a sequence.*seeds=tuple\(range\(3\)\)"),
    ("TrainConfig(task=preset name)", lambda b, f: training.TrainConfig(task="vonoswald"), TypeError,
     r"task must be an iclgd_synth.TaskConfig.*TASK_PRESETS\['vonoswald'\]"),
    ("TrainConfig(task=unknown name)", lambda b, f: training.TrainConfig(task="nosuch"), TypeError,
     r"task must be.*TASK_PRESETS"),
    ("TrainConfig(model=string)", lambda b, f: training.TrainConfig(model="lsa"), TypeError, r"model must be"),
    ("train(workdir=a file)", lambda b, f: training.train(TINY, workdir=f, progress=False), NotADirectoryError,
     r"workdir .*a_file' is a file"),
    ("train(workdir under a file)", lambda b, f: training.train(TINY, workdir=f / "sub", progress=False),
     NotADirectoryError, r"cannot create workdir"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_mistakes_are_clear_errors_naming_the_parameter(call, error, message, batch, a_file, monkeypatch):
    # train() must refuse before any work: initialising the model would be the first step.
    monkeypatch.setattr(training, "init_state", lambda *a: pytest.fail("train started before refusing"))
    with pytest.raises(error, match=message):
        call(batch, a_file)


SILENT_CASES = [
    ("init_scale=0", lambda b: model.ModelConfig(init_scale=0.0), ValueError, r"init_scale must be in \(0"),
    ("b1=1", lambda b: training.TrainConfig(b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
    ("b2=1", lambda b: training.TrainConfig(b2=1.0), ValueError, r"b2 must be in \[0, 1\)"),
    ("b2>1", lambda b: training.TrainConfig(b2=1.5), ValueError, r"b2 must be in \[0, 1\)"),
    ("x_scale=0", lambda b: tasks.TaskConfig(x_scale=0.0), ValueError, r"x_scale must be in \(0"),
    ("complex inputs", lambda b: tasks.TaskBatch.create(np.asarray(b.x) + 1j, b.y, b.x_query, b.y_query), TypeError,
     r"batch.x must hold real numbers, got complex"),
    ("complex labels", lambda b: b.replace(y=np.asarray(b.y) * (1 + 1j)).validated(), TypeError, r"batch.y .*complex"),
    ("perm out of range", lambda b: b.with_context_order(np.array([0, 1, 2, 3, 5])), ValueError,
     r"perm must be a permutation of 0..4.*index 5 is outside"),
    ("perm negative", lambda b: b.with_context_order(np.array([0, 1, 2, 3, -1])), ValueError, r"index -1 is outside"),
    ("perm repeats", lambda b: b.with_context_order(np.array([0, 0, 1, 2, 3])), ValueError,
     r"perm must be a permutation.*index 0 is repeated"),
    ("perm too short", lambda b: b.with_context_order(np.array([2, 1, 0])), ValueError, r"perm must have shape"),
    ("per-task perm repeats", lambda b: b.with_context_order(np.array([[0, 1, 2, 3, 4]] * 3 + [[4, 4, 2, 1, 0]])),
     ValueError, r"perm must be a permutation.*\(row 3\)"),
    ("float perm", lambda b: b.with_context_order(np.arange(5.0)), TypeError, r"perm must hold integer indices"),
    ("momentum_kind without momentum", lambda b: model.ModelConfig(momentum_kind="dual"), ValueError,
     r"momentum_kind='dual' only applies with momentum set"),
    ("mlp_width without mlp", lambda b: model.ModelConfig(mlp_width=8), ValueError,
     r"mlp_width=8 only applies with mlp=True"),
    ("negative eta", lambda b: GD(eta=-1.0)(b), ValueError, r"eta must be >= 0"),
    ("negative per-step eta", lambda b: GD(eta=[1.0, -0.5], steps=2)(b), ValueError, r"eta must be >= 0"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in SILENT_CASES], ids=[c[0] for c in SILENT_CASES])
def test_meaningless_values_are_refused_instead_of_giving_numbers(call, error, message, batch):
    with pytest.raises(error, match=message):
        call(batch)


def test_valid_neighbours_of_the_refused_values_still_work(batch):
    """The checks above refuse only the meaningless values: a permutation, eta 0, a tiny init scale pass."""
    np.testing.assert_array_equal(batch.with_context_order(np.arange(5)[::-1]).x, np.asarray(batch.x)[:, ::-1])
    assert np.all(np.asarray(GD(eta=0.0)(batch)) == 0)
    assert model.ModelConfig(init_scale=1e-9, mlp=True, mlp_width=8, momentum=0.5, momentum_kind="dual")
    assert training.TrainConfig(b1=0.0, b2=0.999, seeds=[0, 1]).seeds == (0, 1)


def test_equivalence_tolerance_is_relative_to_the_prediction_scale():
    """gamma = 1e6: GD++ predictions reach 1e13 at K = 2, and differ by rounding (4e-16 relative): not a failure."""
    rows = equivalence.equivalence_table(batch_size=64, max_layers=2, gamma=1e6)
    big = next(r for r in rows if r["K"] == 2 and r["construction"] == "GD++" and r["dtype"] == "float64")
    assert big["max_abs_pred"] > 1e9 and big["max_abs_diff"] > equivalence.FLOAT64_TOLERANCE
    assert big["rel_diff"] < 1e-13
    assert {equivalence.row_status(r) for r in rows if r["dtype"] == "float64"} == {"ok"}
    # A real discrepancy still fails, and predictions that overflow are not compared (nor passed as ok).
    assert equivalence.row_status({**big, "max_abs_diff": 1e-6 * big["max_abs_pred"]}) == "failed"
    assert equivalence.row_status({**big, "max_abs_pred": float("nan")}) == "overflow"


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 16 GiB, so that the size checks do not depend on the memory of the machine running the tests."""
    monkeypatch.setattr(validation, "machine_memory", lambda: 16 * 2**30)


SIZE_CASES = [
    ("sample 1e8 tasks", lambda: tasks.sample_tasks(KEY, 10**8, 10, 10), r"batch_size = 100000000 .*GiB"),
    ("pool of 1e9 tasks", lambda: tasks.sample_tasks(KEY, 4, 10, 10, pool_size=10**9), r"pool_size = 1000000000"),
    ("task_pool of 1e9 tasks", lambda: tasks.task_pool(tasks.TaskConfig(pool_size=10**9)), r"pool_size = 1000000000"),
    ("train on 1e8 tasks per step", lambda: training.train(TINY.replace(batch_size=10**8), progress=False),
     r"batch_size = 100000000 .*training step"),
    ("train 1e12 steps", lambda: training.train(TINY.replace(n_steps=10**12), progress=False),
     r"n_steps = 1000000000000 .*seeds x n_steps float32"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES])
def test_sizes_that_cannot_fit_are_refused_up_front_with_the_estimate(call, message, small_machine, monkeypatch):
    monkeypatch.setattr(training, "init_state", lambda *a: pytest.fail("train started before refusing"))
    with pytest.raises(MemoryError, match=message) as info:
        call()
    assert "more than this machine's 16 GiB" in str(info.value)  # the estimate and the limit


def test_machine_memory_is_the_physical_memory():
    assert validation.machine_memory() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Stop(Exception):
    pass


def test_long_compilations_are_announced(monkeypatch):
    """A deep unrolled model and equivalence over many K warn (one line, with the reason) before compiling."""
    monkeypatch.setattr(training, "init_state", lambda *a: (_ for _ in ()).throw(_Stop()))
    deep = TINY.replace(model=TINY.model.replace(n_layers=training.SLOW_COMPILE_LAYERS + 1))
    with pytest.warns(validation.SlowCompileWarning, match=r"n_layers = 101 separate layers.*recurrent=True"):
        with pytest.raises(_Stop):
            training.train(deep, progress=False)
    monkeypatch.setattr(equivalence, "sample", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    with pytest.warns(validation.SlowCompileWarning, match=r"max_layers = 200: .*min"):
        with pytest.raises(_Stop):
            equivalence.equivalence_table(max_layers=200)


def _cli(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


def _garbage_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"\x00not a zip archive" * 20)
    return path


CLI_CASES = [
    ("bench --json in a missing folder", lambda t, f: ["bench", "--quick", "--json", str(t / "no" / "b.json")],
     r"--json .*the folder .*no' does not exist"),
    ("weights --out a file", lambda t, f: ["weights", "--out", str(f)], r"--out .*a_file' is a file"),
    ("weights --llm nosuch", lambda t, f: ["weights", "--out", str(t / "w"), "--llm", "nosuch"],
     r"no such file or folder: 'nosuch'"),
    ("weights garbage --trained-params", lambda t, f: ["weights", "--out", str(t / "w"), "--llm", "nosuch",
                                                       "--trained-params", str(_garbage_npz(t))],
     r"parameter file .*garbage.npz' cannot be read"),
    ("weights --hand-dims 200000", lambda t, f: ["weights", "--out", str(t / "w"), "--hand-dims", "11", "200000"],
     r"--hand-dims 200000 .*more than this machine's 16 GiB"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_mistakes_end_in_one_error_line_before_any_work(argv, message, tmp_path, a_file, capsys, small_machine,
                                                            monkeypatch):
    import iclgd_synth.bench
    import iclgd_synth.weights.sources

    monkeypatch.setattr(iclgd_synth.bench, "run_all", lambda **k: pytest.fail("the benchmark ran before refusing"))
    monkeypatch.setattr(iclgd_synth.weights.sources, "quick_trained",
                        lambda **k: pytest.fail("the quick model was trained before refusing"))
    rc, err = _cli(argv(tmp_path, a_file), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iclgd {argv(tmp_path, a_file)[0]}: error: "), err
    assert "Traceback" not in err and "allow_pickle" not in err
    assert __import__("re").search(message, lines[0]), lines[0]


# --- the run lock ----------------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_names_the_live_owner(tmp_path):
    lock = tmp_path / "x.lock"
    with storage.exclusive_lock(lock, "the run X"):
        assert lock.read_text().split()[0] == str(os.getpid())
        assert oct(lock.stat().st_mode & 0o777) == oct(storage.FILE_MODE)
        with pytest.raises(storage.LockedError, match=rf"another process \(pid {os.getpid()}\) is computing the run X"):
            storage.acquire_lock(lock, "the run X")
    assert not lock.exists()  # released
    with pytest.raises(RuntimeError):  # released on an exception too
        with storage.exclusive_lock(lock):
            raise RuntimeError
    assert not lock.exists()


def test_a_stale_lock_is_taken_over_and_a_live_or_foreign_one_is_not(tmp_path):
    lock = tmp_path / "x.lock"
    import socket

    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    with storage.exclusive_lock(lock):
        assert lock.read_text().split()[0] == str(os.getpid())
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # our parent: alive
    with pytest.raises(storage.LockedError, match=rf"pid {os.getppid()}\)"):
        storage.acquire_lock(lock)
    lock.write_text(f"{_dead_pid()} some-other-host\n")  # its process cannot be checked from here
    with pytest.raises(storage.LockedError, match=r"on host some-other-host"):
        storage.acquire_lock(lock)
    storage.release_lock(lock)  # not ours: left alone
    assert lock.exists()


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    value: int = 1

    def quick(self):
        return self


def _toy_study(compute):
    return protocol.Study(name="toy", description="a toy study", config=_ToyConfig(), compute=compute,
                          render=lambda config, metrics, out: f"value {metrics['value']}\n")


def test_a_second_run_of_the_same_study_and_config_does_not_compute(tmp_path, capsys):
    seen = {}

    def compute(config, run):
        seen["locked"] = (run.dir / protocol.LOCK_FILE).exists()
        with pytest.raises(storage.LockedError, match=rf"pid {os.getpid()}\) is computing the run"):
            protocol.run(study, root=tmp_path)  # what a concurrent `iclgd run` of the same study meets
        seen["refused"] = True
        return {"value": config.value}

    study = _toy_study(compute)
    out = protocol.run(study, root=tmp_path)
    assert seen == {"locked": True, "refused": True}
    assert not (out / protocol.LOCK_FILE).exists()
    assert (out / "report.md").read_text() == "value 1\n"


def test_run_takes_over_the_lock_of_a_process_that_died(tmp_path):
    import socket

    study = _toy_study(lambda config, run: {"value": 7})
    out = protocol.run_dir_for(tmp_path, study, _ToyConfig())
    out.mkdir(parents=True)
    (out / protocol.LOCK_FILE).write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    protocol.run(study, root=tmp_path)
    assert protocol.is_finished(out) and not (out / protocol.LOCK_FILE).exists()


def test_cli_run_while_another_process_computes_is_one_error_line_with_its_pid(tmp_path, capsys):
    import socket

    from iclgd_synth.studies.registry import get_study

    study = get_study("vonoswald")
    out = protocol.run_dir_for(tmp_path, study, study.make_config(quick=True))
    out.mkdir(parents=True)
    (out / protocol.LOCK_FILE).write_text(f"{os.getppid()} {socket.gethostname()}\n")
    rc, err = _cli(["run", "vonoswald", "--quick", "--root", str(tmp_path), "--no-progress"], capsys)
    assert rc == 2
    assert f"another process (pid {os.getppid()}) is computing the run" in err and len(err.strip().splitlines()) == 1


# --- figures and the progress bar ------------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """The figures' matplotlib objects, captured as they are saved."""
    saved = []
    real = plotting.save_figure

    def keep(fig, path, dpi=110):
        saved.append(types.SimpleNamespace(axes=fig.get_axes(), title=fig._suptitle.get_text()))
        return real(fig, path, dpi=40)

    monkeypatch.setattr(plotting, "save_figure", keep)
    return saved


def test_ood_figure_is_scaled_by_the_predictors_not_by_least_squares(tmp_path, figures):
    sweeps = {"x_scale": {"values": [0.5, 1.0, 2.0],
                          "losses": {"trained": [0.05, 0.2, 1.2], "GD (1 step)": [0.06, 0.21, 1.4],
                                     "least squares": [50.0, 200.0, 2000.0]}}}
    plotting.ood_curves(tmp_path / "ood.png", sweeps)
    ax = figures[-1].axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0.05 and 1.4 <= hi < 50.0  # GD and the trained model fill the panel; least squares is off it
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["trained", "GD (1 step)", "least squares (off scale: triangles at the edge)"]
    # When every predictor is of one size, nothing is left out.
    assert plotting.robust_log_ylim({"a": [1.0, 2.0], "b": [1.5, 3.0], "c": [0.5, 2.5]}) == (0.5 / 1.6, 3.0 * 1.6)


def test_metric_panels_have_readable_titles_axis_labels_and_reference_lines(tmp_path, figures):
    plotting.metrics_over_training(tmp_path / "m.png", [1, 2, 3],
                                   {"loss": [1.0, 0.5, 0.2], "preds_diff_gd": [0.5, 0.2, 0.1],
                                    "model_cos_gdpp": [0.2, 0.8, 0.99]})
    loss, diff, cos = figures[-1].axes
    assert [a.get_title() for a in (loss, diff, cos)] == [
        "held-out loss", "prediction difference vs tuned GD", "implicit-model cosine vs tuned GD++"]
    assert all(a.get_xlabel() == "training step" and a.get_ylabel() for a in (loss, diff, cos))
    references = {a.get_title(): [tuple(line.get_ydata()) for line in a.get_lines()[1:]] for a in (loss, diff, cos)}
    assert references == {"held-out loss": [], "prediction difference vs tuned GD": [(0.0, 0.0)],
                          "implicit-model cosine vs tuned GD++": [(1.0, 1.0)]}


def test_progress_bar_says_it_compiles_and_where_a_resumed_run_starts(tmp_path, capsys):
    training.train(TINY, tmp_path, stop_after=50)
    first = capsys.readouterr().err
    assert "compiling the training step" in first and "50/100" in first
    training.train(TINY, tmp_path)
    resumed = capsys.readouterr().err
    assert "train (resumed at step 50)" in resumed and "100/100" in resumed
    training.train(TINY, tmp_path)  # nothing left to do: no bar at all (neither 0% nor a stale one)
    assert "train" not in capsys.readouterr().err
