"""Training precision (fp32 / tf32 / bf16), a step that never waits for the device, and
optimizer state restored where the optimizer reads it.

"No host sync" is checked on the CPU at the dispatcher: every aten op the step runs, its
backward and the optimizer included, passes through a TorchDispatchMode that fails on the
ops that read a tensor on the host (`_local_scalar_dense`, behind .item(), int(), float(),
bool()) or whose output shape depends on tensor values (nonzero, boolean-mask indexing,
bincount, unique, masked_select), the ops that make a GPU drain its queue. The kernels take
their device path there (`eager.host_reads_are_free` patched to False), as on a GPU.
"""

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saelab import kernels
from saelab.archs import TRAINABLE
from saelab.checkpoint import load_checkpoint, save_checkpoint
from saelab.config import TrainConfig
from saelab.errors import UserError
from saelab.kernels import eager
from saelab.sae import SparseCoder
from saelab.trainer import Member, _check_finite, _log_step, _train_step

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class SyncDetector(TorchDispatchMode):
    """Records the aten ops that would make a GPU wait (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.seen.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in args[1]
                if i is not None
            ):
                self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def member(arch="topk", d_in=16, d_sae=64, k=4, precision="fp32", seed=0, fused=False):
    torch.manual_seed(seed)
    sae = SparseCoder(d_in, d_sae, k, arch)
    sae.compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=fused)
    aux = "zipf" if arch == "mutual_choice" else "auxk"
    m = Member(Path("unused"), {"aux_loss": aux, "k_aux": 8, "lr": 1e-3}, sae, opt)
    m.since_fired = torch.zeros(d_sae, dtype=torch.int64)
    m.freq = torch.zeros(d_sae)
    m.diverged_at = torch.full((), -1)
    return m


def batch(B=128, d_in=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d_in, generator=g) * 2, torch.randn(B, d_in, generator=g)


# ---- no host sync ----------------------------------------------------------------------------


def test_detector_sees_host_reads_in_forward_and_backward():
    # The positive control: the detector must see the syncs it exists to catch, also in a
    # backward (which torch runs on another thread for accelerators).
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())

    x = torch.randn(8, requires_grad=True)
    with SyncDetector() as d:
        y = ReadsInBackward.apply(x)
        y[y > 0].sum().backward()
    assert any("_local_scalar_dense" in s for s in d.seen), d.seen
    assert any("boolean mask" in s for s in d.seen), d.seen


@pytest.mark.parametrize("arch", ["topk", "gradient_topk", "matching_pursuit"])
@pytest.mark.parametrize("dead", [False, True])
def test_train_step_never_syncs(arch, dead, monkeypatch):
    monkeypatch.setattr(eager, "host_reads_are_free", lambda t: False)
    m = member(arch, fused=True)  # as the trainer builds it (unfused Adam reads its step)
    x, g = batch()
    cfg = TrainConfig(dead_tokens=1000)
    if dead:  # a third of the latents dead, and silenced so they stay so: AuxK runs
        m.since_fired[::3] = 1000
        with torch.no_grad():
            m.sae.b_enc[::3] = -100.0
    grad = g if arch == "gradient_topk" else None
    _train_step(m, x, grad, cfg)  # a first step may set things up
    with SyncDetector() as d:
        stats = _train_step(m, x, grad, cfg)
    assert d.seen == [], d.seen
    assert all(isinstance(v, torch.Tensor) for v in stats.values())
    if dead and arch != "matching_pursuit":
        assert float(stats["aux"]) > 0


def test_device_path_trains_like_the_cpu_path(monkeypatch):
    # The kernels' device path (a fixed-shape, zero-padded AuxK code) and the CPU path
    # (the code cut to the dead latents) give the same step, dead latents or none.
    results = []
    for free in (True, False):
        monkeypatch.setattr(eager, "host_reads_are_free", lambda t, free=free: free)
        m = member()
        m.since_fired[:5] = 1000  # 5 dead < k_aux = 8: the device code holds padding
        with torch.no_grad():
            m.sae.b_enc[:5] = -100.0  # and they stay dead
        x, _ = batch()
        stats = [_train_step(m, x, None, TrainConfig(dead_tokens=1000)) for _ in range(3)]
        results.append((stats, [p.detach().clone() for p in m.sae.parameters()]))
    (s_cpu, p_cpu), (s_dev, p_dev) = results
    for a, b in zip(s_cpu, s_dev):
        assert float(a["aux"]) > 0
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(p_cpu, p_dev):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_log_step_reads_the_stats_once_per_log_line(tmp_path):
    m = member()
    x, _ = batch()
    stats = _train_step(m, x, None, TrainConfig())
    m.logf = open(tmp_path / "log.jsonl", "w")  # noqa: SIM115
    _log_step(m, stats, TrainConfig(), 1.0)
    m.logf.close()
    assert all(type(v) is float for v in stats.values())
    line = (tmp_path / "log.jsonl").read_text()
    assert f'"fvu": {stats["fvu"]}' in line and '"l0": 4.0' in line


def test_a_non_finite_loss_is_recorded_and_stops_the_next_check():
    m = member()
    x, _ = batch()
    cfg = TrainConfig()
    _train_step(m, x, None, cfg)
    x[3, 0] = float("nan")
    _train_step(m, x, None, cfg)  # no host read here: the step carries on
    _train_step(m, x, None, cfg)
    assert int(m.diverged_at) == 1
    with pytest.raises(
        UserError, match=r"diverged at step 3 \(the loss was non-finite from step 2"
    ):
        _check_finite(m)
    with pytest.raises(UserError, match="diverged"):
        _log_step(m, {"fvu": 0.0}, cfg, 1.0)


# ---- precision -----------------------------------------------------------------------------


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                self.dtypes.setdefault(name, set()).add(a.dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_step_runs_its_matmuls_in_bf16_and_keeps_fp32_state():
    m = member(precision="bf16", fused=True)
    x, _ = batch()
    m.since_fired[::2] = 10**8  # AuxK too
    with DtypeRecorder() as rec:
        stats = _train_step(m, x, None, TrainConfig(precision="bf16"))
    assert rec.dtypes["addmm"] == {torch.bfloat16}  # the encoder GEMM
    assert torch.bfloat16 in rec.dtypes["_embedding_bag"]  # the decoder gather
    assert stats["fvu"].dtype == stats["aux"].dtype == torch.float32
    for p in m.sae.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in m.opt.state[p].values())


def test_bf16_step_matches_fp32_within_bf16_rounding():
    out = {}
    for precision in ("fp32", "bf16"):
        m = member(precision=precision, d_in=32, d_sae=128)
        x, _ = batch(256, 32)
        m.since_fired[::4] = 10**8
        cfg = TrainConfig(precision=precision)
        stats = _train_step(m, x, None, cfg)
        out[precision] = stats, [p.grad for p in m.sae.parameters()]
    (s32, g32), (s16, g16) = out["fp32"], out["bf16"]
    assert float(s16["aux"]) > 0
    torch.testing.assert_close(s16["fvu"], s32["fvu"], rtol=2e-2, atol=0)
    torch.testing.assert_close(s16["aux"], s32["aux"], rtol=5e-2, atol=0)
    # A few near-tied selections flip in bf16, so gradients are compared as a whole.
    for a, b in zip(g16, g32):
        assert (a - b).norm() <= 0.2 * b.norm()


@pytest.mark.parametrize("arch", TRAINABLE)
def test_every_rule_trains_in_bf16_like_in_fp32(arch):
    fvu = {}
    for precision in ("fp32", "bf16"):
        m = member(arch, precision=precision, fused=True)
        x, g = batch()
        cfg = TrainConfig(precision=precision)  # type: ignore[arg-type]
        with DtypeRecorder() as rec:
            for _ in range(3):
                stats = _train_step(m, x, g if arch == "gradient_topk" else None, cfg)
        fvu[precision] = float(stats["fvu"])
        if precision == "fp32":
            assert all(torch.bfloat16 not in d for d in rec.dtypes.values())
        elif arch != "matching_pursuit":  # its pursuit and values solve stay in fp32
            assert rec.dtypes["addmm"] == {torch.bfloat16}, "the encoder GEMM"
        assert all(p.dtype == torch.float32 for p in m.sae.state_dict().values())
    assert 0 < fvu["bf16"] == pytest.approx(fvu["fp32"], rel=5e-2)


def test_fp32_is_untouched_by_the_precision_machinery():
    sae = SparseCoder(8, 32, 2)
    t = torch.randn(3, 8)
    assert sae.compute(t) is t and sae.compute_dtype == torch.float32


@pytest.mark.parametrize("before", [False, True])
def test_tf32_is_scoped_to_the_step(before, monkeypatch):
    seen = []
    real = kernels.topk_encode

    def spy(*args, **kw):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "topk_encode", spy)
    x, _ = batch()
    process = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before
    try:
        for precision in ("tf32", "fp32"):
            _train_step(member(), x, None, TrainConfig(precision=precision))
            assert torch.backends.cuda.matmul.allow_tf32 == before
        assert seen == [True, False]  # fp32 means IEEE even where the process allowed TF32
        with pytest.raises(RuntimeError), kernels.matmul_precision("tf32"):
            raise RuntimeError
        assert torch.backends.cuda.matmul.allow_tf32 == before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = process


# ---- optimizer state on the parameters' device ------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_checkpoint_restores_adam_state_where_adam_reads_it(tmp_path, fused):
    # A CPU checkpoint loaded for parameters on another device ("meta" stands in for cuda):
    # exp_avg and exp_avg_sq go with the parameter, and so does `step` when the update is
    # fused (the fused CUDA kernel reads it there); unfused Adam keeps `step` on the CPU.
    m = member(fused=True)
    x, _ = batch()
    _train_step(m, x, None, TrainConfig())
    save_checkpoint(tmp_path / "c.safetensors", m.sae, m.opt, 1, m.counters())
    sae = SparseCoder(16, 64, 4, device="meta")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op
        step, _ = load_checkpoint(tmp_path / "c.safetensors", sae, opt, torch.device("cpu"))
    assert step == 1
    for p in sae.parameters():
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == ("meta" if fused else "cpu")


def test_resumed_fused_adam_steps_like_the_uninterrupted_one(tmp_path):
    x, _ = batch()
    a = member(fused=True)
    for _ in range(2):
        _train_step(a, x, None, TrainConfig())
    save_checkpoint(tmp_path / "c.safetensors", a.sae, a.opt, a.step, a.counters())
    b = member(seed=5, fused=True)
    b.step, counters = load_checkpoint(
        tmp_path / "c.safetensors", b.sae, b.opt, torch.device("cpu")
    )
    b.since_fired.copy_(counters["since_fired"])
    b.freq.copy_(counters["freq"])
    for m in (a, b):
        _train_step(m, x, None, TrainConfig())
    for p, q in zip(a.sae.parameters(), b.sae.parameters()):
        assert torch.equal(p, q)
