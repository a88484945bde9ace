"""The weight comparison as a report: ``weight_stats.json``, ``report.md`` and PNG figures in one folder.

:func:`weights_report` is the library entry point (the ``iclgd weights`` command and other reports call it):
hand-constructed GD / GD++ weights, optionally a trained model, against one or more real LLMs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iclgd_synth.weights.collect import MATRICES, SourceStats, collect_stats
from iclgd_synth.weights.loaders import BUILTIN_SOURCES, WeightSource, open_source
from iclgd_synth.weights.resemblance import (
    INSIDE_PERCENTILES, SUMMARY_ROWS, inside_counts, resemblance,
)
from iclgd_synth.weights.sources import (
    DEFAULT_HAND, HandSpec, construction_at_zero_context, hand_source, p_vs_context_size, trained_source,
)
from iclgd_synth.weights.stats import STATISTICS

#: Heat maps of large LLM matrices also show this top-left corner.
CROP = 48
SHORT_NAMES = {"smollm2": "SmolLM2", "minilm": "MiniLM"}

MATRIX_DESCRIPTIONS = {
    "W_Q": "whole-layer query projection (H Kq x E)",
    "W_K": "whole-layer key projection (G Kq x E)",
    "W_V": "whole-layer value projection (G Kv x E)",
    "W_O": "whole-layer output projection (E x H Kv); P for the linear-attention models",
    "W_Q head": "one query head's rows (Kq x E)",
    "W_K head": "one key/value head's key rows (Kq x E)",
    "W_V head": "one key/value head's value rows (Kv x E)",
    "W_O head": "one head's columns of the output projection (E x Kv); P_h",
    "W_K^T W_Q": "per query head, W_K,g^T W_Q,h (E x E, rank <= Kq): the bilinear form of the attention scores",
    "W_O W_V": "per query head, W_O,h W_V,g (E x E): P W_V for the linear-attention models",
}

INSIDE_RULE = (f"inside = between the LLM's {INSIDE_PERCENTILES[0]:g}st and {INSIDE_PERCENTILES[1]:g}th percentiles "
               "of the statistic over its layers (whole-layer matrices) or layers x heads (per-head matrices)")


def weights_report(llm_sources: Sequence[str | Path | WeightSource], out_dir: str | Path, trained: Any = None, *,
                   trained_note: str | None = None, hand: Sequence[HandSpec | tuple] = DEFAULT_HAND,
                   max_layers: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None,
                   figures: bool = True, progress: bool = True, unpermute: bool | None = None,
                   cache: bool | str | Path | None = None, jobs: Any = None) -> dict:
    """Compare hand-constructed (and trained) attention weights with real LLM weights; write the report to
    ``out_dir`` and return its content.

    Args:
      llm_sources: built-in names (``smollm2``, ``minilm``), checkpoint paths, or :class:`WeightSource` objects.
      out_dir: folder for ``weight_stats.json``, ``report.md`` and the figures (created if needed).
      trained: a trained :class:`~iclgd_synth.model.TransformerParams` (or WeightSource), or None for no trained
        model; ``trained_note`` says where it came from (or why there is none) in the report.
      hand: hand-constructed sources as :class:`HandSpec` or (construction, D) tuples.
      max_layers: read only the first layers of each LLM (quick looks, tests).
      n_heads / n_kv_heads: head counts for checkpoint paths without a config.json / metadata; not applied to the
        built-in sources (whose head counts are known) nor to WeightSource objects.
      figures: write the PNG figures. progress: tqdm bars over layers.
      unpermute: for GGUF checkpoints, undo llama.cpp's rotary row permutation of W_Q / W_K (None: by architecture).
      cache: the LLM statistics cache (:func:`~iclgd_synth.weights.collect.collect_stats`): None from the
        environment (``ICLGD_CACHE``), False off, or a folder.
      jobs: a :class:`~iclgd_synth.background.Jobs` to draw the figures with (the caller then waits for it before
        the figure files are read); None draws them here, before returning.

    Returns:
      dict with "summary_markdown" (the summary table), "resemblance" (every row), "summary" (the summary rows),
      "inside_counts", "files" (paths written), "seconds" and "stats" (name -> :class:`SourceStats`).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not llm_sources:
        raise ValueError("weights_report needs at least one LLM source (e.g. 'smollm2', 'minilm' or a path)")
    llm_src = [open_llm(s, max_layers=max_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, unpermute=unpermute)
               for s in llm_sources]
    llm_src = [s.with_max_layers(max_layers) if max_layers is not None else s for s in llm_src]
    others = [hand_source(h) for h in hand]
    if trained is not None:
        others.append(trained if isinstance(trained, WeightSource) else trained_source(trained))
    named = _unique_names(llm_src + others)
    llm_src, others = named[:len(llm_src)], named[len(llm_src):]

    llms = [collect_stats(s, progress=progress, cache=cache) for s in llm_src]
    rest = [collect_stats(s, progress=progress, cache=False) for s in others]
    rows = resemblance(llms, rest)
    summary = resemblance(llms, rest, SUMMARY_ROWS)
    counts = inside_counts(summary)
    short = {s.name: _short(s) for s in llms}
    n_rows = p_vs_context_size()
    if trained is None and trained_note is None:
        trained_note = "no trained model was given"

    files = {}
    if figures:
        from iclgd_synth.background import Jobs

        # Inline jobs are done when submitted (and raise there).
        files.update(_figures(out_dir, llms, rest, n_rows, jobs if jobs is not None else Jobs(inline=True)))
    summary_md = summary_table(summary, [l.name for l in llms], [o.name for o in rest], short)
    seconds = time.perf_counter() - t0
    md = _markdown(llms, rest, rows, summary_md, counts, short, n_rows, trained_note, files, seconds)
    (out_dir / "report.md").write_text(md)
    files["report"] = str(out_dir / "report.md")
    payload = {
        "generated_by": "iclgd weights", "seconds": round(seconds, 2), "inside_rule": INSIDE_RULE,
        "statistics": STATISTICS, "matrices": MATRIX_DESCRIPTIONS, "trained": trained_note,
        "sources": {s.name: s.to_dict() for s in llms + rest},
        "summary": summary, "inside_counts": counts, "resemblance": rows,
        "n_dependence": {"rows": n_rows, "at_zero": construction_at_zero_context()},
    }
    (out_dir / "weight_stats.json").write_text(json.dumps(_clean(payload), indent=1))
    files["stats"] = str(out_dir / "weight_stats.json")
    return {"summary_markdown": summary_md, "summary": summary, "resemblance": rows, "inside_counts": counts,
            "files": files, "seconds": seconds, "stats": {s.name: s for s in llms + rest}, "trained": trained_note}


