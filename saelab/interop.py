"""SAEs in other libraries' layouts: export to SAELens, import from SAELens and sparsify, and
`load_sae`, which tells a saelab run, a SAELens and a sparsify directory apart by their files.

SAELens (v6 `cfg.json` schema; `SAE.load_from_disk` reads it):
    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, k (topk), metadata
                              {model_name, hook_name, ...}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
                              threshold [d_sae] (jumprelu)
  SAELens SAEs act on raw activations, so saelab's input_scale s is folded into the weights:
  W_enc' = s·W_encᵀ, W_dec' = W_dec/s, b_dec' = b_dec/s leave the pre-activations z, hence
  the codes, unchanged. topk exports as "topk"; feature_choice and mutual_choice export as
  "jumprelu" with their inference thresholds (mutual choice's one threshold broadcast to every
  latent, as SAELens saves BatchTopK); gradient_topk exports as topk (what it computes without
  gradients). matching_pursuit has no encoder and no SAELens equivalent.

sparsify (EleutherAI; one directory per hookpoint):
    cfg.json          d_in, k, num_latents (0: d_in·expansion_factor), activation, ...
    sae.safetensors   encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec
  Its TopK is TopK(ReLU(W_enc(x − b_dec) + b_enc)), saelab's topk exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.errors import UserError
from saelab.runs import CFG, WEIGHTS, finished_cfg, read_json
from saelab.sae import SparseCoder

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = "sae_weights.safetensors"
# The SAELens cfg.json schema we write; SAELens converts configs older than 6.0 on load.
SAELENS_SCHEMA = "6.0.0"
_EXPORTS = {
    "topk": "topk",
    "gradient_topk": "topk",
    "feature_choice": "jumprelu",
    "mutual_choice": "jumprelu",
}


# ---------------------------------------------------------------------------------------
# Export


def saelens_tensors(sae: SparseCoder) -> dict[str, Tensor]:
    """The SAELens state dict of `sae`, input_scale folded in (float32, contiguous)."""
    if sae.arch not in _EXPORTS:
        raise UserError(
            f"arch {sae.arch} has no SAELens equivalent (no encoder); export topk, "
            "gradient_topk, feature_choice or mutual_choice runs"
        )
    s = sae.input_scale
    with torch.no_grad():
        out = {
            "W_enc": (sae.W_enc * s).T,
            "b_enc": sae.b_enc,
            "W_dec": sae.W_dec / s,
            "b_dec": sae.b_dec / s,
        }
        if _EXPORTS[sae.arch] == "jumprelu":
            theta = sae.threshold
            if torch.isnan(theta).any():
                raise UserError(
                    f"this {sae.arch} SAE has no inference threshold yet; train it longer "
                    "(training sets the thresholds) before exporting"
                )
            out["threshold"] = theta.expand(sae.d_sae)
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def saelens_config(sae: SparseCoder, run_cfg: dict[str, Any], source: str) -> dict[str, Any]:
    architecture = _EXPORTS[sae.arch]
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # input_scale is folded into the weights
        "reshape_activations": "none",
    }
    if architecture == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_SCHEMA,
        "sae_lens_training_version": SAELENS_SCHEMA,
        "model_name": run_cfg.get("model"),
        "hook_name": run_cfg.get("hook"),
        "hook_head_index": None,
        "prepend_bos": True,  # saelab contexts start with BOS (corpus.contexts)
        # Enough to come back to saelab unchanged (arch, k) and to recognise our own export.
        "saelab": {**sae.config(), "run": source, "harvest": run_cfg.get("harvest")},
    }
    return cfg


def export_saelens(run: str | Path, dest: str | Path, *, allow_unfinished: bool = False) -> Path:
    """Write the run's SAE to `dest` in the SAELens layout, atomically.

    `dest` must be missing, empty, or an earlier export of this same run (then replaced). The
    run must have finished training unless `allow_unfinished` (for debugging).
    """
    run, dest = Path(run), Path(dest)
    run_cfg = _run_cfg(run, allow_unfinished)
    sae = SparseCoder.load(run)
    source = str(run.resolve())
    tensors = saelens_tensors(sae)
    cfg = saelens_config(sae, run_cfg, source)
    _check_dest(dest, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / CFG).write_text(json.dumps(cfg, indent=2))
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _run_cfg(run: Path, allow_unfinished: bool) -> dict[str, Any]:
    """A saelab run's cfg.json. An unfinished run's weights are its last checkpoint, or the
    untrained initialisation before the first, so it is refused unless asked for."""
    if allow_unfinished:
        return read_json(run / CFG, f"pass a saelab run directory (cfg.json + {WEIGHTS})")
    return finished_cfg(run)


def _check_dest(dest: Path, source: str) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UserError(f"{dest} exists and is not a directory; choose another destination")
    if not any(dest.iterdir()):
        return
    try:
        old = json.loads((dest / CFG).read_text())["metadata"]["saelab"]["run"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        old = None
    if old != source:
        raise UserError(
            f"{dest} is not empty and is not an export of {source}; choose another destination"
        )


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`. A non-empty dest is moved aside first (rename cannot replace it), so
    a reader finds the old export, briefly none, or the new one, never a half-written one."""
    if dest.exists() and any(dest.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        os.replace(new, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, dest)  # rename onto an empty directory is allowed


# ---------------------------------------------------------------------------------------
# Import


def _load_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); re-download it") from None


