"""The figure worker (iclgd_synth.background): jobs give the same results in a worker process and inline, errors come
back to the caller, and a worker never re-runs the caller's own script."""

import os
import subprocess
import sys
import textwrap

import pytest

from iclgd_synth import background


def _square(x):
    return x * x


def _fail(message):
    raise ValueError(message)


def test_jobs_run_inline_outside_the_command_line():
    jobs = background.Jobs()
    assert not jobs.in_worker
    jobs.submit(_square, 3)
    jobs.submit(_square, 4)
    assert jobs.wait() == [9, 16]
    assert jobs.wait() == []  # waited jobs are gone


def test_inline_job_errors_are_raised_at_submission():
    with pytest.raises(ValueError, match="boom"):
        background.Jobs(inline=True).submit(_fail, "boom")


def test_environment_turns_the_worker_off(monkeypatch):
    monkeypatch.setenv(background.ENV, "0")
    with background.enabled():
        assert not background.worker_allowed()
        assert not background.Jobs().in_worker


# The jobs live in a module of their own, so the worker does not import the package (JAX) to unpickle them.
JOBS = """
def _square(x):
    return x * x


def _fail(message):
    raise ValueError(message)
"""

SCRIPT = """
import os, sys
# Top-level code without a __main__ guard: a spawned worker that imported this file would append a second line.
with open(sys.argv[1], "a") as f:
    f.write("ran\\n")
from iclgd_synth import background
from jobs_for_the_worker import _square, _fail

with background.enabled():
    jobs = background.Jobs()
    assert jobs.in_worker
    jobs.submit(_square, 7)
    jobs.submit(os.getpid)
    square, pid = jobs.wait()
    assert square == 49 and pid != os.getpid(), (square, pid)
    jobs.submit(_fail, "from the worker")
    try:
        jobs.wait()
    except ValueError as e:
        assert "from the worker" in str(e)
    else:
        raise AssertionError("the worker's error was not raised")
print("ok")
"""


def test_worker_process_results_errors_and_no_rerun_of_the_callers_script(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "jobs_for_the_worker.py").write_text(JOBS)
    marker = tmp_path / "marker.txt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(background.ENV, None)
    out = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert marker.read_text() == "ran\n"  # the worker did not import the script
