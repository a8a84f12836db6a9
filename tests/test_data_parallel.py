"""saelab.data_parallel on two gloo processes, each holding half of a batch: the losses'
global values and summed gradients equal one process's on the whole batch, and a UserError
on rank 0 reaches both."""

import pytest
import torch

from saelab import distributed
from saelab.data_parallel import all_reduce_grads, global_losses, on_main
from saelab.errors import UserError

B, D, N = 8, 5, 7


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g) * 0.5 + 4  # a large shared mean, as activations have
    x_hat = (x + 0.3 * torch.randn(B, D, generator=g)).requires_grad_()
    e_hat = torch.randn(B, D, generator=g).requires_grad_()
    counts = torch.randint(0, 3, (2, N), generator=g)
    return x, x_hat, e_hat, counts


def _full_losses(x, x_hat, e_hat):
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    e = (x - x_hat).detach()
    aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu, aux


def _halves(report):
    d = distributed.init()
    x, x_hat, e_hat, counts = _batch()
    rows = slice(*d.shard(B))
    xs, hs = x[rows], x_hat[rows]
    fit = ((xs - hs).detach(), e_hat[rows])
    shift = torch.full((D,), 3.0)
    fvu, aux, fvu_all, aux_all, total = global_losses(xs, hs, fit, counts[d.rank], shift, d)
    assert aux is not None
    (fvu + aux).backward()
    grads = [x_hat, e_hat]
    all_reduce_grads(grads, d)  # the rows a rank does not hold get zero gradient there
    try:
        on_main(d, torch.device("cpu"), lambda: (_ for _ in ()).throw(UserError("rank 0 says no")))
        said = ""
    except UserError as e:
        said = str(e)
    out = dict(fvu=fvu_all, aux=aux_all, counts=total, said=said)
    torch.save({**out, "g_hat": x_hat.grad, "g_e": e_hat.grad}, report / f"{d.rank}.pt")


def test_global_losses_and_gradients_equal_one_process(tmp_path, run_ranks):
    run_ranks(_halves, 2, tmp_path)
    x, x_hat, e_hat, counts = _batch()
    fvu, aux = _full_losses(x, x_hat, e_hat)
    (fvu + aux).backward()
    fvu, aux = fvu.detach(), aux.detach()
    for r in (0, 1):
        got = torch.load(tmp_path / f"{r}.pt")
        assert float(got["fvu"]) == pytest.approx(float(fvu), rel=1e-6)
        assert float(got["aux"]) == pytest.approx(float(aux), rel=1e-6)
        assert torch.equal(got["counts"], counts.sum(0))
        torch.testing.assert_close(got["g_hat"], x_hat.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["g_e"], e_hat.grad, rtol=1e-5, atol=1e-7)
        assert got["said"] == "rank 0 says no"


def test_one_process_runs_on_main_directly():
    assert on_main(distributed.SINGLE, torch.device("cpu"), lambda: 42) == 42
