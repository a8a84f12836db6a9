"""saelab workbench: `saelab app [runs_dir]` serves this with SAELAB_RUNS_DIR set.

Pages live in views/; each is thin (layout, caching and widgets) over saelab.workbench,
saelab.viz, saelab.feature_index and saelab.steering.
"""

import sys
from pathlib import Path

# Streamlit runs this file as a script; the pages import the shared helpers next to it.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import streamlit as st  # noqa: E402

st.set_page_config(page_title="saelab workbench", page_icon="🔬", layout="wide")

PAGES = [
    st.Page("views/runs.py", title="Runs", icon=":material/table_view:", default=True),
    st.Page("views/features.py", title="Feature browser", icon=":material/search:"),
    st.Page("views/dead.py", title="Dead latents", icon=":material/heart_broken:"),
    st.Page("views/darkmatter.py", title="Dark matter", icon=":material/dark_mode:"),
    st.Page("views/compare.py", title="Compare", icon=":material/scatter_plot:"),
    st.Page("views/prompt.py", title="Prompt", icon=":material/keyboard:"),
    st.Page("views/steer.py", title="Steer", icon=":material/tune:"),
]

page = st.navigation(PAGES)
common.sidebar()
page.run()
