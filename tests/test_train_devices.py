"""Training with each step's tasks drawn on several host devices gives the one-device run bit for bit; the command
line's one-host-device-per-core setting."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from iclgd_synth import host_devices
from iclgd_synth.train import MIN_TASKS_PER_DEVICE, TrainConfig, task_parts, train


@pytest.mark.parametrize("batch, devices", [(2048, 2), (2048, 3), (2048, 8), (1000, 2), (300, 2), (2048, 1)])
def test_task_parts_cover_every_task_once_in_order(monkeypatch, batch, devices):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    parts = task_parts(batch, devices)
    assert parts[0][0] == 0 and sum(size for _, size in parts) == batch
    assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))
    assert len(parts) == max(1, min(devices, 4, batch // MIN_TASKS_PER_DEVICE))
    if len(parts) > 1:  # device 0 also updates: it draws about half as many tasks as the others
        assert parts[0][1] < min(size for _, size in parts[1:])
        assert all(size >= MIN_TASKS_PER_DEVICE // 2 for _, size in parts)


CONFIG = dict(batch_size=512, n_steps=6, chunk_steps=3, seeds=(0, 1))

SCRIPT = """
import os, sys
os.cpu_count = lambda: 2  # two devices' worth of cores on any machine (task_parts caps parts at the core count)
import jax, numpy as np
from iclgd_synth.train import TrainConfig, train, task_parts, training_devices
assert len(training_devices()) == 2, jax.devices()
config = TrainConfig(**{config})
assert len(task_parts(config.batch_size, 2)) == 2
r = train(config, progress=False)
np.savez(sys.argv[1], losses=r.losses, **{{str(i): np.asarray(l) for i, l in enumerate(jax.tree.leaves(r.params))}})
"""


def test_tasks_drawn_on_two_host_devices_give_the_one_device_run_bit_for_bit(tmp_path):
    out = tmp_path / "two.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT.format(config=CONFIG)), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = np.load(out)
    one = train(TrainConfig(**CONFIG), progress=False)
    np.testing.assert_array_equal(two["losses"], one.losses)
    for i, leaf in enumerate(jax.tree.leaves(one.params)):
        np.testing.assert_array_equal(two[str(i)], np.asarray(leaf))


def test_one_per_core_sets_the_flag_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(host_devices, "_backend_started", lambda: False)
    monkeypatch.setattr(host_devices.os, "cpu_count", lambda: 2)
    monkeypatch.delenv(host_devices.ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert host_devices.one_per_core() == 2
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    assert host_devices.one_per_core() is None  # already set (by us or by the user): left alone
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(host_devices.ENV, "1")
    assert host_devices.one_per_core() is None and os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv(host_devices.ENV, "3")
    assert host_devices.one_per_core() == 3
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(host_devices.ENV, "zero")
    with pytest.raises(ValueError, match="ICLGD_HOST_DEVICES must be an integer >= 1"):
        host_devices.one_per_core()


def test_one_per_core_does_nothing_once_the_backend_started(monkeypatch):
    jax.devices()  # the backend is running in this process
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv(host_devices.ENV, raising=False)
    assert host_devices.one_per_core() is None and os.environ["XLA_FLAGS"] == ""
