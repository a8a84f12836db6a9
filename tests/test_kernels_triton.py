"""Triton kernels against the eager specification: forward values and indices, every gradient.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
the kernels are defined), at small shapes; the `gpu` tests repeat
the checks natively at training shapes.

Ties: which of several equal candidates a top-k keeps is unspecified, so a selection is
checked for being *a* valid top-k (each chosen value is the recomputed pre-activation, and
no unchosen one beats the smallest chosen one), and its sorted values against eager's.
Gradients are compared with eager run on the selection Triton made.

Tolerances: fp32 outputs within rtol 1e-4 and atol 1e-4·scale (scale = max(1, max |ref|));
bf16 outputs within rtol 2e-2, atol 2e-2·scale (a few bf16 ulps; Triton accumulates in
fp32 and rounds once), against eager run in fp32 on the same bf16 inputs.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from saelab import kernels
from saelab.kernels import eager

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e .[triton])", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    # Triton reads it when a kernel is defined and again at launch, so it stays set; only
    # Triton reads it, and nothing else in saelab loads Triton on a machine without CUDA.
    os.environ["TRITON_INTERPRET"] = "1"
from saelab.kernels import triton_select  # noqa: E402

assert triton_select.INTERPRET == (not CUDA), "Triton kernels were defined before this module"

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def triton_backend():
    before = kernels.BACKEND
    kernels.use_backend("triton")
    yield
    kernels.use_backend(before)


def close(actual, ref, dtype):
    tol = TOL[dtype]
    actual, ref = actual.detach().double(), ref.detach().double()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(actual, ref, rtol=tol, atol=tol * scale)


def make(B, d, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(n, d, generator=g) / d**0.5
    b_enc = torch.randn(n, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    return [t.to(device, dtype) for t in (x * 2, W, b_enc, b_dec)]


def assert_valid_topk(values, indices, z, k, allowed=None):
    """indices [B, k] is a top-k of z [B, n] (over `allowed` columns), values = ReLU(z) there.

    The selection itself is made on fp32 z, exact up to summation order even for bf16
    inputs, hence the tight 1e-3 on the ordering; values are rounded to their dtype."""
    B, n = z.shape
    assert values.shape == indices.shape == (B, k)
    assert all(len(set(r)) == k for r in indices.tolist()), "a latent chosen twice"
    chosen = z.gather(1, indices)
    close(values, chosen.relu(), values.dtype)
    others = z.clone()
    if allowed is not None:
        assert allowed[indices].all(), "an aux latent outside the mask"
        others[:, ~allowed] = float("-inf")
    others.scatter_(1, indices, float("-inf"))
    gap = others.max(1).values - chosen.min(1).values
    assert (gap <= 1e-3).all(), f"an unchosen latent beats a chosen one by {gap.max():.2e}"


def check_encode(B, d, n, k, dtype, k_aux, device):
    x, W, b_enc, b_dec = make(B, d, n, dtype, device)
    mask = (torch.arange(n, device=device) % 3 == 0) if k_aux else None
    leaves = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    v, i, av, ai = kernels.topk_encode(*leaves, k, mask, k_aux)
    ev, ei, eav, eai = eager.topk_encode(x, W, b_enc, b_dec, k, mask, k_aux)

    # Forward: a valid top-k of z recomputed in fp64 from the same (rounded) x − b_dec.
    assert v.dtype == ev.dtype and i.dtype == ei.dtype == torch.int64
    z = torch.addmm(b_enc.double(), (x - b_dec).double(), W.double().T)
    assert_valid_topk(v, i, z, k)
    close(v.sort(1).values, ev.sort(1).values, dtype)
    assert av.shape == eav.shape and ai.shape == eai.shape
    if k_aux:
        assert_valid_topk(av, ai, z, min(k_aux, int(mask.sum())), allowed=mask)
        close(av.sort(1).values, eav.sort(1).values, dtype)
    else:
        assert ai.shape == (B, 0)

    # Backward: eager (in fp32) on Triton's selection, main and aux codes side by side.
    g = torch.Generator().manual_seed(1)
    gv = torch.randn(v.shape, generator=g).to(device, dtype)
    ga = torch.randn(av.shape, generator=g).to(device, dtype)
    ((v * gv).sum() + (av * ga).sum()).backward()
    idx = torch.cat([i, ai], 1)
    ref_leaves = [t.float().clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    rv, *_ = eager.sparse_encode(*ref_leaves, lambda zz: (zz.gather(1, idx).relu(), idx))
    (rv * torch.cat([gv, ga], 1).float()).sum().backward()
    for name, a, r in zip(("x", "W_enc", "b_enc", "b_dec"), leaves, ref_leaves):
        assert a.grad is not None and a.grad.dtype == dtype, name
        assert r.grad is not None and r.grad.abs().sum() > 0, name
        close(a.grad, r.grad, dtype)


def check_decode(B, d, n, k, dtype, device):
    g = torch.Generator().manual_seed(2)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(device, dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(device, dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(device)
    vals = torch.rand(B, k, generator=g).to(device, dtype)
    vals[:, -1] = 0  # padding decodes to nothing
    leaves = [t.clone().requires_grad_() for t in (vals, W, b)]
    out = kernels.decode(leaves[0], idx, leaves[1], leaves[2])
    refs = [t.float().clone().requires_grad_() for t in (vals, W, b)]
    ref = eager.decode(refs[0], idx, refs[1], refs[2])
    assert out.dtype == dtype
    close(out, ref, dtype)
    gout = torch.randn(out.shape, generator=g).to(device, dtype)
    (out * gout).sum().backward()
    (ref * gout.float()).sum().backward()
    for a, r in zip(leaves, refs):
        assert a.grad is not None and r.grad is not None
        close(a.grad, r.grad, dtype)


# ---- CPU (interpreter) or GPU, small shapes ----------------------------------------------

# d_in not a power of two (and past one 32-wide d tile); d_sae not a multiple of the 128 tile.
ENCODE_CASES = [
    (16, 48, 200, 1, torch.float32, 0),
    (16, 48, 200, 32, torch.float32, 5),
    (8, 24, 300, 64, torch.float32, 7),
    (16, 48, 200, 32, torch.bfloat16, 5),
    (8, 24, 300, 64, torch.bfloat16, 0),
]


@pytest.mark.parametrize("B,d,n,k,dtype,k_aux", ENCODE_CASES)
def test_topk_encode_matches_eager(B, d, n, k, dtype, k_aux):
    check_encode(B, d, n, k, dtype, k_aux, DEVICE)


def test_topk_encode_aux_with_fewer_dead_than_k_aux():
    x, W, b_enc, b_dec = make(8, 24, 150, torch.float32, DEVICE)
    mask = torch.zeros(150, dtype=torch.bool, device=DEVICE)
    mask[[3, 77, 149]] = True
    _, _, av, ai = kernels.topk_encode(x, W, b_enc, b_dec, 4, mask, 16)
    # The shape may not depend on the mask (reading it would stall a GPU): each row holds
    # the 3 masked latents, then 13 slots of value-0 padding, each on its own latent.
    assert ai.shape == av.shape == (8, 16)
    z = torch.addmm(b_enc, x - b_dec, W.T)
    for row_i, row_v, z_row in zip(ai.tolist(), av, z):
        assert len(set(row_i)) == 16
        real = [j for j, i in enumerate(row_i) if mask[i]]
        assert sorted(row_i[j] for j in real) == [3, 77, 149]
        torch.testing.assert_close(row_v[real], z_row[[row_i[j] for j in real]].relu())
        assert all(row_v[j] == 0 for j in range(16) if j not in real)


def test_relu_clipped_and_negative_rows():
    # Every pre-activation negative: values are all zero and pass no gradient, like eager.
    x, W, b_enc, b_dec = make(8, 24, 150, torch.float32, DEVICE)
    b_enc = (b_enc - 100).requires_grad_()
    W = W.clone().requires_grad_()
    v, i, _, _ = kernels.topk_encode(x, W, b_enc, b_dec, 4)
    z = torch.addmm(b_enc, x - b_dec, W.T).detach().double()
    assert_valid_topk(v, i, z, 4)
    assert (v == 0).all()
    v.sum().backward()
    assert b_enc.grad is not None and W.grad is not None
    assert (b_enc.grad == 0).all() and (W.grad == 0).all()


@pytest.mark.parametrize("k", [1, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_eager(k, dtype):
    check_decode(12, 48, 200, k, dtype, DEVICE)


@pytest.mark.parametrize("ties", [False, True])
def test_row_and_column_topk(ties):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(24, 150, generator=g)
    if ties:  # five distinct values: almost every boundary is a tie
        z = torch.randint(0, 5, (24, 150), generator=g).float()
    z = z.to(DEVICE)
    # Sorted values equal to torch.topk's, each index pointing at its value, no index twice:
    # a valid top-k whatever the tie-breaking.
    for k in (1, 5, 32):
        v, i = kernels.row_topk(z, k)
        ev, _ = torch.topk(z, k, dim=1)
        assert torch.equal(v.sort(1).values, ev.sort(1).values)
        assert torch.equal(z.gather(1, i), v)
        assert all(len(set(r)) == k for r in i.tolist())
    for m in (1, 3, 16):
        v, rows = kernels.column_topk(z, m)
        ev, _ = torch.topk(z, m, dim=0)
        assert v.shape == rows.shape == (m, 150)
        assert torch.equal(v.sort(0).values, ev.sort(0).values)
        assert torch.equal(z.gather(0, rows), v)
        assert all(len(set(c)) == m for c in rows.T.tolist())


def test_bf16_topk_is_exact():
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(4)).to(DEVICE).bfloat16()
    v, i = kernels.row_topk(z, 8)
    assert v.dtype == torch.bfloat16 and torch.equal(z.gather(1, i), v)
    assert torch.equal(v.sort(1).values, torch.topk(z, 8, dim=1).values.sort(1).values)


@pytest.mark.parametrize("skew", [False, True])
def test_global_topk_is_exact(skew):
    z = torch.randn(32, 150, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    if skew:  # one token holds far more than its share of the winners: the fallback path
        z[3] += 10
    K = 32 * 4
    top, rows, cols = kernels.global_topk(z, K)
    assert torch.equal(z[rows, cols], top)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == K
    assert torch.equal(top.sort().values, z.flatten().topk(K).values.sort().values)


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice", "gradient_topk"])
def test_batch_rules_match_eager(arch):
    from saelab.archs import EncodeArgs, to_padded
    from saelab.sae import SparseCoder

    torch.manual_seed(0)
    x = torch.randn(32, 24, device=DEVICE)
    grad = torch.randn(32, 24, device=DEVICE)
    codes, grads = [], []
    for backend in ("triton", "eager"):
        kernels.use_backend(backend)
        torch.manual_seed(1)
        s = SparseCoder(24, 96, 4, arch, device=DEVICE)
        with torch.no_grad():
            s.b_enc.normal_(0, 0.1)
        code = to_padded(s.encode_scaled(x, EncodeArgs(training=True, grad=grad)).code)
        dense = torch.zeros(32, 96, device=DEVICE).scatter_add(1, code.indices, code.values)
        s.decode_scaled(code).pow(2).sum().backward()
        codes.append(dense.detach())
        grads.append([p.grad for p in (s.W_enc, s.b_enc, s.W_dec, s.b_dec)])
    torch.testing.assert_close(codes[0], codes[1], rtol=1e-5, atol=1e-5)
    assert (codes[0] > 0).any()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(CUDA, reason="int32 wrap-around is checked in the interpreter")
def test_row_offsets_are_int64_past_2_31():
    # A row index times a row length passes 2³¹ in a large encode (B·d_in) or W_enc
    # (d_sae·d_in); the interpreter computes int32 as numpy does, wrapping like a GPU.
    import triton
    import triton.language as tl

    @triton.jit
    def offsets_kernel(rows_ptr, out_ptr, stride, N: tl.constexpr):
        ns = tl.arange(0, N)
        rows = tl.load(rows_ptr + ns).to(tl.int32)
        tl.store(out_ptr + ns, triton_select.row_offsets(rows, stride))

    rows = torch.tensor([0, 1, 2**19, 2**20 + 3, 2**31 // 2304, 2**31 - 1], dtype=torch.int32)
    rows = torch.cat([rows, rows[:2]])  # 8, a power of two
    out = torch.empty(8, dtype=torch.int64)
    offsets_kernel[(1,)](rows, out, 4096, N=8)
    assert out.tolist() == [r * 4096 for r in rows.tolist()]


# ---- backend choice ----------------------------------------------------------------------


def _backend_in_subprocess(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_disable_switch_and_cpu_fallback():
    import_backend = "import saelab.kernels as k; print(k.BACKEND)"
    assert _backend_in_subprocess(import_backend, SAELAB_DISABLE_TRITON="1") == "eager"
    # Triton forced but not interpreted: CPU tensors take the eager path and still train.
    code = (
        "import torch, saelab.kernels as k\n"
        "k.use_backend('triton')\n"
        "x = torch.randn(4, 8); W = torch.randn(20, 8, requires_grad=True)\n"
        "v, i, _, _ = k.topk_encode(x, W, torch.zeros(20), torch.zeros(8), 3)\n"
        "v.sum().backward()\n"
        "print(k.BACKEND, k._impl(x).__name__, W.grad.abs().sum() > 0)"
    )
    assert _backend_in_subprocess(code) == "triton saelab.kernels.eager tensor(True)"


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.use_backend("cuda")


# ---- GPU, training shapes ----------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,n,k", [(768, 32768, 32), (2304, 65536, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_topk_encode_matches_eager(d, n, k, dtype):
    check_encode(512, d, n, k, dtype, d // 2, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_matches_eager(dtype):
    check_decode(4096, 768, 32768, 32, dtype, "cuda")


@pytest.mark.gpu
@gpu
def test_gpu_batch_selection():
    z = torch.randn(4096, 32768, device="cuda")
    K = 32 * 4096
    top, rows, cols = kernels.global_topk(z, K)
    assert torch.equal(z[rows, cols], top)
    assert torch.equal(top.sort().values, z.flatten().topk(K).values.sort().values)
    v, r = kernels.column_topk(z, 4)
    assert torch.equal(v.sort(0).values, torch.topk(z, 4, dim=0).values.sort(0).values)
    assert torch.equal(z.gather(0, r), v)


@pytest.mark.slow  # about 15 s of CPU in the interpreter
@pytest.mark.skipif(CUDA, reason="CUDA runs are checked by torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("dead", [False, True])
def test_triton_train_step_never_syncs(dead, monkeypatch):
    # The step of tests/test_precision.py on the Triton kernels (interpreted here): the fused
    # AuxK pass reads its candidate count on the device, scatter_rows sizes nothing on the host.
    from test_precision import SyncDetector, batch, member

    from saelab.config import TrainConfig
    from saelab.trainer import _train_step

    monkeypatch.setattr(eager, "host_reads_are_free", lambda t: False)
    m = member("topk", fused=True)
    if dead:
        m.since_fired[::3] = 1000
        with torch.no_grad():
            m.sae.b_enc[::3] = -100.0
    x, _ = batch(B=32)
    cfg = TrainConfig(dead_tokens=1000)
    _train_step(m, x, None, cfg)
    with SyncDetector() as d:
        stats = _train_step(m, x, None, cfg)
    assert d.seen == [], d.seen
    assert (float(stats["aux"]) > 0) == dead


# ---- ragged (CSR) codes ------------------------------------------------------------------


def _ragged_selection(B, n, device, seed=3):
    """Fixed (rows, cols): per-token counts from 0 to 9, distinct latents within a row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 10, (B,), generator=g)
    counts[1] = 0  # an empty row
    rows = torch.arange(B).repeat_interleave(counts)
    cols = torch.cat([torch.randperm(n, generator=g)[: int(c)] for c in counts])
    order = torch.randperm(rows.numel(), generator=g)  # unsorted, as a selector returns them
    return rows[order].to(device), cols[order].to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_aux", [0, 4])
