"""Dataclass configs for every command, YAML presets and CLI overrides.

Each field carries a docstring under it; `field_docs` reads those docstrings from the
source, and the CLI turns them into `--help` text. Cross-field checks live in
`__post_init__` and raise `UserError` with a message that names the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from saelab.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
# Layer 6 of 30: early enough that harvesting runs fast on a CPU (only 7 blocks run), late
# enough that the residual stream holds contextual, word- and phrase-level features rather
# than token identity alone.
DEFAULT_HOOK = "blocks.6.hook_resid_post"

Dtype = Literal["float16", "bfloat16", "float32"]
Arch = Literal["topk", "gradient_topk", "feature_choice", "mutual_choice", "matching_pursuit"]
"""The selection rules of `saelab.archs.ARCHS` (a test keeps the two equal)."""


@dataclass
class HarvestConfig:
    model: str = DEFAULT_MODEL
    """Model: 'smollm2-135m' (embedded, offline), 'tiny' (random, for tests), an HF name or a
    local HF directory."""

    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """Hook points to record, e.g. blocks.6.hook_resid_post."""

    corpus: str = "default"
    """Text source: 'default' (embedded Bible + stdlib docstrings), an HF dataset name, or a
    local .txt/.jsonl file or directory."""

    text_field: str = "text"
    """Field holding the text in JSONL files and HF datasets."""

    split: str = "train"
    """Split of an HF dataset."""

    n_tokens: int = 300_000
    """Activations to record (BOS positions excluded)."""

    n_ctx: int = 128
    """Context length in tokens, BOS included."""

    batch_size: int = 16
    """Contexts per model forward."""

    shard_contexts: int = 256
    """Contexts per shard file."""

    dtype: Dtype = "float16"
    """Storage dtype of activations."""

    grads: bool = False
    """Also store the gradient of the next-token loss with respect to each hooked activation
    (needed by gradient_topk)."""

    out: str = ""
    """Harvest directory to write; default cached_activations/<model>-<first hook>."""

    seed: int = 0
    """Seed for corpus shuffling."""

    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        _positive(self, "n_tokens", "n_ctx", "batch_size", "shard_contexts")
        if self.n_ctx < 2:
            raise UserError(f"n_ctx={self.n_ctx} leaves no token after BOS; use n_ctx >= 2")
        if not self.hooks:
            raise UserError("hooks is empty; name at least one hook, e.g. " + DEFAULT_HOOK)


@dataclass
class SAEConfig:
    arch: Arch = "topk"
    """Selection rule (saelab/archs.py)."""

    d_sae: int = 4096
    """Number of latents."""

    k: int = 32
    """Active latents per token (mean, for batch-level rules; steps for matching_pursuit)."""

    beta: float = 1.0
    """gradient_topk: weight of the gradient term in the selection score."""

    aux: Literal["default", "auxk", "zipf"] = "default"
    """Auxiliary loss: the arch's own (aux_zipf for mutual_choice, AuxK otherwise), or force
    AuxK on dead latents or aux_zipf on under-used ones."""

    def __post_init__(self) -> None:
        _positive(self, "d_sae", "k")
        _nonnegative(self, "beta")
        if self.k >= self.d_sae:
            raise UserError(f"k={self.k} must be smaller than d_sae={self.d_sae}; lower k")


@dataclass
class TrainConfig:
    harvest: str = ""
    """Harvest directory (cached_activations/<name>)."""

    hook: str = ""
    """Hook to train on; defaults to the harvest's only hook."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE to train."""

    sweep: list[SAEConfig] = field(default_factory=list)
    """Several SAEs (a YAML list of sae mappings) trained together on one read of the data;
    each gets its own run under out/. Replaces sae when given."""

    out: str = ""
    """Run directory; defaults to runs/<harvest name>-<arch>-<d_sae>-k<k>."""

    n_tokens: int = 0
    """Training tokens; 0 means one epoch over the training split."""

    batch_size: int = 4096
    """Tokens per optimizer step."""

    lr: float = 0.0
    """Adam learning rate; 0 picks lr_base / sqrt(d_sae / 2**14)."""

    lr_base: float = 2e-3
    """Learning rate at d_sae = 16384, used when lr is 0."""

    lr_warmup_steps: int = 20
    """Linear warm-up steps."""

    lr_decay_frac: float = 0.2
    """Fraction of training, at the end, over which the lr decays linearly to zero."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024)."""

    k_aux: int = 0
    """Latents in the AuxK reconstruction; 0 means d_in // 2."""

    zipf_exponent: float = 1.0
    """aux_zipf (mutual_choice): target firing frequency of the r-th latent ∝ r^-exponent."""

    freq_decay: float = 0.99
    """Decay of the per-latent firing-frequency EMA that aux_zipf compares with its target."""

    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""

    eval_tokens: int = 20_000
    """Tokens held out at the end of the harvest for evaluation (never trained on)."""

    scale_sample: int = 20_000
    """Tokens sampled to estimate the input scale and the b_dec init."""

    shuffle_buffer: int = 262_144
    """Tokens in the shuffle buffer."""

    checkpoint_every: int = 200
    """Steps between checkpoints (0 disables)."""

    log_every: int = 10
    """Steps between log lines in train_log.jsonl."""

    seed: int = 0
    """Seed for init and data order."""

    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""

    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""

    wandb: bool = False
    """Log to Weights & Biases."""

    wandb_project: str = "saelab"
    """W&B project."""

    wandb_mode: Literal["online", "offline"] = "offline"
    """W&B mode; offline writes to ./wandb for a later `wandb sync`."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        _nonnegative(self, "n_tokens", "lr", "k_aux", "eval_tokens", "checkpoint_every")
        if self.lr_base <= 0:
            raise UserError(f"lr_base={self.lr_base} must be positive")
        if not 0 <= self.lr_decay_frac <= 1:
            raise UserError(f"lr_decay_frac={self.lr_decay_frac} must lie in [0, 1]")
        if self.dead_tokens <= 0:
            raise UserError(f"dead_tokens={self.dead_tokens} must be positive")
        if self.log_every <= 0:
            raise UserError(f"log_every={self.log_every} must be positive")

    def resolved_lr(self) -> float:
        # Scaling heuristic from Gao et al. 2024 (lr ∝ 1/sqrt(n_latents)).
        return self.lr or self.lr_base / math.sqrt(self.sae.d_sae / 2**14)


@dataclass
class EvalConfig:
    run: str = ""
    """Run directory to evaluate."""

    n_tokens: int = 0
    """Held-out tokens to evaluate on; 0 means all of the run's held-out split."""

    batch_size: int = 4096
    """Tokens per batch (also the batch of batch-mode metrics for batch-level rules)."""

    mp_tol: float = 0.1
    """matching_pursuit: residual tolerance of the adaptive-inference metrics, in (0, 1)."""

    downstream: bool = True
    """Also splice the SAE into the model and measure CE/KL on held-out contexts."""

    ce_contexts: int = 64
    """Held-out contexts for the downstream (CE, KL) metrics."""

    splice_from: int = 1
    """First position that is spliced (1 skips BOS)."""

    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        _nonnegative(self, "n_tokens", "ce_contexts")
        if self.splice_from < 1:
            raise UserError(f"splice_from={self.splice_from} would splice BOS; use 1 or more")
        if not 0 < self.mp_tol < 1:
            raise UserError(f"mp_tol={self.mp_tol} must lie in (0, 1), e.g. 0.1")


