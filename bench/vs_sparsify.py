"""saelab against EleutherAI's sparsify on the same synthetic batches, same machine.

    pip install --no-deps eai-sparsify schedulefree simple-parsing docstring-parser natsort
    python bench/vs_sparsify.py [--tokens 2000000] [--mean_offset 8]

Both read the identical shuffled stream from the synthetic harvest of bench/train.py. The
sparsify side follows its own trainer's recipe: its SparseCoder (eager path on CPU), b_dec
at the mean of the first batch, and its default optimizer, SignSGD inside a ScheduleFree
wrapper at lr 5e-3 / sqrt(n / 2^14), decoder rows renormalised before and the
decoder-gradient projection after each forward.
Prints tokens/s and the FVU on the same 100k held-out tokens, and saelab's tokens/s over
sparsify's. --mean_offset N adds one fixed vector of norm N to every token, as the large mean
of a real residual stream (a norm of 8 against the ~1 of the centred tokens at d_in 512).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench.train import EVAL_TOKENS, harvest_dir, parse_args, run  # noqa: E402
from saelab.store import ActivationStore


def sparsify_run(path, tokens: int, args: argparse.Namespace) -> dict[str, float] | None:
    """Train and evaluate sparsify's SparseCoder; its loop tokens/s and held-out FVU."""
    if not torch.cuda.is_available():  # its Triton decoder is imported whenever triton is
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
    except ImportError as e:
        print(f"sparsify not importable ({e}); see this script's docstring to install it")
        return None
    store = ActivationStore(path)
    n = store.n_tokens
    train_range = (0, n - EVAL_TOKENS // 127 * 127 - 127)
    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k))
    opt = ScheduleFreeWrapper(
        SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (args.d_sae / 2**14) ** 0.5}]),
        momentum=0.95,
    )
    opt.train()
    stream = store.batches(args.batch, token_range=train_range, seed=0)
    steps = tokens // args.batch
    t0 = None
    for step, x in zip(range(steps), stream):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()  # sparsify's trainer does this before every step
        if step == 1:
            t0 = time.perf_counter()  # exclude the first step's one-off costs, as saelab's log does
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    stream.close()
    assert t0 is not None
    rate = (steps - 1) * args.batch / (time.perf_counter() - t0)
    opt.eval()  # ScheduleFree evaluates at its averaged weights
    sae.set_decoder_norm_to_unit_norm()
    x = store.read(train_range[1], n)
    with torch.no_grad():
        x_hat = torch.cat([sae(c).sae_out for c in x.split(4096)])
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    print(
        f"{'sparsify (SignSGD+SF)':28s} lr {5e-3 / (args.d_sae / 2**14) ** 0.5:.1e}  "
        f"{rate:9,.0f} tok/s (loop)  held-out FVU {fvu:.3f}"
    )
    return {"tok_s": rate, "fvu": fvu}


def main() -> None:
    args = parse_args(
        __doc__,
        more=lambda p: p.add_argument(
            "--mean_offset", type=float, default=0.0, help="norm of a vector added to every token"
        ),
    )
    path = harvest_dir(args.tokens, args.d_in, mean_offset=args.mean_offset)
    ours = run(path, "saelab defaults", args.tokens, args)
    theirs = sparsify_run(path, args.tokens, args)
    if theirs is not None:
        print(
            f"mean offset {args.mean_offset:g}: tok/s saelab / sparsify "
            f"{ours['tok_s'] / theirs['tok_s']:.2f}, held-out FVU saelab {ours['fvu']:.3f} "
            f"vs sparsify {theirs['fvu']:.3f}"
        )


if __name__ == "__main__":
    main()