def _read_cfg(path: Path) -> dict[str, Any]:
    if not (path / CFG).is_file():
        raise UserError(f"{path} has no {CFG}; pass an SAE directory")
    try:
        return json.loads((path / CFG).read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path / CFG} is not valid JSON; re-download the SAE") from None


def _build(
    arch: str, k: int, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, device: str
) -> SparseCoder:
    """A SparseCoder acting on raw activations (input_scale 1) with W_enc given as [d_sae, d_in]."""
    d_sae, d_in = W_dec.shape
    if W_enc.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise UserError(
            f"weight shapes disagree (W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}); "
            "the SAE files are damaged or not in this layout"
        )
    sae = SparseCoder(d_in, d_sae, k, arch, 1.0, device)
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.float())
    return sae


def _saelens_k(cfg: dict[str, Any], meta: dict[str, Any], d_sae: int) -> int:
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    k = k or (meta.get("saelab") or {}).get("k")
    # A JumpReLU SAE has no k; saelab's batch-level rules use it only to train further.
    return int(min(max(int(k or 1), 1), d_sae - 1))


def load_saelens(path: str | Path, device: str = "cpu") -> SparseCoder:
    """A SAELens-format directory as a SparseCoder (topk, jumprelu or standard)."""
    path = Path(path)
    cfg = _read_cfg(path)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(
            f"{path} normalizes activations ({norm}) at run time; fold the scaling into the "
            "weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise UserError(f"{path} is an attention hook_z SAE; only flat activations are supported")
    w = _load_weights(path / SAELENS_WEIGHTS)
    scale = w.pop("scaling_factor", w.pop("finetuning_scaling_factor", None))
    if scale is not None and not torch.all(scale == 1):
        raise UserError(f"{path} has a finetuning scaling factor; fold it into W_dec first")
    try:
        W_enc, b_enc, W_dec, b_dec = w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"]
    except KeyError as e:
        raise UserError(f"{path / SAELENS_WEIGHTS} lacks {e}; not a SAELens SAE") from None
    if not cfg.get("apply_b_dec_to_input", True):
        # x·W_enc + b_enc = W_enc(x − b_dec) + b_enc' with b_enc' = b_enc + W_enc b_dec
        b_enc = b_enc + W_enc.float() @ b_dec.float()
    d_sae = W_dec.shape[0]
    k = _saelens_k(cfg, meta, d_sae)
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            # z·‖d_i‖ selects and a/‖d_i‖ decodes: the same SAE with unit-norm decoder rows.
            norms = W_dec.float().norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        sae = _build("topk", k, W_enc, b_enc, W_dec, b_dec, device)
    elif arch in ("jumprelu", "standard"):
        theta = w.get("threshold", torch.zeros(d_sae)) if arch == "jumprelu" else torch.zeros(d_sae)
        if arch == "jumprelu" and "threshold" not in w and "log_threshold" in w:
            theta = w["log_threshold"].exp()
        sae = _jumprelu(theta, meta, k, (W_enc, b_enc, W_dec, b_dec), device)
    else:
        raise UserError(
            f"SAELens architecture {arch!r} is not supported; supported: topk, jumprelu, standard"
        )
    sae.hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")  # type: ignore[assignment]
    sae.model_name = meta.get("model_name") or cfg.get("model_name")  # type: ignore[assignment]
    return sae


def _jumprelu(
    theta: Tensor,
    meta: dict[str, Any],
    k: int,
    weights: tuple[Tensor, Tensor, Tensor, Tensor],
    device: str,
) -> SparseCoder:
    """feature_choice inference is JumpReLU with per-latent θ; a saelab mutual_choice export
    (one θ for every latent) comes back as mutual_choice."""
    theta = theta.float()
    was = (meta.get("saelab") or {}).get("arch")
    global_theta = was == "mutual_choice" and bool((theta == theta[0]).all())
    sae = _build("mutual_choice" if global_theta else "feature_choice", k, *weights, device)
    with torch.no_grad():
        sae.threshold.copy_(theta[:1] if global_theta else theta)
    return sae


# sparsify names hookpoints by HF module path; these are the TransformerLens equivalents.
_SPARSIFY_HOOKS = [
    (re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)\.mlp$"), "blocks.{}.hook_mlp_out"),
    (
        re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn)$"),
        "blocks.{}.hook_attn_out",
    ),
]
# Options that change what the coder computes (multi_topk only changes the training loss).
_SPARSIFY_UNSUPPORTED = ("transcode", "skip_connection", "embed_skip", "gram_lookup")


