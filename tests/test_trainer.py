"""Training on synthetic data with a known dictionary: it learns, resumes exactly, and
refuses bad input without touching existing runs."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.config import SAEConfig, TrainConfig
from saelab.errors import UserError
from saelab.runs import CHECKPOINT
from saelab.sae import SparseCoder
from saelab.store import ActivationStore
from saelab.synthetic import SyntheticData
from saelab.trainer import geometric_median, lr_at, split_ranges, train

DATA = dict(d_in=32, n_features=128, k_true=4, seed=3)


@pytest.fixture(scope="module")
def harvest(tmp_path_factory, synthetic_harvest) -> Path:
    path = tmp_path_factory.mktemp("h") / "syn"
    return synthetic_harvest(
        path, n_tokens=40_000, tokens_per_context=63, shard_contexts=64, **DATA
    )


@pytest.fixture
def train_syn(trained_run, harvest):
    """Train into a directory on the module's harvest with this file's settings; keywords
    override them."""
    return partial(
        trained_run,
        harvest=harvest,
        d_sae=128,
        k=4,
        batch_size=512,
        eval_tokens=4000,
        n_tokens=40_000,
        dead_tokens=5000,
        checkpoint_every=10,
        log_every=5,
        lr_warmup_steps=5,
        shuffle_buffer=8192,
    )


def test_training_learns_the_dictionary(train_syn, harvest, tmp_path):
    run = train_syn(tmp_path / "r", n_tokens=120_000)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["fvu"] > 0.5 and log[-1]["fvu"] < 0.2
    assert [r["step"] for r in log] == sorted({r["step"] for r in log})
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["complete"] and cfg["arch"] == "topk" and cfg["d_in"] == 32
    assert cfg["hook"] == "synthetic" and cfg["train"]["sae"]["k"] == 4
    # Input scaling makes E‖x·s‖² = d_in.
    store = ActivationStore(harvest)
    x = store.read(0, 4000) * cfg["input_scale"]
    assert float(x.pow(2).sum(1).mean()) == pytest.approx(32, rel=0.1)
    # The decoder recovers true directions: most of the 64 most frequent features have a
    # latent with cosine > 0.9.
    W_dec = load_file(run / "sae.safetensors")["W_dec"]
    truth = SyntheticData(**DATA).dictionary[:64]
    best = (truth @ W_dec.T).max(1).values
    assert (best > 0.9).float().mean() > 0.8


class _Interrupt(Exception):
    pass


def test_resume_gives_identical_weights(train_syn, tmp_path, monkeypatch):
    full = train_syn(tmp_path / "full")

    real = ActivationStore.batches

    def dying(self, *a, **kw):
        for i, b in enumerate(real(self, *a, **kw)):
            if i == 27:  # past the checkpoint at step 20, before the one at 30
                raise _Interrupt
            yield b

    monkeypatch.setattr(ActivationStore, "batches", dying)
    with pytest.raises(_Interrupt):
        train_syn(tmp_path / "cut")
    assert not json.loads((tmp_path / "cut" / "cfg.json").read_text())["complete"]
    monkeypatch.setattr(ActivationStore, "batches", real)
    cut = train_syn(tmp_path / "cut")

    a, b = load_file(full / "sae.safetensors"), load_file(cut / "sae.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (full / "train_log.jsonl").read_text().splitlines()
    lb = (cut / "train_log.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in ls]  # noqa: E731
    assert strip(la) == strip(lb)  # nothing lost, nothing duplicated


def test_rerun_of_complete_run_is_a_no_op(train_syn, tmp_path):
    run = train_syn(tmp_path / "r", n_tokens=5000)
    before = (run / "sae.safetensors").read_bytes()
    train_syn(tmp_path / "r", n_tokens=5000)
    assert (run / "sae.safetensors").read_bytes() == before


def test_output_dir_with_another_run_is_refused_untouched(train_syn, tmp_path):
    run = train_syn(tmp_path / "r", n_tokens=5000)
    snapshot = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"already holds a different run .*sae.k"):
        train_syn(tmp_path / "r", n_tokens=5000, k=8)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == snapshot


def test_output_dir_that_is_not_a_run_is_refused(train_syn, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a saelab run"):
        train_syn(tmp_path / "r")
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


class _HalfSilent(SparseCoder):
    """Latents 0..63 start with encoders 20× too short: their z never reaches the top k, so
    they die within two batches, and only a gradient from the auxiliary loss can move them."""

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        super().reset_parameters(generator)
        self.W_enc[:64] *= 0.05


def test_auxk_revives_dead_latents(train_syn, tmp_path, monkeypatch):
    # Two runs differing only in auxk_alpha. With the usual init, runs this short show no
    # reliable AuxK effect on the dead count (its "dead" latents mostly serve rare features),
    # so half the latents are silenced at init: AuxK must bring them back, and without it
    # (alpha 0, or a detached aux loss) they stay dead.
    monkeypatch.setattr("saelab.trainer.SparseCoder", _HalfSilent)
    kw = dict(dead_tokens=1024, n_tokens=20_000, checkpoint_every=0)
    runs = {"auxk": train_syn(tmp_path / "auxk", **kw)}
    runs["off"] = train_syn(tmp_path / "off", auxk_alpha=0.0, **kw)
    logs, dead, revived = {}, {}, {}
    for name, run in runs.items():
        logs[name] = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        dead[name] = json.loads((run / "cfg.json").read_text())["dead_latents"]
        since_fired = load_file(run / CHECKPOINT)["state.since_fired"]
        revived[name] = int((since_fired[:64] < 1024).sum())  # silenced latents firing now
    assert logs["auxk"][0]["dead_frac"] >= 0.5  # they did die
    assert any(r["aux"] > 0 for r in logs["auxk"]) and all(r["aux"] == 0 for r in logs["off"])
    assert revived["auxk"] >= 40 and revived["off"] <= 10, revived
    assert dead["auxk"] <= 20 and dead["off"] >= 50 and dead["auxk"] * 3 < dead["off"], dead


def test_train_step_steps_with_the_projected_decoder_gradient():
    # One trainer step from a known state: the gradient Adam steps W_dec with must be
    # ∂FVU/∂W_dec with each row's component along that (unit) row removed, computed here
    # densely by hand.
    from saelab.trainer import Member, _train_step

    torch.manual_seed(1)
    sae = SparseCoder(12, 40, 3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(64, 12) * 2
    W_enc, b_enc = sae.W_enc.detach().clone(), sae.b_enc.detach().clone()
    W_dec, b_dec = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()

    z = (x - b_dec) @ W_enc.T + b_enc
    top = z.relu().topk(3, dim=1)
    a = torch.zeros(64, 40).scatter(1, top.indices, top.values)
    W = W_dec.clone().requires_grad_()
    fvu = ((a @ W + b_dec) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    (g,) = torch.autograd.grad(fvu, W)
    radial = (g * W_dec).sum(1, keepdim=True)
    assert radial.abs().max() > 1e-3  # the projection has something to remove
    expected = g - radial * W_dec

    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(sae.W_dec.grad.clone()))
    m = Member(Path("unused"), {"aux_loss": "auxk", "k_aux": 6}, sae, opt)
    m.since_fired = torch.zeros(40, dtype=torch.int64)  # nothing dead: no auxiliary loss
    m.freq = torch.zeros(40)
    stats = _train_step(m, x, None, TrainConfig())
    assert stats["fvu"] == pytest.approx(fvu.item(), rel=1e-5) and stats["aux"] == 0
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_split_is_disjoint_and_context_aligned(harvest):
    store = ActivationStore(harvest)
    (a, b), (c, d) = split_ranges(store, 4000)
    assert a == 0 and b == c and d == store.n_tokens and b % 63 == 0 and d - c >= 4000
    with pytest.raises(UserError, match="leaves no training tokens"):
        split_ranges(store, store.n_tokens)


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(lr=1.0, lr_warmup_steps=4, lr_decay_frac=0.5)
    lrs = [lr_at(s, 20, 1.0, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:10] == [1.0] * 6 and lrs[10] == 1.0 and lrs[19] == pytest.approx(0.1)


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.zeros(50, 2) + torch.randn(50, 2) * 0.01, torch.full((5, 2), 100.0)])
    assert geometric_median(x).norm() < 0.5 < x.mean(0).norm()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--sae.k", "128"], "k=128 must be smaller than d_sae=128"),
        (["--lr", "-0.1"], "lr=-0.1 must not be negative"),
        (["--sae.arch", "nope"], "sae.arch='nope' is not one of topk, gradient_topk"),
        (["--batch_sise", "3"], "did you mean '--batch_size'"),
        (["--hook", "blocks.99.hook_resid_post"], "blocks.99.hook_resid_post"),
    ],
)
def test_cli_bad_input_exits_2_without_writing(harvest, tmp_path, capsys, args, msg):
    out = tmp_path / "r"
    rc = main(
        [
            "train",
            "--harvest",
            str(harvest),
            "--out",
            str(out),
            "--sae.d_sae",
            "128",
            "--sae.k",
            "4",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_harvest(tmp_path, capsys):
    assert main(["train", "--harvest", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "saelab harvest" in capsys.readouterr().err


def test_wandb_offline_logging(train_syn, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train_syn(tmp_path / "r", n_tokens=5000, wandb=True)
    files = list((run / "wandb").rglob("*.wandb"))
    assert files and files[0].stat().st_size > 0


def _damaged_harvest(tmp_path, synthetic_harvest, truncate: bool, xor: int) -> Path:
    """A small harvest whose shard_00001.npy is cut in half, or has one byte XORed."""
    h = synthetic_harvest(
        tmp_path / "h", d_in=8, n_features=16, k_true=2, n_tokens=3000,
        tokens_per_context=15, shard_contexts=16,
    )  # fmt: skip
    shard = sorted((h / "acts" / "synthetic").glob("shard_*.npy"))[1]
    data = bytearray(shard.read_bytes())
    if truncate:
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-100] ^= xor
        shard.write_bytes(bytes(data))
    return h


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_cli_damaged_shard_is_named(tmp_path, capsys, synthetic_harvest, damage):
    h = _damaged_harvest(tmp_path, synthetic_harvest, truncate=damage == "truncate", xor=0xFF)
    rc = main(
        [
            "train",
            "--harvest",
            str(h),
            "--out",
            str(tmp_path / "r"),
            "--sae.d_sae",
            "32",
            "--sae.k",
            "2",
            "--batch_size",
            "128",
            "--eval_tokens",
            "300",
            "-q",
        ]
    )
    # A corrupt shard's hash is awaited by the batch stream, so its error may follow the bar.
    errors = [ln for ln in capsys.readouterr().err.split("\n") if "error" in ln]
    assert rc == 2 and len(errors) == 1 and "shard_00001.npy" in errors[0]


@pytest.mark.parametrize("verify", ["first-read", "full", "off"])
def test_train_follows_the_verify_policy(tmp_path, synthetic_harvest, verify):
    """A flipped byte in a shard stops training under first-read and full; off trusts it."""
    # The lowest mantissa bit of one value: the value stays finite.
    h = _damaged_harvest(tmp_path, synthetic_harvest, truncate=False, xor=0x01)
    cfg = TrainConfig(
        harvest=str(h), out=str(tmp_path / "r"), sae=SAEConfig(d_sae=32, k=2),
        batch_size=128, eval_tokens=300, verify=verify,
    )  # fmt: skip
    if verify == "off":
        assert (train(cfg, progress=False) / "sae.safetensors").exists()
    else:
        with pytest.raises(UserError, match="shard_00001.npy"):
            train(cfg, progress=False)


def test_zipf_deficit_hand_worked():
    from saelab.trainer import zipf_deficit

    # Frequencies already ranked; exponent 1: targets ∝ (1, 1/2, 1/4·...) scaled to Σf.
    freq = torch.tensor([0.5, 0.3, 0.0, 0.2])  # ranks 1, 2, 4, 3
    t = torch.tensor([1, 1 / 2, 1 / 4, 1 / 3])
    t = t * freq.sum() / t.sum()
    w = zipf_deficit(freq, 1.0)
    expected = ((t - freq) / t).clamp(0, 1) * (freq < t)
    torch.testing.assert_close(w, expected)
    assert w[2] == 1.0 and w[0] == 0.0  # a silent latent has full deficit; the top has none


def test_run_from_before_a_new_config_field_still_matches(train_syn, tmp_path):
    run = train_syn(tmp_path / "r", n_tokens=5000)
    cfg = json.loads((run / "cfg.json").read_text())
    del cfg["train"]["sae"]["aux"], cfg["train"]["zipf_exponent"]  # as an older saelab wrote it
    (run / "cfg.json").write_text(json.dumps(cfg))
    assert train_syn(tmp_path / "r", n_tokens=5000) == run


def test_sweep_members_train_at_their_own_learning_rate(harvest, tmp_path):
    """lr ∝ 1/√d_sae: a sweep of two widths gives each member its own rate, at every step."""
    from saelab.config import SAEConfig
    from saelab.trainer import train

    cfg = TrainConfig(
        harvest=str(harvest), out=str(tmp_path / "sw"), batch_size=512, n_tokens=10_240,
        eval_tokens=4000, lr_warmup_steps=2, lr_decay_frac=0.0, log_every=1,
        checkpoint_every=0, sweep=[SAEConfig("topk", 64, 4), SAEConfig("topk", 256, 4)],
    )  # fmt: skip
    root = train(cfg, progress=False)
    rates = {}
    for member in (p for p in root.iterdir() if (p / "cfg.json").is_file()):
        member_cfg = json.loads((member / "cfg.json").read_text())
        want = rates[member_cfg["d_sae"]] = member_cfg["lr"]
        log = [json.loads(line) for line in (member / "train_log.jsonl").read_text().splitlines()]
        after_warmup = [r["lr"] for r in log if r["step"] > 2]
        assert len(after_warmup) > 10 and after_warmup == pytest.approx([want] * len(after_warmup))
    assert rates[64] == pytest.approx(2 * rates[256])  # lr ∝ 1/√d_sae


@pytest.mark.parametrize("flag", [["--lr", "1e30"], ["--sae.k", "4"]])
def test_divergence_stops_with_one_line_and_keeps_the_checkpoint(harvest, tmp_path, capsys, flag):
    """An absurd learning rate overflows the weights; training stops at the first non-finite
    loss or weight, names the step, and writes no non-finite checkpoint."""
    out = tmp_path / "r"
    argv = ["train", "--harvest", str(harvest), "--out", str(out), "--sae.d_sae", "128"]
    argv += ["--batch_size", "512", "--n_tokens", "20480", "--checkpoint_every", "2", "-q"]
    if flag[0] == "--sae.k":  # finite lr, non-finite activations: poison one shard's row
        import numpy as np

        h = tmp_path / "h"
        import shutil

        shutil.copytree(harvest, h)
        shard = next((h / "acts").rglob("shard_00000.npy"))
        arr = np.load(shard, mmap_mode="r+")
        arr[5, 0] = np.inf
        arr.flush()
        import hashlib

        from saelab.shards import LOG

        entries = [json.loads(line) for line in (h / LOG).read_text().splitlines()]
        for s in entries:
            for rel in s["files"]:
                s["files"][rel] = hashlib.sha256((h / rel).read_bytes()).hexdigest()
        (h / LOG).write_text("".join(json.dumps(s) + "\n" for s in entries))
        argv[2] = str(h)
        argv += ["--shuffle_buffer", "512"]
    argv += flag
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.split("\n") if "error" in ln]
    assert len(errors) == 1 and "training diverged at step" in errors[0]  # (after the bar)
    ckpt = out / "checkpoints" / "state.safetensors"
    if ckpt.exists():
        assert all(torch.isfinite(t).all() for t in load_file(ckpt).values())
    assert not json.loads((out / "cfg.json").read_text())["complete"]


def test_resume_on_a_changed_harvest_is_refused(train_syn, harvest, tmp_path, synthetic_harvest):
    h = tmp_path / "h"
    synthetic_harvest(h, n_tokens=20_000, tokens_per_context=63, shard_contexts=64, **DATA)
    run = train_syn(tmp_path / "r", harvest=h, n_tokens=5000, eval_tokens=2000)
    assert json.loads((run / "cfg.json").read_text())["harvest_identity"]["n_tokens"] == 20_034
    import shutil

    shutil.rmtree(h)
    synthetic_harvest(h, n_tokens=30_000, tokens_per_context=63, shard_contexts=64, **DATA)
    with pytest.raises(UserError, match="already holds a different run .*harvest_identity"):
        train_syn(tmp_path / "r", harvest=h, n_tokens=5000, eval_tokens=2000)


def test_a_second_writer_is_refused_naming_the_holder(train_syn, tmp_path):
    from saelab.runs import writer_lock

    out = tmp_path / "r"
    with writer_lock(out):
        with pytest.raises(UserError, match=r"being written by another saelab process \(pid "):
            train_syn(out, n_tokens=5000)
    assert not out.exists()
    assert (train_syn(out, n_tokens=5000) / "cfg.json").is_file()  # released on exit


@pytest.mark.parametrize("every", [1, 3])
def test_aux_zipf_on_every_nth_token_has_the_gradient_of_its_definition(every):
    """A mutual-choice step's encoder gradient and aux figure against dense autograd of
    ALGORITHMS.md §4: the top k·B entries, and aux_zipf's deficit-weighted top-k_aux of the
    under-used latents reconstructing the residual, on rows 0, n, 2n, … only (aux_every n):
    the candidates the encode selects (n = 1) and those of their own encode (n = 3)."""
    from saelab.trainer import Member, _train_step, zipf_deficit

    torch.manual_seed(0)
    B, d, n, k, k_aux = 30, 8, 24, 2, 5
    sae = SparseCoder(d, n, k, "mutual_choice")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(B, d) * 2
    freq = torch.rand(n) * 0.2
    freq[:4] = 0  # silent latents: full deficit

    W_enc, b_enc, W_dec, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    z = (x - b_dec) @ W_enc.T + b_enc
    chosen = torch.zeros(B * n).index_fill(0, z.detach().flatten().topk(k * B).indices, 1.0)
    x_hat = (z.relu() * chosen.view(B, n)) @ W_dec + b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    w = zipf_deficit(freq, 1.0)
    under = w > 0
    rows = torch.arange(0, B, every)
    zr = z[rows].relu()
    ids = zr.detach().masked_fill(~under, -1).topk(k_aux, dim=1).indices
    e_hat = ((zr.gather(1, ids) * w[ids])[..., None] * W_dec[ids]).sum(1)
    e = (x - x_hat)[rows].detach()
    aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    scale = TrainConfig().auxk_alpha * min(int(under.sum()) / k_aux, 1.0)
    (fvu + scale * aux).backward()

    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append((sae.W_enc.grad.clone(), sae.b_enc.grad)))
    plan = {"aux_loss": "zipf", "k_aux": k_aux, "aux_every": every}
    m = Member(Path("unused"), plan, sae, opt)
    m.since_fired, m.freq = torch.zeros(n, dtype=torch.int64), freq.clone()
    stats = _train_step(m, x, None, TrainConfig())
    assert float(stats["aux"]) == pytest.approx(scale * aux.item(), rel=1e-5)
    torch.testing.assert_close(seen[0][0], W_enc.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(seen[0][1], b_enc.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("B,every,world", [(64, 8, 2), (64, 3, 2), (30, 4, 3), (12, 1, 4)])
def test_aux_rows_of_the_processes_are_the_rows_of_one(B, every, world):
    """Under data parallelism (rank r holds rows r·B/world …) the processes' auxiliary rows
    together are exactly one process's every-n-th rows of the global batch."""
    from saelab.distributed import Dist
    from saelab.trainer import aux_rows

    local = B // world
    mine = [
        torch.arange(r * local, (r + 1) * local)[aux_rows(local, {"aux_every": every}, d)]
        for r in range(world)
        for d in [Dist(rank=r, world=world)]
    ]
    one = torch.arange(B)[aux_rows(B, {"aux_every": every})]
    assert torch.equal(torch.cat(mine), one) and torch.equal(one, torch.arange(0, B, every))