@dataclass
class DarkMatterConfig:
    fit_tokens: int = 0
    """Held-out tokens used to fit the linear predictor of the SAE error; 0: half of the
    run's held-out split, at most 150k (the paper's fit size)."""

    score_tokens: int = 0
    """Further held-out tokens (disjoint from the fit tokens) the predictor is scored on;
    0: the rest of the held-out split, at most 300k (the paper's)."""

    batch_size: int = 4096
    """Tokens per batch."""

    ridge: float = 1e-6
    """Ridge added to the normal equations, relative to their mean diagonal (stability only)."""

    ce_contexts: int = 16
    """Held-out contexts for the three-way CE splice (0 skips it). Each costs five model
    forwards; the splices are paired on the same contexts, so ΔCE is reported with its
    standard error over contexts: raise this when the error bars overlap."""

    splice_from: int = 1
    """First position that is spliced in the CE comparison (1 skips BOS)."""

    top_contexts: int = 20
    """Contexts with the largest nonlinear error to list."""

    pursuit: Literal["support", "greedy", "none"] = "support"
    """Inference-time gradient pursuit at the SAE's own L0: 'support' refits the coefficients
    on the latents the SAE chose, 'greedy' also picks the latents (slow: one dense pass over
    W_dec per step), 'none' skips it."""

    pursuit_steps: int = 10
    """Projected gradient steps (exact line search) refining the pursuit's coefficients."""

    figures: bool = True
    """Write the figures (HTML, and PNG when a browser is available)."""

    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        _nonnegative(self, "fit_tokens", "score_tokens", "ce_contexts", "top_contexts")
        _nonnegative(self, "pursuit_steps", "ridge")
        if self.splice_from < 1:
            raise UserError(f"splice_from={self.splice_from} would splice BOS; use 1 or more")


