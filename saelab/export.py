"""`saelab export`: a finished run's SAE in the layouts of SAELens and sparsify.

Both libraries' SAEs act on raw activations, so saelab's input_scale s is folded into the
weights. Two unit conventions are offered (`units`):

- ``saelens`` (default): unit-norm decoder rows, the convention of SAELens and sparsify.
  Feature values, biases and thresholds are rescaled to match: each latent's value is saelab's
  times c_i = ‖d_i‖/s (1/s, as saelab keeps ‖d_i‖ = 1). The codes (which latents fire) and the
  reconstructions are saelab's; SAELens's `fold_W_dec_norm()` is a no-op on it (for topk that
  needs `rescale_acts_by_decoder_norm: true`, equivalent here since the rows have unit norm),
  and feature magnitudes are comparable with other SAELens SAEs. The cost: the values differ
  from those saelab's app, feature index and steering show by the factor 1/s.
- ``saelab``: feature values exactly as saelab reports them; decoder rows have norm 1/s
  (5.49 for s = 0.18). SAELens's `fold_W_dec_norm()` then refuses the topk export and rescales
  a jumprelu export's values by 1/s, and anything that assumes unit decoder rows (steering by
  a row, comparing magnitudes across SAEs) is off by that factor.

Either way the export records saelab's arch, input_scale and units under "saelab", so
`saelab.load_sae` brings it back in saelab's units, with its arch. No file holds a local path:
the run is named by its folder name and a hash of its location.

SAELens (v6 `cfg.json` schema, read by `SAE.load_from_disk`): topk exports as "topk";
feature_choice and mutual_choice as "jumprelu" with their inference thresholds (mutual
choice's one threshold broadcast to every latent, as SAELens's `save_inference_model` saves
BatchTopK); gradient_topk as topk (what it computes without gradients). matching_pursuit is
refused: see `_MP_SAELENS`. The metadata describe the data as SAELens's training configs do.

sparsify (EleutherAI, `SparseCoder.load_from_disk`): a directory with cfg.json and
sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias, W_dec, b_dec); its TopK is
TopK(ReLU(W_enc(x − b_dec) + b_enc)), saelab's topk exactly, and it has no other rule saelab
trains (its one alternative, GroupMax, saelab lacks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.errors import UserError
from saelab.interop import SAELENS_WEIGHTS
from saelab.runs import CFG, SYNTHETIC, WEIGHTS, finished_cfg, read_json
from saelab.sae import SparseCoder

log = logging.getLogger(__name__)

FORMATS = ("saelens", "sparsify")
UNITS = ("saelens", "saelab")
# The SAELens cfg.json schema we write; SAELens converts configs older than 6.0 on load.
SAELENS_SCHEMA = "6.0.0"
_SAELENS_ARCH = {
    "topk": "topk",
    "gradient_topk": "topk",
    "feature_choice": "jumprelu",
    "mutual_choice": "jumprelu",
    "jumprelu": "jumprelu",
}
# SAELens 6.x's MatchingPursuitSAE (sae_lens/saes/matching_pursuit_sae.py) may pick a latent
# again, adding to its value, and stops a token once a pick repeats one (or, with
# residual_threshold, once ‖r‖ falls below an absolute level); saelab's pursuit never repeats a
# latent and takes the next best instead. The codes agree only until a repeat, so no
# setting of max_iterations or the stopping flags makes them the same SAE.
_MP_SAELENS = (
    "matching_pursuit cannot be exported to SAELens: its MatchingPursuitSAE lets a latent be "
    "picked again and stops a token at the first repeat, while saelab's pursuit never repeats "
    "one, so the codes would differ; use the run in saelab"
)
_SPARSIFY_REFUSALS = {
    "feature_choice": "sparsify has no thresholded (JumpReLU) coder; use --format saelens",
    "mutual_choice": "sparsify has no thresholded (JumpReLU) coder; use --format saelens",
    "jumprelu": "sparsify has no thresholded (JumpReLU) coder; use --format saelens",
    "matching_pursuit": "sparsify coders are TopK or GroupMax, not matching pursuit; use the "
    "run in saelab",
}
# What HookedTransformer computes is TransformerBridge's default numerics only without its
# weight processing (TransformerLens: HookedTransformer.from_pretrained_no_processing).
_NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


# ---------------------------------------------------------------------------------------
# Weights on raw activations


def raw_weights(sae: SparseCoder, units: str = "saelens") -> dict[str, Tensor]:
    """The SAE as weights acting on raw activations, in `units` (module docstring): W_enc
    [d_sae, d_in], b_enc, W_dec [d_sae, d_in], b_dec, and threshold for thresholded rules.

    saelab: z = W_enc(s·x − b_dec) + b_enc and x̂ = (aᵀW_dec + b_dec)/s, so W_enc·s, W_dec/s
    and b_dec/s leave z, hence the code, unchanged. For unit rows each latent is then scaled
    by c_i = ‖W_dec_i‖/s, as SAELens's `fold_W_dec_norm` does (W_enc_i, b_enc_i, θ_i times c_i,
    W_dec_i over c_i). Computed in float64, rounded once to float32.
    """
    if units not in UNITS:
        raise UserError(f"units {units!r} is not one of {', '.join(UNITS)}; pick one")
    s = sae.input_scale
    with torch.no_grad():
        w = {n: getattr(sae, n).detach().double().cpu() for n in ("W_enc", "b_enc", "W_dec")}
        out = {
            "W_enc": w["W_enc"] * s,
            "b_enc": w["b_enc"],
            "W_dec": w["W_dec"] / s,
            "b_dec": sae.b_dec.detach().double().cpu() / s,
        }
        if sae.spec.threshold != "none":
            theta = sae.threshold.detach().double().cpu()
            if torch.isnan(theta).any():
                raise UserError(
                    f"this {sae.arch} SAE has no inference threshold yet; train it longer "
                    "(training sets the thresholds) before exporting"
                )
            # saelab's batch-level rules fire where z > max(θ, 0) (archs._thresholded).
            theta = theta if sae.arch == "jumprelu" else theta.clamp_min(0)
            out["threshold"] = theta.expand(sae.d_sae)
        if units == "saelens":
            norms = out["W_dec"].norm(dim=1)
            c = torch.where(norms > 0, norms, torch.full_like(norms, 1 / s))
            out["W_enc"] = out["W_enc"] * c[:, None]
            out["b_enc"] = out["b_enc"] * c
            out["W_dec"] = out["W_dec"] / c[:, None]
            if "threshold" in out:
                out["threshold"] = out["threshold"] * c
    return {k: v.float().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# Where the activations came from


def _harvest_facts(run_cfg: dict[str, Any]) -> dict[str, Any]:
    """n_ctx and corpus of the run's harvest: from cfg.json (runs record them since this
    export existed), else from the harvest's meta.json when it is still there."""
    facts = {k: run_cfg.get(k) for k in ("n_ctx", "corpus")}
    meta_path = Path(str(run_cfg.get("harvest", ""))) / "meta.json"
    if None in facts.values() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            facts = {k: facts[k] if facts[k] is not None else meta.get(k) for k in facts}
        except (OSError, ValueError):
            pass
    if None in facts.values():
        log.warning("the run's harvest is gone: the export cannot record context_size/dataset")
    return facts