def test_ragged_encode_matches_eager(dtype, k_aux):
    from saelab.archs import mask_to_ragged

    B, d, n = 24, 40, 64
    x, W, b_enc, b_dec = make(B, d, n, dtype, DEVICE)
    rows, cols = _ragged_selection(B, n, DEVICE)
    mask = (torch.arange(n, device=DEVICE) % 3 == 0) if k_aux else None

    def select(z):
        return mask_to_ragged(z, rows, cols)

    leaves = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    v, i, off, av, ai = kernels.ragged_encode(*leaves, select, mask, k_aux)
    refs = [t.float().clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    rv, ri, roff, rav, rai = eager.ragged_encode(*refs, select, mask, k_aux)
    assert torch.equal(i, ri) and torch.equal(off, roff) and torch.equal(ai, rai)
    assert off[1] == off[2], "row 1 is empty"
    close(v, rv, dtype)
    close(av, rav, dtype)
    g = torch.Generator().manual_seed(1)
    gv = torch.randn(v.shape, generator=g).to(DEVICE, dtype)
    ga = torch.randn(av.shape, generator=g).to(DEVICE, dtype)
    ((v * gv).sum() + (av * ga).sum()).backward()
    ((rv * gv.float()).sum() + (rav * ga.float()).sum()).backward()
    for name, a, r in zip(("x", "W_enc", "b_enc", "b_dec"), leaves, refs):
        assert a.grad is not None and a.grad.dtype == dtype, name
        assert r.grad is not None and r.grad.abs().sum() > 0, name
        close(a.grad, r.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_decode_matches_eager(dtype):
    B, d, n = 24, 40, 64
    g = torch.Generator().manual_seed(2)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(DEVICE, dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(DEVICE, dtype)
    rows, cols = _ragged_selection(B, n, DEVICE)
    order = torch.argsort(rows, stable=True)
    idx = cols[order]
    off = torch.zeros(B + 1, dtype=torch.int64, device=DEVICE)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=off[1:])
    vals = torch.rand(idx.numel(), generator=g).to(DEVICE, dtype)
    leaves = [t.clone().requires_grad_() for t in (vals, W, b)]
    out = kernels.ragged_decode(leaves[0], idx, off, leaves[1], leaves[2])
    refs = [t.float().clone().requires_grad_() for t in (vals, W, b)]
    ref = eager.ragged_decode(refs[0], idx, off, refs[1], refs[2])
    assert out.dtype == dtype
    close(out, ref, dtype)
    close(out[1], b, dtype)  # the empty row decodes to the bias
    gout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    (out * gout).sum().backward()
    (ref * gout.float()).sum().backward()
    for a, r in zip(leaves, refs):
        assert a.grad is not None and r.grad is not None and r.grad.abs().sum() > 0
        close(a.grad, r.grad, dtype)
