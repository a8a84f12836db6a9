"""SAEs from other libraries' layouts: import from SAELens and sparsify, and `load_sae`, which
tells a saelab run, a SAELens and a sparsify directory apart by their files. (Exports to
those layouts live in `saelab.export`.)

SAELens (v6 `cfg.json` schema; `SAE.load_from_disk` reads it):
    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, k (topk), metadata
                              {model_name, hook_name, ...}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
                              threshold [d_sae] (jumprelu)
  topk imports as topk; jumprelu and standard (ReLU, θ = 0) as saelab's inference-only
  jumprelu rule, a_i = z_i·[z_i > θ_i]. A BatchTopK *training* save (architecture
  "batchtopk", a topk_threshold) is refused: SAELens's `save_inference_model` turns it into
  the jumprelu SAE it runs as.

sparsify (EleutherAI; one directory per hookpoint):
    cfg.json          d_in, k, num_latents (0: d_in·expansion_factor), activation, ...
    sae.safetensors   encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec
  Its TopK is TopK(ReLU(W_enc(x − b_dec) + b_enc)), saelab's topk exactly.

A saelab export (metadata "saelab": arch, input_scale, units) comes back as it was trained:
its arch, input_scale and saelab's feature values (`_as_saelab`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saelab.errors import UserError
from saelab.runs import CFG, WEIGHTS, finished_cfg, read_json
from saelab.sae import SparseCoder

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = "sae_weights.safetensors"
# SAELens training saves whose inference form is another architecture (SAELens 6.x:
# BatchTopKTrainingSAE.process_state_dict_for_saving_inference turns topk_threshold into a
# JumpReLU threshold; matryoshka BatchTopK inherits it).
_TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")


def __getattr__(name: str) -> Any:
    # export_saelens moved to saelab.export (which imports this module); keep the old name.
    if name == "export_saelens":
        from saelab.export import export_saelens

        return export_saelens
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    return read_json(path / CFG, "re-download the SAE")


def _build(
    arch: str, k: int, w: dict[str, Tensor], device: str, saelab: dict[str, Any] | None = None
) -> SparseCoder:
    """A SparseCoder from weights acting on raw activations (W_enc [d_sae, d_in], b_enc,
    W_dec, b_dec, optional threshold): input_scale 1, unless `saelab` (an export's metadata)
    gives the input_scale s and units to return to saelab's own (`_as_saelab`)."""
    d_sae, d_in = w["W_dec"].shape
    if (
        w["W_enc"].shape != (d_sae, d_in)
        or w["b_enc"].shape != (d_sae,)
        or w["b_dec"].shape != (d_in,)
    ):
        raise UserError(
            f"weight shapes disagree (W_enc {tuple(w['W_enc'].shape)}, W_dec "
            f"{tuple(w['W_dec'].shape)}); the SAE files are damaged or not in this layout"
        )
    s, beta = 1.0, 1.0
    if saelab:
        s, beta = float(saelab["input_scale"]), float(saelab.get("beta", 1.0))
        w = _as_saelab(w, s, saelab.get("units", "saelab"))
    sae = SparseCoder(d_in, d_sae, k, arch, s, device, beta=beta)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name])
        if "threshold" in w and sae.spec.threshold != "none":
            sae.threshold.copy_(w["threshold"][: sae.threshold.numel()])
    return sae


def _as_saelab(w: dict[str, Tensor], s: float, units: str) -> dict[str, Tensor]:
    """Undo a saelab export's folding (saelab.export.raw_weights): its values are saelab's
    times c (c = s for unit decoder rows, 1 in saelab's units, which exports before units
    existed used). With W_enc·c/s, b_enc·c, b_dec·s, W_dec·s/c, θ·c and input_scale s the
    SAE computes c·z of the raw-activation one, i.e. saelab's z and values again."""
    c = s if units == "saelens" else 1.0
    w = {n: t.double() for n, t in w.items()}
    out = {
        "W_enc": w["W_enc"] * (c / s),
        "b_enc": w["b_enc"] * c,
        "W_dec": w["W_dec"] * (s / c),
        "b_dec": w["b_dec"] * s,
    }
    if "threshold" in w:
        out["threshold"] = w["threshold"] * c
    return out


def _saelens_k(cfg: dict[str, Any], meta: dict[str, Any], d_sae: int) -> int:
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    k = k or (meta.get("saelab") or {}).get("k")
    # A JumpReLU SAE has no k; saelab's batch-level rules use it only to train further.
    return int(min(max(int(k or 1), 1), d_sae - 1))


# The saelab rules each SAELens architecture can hold (saelab.export), and what an SAE from
# elsewhere is labelled.
_SAELAB_ARCHS = {
    "topk": ("topk", "gradient_topk"),
    "jumprelu": ("feature_choice", "mutual_choice", "jumprelu"),
}


def _label(architecture: str, saelab: Any, theta: Tensor | None) -> tuple[str, Any]:
    """(saelab arch, saelab metadata or None): a saelab export comes back as it was trained;
    anything else as topk or jumprelu (SAELens jumprelu and standard alike)."""
    plain = "topk" if architecture == "topk" else "jumprelu"
    if not isinstance(saelab, dict) or "input_scale" not in saelab:
        return plain, None
    was = saelab.get("arch")
    if not isinstance(was, str) or was not in _SAELAB_ARCHS[plain]:
        return plain, saelab
    # One threshold for every latent, up to the rounding of the unit-row fold (‖d_i‖ ≈ 1).
    if was == "mutual_choice" and theta is not None and not torch.allclose(theta, theta[:1]):
        return "jumprelu", saelab  # edited since: no longer one threshold for every latent
    return was, saelab


