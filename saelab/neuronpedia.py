"""A run's feature index as the files SAEDashboard's Neuronpedia runner writes, which
Neuronpedia's import tooling converts and uploads (`saelab export --format neuronpedia`).

Followed: SAEDashboard v0.8.0 (PyPI sae-dashboard 0.8.0; tag v0.8.0, commit
37bb168f96423d1f580f4bfc83145c66b3e38304, 2026-04-24). Field names are those of the
`to_dict` methods in sae_dashboard/neuronpedia/neuronpedia_dashboard.py, their meaning that
given them in neuronpedia_converter.py, the file names those of neuronpedia_runner.py
(`batch-N.json`, `n_features_at_a_time` = 128 features each, and `run_settings.json`). The
schema of what we write is saelab/schemas/neuronpedia.schema.json. Consumers read batches by
key: neuronpedia-utils' convert-saedashboard-to-neuronpedia-export.py (and its successor in
SAEDashboard after v0.8.0, neuronpedia_export.py) turn them into Neuronpedia's feature and
activation tables, deriving `maxValue` and `maxValueTokenIndex` (the argmax of `values`).

OUT/
  batch-N.json            {model_id, layer, sae_set, sae_id_suffix, features}: latents
                          128·N … 128·N + 127, each one SAEDashboard feature object
  run_settings.json       the runner's settings that apply here, and under "saelab" the SAE's
                          metadata: model (an HF repo id where known), hook, d_in, d_sae, arch,
                          k, dataset, how the index was built, and the fields left empty
  decoder_neighbours.json top decoder cosines per latent, under Neuronpedia's names for them
                          (topkCosSimIndices/Values); SAEDashboard's correlated_features_* are
                          activation correlations, and an unknown key in a batch would break
                          loaders that build NeuronpediaDashboardFeature(**feature)

From features.sqlite to a feature: feature_index = latent id; activations = the top contexts
(bin_min -1, bin_max the latent's max activation, bin_contains -1: SAEDashboard's "TOP
ACTIVATIONS" group), then the interval examples (bin_min/bin_max: the activation interval the
example was drawn from, bin_contains: that interval's share of the latent's firings, as in its
"INTERVAL" groups), each with token strings, per-token activations and
qualifying_token_index = the peak token; pos_str/pos_values, neg_str/neg_values = the logit
lens; frac_nonzero = firing frequency; freq_hist_data_bar_values/heights = histogram bin
centres and counts. The index holds no logit histogram, neuron alignment, activation
correlations or head attribution, so those lists are empty (as SAEDashboard leaves tables it
did not compute). Activations and logits are written as the shortest decimals that read back
as the index's float32; SAEDashboard rounds them to 3 places. Nothing written names a local
path: a local model or corpus appears by its folder or file name only.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from saelab import __version__
from saelab.config import DEFAULT_MODEL
from saelab.corpus import DEFAULT_DESCRIPTION
from saelab.errors import UserError
from saelab.export import check_dest, replace_dir  # shared with the SAELens export
from saelab.feature_index import Context, FeatureIndex, LatentCard
from saelab.models import EMBEDDED_CONVERSION, EMBEDDED_REPO_ID
from saelab.runs import INDEX, SYNTHETIC, finished_cfg
from saelab.shards import META

log = logging.getLogger(__name__)

SAEDASHBOARD = {"release": "v0.8.0", "commit": "37bb168f96423d1f580f4bfc83145c66b3e38304"}
SCHEMA = Path(__file__).parent / "schemas" / "neuronpedia.schema.json"
FEATURES_PER_BATCH = 128
"""NeuronpediaRunnerConfig.n_features_at_a_time's default."""
RUN_SETTINGS = "run_settings.json"
NEIGHBOURS = "decoder_neighbours.json"
FORMAT = "neuronpedia"
"""Marks our exports (run_settings.json's saelab.format), so that one may be replaced."""

HF_MODELS = {DEFAULT_MODEL: (EMBEDDED_REPO_ID, EMBEDDED_CONVERSION)}
"""saelab's model aliases → (HF repo id, how saelab's weights differ from that repo's)."""
_IDENTITY = ("harvest", "model", "hook", "d_sae", "k", "arch")
"""Index meta that must equal the run's cfg.json, else the index describes another SAE."""
_EMPTY = {
    "logits_hist_data_bar_heights, logits_hist_data_bar_values": "no logit histogram is indexed",
    "neuron_alignment_*, correlated_neurons_*, correlated_features_*": "not indexed",
    "decoder_weights_dist": "attention-head attribution is not computed",
    "vector": "decoder rows are in the run's sae.safetensors",
}


