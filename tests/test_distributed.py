"""saelab.distributed: the collectives under 2 gloo processes equal their single-process
definitions."""

import torch

from saelab import distributed


def _collectives(out):
    d = distributed.init()
    assert d.world == 2
    t = d.all_reduce_(torch.tensor([1.0, 2.0]) * (d.rank + 1))
    g = d.all_gather(torch.full((2, 3), float(d.rank)))
    b = d.broadcast_(torch.full((2,), float(d.rank + 5)))
    x = torch.tensor([1.0, 2.0, 3.0]) * (d.rank + 1)
    x.requires_grad_(True)
    s = d.sum_identical_loss(x)
    (s * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    with distributed.main_first(d):
        if d.main:
            (out / "first").write_text("0")
        else:
            assert (out / "first").exists()
    torch.save(
        {
            "t": t,
            "g": g,
            "b": b,
            "s": s.detach(),
            "xg": x.grad,
            "sent": d.sent,
            "shard": d.shard(8),
        },
        out / f"rank{d.rank}.pt",
    )


def test_collectives_on_two_processes(tmp_path, run_ranks):
    run_ranks(_collectives, 2, tmp_path)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for i, res in enumerate(r):
        assert torch.equal(res["t"], torch.tensor([3.0, 6.0]))
        assert torch.equal(res["g"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert torch.equal(res["b"], torch.tensor([5.0, 5.0]))
        assert torch.equal(res["s"], torch.tensor([3.0, 6.0, 9.0]))
        # the loss is the same on both ranks: each summand's gradient is the loss's own
        assert torch.equal(res["xg"], torch.tensor([1.0, 10.0, 100.0]))
        assert res["shard"] == (4 * i, 4 * i + 4)
    assert r[0]["sent"]["all_reduce"] == 8 + 12 and r[0]["sent"]["all_gather"] == 24
    assert r[0]["sent"]["broadcast"] == 8 and "broadcast" not in r[1]["sent"]


def test_single_process_is_the_identity():
    d = distributed.init()
    assert d is distributed.SINGLE and not d.active and d.main
    t = torch.tensor([1.0, 2.0])
    assert d.all_reduce_(t) is t and d.all_gather(t) is t and d.sum_identical_loss(t) is t
    assert d.shard(8) == (0, 8) and d.sent == {}