def run_id(run: Path) -> str:
    """Names the run's location without revealing it: recognises a re-export of one run."""
    return hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:16]


def provenance(sae: SparseCoder, run: Path, run_cfg: dict[str, Any], units: str) -> dict[str, Any]:
    """Model, hook, context and data of the run, in SAELens's metadata names; no paths."""
    from saelab import __version__
    from saelab.config import DEFAULT_MODEL
    from saelab.corpus import describe
    from saelab.models import TINY, model_source, tl_hook

    model = str(run_cfg.get("model") or "")
    if model == SYNTHETIC:
        model_name, conversion = SYNTHETIC, "no model: synthetic activations (saelab.synthetic)"
    else:
        model_name, conversion = model_source(model) if model else (None, None)
    # The name saelab.load_model takes, unless it is a local path.
    alias = model if model_name == model or model in (DEFAULT_MODEL, TINY) else None
    facts = _harvest_facts(run_cfg)
    dataset_path, dataset = describe(facts["corpus"])
    hook = str(run_cfg.get("hook") or "")
    harvest = Path(str(run_cfg.get("harvest", "")))
    return {
        "model_name": model_name,
        "model_conversion": conversion,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": dict(_NO_PROCESSING),
        "hook_name": tl_hook(hook) if hook and model != SYNTHETIC else hook or None,
        "hook_head_index": None,
        "context_size": facts["n_ctx"],
        "prepend_bos": True,  # saelab contexts start with BOS (corpus.contexts)
        "seqpos_slice": [1, None],  # the harvest skips the BOS position
        "sequence_separator_token": "eos",  # documents are joined with EOS (corpus.contexts)
        "dataset_path": dataset_path,
        "dataset": dataset,
        "saelab": {
            **sae.config(),
            "units": units,
            "model": alias,
            "hook": hook,
            "run": run.resolve().name,
            "run_id": run_id(run),
            "harvest": {
                "name": harvest.name,
                **(run_cfg.get("harvest_identity") or {}),
            },
            "saelab_version": __version__,
        },
    }


