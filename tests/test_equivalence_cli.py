"""``iclgd equivalence``: the table's float64 rows are exact to 1e-10, float32 rows are really float32, and the CLI
prints valid JSON with a zero exit status."""

from __future__ import annotations

import argparse
import json

import jax
import pytest

from iclgd_synth import equivalence


@pytest.fixture(scope="module")
def table():
    return equivalence.equivalence_table(batch_size=64, max_layers=2)


def test_table_has_one_row_per_k_construction_and_dtype(table):
    keys = [(r["K"], r["construction"], r["dtype"]) for r in table]
    assert keys == [(k, c, t) for k in (1, 2) for c in ("GD", "GD++") for t in ("float32", "float64")]
    assert all(r["backend"] == jax.default_backend() for r in table)
    assert all(r["gamma"] is None for r in table if r["construction"] == "GD")


def test_float64_hand_weights_equal_gd_and_gdpp_to_1e_10(table):
    rows = [r for r in table if r["dtype"] == "float64"]
    assert len(rows) == 4
    for r in rows:
        assert r["max_abs_diff"] < equivalence.FLOAT64_TOLERANCE, r
        assert r["max_abs_pred"] > 0.5  # predictions of size O(1): the difference is a meaningful comparison


def test_float32_rows_are_computed_in_float32(table):
    diffs = [r["max_abs_diff"] for r in table if r["dtype"] == "float32"]
    # float32 rounding is ~1e-7 relative; float64's is ~1e-16. Nonzero and above 1e-12: not silently float64.
    assert max(diffs) > 1e-12
    assert max(diffs) < 1e-5  # tests/test_constructions.py documents this float32 bound


def test_table_leaves_x64_as_it_found_it(table):
    assert not jax.config.jax_enable_x64


def test_main_prints_json_and_returns_zero(capsys):
    args = argparse.Namespace(batch_size=64, max_layers=2, seed=0, gamma=0.1, matmul_precision=None, json=True)
    assert equivalence.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["batch_size"] == 64 and len(out["rows"]) == 8
    assert out["backend"] == jax.default_backend()


def test_main_prints_a_table_with_the_backend(capsys):
    parser = argparse.ArgumentParser()
    equivalence.add_arguments(parser)
    assert equivalence.main(parser.parse_args(["--batch-size", "64", "--max-layers", "1"])) == 0
    out = capsys.readouterr().out
    assert f"backend: {jax.default_backend()}" in out
    assert len([line for line in out.splitlines() if line.lstrip().startswith("1 ")]) == 4


def test_main_returns_nonzero_when_a_float64_difference_is_too_large(monkeypatch, capsys):
    monkeypatch.setattr(equivalence, "FLOAT64_TOLERANCE", -1.0)  # every difference, even 0, now counts as a failure
    args = argparse.Namespace(batch_size=64, max_layers=1, seed=0, gamma=0.1, matmul_precision=None, json=False)
    assert equivalence.main(args) == 1
    assert "FAILED" in capsys.readouterr().out


def test_equivalence_table_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        equivalence.equivalence_table(batch_size=0)
    with pytest.raises(ValueError, match="max_layers"):
        equivalence.equivalence_table(max_layers=0)


def test_cli_equivalence_json(capsys):
    # cli.build_parser imports every sub-command module; skip until the other sub-commands exist.
    for module in ("iclgd_synth.studies", "iclgd_synth.bench", "iclgd_synth.weights.command"):
        pytest.importorskip(module)
    from iclgd_synth import cli

    assert cli.main(["equivalence", "--json", "--batch-size", "64", "--max-layers", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["max_abs_diff"] < 1e-10 for r in out["rows"] if r["dtype"] == "float64"] == [True, True]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1, got -3"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--max-layers", "0"], "argument --max-layers: must be an integer >= 1, got 0"),
    (["--max-layers", "2.5"], "argument --max-layers: must be an integer >= 1, got '2.5'"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--gamma", "nan"], "argument --gamma: must be a finite real number, got 'nan'"),
])
def test_bad_sizes_give_a_clean_usage_error_with_exit_status_2(capsys, argv, message):
    parser = argparse.ArgumentParser(prog="iclgd equivalence")
    equivalence.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: iclgd equivalence" in err and "Traceback" not in err
