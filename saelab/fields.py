"""Config fields: their declared valid values, and reading configs from YAML and flags.

A field declares its valid values once, in its annotation (`Annotated[int, Check(ge=1)]`, a
Literal or bool); `validate`, called by every config's `__post_init__`, refuses a value
outside them with a `UserError` naming the field. `build` reads a YAML preset, applies flag
overrides (coerced from strings to each field's type) and builds the config; `field_docs`
reads the docstring under each field, which the CLI turns into `--help` text. The configs
themselves live in `saelab.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from saelab.errors import UserError


@dataclass(frozen=True)
class Check:
    """The valid values of one config field, declared once in its annotation
    (`Annotated[int, Check(ge=1)]`) and enforced by `validate`.

    Numbers take bounds; a float must also be finite unless `finite` is False. A tuple or list
    applies the bounds to each item. Strings take `nonempty` or a `pattern`. `free` says on
    purpose that every value of the type is valid (e.g. '' meaning "pick a default"). Literal
    and bool fields need no Check: their type lists the choices.
    """

    ge: float | None = None
    """Lowest valid value (inclusive); gt, le and lt likewise."""
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    """Refuse nan and ±inf (floats only)."""
    nonempty: bool = False
    """A string (or a list, and each of its strings) must not be empty or blank."""
    pattern: str | None = None
    """A regular expression the whole string must match."""
    what: str = ""
    """The pattern in words, for errors: 'auto, cpu, cuda or cuda:N'."""
    free: bool = False
    """Every value of the field's type is valid, on purpose."""
    note: str = ""
    """Why the bound is what it is, shown after it in errors."""

    def __post_init__(self) -> None:
        bounded = any(b is not None for b in (self.ge, self.gt, self.le, self.lt))
        if not (bounded or self.nonempty or self.pattern or self.free):
            raise TypeError("a Check declares a bound, nonempty, a pattern or free=True")


Positive = Annotated[int, Check(ge=1)]
Count = Annotated[int, Check(ge=0)]
"""A number of things where 0 is allowed (it usually means "all" or "off": see the doc)."""
NonNegative = Annotated[float, Check(ge=0)]
Seed = Annotated[int, Check(ge=0, lt=2**32)]
Name = Annotated[str, Check(nonempty=True)]
Free = Annotated[str, Check(free=True)]
"""Any string: '' asks for a default, and paths are checked when they are opened."""
SpliceFrom = Annotated[int, Check(ge=1, note="0 would splice BOS")]
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
Device = Annotated[str, Check(pattern=DEVICE_PATTERN, what="auto, cpu, cuda or cuda:N")]


# ---------------------------------------------------------------------------------------
# Validation: every field against its declared type and Check


class FieldError(UserError):
    """A bad value of one field; `from_dict` puts the section it sits in before its name."""

    def __init__(self, name: str, rest: str) -> None:
        super().__init__(name + rest)
        self.name = name
        self.rest = rest


def _self_checked(tp: Any) -> bool:
    """Literal and bool fields list their valid values in the type; a nested config checks
    its own fields."""
    return typing.get_origin(tp) is Literal or tp is bool or dataclasses.is_dataclass(tp)


@cache
def constraints(cls: type) -> dict[str, tuple[Any, Check | None]]:
    """Each field's type and declared Check (None where the type is the constraint)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[Any, Check | None]] = {}
    for f in dataclasses.fields(cls):
        tp, check = hints[f.name], None
        if typing.get_origin(tp) is Annotated:
            tp, *extras = typing.get_args(tp)
            check = next((e for e in extras if isinstance(e, Check)), None)
        if check is None and not _self_checked(tp):
            # A programming error, not a user's: fail on the first use of the class.
            raise TypeError(f"{cls.__name__}.{f.name} declares no valid values; add a Check")
        out[f.name] = (tp, check)
    return out


def validate(cfg: Any) -> None:
    """Refuse the first field of `cfg` whose value breaks its type or declared Check."""
    cls = type(cfg)
    for name, (tp, check) in constraints(cls).items():
        value = getattr(cfg, name)
        problem = _problem(value, tp, check)
        if problem:
            default = _show(default_of(cls, name))
            raise FieldError(name, f"={value!r} {problem}; the default is {default}")


def default_of(cls: type, name: str) -> Any:
    """The default value of field `name` of dataclass `cls`."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _show(value: Any) -> str:
    """A value as it is typed on the command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _problem(value: Any, tp: Any, check: Check | None) -> str | None:
    """What is wrong with `value` as a field of type `tp` under `check`, or None."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return None if value in choices else "is not one of " + ", ".join(map(str, choices))
    if dataclasses.is_dataclass(tp):
        return None if isinstance(value, tp) else f"is not a {tp.__name__}"  # type: ignore[union-attr]
    if origin in (list, tuple):
        return _items_problem(value, tp, check)
    if not _has_type(value, tp):
        return f"is not a valid {tp.__name__}"
    if check is None or tp is bool or _satisfies(value, tp, check):
        return None
    if tp is float and check.finite and not math.isfinite(value):
        return "is not a finite number"
    return rule(tp, check)


def _items_problem(value: Any, tp: Any, check: Check | None) -> str | None:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        return "is not a list"
    if typing.get_origin(tp) is tuple and len(value) != len(args):
        return f"needs {len(args)} values"
    if check is not None and check.nonempty and not value:
        return "must not be empty"
    item_types = args if typing.get_origin(tp) is tuple else [args[0]] * len(value)
    for item, item_tp in zip(value, item_types):
        if problem := _problem(item, item_tp, check):
            return f"holds {item!r}, which {problem}"
    return None


