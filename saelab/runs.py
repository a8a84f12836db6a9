"""The run folder: every file in it, how each is written, and which runs are finished.

runs/<name>/
  cfg.json                  SAE shape and arch, input scale, hook, harvest, row ranges, the
                            full training config, "complete"
  sae.safetensors           weights (and inference thresholds) only
  train_log.jsonl           one JSON object per logged step
  checkpoints/state.safetensors
                            weights, Adam moments, dead-latent counters, firing-frequency EMA;
                            the step in its metadata (written and read by the trainer)
  eval.json                 `saelab eval`
  darkmatter.json           `saelab darkmatter`, with darkmatter_tokens.sqlite (one row per
                            scored token) and figures/
  features.sqlite           `saelab index` (read by `saelab.feature_index`)

Every file is replaced atomically (`atomic_write`), so a reader never sees half of one. This
module imports no torch: the app reads runs through it. `open_run` is the one way compute
modules load a finished run's SAE and harvest.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saelab.config import TrainConfig
from saelab.errors import UserError
from saelab.fields import to_dict

if TYPE_CHECKING:
    import torch

    from saelab.sae import SparseCoder
    from saelab.store import ActivationStore

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
LOG = "train_log.jsonl"
CHECKPOINT = "checkpoints/state.safetensors"
EVAL = "eval.json"
DARKMATTER = "darkmatter.json"
DARKMATTER_TOKENS = "darkmatter_tokens.sqlite"
FIGURES = "figures"
INDEX = "features.sqlite"
EXPLANATIONS = "explanations.jsonl"
"""`saelab explain`'s output, appended one JSON line per latent as each finishes (so an
interrupted run resumes): {"latent", "explanation", "score", "n_scored", "explainer"}; a
later line for a latent replaces an earlier one."""
NOTES = "notes.json"
"""The user's own notes on latents, written from the app: {"<latent>": "text"}. Kept in the
run folder, never in the rebuildable index."""
SCALING = "darkmatter-scaling"
"""Beside the runs it compares (in their parent folder): `saelab darkmatter --scaling`."""
COMPARE = "compare"
"""Beside the runs it compares: `saelab compare`'s table and figures."""
SYNTHETIC = "synthetic"
"""The model name of synthetic harvests: no model behind them, so nothing to splice into."""


# ---------------------------------------------------------------------------------------
# Writing and reading files


