"""saelab's exports loaded by the real SAELens and sparsify, on the same inputs as saelab.

    python bench/interop.py                     # peer venvs under $SAELAB_CACHE/interop-venvs
    python bench/interop.py --venvs /tmp/peers  # elsewhere (made there if missing)

SAELens needs transformer-lens < 4 and sparsify its own dependencies, so neither can share
saelab's environment: each gets a venv of its own (torch pinned to the version saelab runs, so
pip never swaps it for another build), made once. The script trains tiny saelab runs of each
arch on a synthetic harvest (with gradients, for gradient_topk), exports every run to every
format in both unit conventions, has the peer library load each export (SAELens:
`SAE.load_from_disk`, then `fold_W_dec_norm()`; sparsify: `SparseCoder.load_from_disk`) and
encode the same held-out activations, and prints one row per export:

    codes =    rows whose firing latents are the same set as saelab's (%)
    max |Δa|   largest difference from saelab's feature values in the export's units
               (saelab's times ‖d_i‖/s for unit rows, saelab's own for --units saelab)
    FVU        saelab's FVU on the inputs / the peer library's
    fold       SAELens fold_W_dec_norm(): "ok" when codes and values are unchanged in SAELens
               units afterwards (max |Δa| again), else what SAELens said
    back       rows with identical codes after saelab.load_sae of the export (%)

and whether HookedTransformer (transformer-lens 3.x, SAELens's venv) and TransformerBridge
(saelab's) resolve the hook names an export writes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab.errors import UserError  # noqa: E402

PEERS = {"saelens": ("sae-lens", "sae_lens"), "sparsify": ("eai-sparsify", "sparsify")}
ARCHS = ("topk", "gradient_topk", "feature_choice", "mutual_choice", "matching_pursuit")
HOOKS = (  # saelab hook names as users give them: bridge-native and HookedTransformer names
    "blocks.1.hook_resid_post", "blocks.1.hook_out", "blocks.1.mlp.hook_out",
    "blocks.1.attn.hook_out", "blocks.1.attn.o.hook_in", "blocks.1.ln2.hook_in",
    "blocks.1.mlp.out.hook_in", "hook_embed",
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Peer environments


def peer_python(venvs: Path, name: str) -> tuple[Path | None, str]:
    """The venv's python with `name` importable, made if missing; or None and why not."""
    package, module = PEERS[name]
    venv = venvs / name
    py = venv / "bin" / "python"
    if py.exists() and _run([str(py), "-c", f"import {module}"]).returncode == 0:
        return py, "ready"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    pins = venv.parent / "constraints.txt"
    pins.write_text(torch_pin + "\n")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", torch_pin],  # first: never a CUDA build
        [str(py), "-m", "pip", "install", "-q", "-c", str(pins), package],
    ]
    for cmd in steps:
        print(f"[{name}] {' '.join(cmd[-3:])}", flush=True)
        done = _run(cmd)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(cmd)}` failed: {' | '.join(tail)}"
    return py, "installed"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------
# saelab side


def train_runs(root: Path) -> tuple[dict[str, Path], torch.Tensor]:
    """A tiny finished run per arch on one synthetic harvest, and held-out raw inputs."""
    from saelab.config import SAEConfig, TrainConfig
    from saelab.store import ActivationStore
    from saelab.synthetic import SyntheticData, write_harvest
    from saelab.trainer import train

    data = SyntheticData(d_in=64, n_features=512, k_true=4, seed=1)
    harvest = write_harvest(root / "harvest", data, 60_000, grads=True)
    runs = {}
    for arch in ARCHS:
        cfg = TrainConfig(
            harvest=str(harvest),
            out=str(root / "runs" / arch),
            sae=SAEConfig(arch, 256, 8),
            batch_size=512,
            eval_tokens=4000,
            dead_tokens=20_000,
            checkpoint_every=0,
        )
        runs[arch] = train(cfg, progress=False)
    store = ActivationStore(harvest)
    x = store.read(store.n_tokens - 2000, store.n_tokens).float()
    return runs, x


def saelab_side(run: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """saelab's dense codes, reconstruction and per-latent unit factor ‖d_i‖/s for `run`."""
    from saelab.sae import SparseCoder

    sae = SparseCoder.load(run).eval()
    with torch.no_grad():
        code = sae.encode(x)
        dense = torch.zeros(x.shape[0], sae.d_sae).scatter_add_(1, code.indices, code.values)
        return {
            "acts": dense,
            "recon": sae.decode(code),
            "factor": sae.W_dec.norm(dim=1) / sae.input_scale,
        }


def round_trip(dest: Path, want: torch.Tensor, x: torch.Tensor) -> float:
    """% rows with identical codes after saelab's own import of an export."""
    from saelab.interop import load_sae

    back = load_sae(dest)
    with torch.no_grad():
        code = back.encode(x)
        got = torch.zeros_like(want).scatter_add_(1, code.indices, code.values)
    return same_rows(got, want)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float(((a != 0) == (b != 0)).all(1).float().mean())


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---------------------------------------------------------------------------------------
# Peer side: one child process per library, given a list of jobs

SAELENS_CHILD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from transformer_lens import HookedTransformer, HookedTransformerConfig
jobs, x = json.loads(sys.argv[1]), load_file(sys.argv[2])["x"]
for job in jobs:
    out, info = {}, {}
    with torch.no_grad():
        sae = SAE.load_from_disk(job["dir"])
        info["class"] = type(sae).__name__
        out["acts"] = sae.encode(x)
        out["recon"] = sae.decode(out["acts"])
        try:
            sae.fold_W_dec_norm()
            out["acts_fold"] = sae.encode(x)
            out["recon_fold"] = sae.decode(out["acts_fold"])
            info["fold"] = "ok"
        except NotImplementedError as e:
            info["fold"] = "refused: " + str(e)[:45] + "..."
    save_file({k: v.contiguous() for k, v in out.items()}, job["out"] + ".safetensors")
    json.dump(info, open(job["out"] + ".json", "w"))
# The hook names each TransformerLens 3.x model class resolves, on tiny random llama models.
import tempfile
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformer_lens.model_bridge import TransformerBridge
cfg = HookedTransformerConfig(
    d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=128, n_ctx=64, d_vocab=100,
    act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True)
ht = HookedTransformer(cfg)
hf = tempfile.mkdtemp()
LlamaForCausalLM(LlamaConfig(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).save_pretrained(hf)
vocab = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
vocab.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token="<s>", eos_token="</s>",
                        unk_token="<unk>").save_pretrained(hf)
bridge = TransformerBridge.boot_transformers(hf, device="cpu")
print(json.dumps({"HookedTransformer 3.x": sorted(ht.hook_dict),
                  "TransformerBridge 3.x": sorted(bridge.hook_dict)}))
"""

SPARSIFY_CHILD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder
jobs, x = json.loads(sys.argv[1]), load_file(sys.argv[2])["x"]
for job in jobs:
    with torch.no_grad():
        sae = SparseCoder.load_from_disk(job["dir"])
        top = sae.encode(x)
        acts = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, top.top_indices, top.top_acts)
        recon = sae.decode(top.top_acts, top.top_indices)
    save_file({"acts": acts, "recon": recon}, job["out"] + ".safetensors")
    json.dump({"class": type(sae).__name__, "fold": "n/a"}, open(job["out"] + ".json", "w"))
print("{}")
"""


def run_peer(py: Path, child: str, jobs: list[dict], inputs: Path) -> tuple[dict, str]:
    """Run a peer library on every job; (hook names per model class, error or '')."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = _run([str(py), "-c", child, json.dumps(jobs), str(inputs)], timeout=1800, env=env)
    if done.returncode != 0:
        return {}, " | ".join(done.stderr.strip().splitlines()[-3:])
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


# ---------------------------------------------------------------------------------------
# Exports and the table


def export_all(runs: dict[str, Path], root: Path) -> tuple[list[dict], list[list[str]]]:
    """Every run in every format and unit convention: the jobs, and the refusals' rows."""
    from saelab.export import FORMATS, UNITS, export

    jobs, refused = [], []
    for fmt in FORMATS:
        for arch, run in runs.items():
            for units in UNITS:
                dest = root / "exports" / f"{fmt}-{arch}-{units}"
                try:
                    export(run, dest, fmt, units=units)
                except UserError as e:
                    if units == UNITS[0]:
                        refused.append([fmt, arch, "both", "-", "-", "-", f"refused: {e}", "-"])
                    continue
                out = str(root / "peer" / dest.name)
                jobs.append(
                    {"fmt": fmt, "arch": arch, "units": units, "dir": str(dest), "out": out}
                )
    (root / "peer").mkdir(exist_ok=True)
    return jobs, refused


def row(job: dict, mine: dict[str, torch.Tensor], x: torch.Tensor) -> list[str]:
    peer = load_file(job["out"] + ".safetensors")
    info = json.loads(Path(job["out"] + ".json").read_text())
    f = mine["factor"] if job["units"] == "saelens" else torch.ones_like(mine["factor"])
    delta = float((peer["acts"] - mine["acts"] * f).abs().max())
    fold = info["fold"]
    if "acts_fold" in peer:  # after folding, values are in SAELens units whatever was exported
        d = float((peer["acts_fold"] - mine["acts"] * mine["factor"]).abs().max())
        same = same_rows(peer["acts_fold"], mine["acts"])
        fold = f"ok ({same:.1f}%, Δa {d:.1e})" if same == 100.0 else f"codes {same:.1f}%"
    return [
        job["fmt"],
        job["arch"],
        job["units"],
        f"{same_rows(peer['acts'], mine['acts']):.2f}",
        f"{delta:.1e}",
        f"{fvu(x, mine['recon']):.5f} / {fvu(x, peer['recon']):.5f}",
        fold,
        f"{round_trip(Path(job['dir']), mine['acts'], x):.2f}",
    ]


def print_table(rows: list[list[str]]) -> None:
    head = ["format", "arch", "units", "codes =%", "max |Δa|", "FVU saelab / peer", "fold"]
    head.append("back =%")
    rows = [r[:6] + r[7:] + r[6:7] for r in rows]  # the fold column last: long messages
    head = head[:6] + head[7:] + head[6:7]
    rows = [r + [""] * (len(head) - len(r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the messages run on; no need to pad them
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def hook_check(peer_names: dict[str, list[str]]) -> None:
    """Does each model class resolve the hook name an export writes for a saelab hook?"""
    from saelab.models import load_model, tl_hook

    bridge = load_model("tiny").hook_dict
    classes = [*peer_names, "TransformerBridge 4.3 (saelab)"]
    print(f"\n{'saelab hook':25s} {'exported as':25s} " + "  ".join(classes))
    for h in HOOKS:
        name = tl_hook(h)
        found = ["yes" if name in names else "NO" for names in peer_names.values()]
        found.append("yes" if bridge.get(name) is bridge.get(h) is not None else "NO")
        cells = "  ".join(f.ljust(len(c)) for f, c in zip(found, classes))
        print(f"{h:25s} {name:25s} {cells}".rstrip())


def compare(peers: dict, root: Path) -> None:
    """Train, export, load in each peer library, and print the tables."""
    runs, x = train_runs(root)
    save_file({"x": x.contiguous()}, root / "x.safetensors")
    jobs, rows = export_all(runs, root)
    mine = {arch: saelab_side(run, x) for arch, run in runs.items()}
    names: dict[str, list[str]] = {}
    for fmt, child in (("saelens", SAELENS_CHILD), ("sparsify", SPARSIFY_CHILD)):
        todo = [j for j in jobs if j["fmt"] == fmt]
        py, status = peers[fmt]
        got, err = run_peer(py, child, todo, root / "x.safetensors") if py else ({}, status)
        names |= got
        for j in todo:
            failed = [fmt, j["arch"], j["units"], "-", "-", "-", f"FAILED: {err}", "-"]
            rows.append(failed if err else row(j, mine[j["arch"]], x))
    print(f"\n{x.shape[0]} held-out tokens, d_in {x.shape[1]}, d_sae 256, k 8\n")
    print_table(sorted(rows, key=lambda r: (r[0], ARCHS.index(r[1]), r[2])))
    hook_check(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--venvs", default="", help="where the peer venvs live (made if missing)")
    args = ap.parse_args()
    from saelab.models import cache_root

    venvs = Path(args.venvs or cache_root() / "interop-venvs")
    peers = {name: peer_python(venvs, name) for name in PEERS}
    for name, (py, status) in peers.items():
        print(f"{name}: {py or 'unavailable'} ({status})")
    with tempfile.TemporaryDirectory(prefix="saelab-interop-") as tmp:
        compare(peers, Path(tmp))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