def open_llm(source: str | Path | WeightSource, *, max_layers: int | None = None, n_heads: int | None = None,
             n_kv_heads: int | None = None, unpermute: bool | None = None) -> WeightSource:
    """One LLM source of the report: a WeightSource as given; a built-in name opened without the head-count
    overrides (they are meant for checkpoint paths that lack the metadata); a path opened with them."""
    if isinstance(source, WeightSource):
        return source
    heads = {} if str(source) in BUILTIN_SOURCES else dict(n_heads=n_heads, n_kv_heads=n_kv_heads)
    return open_source(source, max_layers=max_layers, unpermute=unpermute, **heads)


# --- markdown -----------------------------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    """Numbers for tables: 4 significant digits, fractions near 1 with enough decimals to tell them from 1."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    v = float(v)
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(1 - abs(v)) < 1e-12:  # equal to +-1 up to rounding
        return "-1" if v < 0 else "1"
    if 0.9999 < abs(v) < 1:  # e.g. the zero fraction 1 - 1/4096^2 of a hand-constructed W_V
        return f"{'-' if v < 0 else ''}1-{1 - abs(v):.2e}"
    if 0.999 < abs(v) < 1:
        return f"{v:.6f}"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def summary_table(rows: Sequence[dict], llm_names: Sequence[str], other_names: Sequence[str],
                  short: dict[str, str] | None = None) -> str:
    """Markdown: one row per (matrix, statistic); the LLMs' [p1, p99] ranges and each other source's value with one
    mark per LLM (in column order): ✓ inside that LLM's range, ✗ outside."""
    short = short or {n: n for n in llm_names}
    head = (["matrix", "statistic"] + [f"{short[n]} [p1, p99]" for n in llm_names] + list(other_names))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["matrix"], row["stat"]]
        for n in llm_names:
            d = row["llm"].get(n, {})
            cells.append(f"[{fmt(d.get('p1'))}, {fmt(d.get('p99'))}]" if d.get("n") else "n/a")
        for o in other_names:
            e = row["sources"].get(o)
            if e is None:
                cells.append("n/a")
                continue
            marks = "".join("·" if e["positions"][n]["inside"] is None else
                            ("✓" if e["positions"][n]["inside"] else "✗") for n in llm_names)
            cells.append(f"{fmt(e['value'])} {marks}")
        lines.append("| " + " | ".join(cells) + " |")
    counts = inside_counts(rows)
    tail = ["**inside (of compared)**", ""] + [""] * len(llm_names)
    for o in other_names:
        c = counts.get(o, {})
        tail.append(" · ".join(f"{c[n][0]}/{c[n][1]}" for n in llm_names if n in c) or "n/a")
    lines.append("| " + " | ".join(tail) + " |")
    return "\n".join(lines)