def atomic_write(path: Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write `content` (or let it write itself to the path it is given) to a hidden temp
    file beside `path`, fsync it, then rename it into place. The temp name carries the PID,
    so two writers never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # Writers in Rust or C++ (safetensors, sqlite) report a full disk in their own
        # exception types; the CLI turns OSError into one line, so hand it an OSError.
        code = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
        if code:
            n = int(code.group(1))
            raise OSError(n, os.strerror(n), str(path)) from e
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def read_json(path: Path, hint: str = "") -> dict[str, Any]:
    """A JSON object from disk, or a UserError saying what is wrong (and `hint`: how to fix)."""
    fix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist{fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}){fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}){fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a JSON object{fix}")
    return data


# ---------------------------------------------------------------------------------------
# One writer at a time


LOCK = ".lock"
"""Inside a run or harvest folder: the writer's advisory lock, holding its PID while held."""


@contextmanager
def writer_lock(folder: Path, what: str = "run") -> Iterator[None]:
    """Hold an advisory lock on `folder` (a run or a harvest) while writing it; a second
    writer gets a UserError naming the PID that holds it. The OS releases the lock when the
    holder dies, so a killed writer never leaves the folder locked. A folder this call had
    to create is removed again if nothing else was written into it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{folder} is being written by another saelab process (pid {holder}); wait "
                f"for it to finish, or write this {what} to another --out"
            ) from None
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if created and [q.name for q in folder.iterdir()] == [LOCK]:
                (folder / LOCK).unlink()
                folder.rmdir()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Finished runs


def is_finished(run: Path) -> bool:
    """Training completed and the weights are there (cfg.json says "complete")."""
    try:
        return (
            bool(json.loads((run / CFG).read_text()).get("complete")) and (run / WEIGHTS).is_file()
        )
    except (OSError, ValueError, AttributeError):
        return False


def finished_cfg(run: str | Path) -> dict[str, Any]:
    """The cfg.json of a finished run, or the UserError that says why it is not one."""
    run = Path(run)
    if not (run / CFG).is_file():
        raise UserError(f"{run} is not a run directory (no {CFG}); train one with saelab train")
    cfg = read_json(run / CFG, f"delete {run} and retrain it")
    if not cfg.get("complete"):
        raise UserError(f"{run} has not finished training; rerun its saelab train command")
    return cfg


@dataclass
class OpenRun:
    """A finished run loaded for computing: its SAE on `device` (eval mode) and its harvest."""

    path: Path
    cfg: dict[str, Any]
    sae: SparseCoder
    store: ActivationStore
    device: torch.device

    @property
    def heldout(self) -> tuple[int, int]:
        """The rows training held out (cfg.json's eval_range)."""
        if "eval_range" not in self.cfg:
            raise UserError(f"{self.path} records no held-out rows (eval_range); retrain it")
        lo, hi = self.cfg["eval_range"]
        return int(lo), int(hi)


def open_run(run: str | Path, device: str = "cpu") -> OpenRun:
    """Load a finished run's SAE and open its harvest; every check before any loading."""
    # NOTE: imported here so that reading runs (the app) never imports torch.
    from saelab.models import resolve_device
    from saelab.sae import SparseCoder
    from saelab.store import ActivationStore

    run = Path(run)
    cfg = finished_cfg(run)
    if not Path(cfg.get("harvest", "")).is_dir():
        raise UserError(
            f"the harvest of {run} ({cfg.get('harvest')}) is missing; restore it or "
            "re-run its saelab harvest command"
        )
    dev = resolve_device(device)
    sae = SparseCoder.load(run, dev).eval()
    return OpenRun(run, cfg, sae, ActivationStore(cfg["harvest"], cfg["hook"]), dev)


# ---------------------------------------------------------------------------------------
# The dark-matter token table: one row per scored token, keyed by activation row

TOKEN_COLUMNS = ("row", "context", "position", "e_norm", "e_nl_norm", "e_lin_norm", "e_sq_pred")


def write_token_table(path: Path, columns: dict[str, np.ndarray]) -> None:
    """SQLite table `tokens` with TOKEN_COLUMNS (all given), indexed by the nonlinear error."""

    def build(tmp: Path) -> None:
        con = sqlite3.connect(tmp)
        try:
            con.execute(
                "CREATE TABLE tokens (row INTEGER PRIMARY KEY, context INTEGER, position INTEGER, "
                "e_norm REAL, e_nl_norm REAL, e_lin_norm REAL, e_sq_pred REAL)"
            )
            data = zip(*(columns[c].tolist() for c in TOKEN_COLUMNS))
            con.executemany(f"INSERT INTO tokens VALUES ({', '.join('?' * 7)})", data)
            con.execute("CREATE INDEX tokens_e_nl ON tokens (e_nl_norm)")
            con.commit()
        finally:
            con.close()

    atomic_write(path, build)


def read_token_table(path: str | Path) -> dict[str, np.ndarray]:
    """The per-token table as numpy columns, ordered by row."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        got = con.execute(f"SELECT {', '.join(TOKEN_COLUMNS)} FROM tokens ORDER BY row").fetchall()
    finally:
        con.close()
    arr = np.array(got, dtype=np.float64).reshape(-1, len(TOKEN_COLUMNS))
    return {c: arr[:, i] for i, c in enumerate(TOKEN_COLUMNS)}


# ---------------------------------------------------------------------------------------
# Starting or resuming a run: is the folder this run, another, or free?

# Fields that do not change what a run computes; any other difference makes another run.
_RUNTIME_ONLY = {
    "out",
    "device",
    "threads",
    "wandb",
    "wandb_project",
    "wandb_mode",
    "checkpoint_every",
    "log_every",
    "parallel",  # how processes share the work, not what they train
}


def _with_defaults(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A config dict with fields added since it was written filled in at their defaults,
    so that runs from an older saelab still count as the same run."""
    out = dict(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def signature(plan: dict[str, Any]) -> dict[str, Any]:
    train = _with_defaults(plan["train"], to_dict(TrainConfig()))
    train = {k: v for k, v in train.items() if k not in _RUNTIME_ONLY}
    # The harvest's size and token checksum, so a harvest that grew or was rewritten since
    # the run started (which would move its train/held-out split) is another run.
    ident = {"harvest_identity": plan["harvest_identity"]} if "harvest_identity" in plan else {}
    return {"harvest": plan["harvest"], "hook": plan["hook"], **ident, **train}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, prefix + key + ".")
        elif va != vb:
            out.append(f"{prefix}{key} {vb!r} vs {va!r}")
    return out


def prepare_run_dir(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The existing cfg.json when `out` holds this same run; an error when it holds another."""
    if not out.exists():
        return None
    cfg_path = out / CFG
    if not cfg_path.is_file():
        if any(p.name != LOCK for p in out.iterdir()):
            raise UserError(f"{out} exists and is not a saelab run; choose another --out")
        return None
    try:
        old = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{cfg_path} is damaged; delete {out} or choose another --out") from None
    if "train" not in old:
        raise UserError(f"{out} holds a run of another tool; choose another --out or delete it")
    if "harvest_identity" not in old:  # written before saelab recorded it
        plan = {k: v for k, v in plan.items() if k != "harvest_identity"}
    differences = _diff(signature(plan), signature(old))
    if differences:
        raise UserError(
            f"{out} already holds a different run (existing vs asked: "
            f"{'; '.join(differences[:3])}); choose another --out or delete it"
        )
    return old


# ---------------------------------------------------------------------------------------
# Append-only JSON lines (the harvest's shard log and checksum record, explanations.jsonl):
# a line counts only with its newline, so a crash mid-append leaves a torn last line that
# readers skip and the next writer cuts off.


def append_lines(file: Path, text: str, fsync: bool = True) -> None:
    """Append ``text`` (whole lines); a torn line left at the end gets its newline first, so
    it spoils only itself."""
    fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            text = "\n" + text
        os.write(fd, text.encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def complete_lines(file: Path) -> list[bytes]:
    """The complete lines of an append-only file ([] when it is absent)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return []
    return data.split(b"\n")[:-1]


def cut_torn_line(file: Path) -> None:
    """Writers call this before appending: drop a last line a crash cut short."""
    if not file.is_file():
        return
    data = file.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(file, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def read_records(file: Path, what: str, fix: str) -> list[dict[str, Any]]:
    """The JSON objects on the complete lines of ``file``; any other complete line is a
    UserError naming it, ``what`` a line should be and the ``fix``."""
    records = []
    for n, line in enumerate(complete_lines(file), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry = None
        if not isinstance(entry, dict):
            raise UserError(f"line {n} of {file} is not {what}; {fix}")
        records.append(entry)
    return records


def read_explanations(run: str | Path) -> dict[int, dict[str, Any]]:
    """`saelab explain`'s records by latent (a later line replaces an earlier one); {} when
    there are none. A torn last line is skipped."""
    fix = "delete that line or rerun saelab explain"
    out = {}
    for d in read_records(Path(run) / EXPLANATIONS, "an explanation record", fix):
        if not isinstance(d.get("latent"), int) or not isinstance(d.get("explanation"), str):
            raise UserError(f"{Path(run) / EXPLANATIONS} has a record without a latent id and "
                            f"an explanation: {fix}")  # fmt: skip
        out[d["latent"]] = d
    return out


def trim_log(path: Path, step: int) -> None:
    """Keep only log lines up to the checkpoint, so a resume never duplicates them."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                kept.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a kill: drop it and everything after
    atomic_write(path, "".join(ln + "\n" for ln in kept))
