"""Sweeps (issue 13): the plan and its refusals, the same per-run numbers on 1 and 8 host devices, resumption, nested
task pools and the command line.

One tiny sweep (d = 3, N = 4, 2 learning rates x 2 seeds, 60 steps) runs in this process and once in a subprocess
with 8 host devices (started first, so both compile at the same time); the other tests reuse the in-process folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import iclgd_synth as ic
from iclgd_synth import sweep as sw
from iclgd_synth.model import ModelConfig
from iclgd_synth.train import TrainConfig, train

BASE = TrainConfig(task=ic.TaskConfig(dim=3, n_context=4), model=ModelConfig(dim=3), batch_size=32, n_steps=60,
                   chunk_steps=20, checkpoint_every=20)
GRID = [("lr", [1e-2, 3e-3])]
SEEDS = (0, 1)
EVAL_TASKS = 256

_SUBPROCESS = textwrap.dedent("""
    import sys
    import iclgd_synth as ic
    from iclgd_synth import sweep as sw
    from iclgd_synth.model import ModelConfig
    from iclgd_synth.train import TrainConfig, train
    base = TrainConfig(task=ic.TaskConfig(dim=3, n_context=4), model=ModelConfig(dim=3), batch_size=32, n_steps=60,
                       chunk_steps=20, checkpoint_every=20)
    plan = sw.expand(base, [("lr", [1e-2, 3e-3])], seeds=(0, 1), eval_tasks=256)
    sw.run_sweep(plan, sys.argv[1], progress=False, figures=False)
