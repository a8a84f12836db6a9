"""What every page shares: the runs directory, the run selection (in st.session_state, so it
survives page changes), cached readers, and the guard that turns errors into messages."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from saelab import workbench as wb
from saelab.errors import UserError
from saelab.runs import SYNTHETIC

log = logging.getLogger("saelab.app")

SELECTED = "selected_runs"
"""session_state key: the runs chosen on the Runs page (names relative to the runs dir)."""
FOCUS = "focus_run"
"""session_state key of the sidebar's run: the one single-run pages show."""
FOCUS_BOX = "_focus_box"


@contextmanager
def guard() -> Iterator[None]:
    """Errors become a message on the page, never a stack trace (st.stop and st.rerun are
    BaseExceptions and pass through)."""
    try:
        yield
    except UserError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - the browser gets one line; the log gets the rest
        log.exception("workbench page failed")
        st.error(f"Something went wrong: {type(e).__name__}: {e}")


def root() -> Path:
    return wb.runs_root(os.environ.get("SAELAB_RUNS_DIR") or "runs")


def runs() -> list[wb.RunInfo]:
    return wb.list_runs(root())


def selected(all_runs: list[wb.RunInfo]) -> list[wb.RunInfo]:
    """The runs chosen on the Runs page, or every run when none is chosen."""
    chosen = set(st.session_state.get(SELECTED) or [])
    picked = [r for r in all_runs if r.name in chosen]
    return picked or all_runs


def display(path: Path) -> str:
    """A run's path as the user typed the runs directory (for commands to copy)."""
    base = os.environ.get("SAELAB_RUNS_DIR") or "runs"
    try:
        return str(Path(base) / path.relative_to(root()))
    except ValueError:
        return str(path)


def no_runs_message() -> None:
    st.info(
        f"No runs in {root()}. Train one with `saelab train` (or `saelab demo`), "
        "then reload this page."
    )


def sidebar() -> None:
    """The runs directory and the run the single-run pages show. A `?run=` query parameter
    picks the run on the first visit; afterwards the choice is written back to the URL."""
    try:
        names = wb.run_names(root())
    except UserError as e:
        st.sidebar.error(str(e))
        return
    st.sidebar.caption(f"runs: `{root()}`")
    if not names:
        return
    if "_query_read" not in st.session_state:
        st.session_state["_query_read"] = True
        want = st.query_params.get("run")
        if want:
            try:
                run = wb.resolve_run(root(), want)
                st.session_state[FOCUS] = run.relative_to(root()).as_posix() or "."
                chosen = st.session_state.setdefault(SELECTED, [])
                if st.session_state[FOCUS] not in chosen and chosen:
                    chosen.append(st.session_state[FOCUS])
            except UserError as e:
                st.session_state["_query_error"] = str(e)
    chosen = [n for n in st.session_state.get(SELECTED) or [] if n in names]
    options = chosen or names
    if st.session_state.get(FOCUS) not in options:
        st.session_state[FOCUS] = wb.first_complete(root(), options)
    # The widget's state does not survive st.switch_page; FOCUS does, and seeds it.
    st.session_state[FOCUS_BOX] = st.session_state[FOCUS]
    st.sidebar.selectbox(
        "Run",
        options,
        key=FOCUS_BOX,
        on_change=lambda: st.session_state.update({FOCUS: st.session_state[FOCUS_BOX]}),
        help="The run the single-run pages show; choose several on Runs to narrow this list",
    )
    st.query_params["run"] = st.session_state[FOCUS]


def query_error() -> None:
    """A rejected ?run= parameter, shown once on the page it arrived with."""
    if err := st.session_state.pop("_query_error", None):
        st.error(err)


def focus() -> wb.RunInfo | None:
    """The sidebar's run, read fresh; None (and a message) when there is none."""
    query_error()
    name = st.session_state.get(FOCUS)
    if not name:
        no_runs_message()
        return None
    return wb.run_info(root(), name)


def need_complete(info: wb.RunInfo) -> bool:
    if info.complete:
        return True
    st.warning(
        f"{info.name}: "
        + ("; ".join(info.problems) or "the run is incomplete")
        + ". This page needs a finished run."
    )
    return False


def table(rows: list[dict[str, Any]], formats: dict[str, str]) -> Any:
    """Rows as a DataFrame with the `formats` columns as text and "-" where there is no
    number (st.dataframe shows a missing value as "None" whatever the Styler says)."""
    import math

    import pandas as pd

    def cell(fmt: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)

    df = pd.DataFrame(rows)
    for col, fmt in formats.items():
        if col in df:
            df[col] = [cell(fmt, v) for v in df[col].tolist()]
    return df


def mtime(path: Path) -> float:
    """Part of cache keys, so that a rewritten file is read again."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(max_entries=4, show_spinner=False)
def _index(path: str, modified: float) -> Any:
    from saelab.feature_index import FeatureIndex

    return FeatureIndex(path)


def open_index(run: Path) -> Any:
    """The run's feature index, opened once per file version and shared by sessions
    (FeatureIndex is read-only and thread-safe); never close it."""
    path = run / wb.INDEX
    return _index(str(path), mtime(path))


@st.cache_data(max_entries=16, show_spinner=False)
def darkmatter_tokens(run: str, modified: float) -> dict[str, Any] | None:
    return wb.darkmatter_tokens(Path(run))


# ---------------------------------------------------------------------------------------
# The model and the SAE (Prompt, Steer, the feature page's own-text box)


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def model(name: str) -> Any:
    from saelab.models import load_model

    return load_model(name)


@st.cache_resource(max_entries=4, show_spinner=False)
def sae(path: str, modified: float) -> Any:
    from saelab.steering import load_sae

    return load_sae(path).eval()


def model_and_sae(info: wb.RunInfo) -> tuple[Any, Any] | None:
    """The run's model and SAE, loaded once per process; None (with a message) when the run
    has no model behind it."""
    name = info.cfg.get("model")
    if not name or name == SYNTHETIC:
        st.info(f"{info.name} was trained on a synthetic harvest: there is no model to run.")
        return None
    weights = info.path / wb.WEIGHTS
    return model(name), sae(str(info.path), mtime(weights))


def describer(info: wb.RunInfo, idx: Any = None) -> wb.Describer:
    """Notes, explanations and index labels of the run (read each rerun: a few small files)."""
    return wb.describer(info.path, idx)


def named(i: int, describe: wb.Describer, width: int = 48) -> str:
    """'#i · label' for a button or a list, markdown-escaped."""
    label = describe(i)
    return f"#{i}" + (f" · {wb.md_escape(wb.shorten(label, width))}" if label else "")