# ---------------------------------------------------------------------------------------
# SAELens


def saelens_tensors(sae: SparseCoder, units: str = "saelens") -> dict[str, Tensor]:
    """The SAELens state dict of `sae` (float32, contiguous)."""
    if sae.arch == "matching_pursuit":
        raise UserError(_MP_SAELENS)
    if sae.arch not in _SAELENS_ARCH:
        raise UserError(f"arch {sae.arch} has no SAELens equivalent; use the run in saelab")
    w = raw_weights(sae, units)
    w["W_enc"] = w["W_enc"].T.contiguous()  # SAELens keeps [d_in, d_sae]
    return w


def saelens_config(sae: SparseCoder, meta: dict[str, Any]) -> dict[str, Any]:
    architecture = _SAELENS_ARCH[sae.arch]
    hook = meta["hook_name"] or ""
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # input_scale is folded into the weights
        # saelab stores hook_z with its heads concatenated, as SAELens's reshape does.
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
    }
    if architecture == "topk":
        # Unit rows: selecting on z·‖d_i‖ is selecting on z, and fold_W_dec_norm accepts it.
        rescale = meta["saelab"]["units"] == "saelens"
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": rescale}
    schema = {"sae_lens_version": SAELENS_SCHEMA, "sae_lens_training_version": SAELENS_SCHEMA}
    cfg["metadata"] = {**schema, **meta}
    return cfg


def export_saelens(
    run: str | Path,
    dest: str | Path,
    *,
    units: str = "saelens",
    allow_unfinished: bool = False,
) -> Path:
    """Write the run's SAE to `dest` in the SAELens layout, atomically (see `export`)."""
    return export(run, dest, "saelens", units=units, allow_unfinished=allow_unfinished)


# ---------------------------------------------------------------------------------------
# sparsify


def sparsify_tensors(sae: SparseCoder, units: str = "saelens") -> dict[str, Tensor]:
    """sparsify's SparseCoder state dict of `sae` (a topk rule only)."""
    if sae.arch in _SPARSIFY_REFUSALS:
        raise UserError(
            f"{sae.arch} cannot be exported to sparsify: {_SPARSIFY_REFUSALS[sae.arch]}"
        )
    if sae.arch not in ("topk", "gradient_topk"):
        raise UserError(f"arch {sae.arch} has no sparsify equivalent; use the run in saelab")
    w = raw_weights(sae, units)
    return {
        "encoder.weight": w["W_enc"],  # nn.Linear keeps [out, in] = [d_sae, d_in]
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }


