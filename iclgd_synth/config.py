"""Composed configs: overrides by dotted path, JSON form and the hash that names a run directory.

Configs are frozen dataclasses that hold other configs (a study holds its ``train`` config, which holds ``task`` and
``model``). ``override(config, ["train.lr=5e-4", "train.task.noise=0.1"])`` returns a new config with those fields
set; the value is parsed by the field's type and the constructors' own checks run, so a bad value gets the same
clear error as in Python. An unknown path names the nearest valid ones.

A field declared with ``dataclasses.field(metadata={"hash": False})`` (how often to checkpoint, the chunk length of
the compiled training loop, ...) does not change results: it is left out of :func:`hash_dict`, so changing it
neither renames the run directory nor refuses to resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Iterable, Mapping

NO_HASH = {"hash": False}


def is_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def to_dict(config: Any, *, for_hash: bool = False) -> Any:
    """The JSON form of a (nested) config; ``for_hash`` leaves out fields marked ``metadata={"hash": False}``."""
    if is_config(config):
        return {f.name: to_dict(getattr(config, f.name), for_hash=for_hash) for f in dataclasses.fields(config)
                if not (for_hash and f.metadata.get("hash") is False)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v, for_hash=for_hash) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_dict(v, for_hash=for_hash) for k, v in config.items()}
    return config


def hash_dict(config: Any) -> Any:
    """The fields of ``config`` that change results (see the module docstring)."""
    return to_dict(config, for_hash=True)


def paths(config: Any, prefix: str = "") -> list[str]:
    """Every settable dotted path of ``config`` (leaves only)."""
    out = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if is_config(v):
            out += paths(v, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _hint(config: Any, name: str) -> Any:
    try:
        return typing.get_type_hints(type(config)).get(name)
    except Exception:  # an unresolvable annotation: fall back on the current value's type
        return None


def _parse_scalar(text: str, kind: type, path: str) -> Any:
    t = text.strip()
    if kind is bool:
        low = t.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{path} must be true or false, got {text!r}")
    if kind is int:
        try:
            f = float(t)
        except ValueError:
            raise ValueError(f"{path} must be an integer, got {text!r}") from None
        if not f.is_integer():
            raise ValueError(f"{path} must be an integer, got {text!r}")
        return int(f)
    if kind is float:
        try:
            return float(t)
        except ValueError:
            raise ValueError(f"{path} must be a number, got {text!r}") from None
    return t


def _kinds(hint: Any, current: Any) -> tuple[list[type], bool, Any]:
    """(scalar types the field accepts, whether None is accepted, element hint for tuples)."""
    if hint is None:
        return ([type(current)] if current is not None else [str]), current is None, None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds, optional, elem = [], False, None
        for a in typing.get_args(hint):
            if a is type(None):
                optional = True
            else:
                k, _, e = _kinds(a, None)
                kinds += k
                elem = elem or e
        return kinds, optional, elem
    if origin in (tuple, list) or hint in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return [tuple], False, (args[0] if args else None)
    if isinstance(hint, type):
        return [hint], False, None
    return [str], False, None


def parse_value(config: Any, name: str, text: str, path: str) -> Any:
    """Parse ``text`` as a value of field ``name`` of ``config``."""
    current = getattr(config, name)
    if isinstance(current, (tuple, list)) and any(is_config(c) or isinstance(c, (tuple, list)) for c in current):
        raise ValueError(f"{path} holds configs and cannot be set from the command line; set the fields of the "
                         "preset's own configs instead, or build the config in Python")
    kinds, optional, elem = _kinds(_hint(config, name), current)
    t = text.strip()
    if optional and t.lower() in ("none", "null", ""):
        return None
    if tuple in kinds:
        body = t[1:-1] if t[:1] in "[(" and t[-1:] in "])" else t
        items = [s for s in body.split(",") if s.strip()] if body.strip() else []
        ekinds, _, _ = _kinds(elem, current[0] if current else None)
        if elem is None and current:
            ekinds = [type(current[0])]
        return tuple(_parse_first(s, ekinds or [str], f"{path}[i]") for s in items)
    return _parse_first(t, kinds, path)


def _parse_first(text: str, kinds: list[type], path: str) -> Any:
    errors = []
    for k in sorted(kinds, key=lambda k: (k is str, k is float)):  # int before float before str
        try:
            return _parse_scalar(text, k, path)
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(errors[0] if errors else f"cannot parse {text!r} for {path}")


def _unknown(path: str, config: Any) -> ValueError:
    valid = paths(config)
    near = difflib.get_close_matches(path, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return ValueError(f"unknown config path {path!r} for {type(config).__name__}{hint} (settable paths: "
                      f"{', '.join(valid)})")


def set_path(config: Any, path: str, value: Any) -> Any:
    """``config`` with the field at dotted ``path`` set to ``value`` (already parsed), constructors re-run."""
    head, _, rest = path.partition(".")
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise _unknown(path, config)
    current = getattr(config, head)
    if rest:
        if not is_config(current):
            raise _unknown(path, config)
        return _replace(config, head, set_path(current, rest, value))
    if is_config(current):
        raise ValueError(f"{path!r} is a section, not a value; set one of its fields: "
                         f"{', '.join(paths(current, path + '.'))}")
    return _replace(config, head, value)


def _replace(config: Any, name: str, value: Any) -> Any:
    replace = getattr(config, "replace", None)
    return replace(**{name: value}) if callable(replace) else dataclasses.replace(config, **{name: value})


def _leaf_owner(config: Any, path: str) -> tuple[Any, str]:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        if not is_config(node) or p not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown(path, config)
        node = getattr(node, p)
    if not is_config(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
        raise _unknown(path, config)
    return node, leaf


def override(config: Any, assignments: Iterable[str] | Mapping[str, Any]) -> Any:
    """Apply ``PATH=VALUE`` strings (or a {path: value} mapping of parsed values).

    All assignments are applied together: every nested config is rebuilt once with all of its new values, so coupled
    fields (``train.task.dim`` and ``train.model.dim``) can change in one call; the constructors' checks then run on
    the result and an error names the assignments involved. A path set twice keeps its last value.
    """
    items = list(assignments.items()) if isinstance(assignments, Mapping) else [_split(a) for a in assignments]
    if not items:
        return config
    tree: dict[str, Any] = {}
    for path, value in items:
        owner, leaf = _leaf_owner(config, path)
        if isinstance(value, str):
            value = parse_value(owner, leaf, value, path)
        elif isinstance(getattr(owner, leaf), (tuple, list)) and any(is_config(c) for c in getattr(owner, leaf)):
            raise ValueError(f"{path} holds configs and cannot be set by path")
        if is_config(getattr(owner, leaf)):
            raise ValueError(f"{path!r} is a section, not a value; set one of its fields: "
                             f"{', '.join(paths(getattr(owner, leaf), path + '.'))}")
        node = tree
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        return _rebuild(config, tree)
    except (TypeError, ValueError) as e:
        shown = ", ".join(f"{p}={v!r}" if not isinstance(v, str) else f"{p}={v}" for p, v in items)
        raise ValueError(f"--set {shown}: {e}") from e


def _rebuild(config: Any, changes: dict[str, Any]) -> Any:
    values = {name: _rebuild(getattr(config, name), sub) if isinstance(sub, dict) and is_config(getattr(config, name))
              else sub for name, sub in changes.items()}
    return dataclasses.replace(config, **values)


def _split(assignment: str) -> tuple[str, str]:
    path, eq, value = assignment.partition("=")
    if not eq or not path.strip():
        raise ValueError(f"an override must read PATH=VALUE (e.g. train.lr=5e-4), got {assignment!r}")
    return path.strip(), value


def describe_overrides(assignments: Iterable[str]) -> list[str]:
    """Normalised ``PATH=VALUE`` strings, for config.json."""
    return [f"{p}={v.strip()}" for p, v in (_split(a) for a in assignments)]


def dumps(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, default=str)