""")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """(1-device folder, 8-device folder): the in-process sweep, interrupted after 20 steps and resumed, and the
    same sweep on 8 host devices in a subprocess."""
    root = tmp_path_factory.mktemp("sweeps")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    child = subprocess.Popen([sys.executable, "-c", _SUBPROCESS, str(root / "eight")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        plan = sw.expand(BASE, GRID, SEEDS, eval_tasks=EVAL_TASKS)
        one = root / "one"
        assert sw.run_sweep(plan, one, progress=False, stop_after=20) == one
        ckpts = list((one / "groups").glob("*/checkpoint.msgpack"))
        assert len(ckpts) == 1 and not (one / "runs.jsonl").exists()
        sw.run_sweep(plan, one, progress=False)
        output = child.communicate(timeout=300)[0]
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output
    return one, root / "eight"


def test_expand_builds_grid_points_times_seeds_in_order():
    plan = sw.expand(BASE, GRID + [("model.n_layers", "1,2")], seeds=(3, 5))
    assert len(plan.runs) == 8
    assert [r.seed for r in plan.runs[:2]] == [3, 5]
    assert [r.point_label for r in plan.runs[::2]] == ["lr=0.01, model.n_layers=1", "lr=0.01, model.n_layers=2",
                                                      "lr=0.003, model.n_layers=1", "lr=0.003, model.n_layers=2"]
    assert plan.runs[2].train.model.n_layers == 2 and plan.runs[4].train.lr == 3e-3
    assert plan.runs[0].train.seeds == (3,) and len({r.run_id for r in plan.runs}) == 8
    # learning rates share a program; depths do not
    groups = sw.group_runs(plan.runs)
    assert [[r.index for r in g] for g in groups] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [[r.index for r in g] for g in sw.group_runs(plan.runs, 3)] == [[0, 1, 4], [5], [2, 3, 6], [7]]
    assert plan.eval_tasks == sw.DEFAULT_EVAL_TASKS


def test_expand_from_a_study_uses_its_config_and_eval_tasks():
    plan = sw.expand("vonoswald", ["train.lr=1e-3,5e-4"], seeds=(0,), quick=True, overrides=["train.n_steps=7"])
    assert [r.train.lr for r in plan.runs] == [1e-3, 5e-4]
    assert plan.runs[0].train.n_steps == 7 and plan.eval_tasks == 1000  # the quick study's eval_tasks


@pytest.mark.parametrize("grid, match", [
    (["train.nope=1,2"], r"train.nope=1 cannot be built: unknown config path 'train.nope'"),
    (["train.lr=1e-3,abc"], r"train.lr=abc cannot be built: train.lr must be a number"),
    (["train.lr=1e-3,-1"], r"train.lr=-1 cannot be built: .*lr"),
    (["train.model.dim=3"], r"train.model.dim=3 cannot be built: .*must match task.dim"),
    (["train.lr"], r"PATH=V1,V2"),
    (["train.lr=1e-3,,2e-3"], "empty value"),
    (["train.lr=1e-3,1e-3"], "repeats a value"),
    (["train.seeds=1,2"], "--seeds"),
    (["llm_max_layers=1,2"], "train the same run"),
])
def test_bad_grid_entry_is_refused_before_anything_runs(grid, match, tmp_path, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before the grid was checked")

    monkeypatch.setattr(sw, "train_group", must_not_train)
    with pytest.raises(ValueError, match=match):
        sw.sweep("vonoswald", grid, seeds=(0,), quick=True, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_bad_seeds_and_base_are_refused():
    with pytest.raises(ValueError, match="different integers"):
        sw.expand(BASE, GRID, seeds=(1, 1))
    with pytest.raises(ValueError, match="seeds"):
        sw.expand(BASE, GRID, seeds=(-1,))
    with pytest.raises(TypeError, match="base must be a study name"):
        sw.expand(ic.TaskConfig(), GRID)
    with pytest.raises(ValueError, match="unknown study"):
        sw.expand("vonoswal", GRID)


def _runs(folder):
    return sw.read_runs(folder)


def test_sweep_on_8_devices_gives_each_run_its_1_device_numbers(sweeps):
    one, eight = sweeps
    assert json.loads((one / "sweep.json").read_text())["devices"] == jax.device_count() != 8
    assert json.loads((eight / "sweep.json").read_text())["devices"] == 8
    a, b = _runs(one), _runs(eight)
    assert len(a) == 4 and set(a) == set(b)
    worst = 0.0
    for run_id, row in a.items():
        assert row["diverged_at"] is None and np.isfinite(row["eval_loss"])
        for field in ("final_train_loss", "eval_loss"):
            worst = max(worst, abs(row[field] - b[run_id][field]) / abs(row[field]))
        c1, c8 = np.asarray(row["curve"]["loss"]), np.asarray(b[run_id]["curve"]["loss"])
        assert row["curve"]["step"] == b[run_id]["curve"]["step"] == [20, 40, 60]
        worst = max(worst, float(np.max(np.abs(c1 - c8) / np.abs(c1))))
    assert worst <= 1e-6
    # the two learning rates differ, and the two seeds differ: the rows are not copies of one run
    assert len({round(r["eval_loss"], 7) for r in a.values()}) == 4


def test_sweep_run_equals_the_same_run_trained_alone(sweeps):
    one, _ = sweeps
    plan = sw.expand(BASE, GRID, SEEDS, eval_tasks=EVAL_TASKS)
    run = plan.runs[3]  # lr 3e-3, seed 1
    alone = train(run.train, progress=False).losses[0].astype(np.float64)
    row = _runs(one)[run.run_id]
    np.testing.assert_allclose(row["final_train_loss"], alone[-sw.FINAL_STEPS:].mean(), rtol=1e-6)
    np.testing.assert_allclose(row["curve"]["loss"], alone.reshape(3, 20).mean(1), rtol=1e-6)


def test_sweep_writes_rows_csv_summary_and_figures(sweeps):
    one, _ = sweeps
    assert not (one / "groups").exists()  # checkpoints removed once the runs are written
    csv_lines = (one / "runs.csv").read_text().splitlines()
    assert csv_lines[0] == "run_id,lr,seed,group,n_steps,final_train_loss,eval_loss,diverged_at"
    assert len(csv_lines) == 5
    summary = (one / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| 0.0")]
    assert len(rows) == 2 and all("(2 seeds)" in r for r in rows)
    s = sw.summarize(one)
    point = s["points"]["lr=0.01"]
    vals = [r["eval_loss"] for r in _runs(one).values() if r["point"] == {"lr": 0.01}]
    assert point["eval_loss"]["mean"] == pytest.approx(np.mean(vals)) and point["eval_loss"]["lo"] < min(vals)
    for name in ("curves.png", "eval_lr.png"):
        assert (one / name).stat().st_size > 1000 and f"]({name})" in summary


def test_resume_trains_only_the_runs_not_yet_finished(sweeps, tmp_path, monkeypatch):
    one, _ = sweeps
    folder = tmp_path / "resumed"
    shutil.copytree(one, folder)
    before = (folder / "runs.jsonl").read_text()
    with open(folder / "runs.jsonl", "a") as f:
        f.write('{"run_id": "cut by an interr')  # a line cut by an interruption
    trained = []
    real = sw.train_group
    monkeypatch.setattr(sw, "train_group", lambda runs, **kw: trained.append(len(runs)) or real(runs, **kw))
    plan = sw.expand(BASE, GRID, (0, 1, 2, 3), eval_tasks=EVAL_TASKS)  # two more seeds per point
    sw.run_sweep(plan, folder, progress=False, figures=False)
    assert trained == [4]  # the 4 new runs, as one program; the 4 finished ones skipped
    text = (folder / "runs.jsonl").read_text()
    assert text.startswith(before) and "cut by" not in text
    assert len(sw.read_runs(folder)) == 8 and "(4 seeds)" in (folder / "summary.md").read_text()
    trained.clear()
    sw.run_sweep(plan, folder, progress=False, figures=False)
    assert trained == []


def test_diverged_run_is_recorded_and_does_not_stop_the_others(tmp_path):
    plan = sw.expand(BASE, [("lr", [1e30, 1e-2])], SEEDS, eval_tasks=EVAL_TASKS)  # the compiled program of above
    rows = sw.read_runs(sw.run_sweep(plan, tmp_path / "d", progress=False, figures=False))
    bad, good = rows[plan.runs[0].run_id], rows[plan.runs[2].run_id]
    assert bad["diverged_at"] is not None and np.isnan(bad["eval_loss"]) and np.isnan(bad["final_train_loss"])
    assert good["diverged_at"] is None and np.isfinite(good["eval_loss"])
    assert "2 diverged" in (tmp_path / "d" / "summary.md").read_text()


def test_task_pool_of_size_m_is_the_first_m_tasks_of_a_larger_pool():
    small = ic.TaskConfig(dim=3, n_context=4, out_dim=2, pool_size=5, pool_seed=11, w_scale=2.0)
    big = np.asarray(ic.task_pool(small.replace(pool_size=37)))
    np.testing.assert_array_equal(np.asarray(ic.task_pool(small)), big[:5])
    # task m comes from fold_in(PRNGKey(pool_seed), m) alone, drawn flat under the package's fixed threefry mode
    m = 23
    with jax.threefry_partitionable(False):
        alone = 2.0 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), m), (6,)).reshape(2, 3)
    np.testing.assert_array_equal(big[m], np.asarray(alone))
    other_seed = np.asarray(ic.task_pool(small.replace(pool_seed=12)))
    assert not np.allclose(other_seed, big[:5])


def test_distributed_is_not_initialised_on_one_machine(monkeypatch):
    for name in (*sw.COORDINATOR_ENV, "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(a))
    assert sw.maybe_initialize_distributed() is False and called == []
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task job step
    assert sw.maybe_initialize_distributed() is False and called == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        sw.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert sw.maybe_initialize_distributed() is True and called == [("host0:1234",)]


def test_cli_sweep_refuses_a_bad_grid_in_one_line(capsys, tmp_path):
    from iclgd_synth.cli import main

    assert main(["sweep", "vonoswald", "--quick", "--grid", "train.model.n_layer=1,2", "--out",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "grid entry train.model.n_layer=1 cannot be built" in err and "n_layers" in err
    assert not (tmp_path / "s").exists()


def test_grid_entry_text_splits_at_top_level_commas_only():
    assert sw.parse_grid_entry("a.b=(1,2),(3,4)") == ("a.b", ["(1,2)", "(3,4)"])
    assert sw.parse_grid_entry(" train.lr = 1e-3, 5e-4") == ("train.lr", ["1e-3", "5e-4"])
