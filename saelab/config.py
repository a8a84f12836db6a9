"""Dataclass configs for every command, YAML presets and CLI overrides.

Each field carries a docstring under it; `field_docs` reads those docstrings from the
source, and the CLI turns them into `--help` text. Each field also declares its valid values
once, in its annotation (`n_ctx: Annotated[int, Check(ge=2)]`, a Literal or bool); `validate`,
called by every `__post_init__`, refuses a value outside them with a `UserError` that names
the field. Checks that involve several fields follow it in `__post_init__`.
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
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from saelab.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
# Layer 6 of 30: early enough that harvesting runs fast on a CPU (only 7 blocks run), late
# enough that the residual stream holds contextual, word- and phrase-level features rather
# than token identity alone.
DEFAULT_HOOK = "blocks.6.hook_resid_post"

Dtype = Literal["float16", "bfloat16", "float32"]
Arch = Literal[
    "topk", "gradient_topk", "feature_choice", "mutual_choice", "matching_pursuit", "jumprelu"
]
"""The selection rules of `saelab.archs.ARCHS` (a test keeps the two equal); jumprelu is
inference-only (imported SAELens SAEs), so training refuses it."""


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


@dataclass
class HarvestConfig:
    model: Name = DEFAULT_MODEL
    """Model: 'smollm2-135m' (embedded, offline), 'tiny' (random, for tests), an HF name or a
    local HF directory."""

    hooks: Annotated[list[str], Check(nonempty=True)] = field(
        default_factory=lambda: [DEFAULT_HOOK]
    )
    """Hook points to record, e.g. blocks.6.hook_resid_post."""

    corpus: Name = "default"
    """Text source: 'default' (embedded Bible + stdlib docstrings), an HF dataset name, or a
    local .txt/.jsonl file or directory."""

    text_field: Name = "text"
    """Field holding the text in JSONL files and HF datasets."""

    split: Name = "train"
    """Split of an HF dataset."""

    n_tokens: Positive = 300_000
    """Activations to record (BOS positions excluded)."""

    n_ctx: Annotated[int, Check(ge=2, note="BOS and at least one token")] = 128
    """Context length in tokens, BOS included."""

    batch_size: Positive = 16
    """Contexts per model forward."""

    shard_contexts: Positive = 256
    """Contexts per shard file."""

    dtype: Dtype = "float16"
    """Storage dtype of activations."""

    grads: bool = False
    """Also store the gradient of the next-token loss with respect to each hooked activation
    (needed by gradient_topk)."""

    out: Free = ""
    """Harvest directory to write; default cached_activations/<model>-<first hook>."""

    seed: Seed = 0
    """Seed for corpus shuffling."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class SAEConfig:
    arch: Arch = "topk"
    """Selection rule (saelab/archs.py)."""

    d_sae: Positive = 4096
    """Number of latents."""

    k: Positive = 32
    """Active latents per token (mean, for batch-level rules; steps for matching_pursuit)."""

    beta: NonNegative = 1.0
    """gradient_topk: weight of the gradient term in the selection score."""

    aux: Literal["default", "auxk", "zipf"] = "default"
    """Auxiliary loss: the arch's own (aux_zipf for mutual_choice, AuxK otherwise), or force
    AuxK on dead latents or aux_zipf on under-used ones."""

    def __post_init__(self) -> None:
        validate(self)
        if self.k >= self.d_sae:
            raise FieldError("k", f"={self.k} must be smaller than d_sae={self.d_sae}; lower k")


@dataclass
class TrainConfig:
    harvest: Free = ""
    """Harvest directory (cached_activations/<name>)."""

    hook: Free = ""
    """Hook to train on; defaults to the harvest's only hook."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE to train."""

    sweep: Annotated[list[SAEConfig], Check(free=True)] = field(default_factory=list)
    """Several SAEs (a YAML list of sae mappings) trained together on one read of the data;
    each gets its own run under out/. Replaces sae when given."""

    out: Free = ""
    """Run directory; defaults to runs/<harvest name>-<arch>-<d_sae>-k<k>."""

    n_tokens: Count = 0
    """Training tokens; 0 means one epoch over the training split."""

    batch_size: Positive = 4096
    """Tokens per optimizer step."""

    lr: NonNegative = 0.0
    """Adam learning rate; 0 picks lr_base / sqrt(d_sae / 2**14)."""

    lr_base: Annotated[float, Check(gt=0)] = 2e-3
    """Learning rate at d_sae = 16384, used when lr is 0."""

    lr_warmup_steps: Count = 20
    """Linear warm-up steps."""

    lr_decay_frac: Annotated[float, Check(ge=0, le=1)] = 0.2
    """Fraction of training, at the end, over which the lr decays linearly to zero."""

    betas: Annotated[tuple[float, float], Check(ge=0, lt=1)] = (0.9, 0.999)
    """Adam betas."""

    auxk_alpha: NonNegative = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024)."""

    k_aux: Count = 0
    """Latents in the AuxK reconstruction; 0 means d_in // 2."""

    zipf_exponent: NonNegative = 1.0
    """aux_zipf (mutual_choice): target firing frequency of the r-th latent ∝ r^-exponent."""

    freq_decay: Annotated[float, Check(gt=0, lt=1)] = 0.99
    """Decay of the per-latent firing-frequency EMA that aux_zipf compares with its target."""

    dead_tokens: Positive = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""

    eval_tokens: Count = 20_000
    """Tokens held out at the end of the harvest for evaluation (never trained on)."""

    scale_sample: Positive = 20_000
    """Tokens sampled to estimate the input scale and the b_dec init."""

    shuffle_buffer: Positive = 262_144
    """Tokens in the shuffle buffer."""

    checkpoint_every: Count = 200
    """Steps between checkpoints (0 disables)."""

    log_every: Positive = 10
    """Steps between log lines in train_log.jsonl."""

    seed: Seed = 0
    """Seed for init and data order."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    threads: Count = 0
    """torch CPU threads; 0 keeps torch's default."""

    wandb: bool = False
    """Log to Weights & Biases."""

    wandb_project: Name = "saelab"
    """W&B project."""

    wandb_mode: Literal["online", "offline"] = "offline"
    """W&B mode; offline writes to ./wandb for a later `wandb sync`."""

    def __post_init__(self) -> None:
        validate(self)
        for s in self.sweep or [self.sae]:
            # AuxK reconstructs from the k_aux best dead latents, so it cannot ask for more
            # latents than the SAE has (0 is resolved against d_in once the harvest is open).
            if self.k_aux > s.d_sae:
                raise FieldError(
                    "k_aux", f"={self.k_aux} exceeds d_sae={s.d_sae}; lower k_aux (0: d_in // 2)"
                )

    def resolved_lr(self) -> float:
        # Scaling heuristic from Gao et al. 2024 (lr ∝ 1/sqrt(n_latents)).
        return self.lr or self.lr_base / math.sqrt(self.sae.d_sae / 2**14)