def statistic_tables(rows: Sequence[dict], llm_names: Sequence[str], other_names: Sequence[str],
                     short: dict[str, str]) -> str:
    """Markdown: one table per statistic; rows are matrices; LLM columns give median [p1, p99], other sources' cells
    give the value and, per LLM, its percentile p and z-score."""
    by_stat: dict[str, list[dict]] = {}
    for row in rows:
        by_stat.setdefault(row["stat"], []).append(row)
    out = []
    for stat, desc in STATISTICS.items():
        if stat not in by_stat:
            continue
        out.append(f"### `{stat}`: {desc}\n")
        head = ["matrix"] + [f"{short[n]} median [p1, p99] (n)" for n in llm_names] + list(other_names)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for row in sorted(by_stat[stat], key=lambda r: MATRICES.index(r["matrix"]) if r["matrix"] in MATRICES
                          else len(MATRICES)):
            cells = [row["matrix"]]
            for n in llm_names:
                d = row["llm"].get(n, {})
                cells.append(f"{fmt(d.get('median'))} [{fmt(d.get('p1'))}, {fmt(d.get('p99'))}] ({d.get('n', 0)})"
                             if d.get("n") else "n/a")
            for o in other_names:
                e = row["sources"].get(o)
                if e is None or e["value"] is None or math.isnan(e["value"]):
                    cells.append("n/a")
                    continue
                pos = " / ".join(f"p{fmt(e['positions'][n]['percentile'])} z{_z(e['positions'][n]['z'])}"
                                 for n in llm_names)
                cells.append(f"{fmt(e['value'])} ({pos})")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _z(z: float) -> str:
    if z is None or math.isnan(z):
        return "n/a"
    if math.isinf(z):
        return "+inf" if z > 0 else "-inf"
    return f"{z:+.3g}"