def sparsify_config(sae: SparseCoder, meta: dict[str, Any]) -> dict[str, Any]:
    """sparsify's SparseCoderConfig fields plus d_in; its loader drops the other keys, which
    keep the provenance (as in the SAELens metadata)."""
    return {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),  # unused: num_latents is set
        "normalize_decoder": meta["saelab"]["units"] == "saelens",
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
        **meta,
    }


def export_sparsify(
    run: str | Path,
    dest: str | Path,
    *,
    units: str = "saelens",
    allow_unfinished: bool = False,
) -> Path:
    """Write the run's SAE to `dest` as one sparsify hookpoint directory (see `export`)."""
    return export(run, dest, "sparsify", units=units, allow_unfinished=allow_unfinished)


# ---------------------------------------------------------------------------------------
# Writing


def export(
    run: str | Path,
    dest: str | Path,
    fmt: str = "saelens",
    *,
    units: str = "saelens",
    allow_unfinished: bool = False,
) -> Path:
    """Write the run's SAE to `dest` in layout `fmt` (one of FORMATS), atomically.

    `dest` must be missing, empty, or an earlier export of this same run (then replaced). The
    run must have finished training unless `allow_unfinished` (for debugging).
    """
    layouts = {
        "saelens": (SAELENS_WEIGHTS, saelens_tensors, saelens_config),
        "sparsify": (WEIGHTS, sparsify_tensors, sparsify_config),
    }
    if fmt not in layouts:
        raise UserError(f"format {fmt!r} is not one of {', '.join(layouts)}; pick one")
    weights_file, tensors_of, config_of = layouts[fmt]
    run, dest = Path(run), Path(dest)
    sae, run_cfg = _load(run, allow_unfinished)
    tensors = tensors_of(sae, units)
    cfg = config_of(sae, provenance(sae, run, run_cfg, units))
    return _write(dest, run, {weights_file: _safetensors(tensors), CFG: _json(cfg)})


def _load(run: Path, allow_unfinished: bool) -> tuple[SparseCoder, dict[str, Any]]:
    """A saelab run's SAE and cfg.json. An unfinished run's weights are its last checkpoint,
    or the untrained initialisation before the first, so it is refused unless asked for."""
    if allow_unfinished:
        cfg = read_json(run / CFG, f"pass a saelab run directory (cfg.json + {WEIGHTS})")
    else:
        cfg = finished_cfg(run)
    return SparseCoder.load(run), cfg


def _safetensors(tensors: dict[str, Tensor]) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, str(path))


def _json(data: dict[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2))

    return write


def _write(dest: Path, run: Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Fill a temp directory beside `dest` with `files`, then put it at `dest`."""
    check_dest(dest, _holds_export_of(run), f"an export of {run}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_dest(dest: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse a destination that is a file, or a non-empty folder that is not `what` (an
    earlier export of the same run, which the new one replaces)."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UserError(f"{dest} exists and is not a directory; choose another destination")
    if any(dest.iterdir()) and not is_ours(dest):
        raise UserError(f"{dest} is not empty and is not {what}; choose another destination")


def _holds_export_of(run: Path) -> Callable[[Path], bool]:
    def ours(dest: Path) -> bool:
        try:
            cfg = json.loads((dest / CFG).read_text())
            return (cfg.get("metadata") or cfg)["saelab"]["run_id"] == run_id(
                run
            )  # SAELens, sparsify
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            return False

    return ours


def replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`. A non-empty dest is moved aside first (rename cannot replace it), so
    a reader finds the old export, briefly none, or the new one, never a half-written one."""
    if dest.exists() and any(dest.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        os.replace(new, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, dest)  # rename onto an empty directory is allowed
