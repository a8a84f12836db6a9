"""Shared fixtures: every RNG seeded, the hub switched off so accidental downloads fail fast,
and factories for the harvests and tiny trained runs that many tests start from."""

import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# `saelab.models.cpu_has_bf16` pinned off: the tests are written for float32 forwards under
# model_dtype auto, whatever CPU runs them (subprocesses inherit it too).
os.environ["SAELAB_CPU_BF16"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


# The factories are session-scoped (they hold no state) so that module- and session-scoped
# fixtures can use them too; those pass paths from tmp_path_factory, tests pass tmp_path.


@pytest.fixture(scope="session")
def synthetic_harvest():
    """Factory: write a saelab.synthetic harvest at `path` and return its directory."""
    from saelab.synthetic import SyntheticData, write_harvest

    def make(
        path: Path,
        *,
        n_tokens: int,
        d_in: int = 16,
        n_features: int = 64,
        k_true: float = 3,
        seed: int = 0,
        tokens_per_context: int = 31,
        shard_contexts: int = 32,
        grads: bool = False,
    ) -> Path:
        data = SyntheticData(d_in=d_in, n_features=n_features, k_true=k_true, seed=seed)
        return write_harvest(
            path,
            data,
            n_tokens,
            tokens_per_context=tokens_per_context,
            shard_contexts=shard_contexts,
            grads=grads,
        )

    return make


@pytest.fixture(scope="session")
def model_harvest():
    """Factory: harvest one hook of the tiny model (float32) into `root`/h; returns the path."""
    from saelab.config import HarvestConfig
    from saelab.harvest import harvest

    def make(
        root: Path,
        *,
        n_tokens: int,
        hook: str = "blocks.0.hook_resid_post",
        n_ctx: int = 16,
        batch_size: int = 32,
    ) -> Path:
        cfg = HarvestConfig(
            model="tiny", hooks=[hook], n_tokens=n_tokens, n_ctx=n_ctx, batch_size=batch_size,
            dtype="float32", out=str(root / "h"),
        )  # fmt: skip
        return harvest(cfg, progress=False)

    return make


@pytest.fixture(scope="session")
def trained_run(synthetic_harvest):
    """Factory: train a tiny SAE into `out` and return the run directory.

    harvest is a harvest directory, or a mapping of synthetic_harvest keywords for a
    synthetic harvest written next to the run (at out/../h). Any other TrainConfig field
    can be given as a keyword; batch_size, dead_tokens and checkpoint_every have small
    defaults here.
    """
    from saelab.config import SAEConfig, TrainConfig
    from saelab.trainer import train

    def make(
        out: Path,
        *,
        harvest: Path | Mapping[str, Any],
        d_sae: int,
        k: int,
        eval_tokens: int,
        arch: str = "topk",
        n_tokens: int = 0,
        batch_size: int = 256,
        dead_tokens: int = 2000,
        checkpoint_every: int = 0,
        **overrides: Any,
    ) -> Path:
        if isinstance(harvest, Mapping):
            harvest = synthetic_harvest(Path(out).parent / "h", **harvest)
        cfg = TrainConfig(
            harvest=str(harvest),
            out=str(out),
            sae=SAEConfig(arch, d_sae, k),
            n_tokens=n_tokens,
            eval_tokens=eval_tokens,
            batch_size=batch_size,
            dead_tokens=dead_tokens,
            checkpoint_every=checkpoint_every,
            **overrides,
        )
        return train(cfg, progress=False)

    return make


@pytest.fixture(scope="session")
def html_figure():
    """Reader: the plotly figure a written HTML file draws, as {"data": traces, "layout": ...}
    with every typed array (plotly's {"dtype", "bdata"}) decoded to a numpy array."""
    import base64
    import json

    def decode(v: Any) -> Any:
        if isinstance(v, dict) and "bdata" in v:
            a = np.frombuffer(base64.b64decode(v["bdata"]), np.dtype(v["dtype"]))
            return a.reshape(v["shape"]) if "shape" in v else a
        if isinstance(v, dict):
            return {k: decode(x) for k, x in v.items()}
        if isinstance(v, list):
            return [decode(x) for x in v]
        return v

    def read(path: Path) -> dict[str, Any]:
        text = Path(path).read_text()
        at = text.rindex("Plotly.newPlot(") + len("Plotly.newPlot(")
        parts, dec = [], json.JSONDecoder()
        for _ in range(3):  # the div id, the traces, the layout
            while text[at] in " \n\t,":
                at += 1
            value, at = dec.raw_decode(text, at)
            parts.append(value)
        return {"data": decode(parts[1]), "layout": parts[2]}

    return read


# ---------------------------------------------------------------------------------------
# Several processes, as torchrun starts them


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as tdist

    try:
        fn(*args)
    except BaseException:
        if tdist.is_initialized():
            tdist.destroy_process_group()
        raise
    if tdist.is_initialized():
        tdist.barrier()  # no rank tears gloo down while another still talks to it
        tdist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort a process in the interpreter's teardown, after its work is
    # done and reported; a successful rank leaves without that teardown.
    os._exit(0)


@pytest.fixture(scope="session")
def run_ranks():
    """Factory: run(fn, world, *args) runs the module-level function fn(*args) in `world`
    spawned processes with torchrun's environment (gloo on CPU), so `saelab.distributed.init`
    joins them; it raises if any process fails. fn reports by writing files."""
    import torch.multiprocessing as mp

    def run(fn: Any, world: int, *args: Any) -> None:
        mp.start_processes(
            _rank_main, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn"
        )

    return run
