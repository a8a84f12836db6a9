"""The configs of every command: one dataclass each, a docstring under each field.

Each field declares its valid values once, in its annotation (`n_ctx: Annotated[int,
Check(ge=2)]`, a Literal or bool); `saelab.fields.validate`, called by every `__post_init__`,
refuses a value outside them, and checks that involve several fields follow it there. The
docstrings become `--help` text; YAML presets and flags are read by `saelab.fields.build`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from saelab.fields import (
    Check,
    Count,
    Device,
    FieldError,
    Free,
    Name,
    NonNegative,
    Positive,
    Seed,
    SpliceFrom,
    validate,
)

DEFAULT_MODEL = "smollm2-135m"
# Layer 6 of 30: early enough that harvesting runs fast on a CPU (only 7 blocks run), late
# enough that the residual stream holds contextual, word- and phrase-level features rather
# than token identity alone.
DEFAULT_HOOK = "blocks.6.hook_resid_post"

Dtype = Literal["float16", "bfloat16", "float32"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The dtype a model runs in; 'auto' is bfloat16 on CUDA and on CPUs with bf16 instructions
(AVX512-BF16, AMX), float32 on other CPUs (`saelab.models.resolve_model_dtype`)."""
Precision = Literal["fp32", "tf32", "bf16"]
Verify = Literal["full", "first-read", "off"]
Parallel = Literal["data", "latent"]
Arch = Literal[
    "topk", "gradient_topk", "feature_choice", "mutual_choice", "matching_pursuit", "jumprelu"
]
"""The selection rules of `saelab.archs.ARCHS` (a test keeps the two equal); jumprelu is
inference-only (imported SAELens SAEs), so training refuses it."""


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

    batch_size: Count = 0
    """Contexts per model forward; 0 = auto: 16 on CPU, about 32k tokens per forward on CUDA
    (16 with grads). A resume keeps the one its harvest started with."""

    shard_contexts: Positive = 256
    """Contexts per shard file."""

    dtype: Dtype = "float16"
    """Storage dtype of activations."""

    model_dtype: ModelDtype = "auto"
    """dtype the model runs in: 'auto' is bfloat16 on CUDA and on CPUs with bf16 instructions
    (AVX512-BF16, AMX), float32 on other CPUs."""

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

    model: Free = ""
    """Train live, without a harvest: the model to run on the corpus as training goes
    ('smollm2-135m', 'tiny', an HF name or a local HF directory). Give this or harvest."""

    hooks: Annotated[list[str], Check(free=True)] = field(default_factory=list)
    """Live training: the hook to train on (empty: hook, else the default hook)."""

    corpus: Name = "default"
    """Live training: text source, as for harvest."""

    text_field: Name = "text"
    """Live training: field holding the text in JSONL files and HF datasets."""

    split: Name = "train"
    """Live training: split of an HF dataset."""

    n_ctx: Annotated[int, Check(ge=2, note="BOS and at least one token")] = 128
    """Live training: context length in tokens, BOS included."""

    model_dtype: ModelDtype = "auto"
    """Live training: dtype the model runs in; 'auto' as for harvest (bfloat16 on CUDA and on
    CPUs with bf16 instructions, float32 on other CPUs)."""

    model_batch_size: Positive = 16
    """Live training: contexts per model forward."""

    heldout: Free = ""
    """Live training: where to harvest the held-out set (eval_tokens, taken from the corpus
    before the training contexts); default cached_activations/<model>-<hook>-heldout-<id>."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE to train."""

    sweep: Annotated[list[SAEConfig], Check(free=True)] = field(default_factory=list)
    """Several SAEs (a YAML list of sae mappings) trained together on one read of the data;
    each gets its own run under out/. Replaces sae when given."""

    out: Free = ""
    """Run directory; defaults to runs/<harvest name>-<arch>-<d_sae>-k<k>."""

    n_tokens: Count = 0
    """Training tokens; 0 means one epoch over the training split (live training needs a
    count)."""

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

    aux_every: Count = 0
    """The auxiliary loss runs on every n-th token of each batch (a shuffled batch's: a
    random subset, so the loss keeps its expectation at 1/n of its cost); 0 picks the loss's
    default: 8 for aux_zipf, whose under-used latents are about half of them at every step,
    1 (every token) for AuxK, which runs only while latents are dead."""

    freq_decay: Annotated[float, Check(gt=0, lt=1)] = 0.99
    """Decay of the per-latent firing-frequency EMA that aux_zipf compares with its target."""

    dead_tokens: Positive = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""

    eval_tokens: Count = 20_000
    """Tokens held out for evaluation, never trained on: the end of the harvest, or (live) the
    corpus contexts before the training ones."""

    scale_sample: Positive = 20_000
    """Tokens sampled to estimate the input scale and the b_dec init."""

    shuffle_buffer: Positive = 262_144
    """Tokens in the shuffle buffer."""

    precision: Precision = "fp32"
    """SAE compute: 'fp32', 'tf32' (CUDA tensor cores at ~fp32 range) or 'bf16' (matmuls in
    bfloat16; weights, Adam state, losses and metrics stay float32)."""

    parallel: Parallel = "data"
    """Under torchrun, how the processes share the work: 'data' (each takes its slice of every
    batch and holds the whole SAE) or 'latent' (each holds 1/N of the latents and sees every
    batch whole, for dictionaries too big for one GPU; topk and gradient_topk)."""

    verify: Verify = "first-read"
    """Shard checksums: 'first-read' hashes each shard once and remembers it in the harvest
    (a resume hashes nothing again), 'full' hashes on every start, 'off' trusts the files."""

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

    intervals: Positive = 8
    """Equal-width activation intervals per latent, from its smallest to its largest firing
    activation; each shows its share of firings and a few examples."""

    interval_samples: Count = 3
    """Examples kept per activation interval, drawn uniformly from the firings inside it."""

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
    """Seed of the interval sampling."""

    device: Device = "auto"
    """Where to run; 'auto' picks cuda when it is available."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class ExplainConfig:
    run: Free = ""
    """Run directory to explain (finished and indexed)."""

    latents: Free = ""
    """Latents to explain: a range '0:50' (end excluded), a list '12,40,7', or both mixed;
    '' picks n_latents live latents at random (seeded). Checked against the SAE's width."""

    n_latents: Positive = 50
    """Latents picked at random when --latents is not given."""

    explainer: Name = DEFAULT_MODEL
    """Explainer LM: 'smollm2-135m' (embedded, offline), an HF name or local folder, an
    OpenAI-compatible endpoint 'http(s)://…/v1', or 'none' (a label from the index, no score)."""

    api_model: Free = ""
    """Model name sent to an endpoint explainer ('' sends none: the server's default)."""

    api_key_env: Free = ""
    """Environment variable holding an endpoint's API key, e.g. OPENAI_API_KEY ('' sends no
    key); the key is never written to disk."""

    detection: Literal["auto", "likelihood", "yes_no"] = "auto"
    """How the explainer tells held-out texts apart: 'likelihood' (how much the explanation
    raises its log-prob of a token of the text; local models only), 'yes_no' (its Yes/No
    answer to "does this text contain <explanation>?"), 'auto' (likelihood for a local model,
    yes_no for an endpoint)."""

    n_show: Positive = 10
    """Top-activating contexts shown to the explainer (the even ranks 0, 2, …)."""

    n_detect: Positive = 10
    """Held-out positive contexts scored per latent (the other top ranks, then the interval
    contexts), and as many negatives (windows where the latent is silent)."""

    max_new_tokens: Annotated[int, Check(ge=1, le=256)] = 16
    """Longest explanation, in tokens (greedy decoding)."""

    batch_size: Positive = 8
    """Detection prompts per forward of a local explainer."""

    seed: Seed = 0
    """Seed of the latent sample, the negatives and the endpoint's sampling."""

    device: Device = "auto"
    """Where to run the SAE and a local explainer; 'auto' picks cuda when it is available."""

    threads: Count = 0
    """torch CPU threads; 0 keeps torch's default. On a CPU shared with other jobs, 1 can be
    several times faster than the default (threads waiting on each other)."""

    def __post_init__(self) -> None:
        validate(self)