def _saelens_checks(path: Path, cfg: dict[str, Any], arch: str) -> None:
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(
            f"{path} normalizes activations ({norm}) at run time; fold the scaling into the "
            "weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise UserError(f"{path} is an attention hook_z SAE; only flat activations are supported")
    if arch in _TRAINING_ONLY:
        raise UserError(
            f"{path} is a SAELens {arch} training save; save it with SAELens's "
            "save_inference_model (it becomes the jumprelu SAE it runs as) and load that"
        )
    if arch not in ("topk", "jumprelu", "standard"):
        raise UserError(
            f"SAELens architecture {arch!r} is not supported; supported: topk, jumprelu, standard"
        )


def _saelens_weights(path: Path, cfg: dict[str, Any], arch: str) -> dict[str, Tensor]:
    """The weights as `_build` takes them: W_enc [d_sae, d_in], b_dec applied to the input,
    topk decoder-norm rescaling folded in, and the threshold (0 for standard)."""
    w = _load_weights(path / SAELENS_WEIGHTS)
    scale = w.pop("scaling_factor", w.pop("finetuning_scaling_factor", None))
    if scale is not None and not torch.all(scale == 1):
        raise UserError(f"{path} has a finetuning scaling factor; fold it into W_dec first")
    try:
        W_enc, b_enc, W_dec, b_dec = w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"]
    except KeyError as e:
        raise UserError(f"{path / SAELENS_WEIGHTS} lacks {e}; not a SAELens SAE") from None
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (W_enc, b_enc, W_dec, b_dec))
    if not cfg.get("apply_b_dec_to_input", True):
        # x·W_enc + b_enc = W_enc(x − b_dec) + b_enc' with b_enc' = b_enc + W_enc b_dec
        b_enc = b_enc + W_enc @ b_dec
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # z·‖d_i‖ selects and a/‖d_i‖ decodes: the same SAE with unit-norm decoder rows.
        norms = W_dec.norm(dim=1)
        out |= {"W_enc": W_enc * norms[:, None], "b_enc": b_enc * norms}
        out["W_dec"] = W_dec / norms[:, None]
    if arch == "jumprelu":
        theta = w.get("threshold")
        if theta is None and "log_threshold" in w:  # SAELens before 6 saved log θ
            theta = w["log_threshold"].exp()
        if theta is None:
            raise UserError(f"{path / SAELENS_WEIGHTS} lacks threshold; not a JumpReLU SAE")
        out["threshold"] = theta.double().expand(W_dec.shape[0])
    elif arch == "standard":
        out["threshold"] = torch.zeros(W_dec.shape[0], dtype=torch.float64)
    return out


def load_saelens(path: str | Path, device: str = "cpu") -> SparseCoder:
    """A SAELens-format directory as a SparseCoder: topk, or jumprelu for SAELens's jumprelu
    and standard SAEs; a saelab export as the run it came from (its arch and units)."""
    path = Path(path)
    cfg = _read_cfg(path)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    _saelens_checks(path, cfg, arch)
    w = _saelens_weights(path, cfg, arch)
    label, saelab = _label(arch, meta.get("saelab"), w.get("threshold"))
    sae = _build(label, _saelens_k(cfg, meta, w["W_dec"].shape[0]), w, device, saelab)
    hook = (saelab or {}).get("hook") or meta.get("hook_name")
    sae.hook = hook or cfg.get("hook_name") or cfg.get("hook_point")  # type: ignore[assignment]
    # A saelab export names the model as saelab.load_model takes it (smollm2-135m).
    name = (saelab or {}).get("model") or meta.get("model_name") or cfg.get("model_name")
    sae.model_name = name  # type: ignore[assignment]
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

    The hook comes from `hook`, else from a saelab export's metadata, else from the directory
    name (sparsify names it after the hookpoint, e.g. ``layers.6`` → ``blocks.6.hook_resid_post``).
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
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    label, saelab = _label("topk", cfg.get("saelab"), None)
    sae = _build(label, int(cfg.get("k", 32)), weights, device, saelab)
    hook = hook or (saelab or {}).get("hook") or sparsify_hook(path.name)
    sae.hook = hook  # type: ignore[assignment]
    sae.model_name = (saelab or {}).get("model") or cfg.get("model_name")  # type: ignore[assignment]
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
        if allow_unfinished:
            cfg = read_json(path / CFG, f"pass a saelab run directory (cfg.json + {WEIGHTS})")
        else:
            cfg = finished_cfg(path)
        sae = SparseCoder.load(path, device)
        sae.hook, sae.model_name = cfg.get("hook"), cfg.get("model")  # type: ignore[assignment]
        return sae
    subdirs = sorted(p.name for p in path.iterdir() if (p / CFG).is_file())
    hint = f"; it holds SAEs in {', '.join(subdirs[:5])}: pass one" if subdirs else ""
    raise UserError(
        f"{path} holds no SAE (saelab: cfg.json + sae.safetensors, SAELens: cfg.json + "
        f"sae_weights.safetensors){hint}"
    )
