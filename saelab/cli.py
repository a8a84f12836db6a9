"""The `saelab` command: one entry point, subcommands dispatched from a small table.

Flags come from the config dataclasses (`--sae.k 64`), with their field docstrings as help.
A `UserError` ends the command with its one-line message and exit status 2; so does an
`OSError` (a full disk, a read-only folder, a file where a folder should be), as one line that
names the path and what to do.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from saelab import config as C
from saelab import fields as F
from saelab.errors import UserError

log = logging.getLogger("saelab")


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument("--config", help="YAML preset; flags below override its values")
    for key, (tp, doc) in F.flat_fields(cls).items():
        default = _default_of(cls, key)
        rule = F.requirement(cls, key)
        help_ = f"{doc} ({rule + '; ' if rule else ''}default: {default})" if doc else None
        if tp is bool:
            p.add_argument(
                f"--{key}",
                nargs="?",
                const="true",
                dest=key,
                help=help_,
                default=argparse.SUPPRESS,
                metavar="BOOL",
            )
        else:
            p.add_argument(
                f"--{key}",
                dest=key,
                help=help_,
                default=argparse.SUPPRESS,
                metavar=_metavar(key, tp),
            )


def _metavar(key: str, tp: Any) -> str:
    """A Literal's choices (`topk|gradient_topk|…`), else the field's name in capitals."""
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return key.split(".")[-1].upper()


def _default_of(cls: type, dotted: str) -> Any:
    obj: Any = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _config_from_args(cls: type, ns: argparse.Namespace, extra: dict[str, Any]) -> Any:
    keys = F.flat_fields(cls)
    overrides = {k: v for k, v in vars(ns).items() if k in keys}
    overrides.update(extra)
    return F.build(cls, getattr(ns, "config", None), overrides)


# ---------------------------------------------------------------------------------------
# Subcommands. Each takes the parsed namespace; heavy imports happen inside.


def cmd_harvest(ns: argparse.Namespace) -> int:
    from saelab.harvest import harvest

    cfg = _config_from_args(C.HarvestConfig, ns, {})
    path = harvest(cfg)
    log.info("harvest ready: %s", path)
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from saelab.trainer import train

    cfg = _config_from_args(C.TrainConfig, ns, {})
    run = train(cfg)
    log.info("run ready: %s", run)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from saelab.evaluate import evaluate, summary_table

    cfg = _config_from_args(C.EvalConfig, ns, {})
    result = evaluate(cfg)
    sys.stdout.write(summary_table([(cfg.run, result)]) + "\n")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from saelab.compare import eval_rows, expand_runs, table, write_comparison
    from saelab.evaluate import eval_results
    from saelab.runs import COMPARE

    cfg = _config_from_args(C.EvalConfig, ns, {"run": ""})  # flags first, then the runs
    runs = expand_runs(ns.run)
    results = eval_results(runs, cfg)
    rows = [row for run, res in results for row in eval_rows(run.name, res)]
    files = write_comparison(rows, Path(ns.out) if ns.out else runs[0].parent / COMPARE)
    sys.stdout.write(table(rows) + "\n\nwrote " + ", ".join(map(str, files)) + "\n")
    return 0


def cmd_darkmatter(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from saelab import darkmatter as D
    from saelab.runs import DARKMATTER

    cfg = _config_from_args(C.DarkMatterConfig, ns, {})
    runs = [Path(r) for r in ns.run]
    if ns.scaling:
        written, figures = D.run_scaling(D.prepare_scaling(runs, cfg), cfg)
        sys.stdout.write("".join(f"wrote {p}\n" for p in [written, *figures]))
        return 0
    subjects = [D.prepare(r, cfg) for r in runs]  # all checks before any work
    for s in subjects:
        result = D.run_one(s, cfg)
        sys.stdout.write(D.summary_lines(result) + f"\n  wrote {s.path / DARKMATTER}\n")
    return 0


def cmd_index(ns: argparse.Namespace) -> int:
    from saelab.features import build_index

    cfg = _config_from_args(C.IndexConfig, ns, {})
    if not cfg.run:
        raise UserError("no run given; use saelab index runs/<name>")
    log.info("feature index ready: %s", build_index(cfg.run, cfg, progress=not ns.quiet))
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from saelab.explain import explain_run, summary

    cfg = _config_from_args(C.ExplainConfig, ns, {})
    path = explain_run(cfg, progress=not ns.quiet)
    sys.stdout.write(f"{summary(path.parent)}\nwrote {path}\n")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.format in ("neuronpedia", "saedashboard"):  # one layout: SAEDashboard's runner output
        from saelab.neuronpedia import export_neuronpedia

        log.info("Neuronpedia export ready: %s", export_neuronpedia(ns.run, ns.out))
        return 0
    from saelab.export import export

    log.info("%s export ready: %s", ns.format, export(ns.run, ns.out, ns.format, units=ns.units))
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        # As the server will: a port in TIME_WAIT is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"cannot serve on {host}:{port} ({e.strerror}); pass another --port or --host"
            ) from None


def cmd_app(ns: argparse.Namespace) -> int:
    import os
    import subprocess
    from pathlib import Path

    if not 1 <= ns.port <= 65535:
        raise UserError(f"--port {ns.port} is not a TCP port; pass one in 1..65535, e.g. 8501")
    home = Path(__file__).resolve().parent.parent / "app" / "Home.py"
    if not home.is_file():
        raise UserError(
            f"the app is not at {home}; run saelab from a source checkout (pip install -e .)"
        )
    runs = Path(ns.runs).resolve()
    if not runs.is_dir():
        raise UserError(
            f"{ns.runs} is not a directory; train a run first (saelab demo) or pass a runs folder"
        )
    _check_port_free(ns.host, ns.port)
    cmd = [sys.executable, "-m", "streamlit", "run", str(home), "--server.headless", "true"]
    cmd += ["--server.address", ns.host, "--server.port", str(ns.port)]
    cmd += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    log.info("saelab app: http://%s:%d (runs from %s)", ns.host, ns.port, runs)
    env = {**os.environ, "SAELAB_RUNS_DIR": str(runs)}
    return subprocess.call(cmd, env=env)


def cmd_demo(ns: argparse.Namespace) -> int:
    from saelab.demo import demo

    return demo(quick=ns.quick)


@dataclass(frozen=True)
class Command:
    help: str
    handler: Callable[[argparse.Namespace], int]
    config: type | None = None
    """The config dataclass whose fields become flags (`--sae.k`), if any."""
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    """Its own arguments: (names, add_argument keywords) each."""


def _arg(*names: str, **kw: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return names, kw


# A positional run that fills the config's `run` field; SUPPRESS lets a preset's value stand.
_RUN = _arg("run", nargs="?", default=argparse.SUPPRESS, help="run directory (runs/<name>)")

COMMANDS: dict[str, Command] = {
    "harvest": Command(
        "record a model's activations to cached_activations/", cmd_harvest, C.HarvestConfig
    ),
    "train": Command("train an SAE on a harvest", cmd_train, C.TrainConfig),
    "eval": Command(
        "evaluate a run on held-out tokens (writes eval.json)", cmd_eval, C.EvalConfig, (_RUN,)
    ),
    "compare": Command(
        "runs side by side: table and FVU-vs-L0 figure (HTML, PNG)",
        cmd_compare,
        C.EvalConfig,
        (
            _arg("run", nargs="+", help="run directories, or folders of runs (a sweep)"),
            _arg("--out", help="output folder (default: <first run's parent>/compare)"),
        ),
    ),
    "darkmatter": Command(
        "decompose a run's SAE error (darkmatter.json); --scaling across runs",
        cmd_darkmatter,
        C.DarkMatterConfig,
        (
            _arg("run", nargs="+", help="run directory (several with --scaling)"),
            _arg(
                "--scaling",
                action="store_true",
                help="per-token error-norm R² matrix across SAEs of one harvest",
            ),
        ),
    ),
    "index": Command(
        "build a run's feature index for the app (features.sqlite)",
        cmd_index,
        C.IndexConfig,
        (_RUN,),
    ),
    "explain": Command(
        "explain a run's latents with an LM and score each explanation (explanations.jsonl)",
        cmd_explain,
        C.ExplainConfig,
        (_RUN,),
    ),
    "export": Command(
        "export a run to another SAE layout (SAELens, sparsify)",
        cmd_export,
        None,
        (
            _arg("run", help="run directory (runs/<name>)"),
            _arg("out", help="output directory"),
            _arg(
                "--format",
                default="saelens",
                choices=["saelens", "sparsify", "neuronpedia", "saedashboard"],
                help="target layout (neuronpedia and saedashboard are one layout)",
            ),
            _arg(
                "--units",
                default="saelens",
                choices=["saelens", "saelab"],
                help="saelens: unit-norm decoder rows, values rescaled to match (default); "
                "saelab: saelab's own feature values (see saelab/export.py)",
            ),
        ),
    ),
    "app": Command(
        "the Streamlit workbench on a folder of runs (localhost)",
        cmd_app,
        None,
        (
            _arg("runs", nargs="?", default="runs", help="folder of runs (default: runs)"),
            _arg("--port", type=int, default=8501, help="port (default: 8501)"),
            _arg("--host", default="127.0.0.1", help="address to bind (default: localhost)"),
        ),
    ),
    "demo": Command(
        "harvest, train and evaluate on the embedded default model",
        cmd_demo,
        None,
        (_arg("--quick", action="store_true", help="a smaller, faster demo"),),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab", description=(__doc__ or "saelab").splitlines()[0]
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, allow_abbrev=False)
        # SUPPRESS: without -q here, keep what `saelab -q <command>` set before the command.
        p.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="only warnings and errors",
        )
        for names, kw in cmd.args:
            p.add_argument(*names, **kw)
        if cmd.config is not None:
            _add_config_flags(p, cmd.config)
    return parser


def _check_unknown(ns: argparse.Namespace, unknown: list[str]) -> None:
    flags = [u for u in unknown if u.startswith("--")]
    if not unknown:
        return
    cls = COMMANDS[ns.command].config
    known = ["--" + k for k in F.flat_fields(cls)] if cls else []
    bad = flags[0] if flags else unknown[0]
    close = F.did_you_mean(bad.split("=")[0].removeprefix("--"), [k[2:] for k in known])
    hint = f"; did you mean '--{close}'?" if close else f"; see saelab {ns.command} --help"
    raise UserError(f"unknown option '{bad}' for saelab {ns.command}{hint}")


_OS_FIXES = {
    errno.EROFS: "choose a place on a writable file system (e.g. another --out)",
    errno.EACCES: "fix its permissions or choose another place (e.g. another --out)",
    errno.EPERM: "fix its permissions or choose another place (e.g. another --out)",
    errno.ENOTDIR: "a folder on that path is a file; move the file or choose another path",
    errno.EEXIST: "something is in the way there; move it or choose another path",
    errno.EISDIR: "that is a folder; give the path of a file",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ENOENT: "check the path",
    errno.ENOSPC: "free some space or write elsewhere, then run the same command again",
    errno.EDQUOT: "free some space or write elsewhere, then run the same command again",
    errno.EPIPE: "the program reading the output (e.g. | head) stopped early",
}
"""What to do about an OS error, by errno; anything else gets a generic fix."""


def os_error_line(e: OSError) -> str:
    """An OSError as one line: the path it concerns, what happened and the fix."""
    path = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    fix = _OS_FIXES.get(e.errno or 0, "check the path, then run the same command again")
    line = f"{path}: {what}; {fix}" if path else f"{what}; {fix}"
    return " ".join(line.splitlines())  # a path may hold a newline; the message stays one line


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.WARNING if ns.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        _check_unknown(ns, unknown)
        return COMMANDS[ns.command].handler(ns)
    except UserError as e:
        sys.stderr.write(f"saelab {ns.command}: error: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"saelab {ns.command}: error: {os_error_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"saelab {ns.command}: interrupted; run the same command to resume\n")
        return 130
    finally:
        if "torch" in sys.modules:  # only a command that ran torch can have joined a group
            from saelab import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