@dataclass
class IndexConfig:
    run: str = ""
    """Run directory to index."""

    rows: Literal["all", "heldout"] = "all"
    """Harvest rows to index: 'all' (more text, so better contexts for rare latents; the SAE
    was trained on most of it) or 'heldout' (only the run's held-out split)."""

    n_tokens: int = 0
    """Index only the first this many of those rows; 0 means all of them."""

    top_contexts: int = 20
    """Top-activating contexts kept per latent: the best of its top 2·top_contexts tokens whose
    windows do not overlap a better one's in the same context."""

    quantile_samples: int = 2
    """Contexts kept near each of the activation quantiles 0.75, 0.5 and 0.25 of a latent."""

    quantile_pool: int = 64
    """Firing tokens per latent sampled uniformly during the pass, to pick quantile contexts."""

    context_before: int = 16
    """Tokens shown before the peak token of a context."""

    context_after: int = 4
    """Tokens shown after the peak token of a context."""

    hist_bins: int = 64
    """Histogram bins per latent; empty bins above the maximum are trimmed, so between half
    and all of them remain."""

    neighbours: int = 10
    """Nearest latents by decoder cosine kept per latent."""

    logit_tokens: int = 10
    """Logit-lens tokens kept at each end (most promoted and most suppressed)."""

    logit_lens: bool = True
    """Load the model for the logit lens (false skips it)."""

    token_latents: int = 32
    """Latents kept per token id for token search, most frequent on that token first."""

    batch_size: int = 4096
    """Tokens per batch."""

    seed: int = 0
    """Seed of the quantile sampling."""

    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        _positive(self, "top_contexts", "quantile_pool", "hist_bins", "batch_size", "token_latents")
        _nonnegative(self, "n_tokens", "quantile_samples", "context_before", "context_after")
        _nonnegative(self, "neighbours", "logit_tokens")


# ---------------------------------------------------------------------------------------
# Field docs, YAML and overrides


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise UserError(f"{n}={v} must be positive")


def _nonnegative(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v < 0:
            raise UserError(f"{n}={v} must not be negative")


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
    try:
        if origin is Literal:
            if value not in args:
                raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, args))}")
            return value
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if origin is list else value.split(",")
            if origin is tuple:
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
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (ValueError, TypeError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{key}={value!r} is not a valid {name}") from None
    return value


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
    return cls(**kwargs)


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