def _sources_table(stats: Sequence[SourceStats]) -> str:
    lines = ["| source | role | format (storage) | layers read / total | heads (kv heads) | head dim | hidden E | "
             "time (s) | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        i = s.info
        when = f"{s.seconds:.1f} (cached)" if s.cached else f"{s.seconds:.1f}"
        lines.append(f"| {s.name} | {s.kind} | {i.format} ({i.storage}) | {s.n_layers} / {i.n_layers} | {i.n_heads} "
                     f"({i.n_kv_heads}) | {i.head_dim} | {i.hidden_size} | {when} | "
                     f"{'; '.join(i.notes) or ''} |")
    return "\n".join(lines)


def _findings(counts: dict, llm_names: Sequence[str], short: dict[str, str], n_rows: int) -> str:
    lines = []
    for o, per in counts.items():
        parts = [f"{per[n][0]} of {per[n][1]} inside {short[n]}'s range" for n in llm_names if n in per]
        lines.append(f"- **{o}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _markdown(llms, rest, rows, summary_md, counts, short, n_rows, trained_note, files, seconds) -> str:
    llm_names, other_names = [l.name for l in llms], [o.name for o in rest]
    n_table = ["| N | P[y, y] = eta / N | fraction of P with abs < 1e-2 | abs < 1e-3 |", "|---|---|---|---|"]
    n_table += [f"| {r['N']} | {fmt(r['P_yy'])} | {fmt(r['abs<1e-2'])} | {fmt(r['abs<1e-3'])} |" for r in n_rows]
    heads_shown = _heatmap_heads(llms, short)
    figs = {"magnitudes": "Histograms of log10(|w| / RMS(W)): each entry's magnitude relative to the root-mean-square "
                          "of its whole-layer matrix (0 = an entry of typical size, -3 = a thousand times smaller), "
                          "as the fraction of all entries per bin; exact zeros have no logarithm and are counted in "
                          "the legend",
            "small_fraction": "Fraction of entries with |w| < t against the absolute threshold t (the critique's "
                              "sparsity curve)",
            "spectra": "Normalised singular values s_k / s_1 against k / n (LLMs: median and 10-90% band)",
            "kq_heatmaps": f"Heat maps of W_K^T W_Q: the hand constructions with D <= 64, the trained model, and "
                           f"{heads_shown}",
            "ov_heatmaps": f"Heat maps of W_O W_V = P W_V: the hand constructions with D <= 64, the trained model, and "
                           f"{heads_shown}",
            "n_dependence": "The hand weights' P = eta / N against the number of demonstrations N"}
    fig_md = "\n".join(f"**{desc}.**\n\n![{key}]({Path(files[key]).name})\n" for key, desc in figs.items()
                       if key in files)
    trained_text = " and a model trained on the in-context objective" if any(o.kind == "trained" for o in rest) else ""
    return f"""# Do hand-constructed weights look like real LLM weights?

Written by `iclgd weights` in {seconds:.0f} s. Hand-constructed linear-attention weights that implement gradient
descent ("Transformers learn in-context by gradient descent", Proposition 1){trained_text}
against real pretrained attention weights, statistic by statistic. The critique "Do pretrained Transformers Learn
In-Context by Gradient Descent?" compares sparsity at absolute thresholds only; the other statistics here are
scale-invariant (the scale of each linear-attention weight pair is arbitrary) and are this package's own.

Trained model: {trained_note}.

## Sources

{_sources_table(llms + rest)}

## How to read the tables

- Matrices: {'; '.join(f'`{k}` {v}' for k, v in MATRIX_DESCRIPTIONS.items())}.
- An LLM's distribution of a statistic is over its layers (whole-layer matrices) or its layers x heads (per-head
  matrices). A hand-constructed or trained source gives one value (median over its layers / heads; each has one).
- {INSIDE_RULE}. Percentile p = 100 (#below + #equal / 2) / n; z = (value - mean) / std of the LLM's values.
- Rank-like statistics are divided by n = min(rows, cols). A per-head W_K^T W_Q of an LLM has rank <= head dim, a
  hand-constructed one (one head, key size D) rank d = D - 1: part of the difference is architectural.
- Symmetry, cosine with I, diagonal and top-row energy are computed for the per-head products only (E x E, the
  same hidden / token coordinates on both sides); for a whole-layer W_Q or W_O they would depend on the arbitrary
  order of the heads' coordinates.
- What an LLM's W_K^T W_Q leaves out of its attention score: {_omissions(llms, short)}.

## Summary

Marks after each value, one per LLM in column order: ✓ inside that LLM's range, ✗ outside.

{summary_md}

{_findings(counts, llm_names, short, len(rows))}

## Dependence on the number of demonstrations N

The construction writes 1/N into P = (eta / N) I, so the weights change with the prompt length (the scale-invariant
statistics do not, the absolute-threshold ones of P do). At N = 0 the construction is undefined:
{construction_at_zero_context()}.

{chr(10).join(n_table)}

## Figures

{fig_md}
## Per-statistic tables

Cells of the hand-constructed and trained sources: value (percentile p and z-score in each LLM, in column order).

{statistic_tables(rows, llm_names, other_names, short)}
"""


# --- helpers ------------------------------------------------------------------------------------------------------


def _figures(out_dir: Path, llms, rest, n_rows, jobs) -> dict[str, str]:
    """Submit the figures to ``jobs``; their paths (written once the jobs are done)."""
    from iclgd_synth.weights import figures

    everything = llms + rest
    files = {}
    for key, draw, data in (("magnitudes", figures.magnitude_histograms, everything),
                            ("small_fraction", figures.small_fraction_curves, everything),
                            ("spectra", figures.spectra, everything),
                            ("n_dependence", figures.n_dependence, n_rows)):
        files[key] = out_dir / f"{key}.png"
        jobs.submit(draw, files[key], data)
    for key, matrix in (("kq_heatmaps", "W_K^T W_Q"), ("ov_heatmaps", "W_O W_V")):
        examples = []
        for s in rest:
            if s.kind == "hand" and s.info.hidden_size > 64:
                continue  # heat maps of the small constructions show the same pattern legibly
            examples += [(f"{s.name}: {k}", m) for k, m in s.examples.items() if k.startswith(matrix)]
        for s in llms:
            mine = [(f"{_short(s)}: {k}", m) for k, m in s.examples.items() if k.startswith(matrix)]
            examples += mine
            if mine and mine[0][1].shape[0] > CROP:  # a corner, to show whether there is a diagonal at all
                examples.append((f"{mine[0][0]}, first {CROP} rows/cols", mine[0][1][:CROP, :CROP]))
        if examples:
            files[key] = out_dir / f"{key}.png"
            jobs.submit(figures.heatmaps, files[key], examples)
    return {k: str(v) for k, v in files.items()}


def _omissions(llms: Sequence[SourceStats], short: dict[str, str]) -> str:
    return "; ".join(f"{short[s.name]} ({s.info.architecture}): {s.info.score_omits or 'nothing'}" for s in llms)


def _heatmap_heads(llms: Sequence[SourceStats], short: dict[str, str]) -> str:
    """Which LLM heads the heat maps show, e.g. "SmolLM2 layers 0 and 15, head 0 of each"."""
    parts = []
    for s in llms:
        layers = sorted({int(k.split(" L")[1].split()[0]) for k in s.examples if k.startswith("W_K^T W_Q")})
        if layers:
            parts.append(f"{short[s.name]} layer{'s' if len(layers) > 1 else ''} "
                         f"{' and '.join(map(str, layers))}, head 0")
    if not parts:
        return "no LLM heads (too large to draw)"
    return (f"the LLM heads {'; '.join(parts)} (the first layer and the middle one; query head 0 with its key/value "
            f"head 0), each LLM's first also as its top-left {CROP} x {CROP} corner")


def _short(s: SourceStats) -> str:
    return SHORT_NAMES.get(s.info.source, s.name)


def _unique_names(sources: list[WeightSource]) -> list[WeightSource]:
    """Sources with distinct names ("name (2)" for a repeated one): names key the report's tables."""
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        n = s.info.name
        seen[n] = seen.get(n, 0) + 1
        out.append(s if seen[n] == 1 else
                   dataclasses.replace(s, info=dataclasses.replace(s.info, name=f"{n} ({seen[n]})")))
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: NaN -> null, +-inf -> "inf" / "-inf", NumPy scalars and arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