@dataclass
class EvalConfig:
    run: Free = ""
    """Run directory to evaluate."""

    n_tokens: Count = 0
    """Held-out tokens to evaluate on; 0 means all of the run's held-out split."""

    batch_size: Positive = 4096
    """Tokens per batch (also the batch of batch-mode metrics for batch-level rules)."""

    mp_tol: Annotated[float, Check(gt=0, lt=1)] = 0.1
    """matching_pursuit: residual tolerance of the adaptive-inference metrics, in (0, 1)."""

    downstream: bool = True
    """Also splice the SAE into the model and measure CE/KL on held-out contexts."""

    ce_contexts: Count = 64
    """Held-out contexts for the downstream (CE, KL) metrics."""

    splice_from: SpliceFrom = 1
    """First position that is spliced (1 skips BOS)."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class DarkMatterConfig:
    fit_tokens: Count = 0
    """Held-out tokens used to fit the linear predictor of the SAE error; 0: half of the
    run's held-out split, at most 150k (the paper's fit size)."""

    score_tokens: Count = 0
    """Further held-out tokens (disjoint from the fit tokens) the predictor is scored on;
    0: the rest of the held-out split, at most 300k (the paper's)."""

    batch_size: Positive = 4096
    """Tokens per batch."""

    ridge: NonNegative = 1e-6
    """Ridge added to the normal equations, relative to their mean diagonal (stability only)."""

    ce_contexts: Count = 16
    """Held-out contexts for the three-way CE splice (0 skips it). Each costs five model
    forwards; the splices are paired on the same contexts, so ΔCE is reported with its
    standard error over contexts: raise this when the error bars overlap."""

    splice_from: SpliceFrom = 1
    """First position that is spliced in the CE comparison (1 skips BOS)."""

    top_contexts: Count = 20
    """Contexts with the largest nonlinear error to list."""

    pursuit: Literal["support", "greedy", "none"] = "support"
    """Inference-time gradient pursuit at the SAE's own L0: 'support' refits the coefficients
    on the latents the SAE chose, 'greedy' also picks the latents (slow: one dense pass over
    W_dec per step), 'none' skips it."""

    pursuit_steps: Count = 10
    """Projected gradient steps (exact line search) refining the pursuit's coefficients."""

    figures: bool = True
    """Write the figures (HTML, and PNG when a browser is available)."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class IndexConfig:
    run: Free = ""
    """Run directory to index."""

    rows: Literal["all", "heldout"] = "all"
    """Harvest rows to index: 'all' (more text, so better contexts for rare latents; the SAE
    was trained on most of it) or 'heldout' (only the run's held-out split)."""

    n_tokens: Count = 0
    """Index only the first this many of those rows; 0 means all of them."""

    top_contexts: Positive = 20
    """Top-activating contexts kept per latent: the best of its top 2·top_contexts tokens whose
    windows do not overlap a better one's in the same context."""

    quantile_samples: Count = 2
    """Contexts kept near each of the activation quantiles 0.75, 0.5 and 0.25 of a latent."""

    quantile_pool: Positive = 64
    """Firing tokens per latent sampled uniformly during the pass, to pick quantile contexts."""

    context_before: Count = 16
    """Tokens shown before the peak token of a context."""

    context_after: Count = 4
    """Tokens shown after the peak token of a context."""

    hist_bins: Positive = 64
    """Histogram bins per latent; empty bins above the maximum are trimmed, so between half
    and all of them remain."""

    neighbours: Count = 10
    """Nearest latents by decoder cosine kept per latent."""

    logit_tokens: Count = 10
    """Logit-lens tokens kept at each end (most promoted and most suppressed)."""

    logit_lens: bool = True
    """Load the model for the logit lens (false skips it)."""

    token_latents: Positive = 32
    """Latents kept per token id for token search, most frequent on that token first."""

    batch_size: Positive = 4096
    """Tokens per batch."""

    seed: Seed = 0
    """Seed of the quantile sampling."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    def __post_init__(self) -> None:
        validate(self)


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
