"""The non-LLM sources of the comparison: hand-constructed GD / GD++ weights, a model trained on the in-context
objective, and a Gaussian stand-in used when no real checkpoint is installed.

Hand weights ("Transformers learn in-context by gradient descent", Proposition 1): W_K = W_Q = [[I_d, 0], [0, 0]],
W_V = [[0, 0], [0, -1]], P = (eta / N) I (GD++: W_V = diag(I_d, -1), P = diag(-gamma I_d, eta / N)), built by
:func:`~iclgd_synth.constructions.gd_params` / :func:`~iclgd_synth.constructions.gdpp_params` with dim = D - 1. The
scale-invariant statistics depend neither on eta nor on N; the absolute-threshold ones of P do (see
:func:`p_vs_context_size`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iclgd_synth.validation import check_float, check_int
from iclgd_synth.weights.loaders import ModelInfo, WeightSource, arrays_source, params_source

#: Step size of the hand weights: the tuned one-step GD step of the P1 preset (d = N = 10, x ~ U(-0.5, 0.5)).
HAND_ETA = 6.0
#: GD++ input-transformation strength: the value learned at N = 10 in the reference paper.
HAND_GAMMA = 0.179
#: Context size N written into P = eta / N.
HAND_N = 10
#: (construction, token size D) pairs compared by default: the P1 size and LLM-like sizes.
DEFAULT_HAND = (("gd", 11), ("gdpp", 11), ("gd", 576), ("gdpp", 576), ("gd", 4096), ("gdpp", 4096))


@dataclasses.dataclass(frozen=True)
class HandSpec:
    """One hand-constructed source.

    Attributes:
      construction: "gd" or "gdpp".
      token_dim: D = d + 1 (d = D - 1 inputs, one label).
      eta: step size. Default :data:`HAND_ETA`.
      gamma: GD++ strength (ignored for "gd"). Default :data:`HAND_GAMMA`.
      n_context: N in P = eta / N. Default :data:`HAND_N`.
    """

    construction: str
    token_dim: int
    eta: float = HAND_ETA
    gamma: float = HAND_GAMMA
    n_context: int = HAND_N

    def __post_init__(self):
        if self.construction not in ("gd", "gdpp"):
            raise ValueError(f"construction must be 'gd' or 'gdpp', got {self.construction!r}")
        check_int("token_dim", self.token_dim, min_value=2)
        check_float("eta", self.eta)
        check_float("gamma", self.gamma)
        check_int("n_context", self.n_context, min_value=1)

    @property
    def name(self) -> str:
        return f"hand {'GD' if self.construction == 'gd' else 'GD++'} D={self.token_dim}"


def hand_params(spec: HandSpec) -> Any:
    """The one-layer hand-constructed :class:`~iclgd_synth.model.TransformerParams` of ``spec``."""
    from iclgd_synth.constructions import gd_params, gdpp_params

    d = spec.token_dim - 1
    if spec.construction == "gd":
        return gd_params(d, spec.eta, 1, n_context=spec.n_context)
    return gdpp_params(d, spec.eta, spec.gamma, 1, n_context=spec.n_context)


def hand_source(spec: HandSpec | tuple) -> WeightSource:
    """A hand-constructed source (built when its layer is read)."""
    spec = spec if isinstance(spec, HandSpec) else HandSpec(*spec)
    built: dict[str, Any] = {}

    def read(i: int):
        if "params" not in built:  # build lazily: the D = 4096 matrices are 64 MiB each
            built["params"] = hand_params(spec)
        return params_source(built["params"], spec.name).read_layer(i)

    d = spec.token_dim
    extra = f", gamma = {spec.gamma:g}" if spec.construction == "gdpp" else ""
    info = ModelInfo(name=spec.name, source=spec.name, format="params", architecture="lsa-linear", n_layers=1,
                     n_heads=1, n_kv_heads=1, head_dim=d, value_dim=d, hidden_size=d, storage="F32",
                     notes=(f"eta = {spec.eta:g}, N = {spec.n_context}{extra}",))
    return WeightSource(info=info, read_layer=read, kind="hand")


def trained_source(params: Any, name: str = "trained LSA") -> WeightSource:
    """A model trained on the in-context objective as a source. Its individual W_Q, W_K (and P, W_V) are only fixed
    up to an invertible change of basis between each pair; the products W_K^T W_Q and P W_V are what training
    determines."""
    return params_source(params, name, kind="trained",
                         notes=("trained on the in-context regression objective; only the products W_K^T W_Q and "
                                "P W_V are identifiable",))


def quick_trained(steps: int = 2000, seed: int = 0) -> tuple[Any | None, str]:
    """Train the quick 1-layer LSA (vonoswald preset, d = N = 10) if the training module is available.

    Returns (params or None, a note saying what was done or why there is no trained model).
    """
    try:
        from iclgd_synth.train import quick_trained_lsa
    except ImportError as e:  # the training module is optional for this comparison
        return None, f"trained model not available (iclgd_synth.train could not be imported: {e})"
    params = quick_trained_lsa(steps=steps, seed=seed)
    return params, f"1-layer LSA trained for {steps} steps on the vonoswald preset (d = N = 10), seed {seed}"


_NPZ_EXPECTED = ("an .npz written by iclgd_synth.train.save_params, or by numpy.savez with arrays w_q, w_k, w_v "
                 "(H, K, D) and w_p (H, D, K), optionally with a leading layer axis")


def load_trained_params(path: str | Path) -> Any:
    """Parameters from an .npz: either written by :func:`iclgd_synth.train.save_params`, or plain arrays ``w_q``,
    ``w_k``, ``w_v``, ``w_p`` of shape (H, K, D) / (H, D, K) (one layer) or with a leading layer axis.

    Nothing is unpickled: a file that is not such an .npz (garbage, truncated, pickled objects, a single .npy array)
    raises ValueError naming the file and what was expected.
    """
    import zipfile

    import jax.numpy as jnp

    from iclgd_synth.model import TransformerParams, check_params

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such parameter file: {str(path)!r} (expected {_NPZ_EXPECTED})")
    if path.is_dir():
        raise IsADirectoryError(f"the parameter file {str(path)!r} is a folder; expected {_NPZ_EXPECTED}")

    def unreadable(why: str | BaseException) -> ValueError:
        if isinstance(why, BaseException):  # numpy's advice to pass allow_pickle would be unsafe for such a file
            why = ("an array holds pickled Python objects, which are not loaded" if "pickle" in str(why) else
                   f"{type(why).__name__}: {why}")
        return ValueError(f"the parameter file {str(path)!r} cannot be read ({why}); expected {_NPZ_EXPECTED}")

    try:
        z = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's advice here (allow_pickle) would be unsafe for a file of unknown origin
        raise unreadable("not an .npz archive of plain arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise unreadable(e) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise unreadable(f"a single array of shape {np.shape(z)}, not an .npz archive")
    with z:
        files = set(z.files)
        if "__arch__" in files:
            from iclgd_synth.train import load_params

            try:
                return load_params(path)
            except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise unreadable(e) from None
        missing = {"w_q", "w_k", "w_v", "w_p"} - files
        if missing:
            raise ValueError(f"{str(path)!r} lacks arrays {sorted(missing)}; expected w_q, w_k, w_v (H, K, D) and "
                             f"w_p (H, D, K), optionally with a leading layer axis (found {sorted(files)})")
        try:
            arrays = {k: np.asarray(z[k]) for k in ("w_q", "w_k", "w_v", "w_p")}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise unreadable(e) from None
    if arrays["w_q"].ndim == 3:
        arrays = {k: v[None] for k, v in arrays.items()}
    if arrays["w_q"].ndim != 4:
        raise ValueError(f"w_q in {str(path)!r} must have 3 (H, K, D) or 4 (L, H, K, D) axes, "
                         f"got shape {arrays['w_q'].shape}")
    layers = tuple({k: jnp.asarray(v[i]) for k, v in arrays.items()} for i in range(arrays["w_q"].shape[0]))
    params = TransformerParams(layers=layers)
    try:
        check_params(params)
    except (ValueError, TypeError) as e:
        raise type(e)(f"the parameter file {str(path)!r}: {e}") from None
    return params


def synthetic_source(n_layers: int = 2, hidden: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                     seed: int = 0) -> WeightSource:
    """Gaussian random weights (std 1 / sqrt(hidden)) in an LLM's shape: a stand-in when no checkpoint is installed.
    It is *not* an LLM; reports label it "synthetic"."""
    rng = np.random.default_rng(seed)
    hd = hidden // n_heads
    s = 1.0 / np.sqrt(hidden)
    layers = [{"w_q": s * rng.standard_normal((n_heads, hd, hidden)),
               "w_k": s * rng.standard_normal((n_kv_heads, hd, hidden)),
               "w_v": s * rng.standard_normal((n_kv_heads, hd, hidden)),
               "w_o": s * rng.standard_normal((n_heads, hidden, hd))} for _ in range(n_layers)]
    return arrays_source(layers, f"synthetic Gaussian (E={hidden})", kind="llm",
                         notes=("random Gaussian stand-in for an LLM, not real weights",))


def p_vs_context_size(n_values: Sequence[int] = (1, 2, 5, 10, 20, 50, 100, 1000, 10000), eta: float = HAND_ETA,
                      thresholds: Sequence[float] = (1e-2, 1e-3)) -> list[dict]:
    """How the hand weights depend on the number of demonstrations N: the label entry of P = eta / N, read from the
    constructed weights at each N, and P's fraction of entries with |P| < t (absolute thresholds)."""
    from iclgd_synth.constructions import gd_params

    rows = []
    for n in n_values:
        p = np.asarray(gd_params(10, eta, 1, n_context=int(n)).layers[0]["w_p"][0], np.float64)
        row = {"N": int(n), "P_yy": float(p[-1, -1])}
        for t in thresholds:
            row[f"abs<{t:.0e}".replace("e-0", "e-")] = float(np.mean(np.abs(p) < t))
        rows.append(row)
    return rows


def construction_at_zero_context() -> str:
    """What the construction does at N = 0 (no demonstrations): P = eta / N is undefined."""
    from iclgd_synth.constructions import gd_params

    try:
        gd_params(10, HAND_ETA, 1, n_context=0)
    except (ValueError, ZeroDivisionError) as e:
        return f"refused: {e}"
    return "accepted (unexpected)"