def _has_type(value: Any, tp: Any) -> bool:
    if tp is float:  # an int is a valid float (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _satisfies(value: Any, tp: Any, c: Check) -> bool:
    if c.free:
        return True
    if tp is str:
        empty_ok = not c.nonempty or bool(value.strip())
        return empty_ok and (c.pattern is None or re.fullmatch(c.pattern, value) is not None)
    if c.finite and not math.isfinite(value):
        return False
    return not (
        (c.ge is not None and not value >= c.ge)
        or (c.gt is not None and not value > c.gt)
        or (c.le is not None and not value <= c.le)
        or (c.lt is not None and not value < c.lt)
    )


def rule(tp: Any, c: Check) -> str:
    """A Check as a requirement on one value: 'must be positive', 'must lie in (0, 1)', …"""
    if c.free:
        return ""
    if tp is str:
        return f"must be {c.what or c.pattern}" if c.pattern else "must not be empty"
    return _bound_text(tp, c) + (f" ({c.note})" if c.note else "")


def _bound_text(tp: Any, c: Check) -> str:
    lo = c.ge if c.ge is not None else c.gt
    hi = c.le if c.le is not None else c.lt
    if lo is not None and hi is not None:
        left = "[" if c.ge is not None else "("
        right = "]" if c.le is not None else ")"
        return f"must lie in {left}{_num(lo)}, {_num(hi)}{right}"
    if hi is not None:
        return f"must be {'<=' if c.le is not None else '<'} {_num(hi)}"
    if c.ge == 0:
        return "must not be negative"
    if c.gt == 0 or (tp is int and c.ge == 1):
        return "must be positive"
    return f"must be {'>=' if c.ge is not None else '>'} {_num(lo)}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def requirement(cls: type, dotted: str) -> str:
    """The rule of a (dotted) field for --help, or '' where its type says it all."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        cls = constraints(cls)[p][0]
    tp, check = constraints(cls)[leaf]
    if check is None:
        return ""
    item = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else tp
    text = rule(item, check)
    return f"each item {text}" if text and item is not tp else text


# ---------------------------------------------------------------------------------------
# Field docs, YAML and overrides


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to a field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    raw = value
    try:
        if origin is Literal:
            if value not in args:
                raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, args))}")
            return value
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if origin is list else value.split(",")
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if origin is tuple:
                if len(value) != len(args):
                    raise UserError(
                        f"{key}={raw!r} needs {len(args)} comma-separated values, got {len(value)}"
                    )
                return tuple(coerce(v, a, key) for v, a in zip(value, args))
            if dataclasses.is_dataclass(args[0]):
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise UserError(f"{key} must be a YAML list of mappings (set it in --config)")
                item_cls = typing.cast(type, args[0])
                return [from_dict(item_cls, v, f"{key}[{i}].") for i, v in enumerate(value)]
            return [coerce(v, args[0], key) for v in value]
        if origin in (typing.Union, types.UnionType):
            return coerce(value, next(a for a in args if a is not type(None)), key)
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise UserError(f"{key}={value!r} is not a boolean; use true or false")
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, int) or value not in (0, 1):  # bool is an int
                raise UserError(f"{key}={value!r} is not a boolean; use true or false")
            return bool(value)
        if tp is int:
            return _to_int(value)
        if tp is float:
            if isinstance(value, bool):  # YAML's `true` is no number
                raise ValueError
            return float(value)  # nan and inf pass here; validate names the field's rule
        if tp is str:
            if isinstance(value, (list, dict)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError, OverflowError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{key}={value!r} is not a valid {name}") from None
    return value


def _to_int(value: Any) -> int:
    """An int from an int, an integral float or a string such as '300000' or '3e5'."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float) and not value.is_integer():  # also refuses nan and inf
        raise ValueError
    return int(value)


RENAMED = {
    "out_dir": "out",
    "name": "out",
    "downstream_contexts": "ce_contexts",
    "top_n": "top_contexts",
    "tokens": "n_tokens",
    "eval_tokens": "score_tokens",
}
"""Names that an earlier saelab used for a field, refused with the new one as the hint (an
old name that still names another field, like train's eval_tokens, is simply that field)."""


def did_you_mean(key: str, known: list[str]) -> str | None:
    """The known key that `key` most likely meant: its new name, or the closest spelling."""
    prefix, _, last = key.rpartition(".")
    renamed = (prefix + "." if prefix else "") + RENAMED.get(last, "\0")
    if renamed in known:
        return renamed
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown_key(key: str, known: list[str]) -> UserError:
    close = [m] if (m := did_you_mean(key, known)) else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
    return UserError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking keys and coercing types."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or cls.__name__}' must be a mapping")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + key, [prefix + n for n in names])
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix + key + ".")  # type: ignore[arg-type]
        else:
            kwargs[key] = coerce(value, tp, prefix + key)
    try:
        return cls(**kwargs)
    except FieldError as e:
        if not prefix:
            raise
        raise FieldError(prefix + e.name, e.rest) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every leaf field as 'a.b' -> (type, doc), for CLI flags."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, prefix + f.name + "."))  # type: ignore[arg-type]
        else:
            out[prefix + f.name] = (tp, docs.get(f.name, ""))
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        presets = sorted(q.stem for q in Path("configs").glob("*.yaml"))
        hint = f" (presets in configs/: {', '.join(presets)})" if presets else ""
        raise UserError(f"config file {p} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values")
    return data


def build(cls: type, yaml_path: str | Path | None, overrides: dict[str, Any]) -> Any:
    """A config from an optional YAML preset with dotted-key overrides on top."""
    data = load_yaml(yaml_path) if yaml_path else {}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return from_dict(cls, data)