def export_neuronpedia(run: str | Path, dest: str | Path) -> Path:
    """Write the run's feature index to `dest` as SAEDashboard's Neuronpedia runner output.

    `dest` must be missing, empty, or an earlier Neuronpedia export of a run of the same name
    (then replaced). Built in a temporary folder beside `dest` and moved into place, so a
    failed export leaves `dest` as it was.
    """
    run, dest = Path(run), Path(dest)
    cfg = finished_cfg(run)
    ix = open_index(run, cfg)
    try:
        meta = metadata(run, cfg, ix)
        name = meta["saelab"]["run"]
        check_dest(dest, _holds_export_of(name), f"a Neuronpedia export of {name}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            _write_all(tmp, ix, meta)
            replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        ix.close()
    log.info("wrote %d latents in %s", ix.d_sae, dest)
    return dest


def open_index(run: Path, cfg: dict[str, Any]) -> FeatureIndex:
    """The run's index, refused when missing, incomplete, of another saelab version, or built
    for another SAE than the run's (stale)."""
    fix = f"run `saelab index {run}`"
    if not (run / INDEX).is_file():
        raise UserError(f"{run} has no feature index ({INDEX}); {fix} first")
    ix = FeatureIndex(run / INDEX)  # refuses incomplete, damaged and other-version files
    stale = [f"{k} {ix.meta.get(k)!r} vs {cfg.get(k)!r}" for k in _IDENTITY
             if ix.meta.get(k) != cfg.get(k)]  # fmt: skip
    if stale:
        ix.close()
        raise UserError(
            f"{run / INDEX} is stale (index vs run: {'; '.join(stale[:3])}); {fix} to rebuild it"
        )
    return ix


# ---------------------------------------------------------------------------------------
# Metadata


def model_id(name: str | None) -> tuple[str, str | None, str]:
    """(name to show, HF repo id or None, what it is) for a run's model name."""
    if name in HF_MODELS:
        repo, how = HF_MODELS[name]
        return repo, repo, f"{repo}, {how}"
    if name in (None, SYNTHETIC):
        return SYNTHETIC, None, "no model: synthetic activations (saelab.synthetic)"
    if name == "tiny":  # saelab.models.TINY
        return name, None, "saelab's randomly initialised 2-block test model"
    if _is_local(name):
        return Path(name).name, None, "a local HF directory (its folder name; no path exported)"
    return name, name, f"{name} from the Hugging Face hub"


def dataset(corpus: dict[str, Any] | None) -> str:
    """A one-line description of the harvest's corpus; an HF dataset as its path, which is
    what SAEDashboard's `dataset` holds (e.g. "Skylion007/openwebtext")."""
    if not isinstance(corpus, dict):
        return "unknown: the run's harvest is not available"
    if "synthetic" in corpus:
        return "synthetic activations (saelab.synthetic), no text"
    spec = str(corpus.get("spec"))
    if spec == "default":
        return DEFAULT_DESCRIPTION
    if _is_local(spec):
        return f"local text: {Path(spec).expanduser().name}"
    return spec


def _is_local(spec: str) -> bool:
    # As saelab.corpus and saelab.models resolve names: an existing path or one written as a path.
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def _layer(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise UserError(
            f"hook {hook} names no layer (blocks.N.…); Neuronpedia files each SAE under a layer, "
            "so export a run of a block hook"
        )
    return int(m[1])


def _harvest_meta(cfg: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads((Path(cfg.get("harvest", "")) / META).read_text())
    except (OSError, ValueError):
        return None


def metadata(run: Path, cfg: dict[str, Any], ix: FeatureIndex) -> dict[str, Any]:
    """run_settings.json: the NeuronpediaRunnerConfig fields that apply, and "saelab"."""
    shown, repo, what = model_id(cfg.get("model"))
    m, hm = ix.meta, _harvest_meta(cfg)
    if hm is None:
        log.warning("the harvest of %s is missing: dataset and prompt counts are unknown", run)
    lo, hi = m["rows"]
    tpc = hm["tokens_per_context"] if hm else 0
    data = dataset(hm.get("corpus") if hm else None)
    name = run.resolve().name
    return {
        "sae_set": name, "np_set_name": None, "np_sae_id_suffix": None,
        "huggingface_dataset_path": data,
        "n_prompts_total": -(-hi // tpc) - lo // tpc if tpc else 0,  # contexts the rows span
        "n_tokens_in_prompt": hm["n_ctx"] if hm else 0,
        "n_features_at_a_time": FEATURES_PER_BATCH, "n_quantiles": m["intervals"],
        "top_acts_group_size": m["top_contexts"], "quantile_group_size": m["interval_samples"],
        "model_id": shown, "layer": _layer(cfg["hook"]), "hf_model_path": repo,
        "prepend_bos": True,  # every saelab context starts with BOS (corpus.contexts)
        "saelab": {
            "format": FORMAT, "saelab_version": __version__, "saedashboard": SAEDASHBOARD,
            "run": name, "model": {"id": shown, "hf_repo_id": repo, "description": what},
            "hook": cfg["hook"], "d_in": cfg.get("d_in"), "d_sae": ix.d_sae,
            "arch": m["arch"], "k": m["k"], "dataset": data,
            "index": {
                "version": m["version"], "built_at": m["built_at"], "n_tokens": m["n_tokens"],
                "rows": m["rows"], "row_choice": m["row_choice"],
                "top_contexts": m["top_contexts"],
                "intervals": m["intervals"], "interval_samples": m["interval_samples"],
                "context": m["context"], "logit_lens": bool(m["logit_lens"]),
            },
            "empty_fields": _EMPTY,
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Features


def _f32(xs: Any) -> list[float]:
    """The shortest decimals that read back as the same float32s (numpy's str of a float32)."""
    return [float(s) for s in np.asarray(xs, np.float32).astype(str)]


def _activation(c: Context, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
    return {
        "bin_min": bin_min, "bin_max": bin_max, "bin_contains": contains,
        "tokens": list(c.tokens), "values": _f32(c.acts), "qualifying_token_index": c.peak,
    }  # fmt: skip


def _interval(card: LatentCard, c: Context) -> tuple[float, float, float]:
    """(bin_min, bin_max, share of firings) of the activation interval `c` was drawn from."""
    lo, hi, n = card.intervals[c.group]
    return lo, hi, n / max(card.n_fires, 1)


def feature(ix: FeatureIndex, card: LatentCard, common: dict[str, Any]) -> dict[str, Any]:
    """A latent as one SAEDashboard feature object, keys in NeuronpediaDashboardFeature's
    order."""
    i = card.id
    (top_max,) = _f32([card.max_act])
    acts = [_activation(c, -1, top_max, -1) for c in ix.contexts(i, "top")]
    acts += [_activation(c, *_interval(card, c)) for c in ix.contexts(i, "interval")]
    edges = card.hist_edges
    tables = ("neuron_alignment", "correlated_neurons", "correlated_features")
    return {
        "feature_index": i,
        **{f"{t}_{s}": [] for t in tables[:1] for s in ("indices", "values", "l1")},
        **{f"{t}_{s}": [] for t in tables[1:] for s in ("indices", "l1", "pearson")},
        "neg_str": [t for t, _ in card.logit_bottom],
        "neg_values": _f32([v for _, v in card.logit_bottom]),
        "pos_str": [t for t, _ in card.logit_top],
        "pos_values": _f32([v for _, v in card.logit_top]),
        "frac_nonzero": card.freq,
        "freq_hist_data_bar_values": [(a + b) / 2 for a, b in zip(edges, edges[1:])],
        "freq_hist_data_bar_heights": list(card.hist_counts),
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        **common,
        "decoder_weights_dist": [],
        "activations": acts,
        "vector": [],
    }


def _dump(path: Path, doc: Any, indent: int | None = None) -> None:
    # allow_nan=False: NaN is not JSON, and no consumer should have to guess at it.
    path.write_text(json.dumps(doc, indent=indent, allow_nan=False))


def _write_all(out: Path, ix: FeatureIndex, meta: dict[str, Any]) -> None:
    head = {"model_id": meta["model_id"], "layer": meta["layer"], "sae_set": meta["sae_set"]}
    common = {
        "n_prompts_total": meta["n_prompts_total"],
        "n_tokens_in_prompt": meta["n_tokens_in_prompt"],
        "dataset": meta["huggingface_dataset_path"],
    }
    near = []
    for n, a in enumerate(range(0, ix.d_sae, FEATURES_PER_BATCH)):
        cards = [ix.latent(i) for i in range(a, min(a + FEATURES_PER_BATCH, ix.d_sae))]
        feats = [feature(ix, card, common) for card in cards]
        _dump(out / f"batch-{n}.json", {**head, "sae_id_suffix": None, "features": feats})
        near += [card.neighbours for card in cards]
    _dump(out / NEIGHBOURS, {
        **head,
        "description": "top decoder-direction cosine similarities of each latent, most similar "
        "first (Neuronpedia's Feature.topkCosSimIndices/topkCosSimValues)",
        "features": [
            {"feature_index": i, "topkCosSimIndices": [int(j) for j, _ in nb],
             "topkCosSimValues": _f32([c for _, c in nb])}
            for i, nb in enumerate(near)
        ],
    })  # fmt: skip
    _dump(out / RUN_SETTINGS, meta, indent=4)  # last: its presence marks a whole export


def _holds_export_of(run_name: str) -> Callable[[Path], bool]:
    def ours(dest: Path) -> bool:
        try:
            old = json.loads((dest / RUN_SETTINGS).read_text())["saelab"]
            return old["format"] == FORMAT and old["run"] == run_name
        except (OSError, ValueError, KeyError, TypeError):
            return False

    return ours