def sparsify_hook(hookpoint: str) -> str | None:
    """The TransformerLens hook for a sparsify hookpoint name (a directory name), if known."""
    for pattern, hook in _SPARSIFY_HOOKS:
        if m := pattern.match(hookpoint):
            return hook.format(m[1])
    return None


def load_sparsify(path: str | Path, hook: str | None = None, device: str = "cpu") -> SparseCoder:
    """A sparsify sparse coder directory as a topk SparseCoder.

    The hook comes from `hook`, else from the directory name (sparsify names it after the
    hookpoint, e.g. ``layers.6`` → ``blocks.6.hook_resid_post``).
    """
    path = Path(path)
    cfg = _read_cfg(path)
    unsupported = [f for f in _SPARSIFY_UNSUPPORTED if cfg.get(f)]
    if cfg.get("activation", "topk") != "topk":
        unsupported.append(f"activation={cfg['activation']}")
    if unsupported:
        raise UserError(f"{path} uses {', '.join(unsupported)}; only plain TopK SAEs load")
    w = _load_weights(path / WEIGHTS)
    if "W_skip" in w:
        raise UserError(f"{path} has a skip connection; only plain TopK SAEs load")
    try:
        W_enc, b_enc, W_dec, b_dec = w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"]
    except KeyError as e:
        raise UserError(f"{path / WEIGHTS} lacks {e}; not a sparsify SAE") from None
    d_in = int(cfg.get("d_in", W_dec.shape[1]))
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    if tuple(W_dec.shape) != (d_sae, d_in):
        raise UserError(
            f"{path}: W_dec is {tuple(W_dec.shape)} but cfg.json says ({d_sae}, {d_in}); "
            "the files do not belong together"
        )
    sae = _build("topk", int(cfg.get("k", 32)), W_enc, b_enc, W_dec, b_dec, device)
    sae.hook = hook or sparsify_hook(path.name)  # type: ignore[assignment]
    sae.model_name = None  # type: ignore[assignment]
    return sae


# ---------------------------------------------------------------------------------------
# Any layout


def load_sae(
    path: str | Path, device: str = "cpu", *, allow_unfinished: bool = False
) -> SparseCoder:
    """A saelab run, a SAELens-format or a sparsify-format directory, told apart by its files.

    The SAE comes back with `sae.hook` (and `sae.model_name`) set from the file's metadata when
    it names them, so that interventions know where they belong. A saelab run must have
    finished training (cfg.json says "complete") unless `allow_unfinished` (for debugging).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a run or SAE directory")
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, device)
    if (path / CFG).is_file() and (path / WEIGHTS).is_file():
        cfg = _read_cfg(path)
        if "arch" not in cfg or "input_scale" not in cfg:  # not ours: sparsify names no arch
            return load_sparsify(path, device=device)
        cfg = _run_cfg(path, allow_unfinished)
        sae = SparseCoder.load(path, device)
        sae.hook, sae.model_name = cfg.get("hook"), cfg.get("model")  # type: ignore[assignment]
        return sae
    subdirs = sorted(p.name for p in path.iterdir() if (p / CFG).is_file())
    hint = f"; it holds SAEs in {', '.join(subdirs[:5])}: pass one" if subdirs else ""
    raise UserError(
        f"{path} holds no SAE (saelab: cfg.json + sae.safetensors, SAELens: cfg.json + "
        f"sae_weights.safetensors){hint}"
    )
