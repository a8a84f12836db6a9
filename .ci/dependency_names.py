"""Print the names of saelab's dependencies (and the extras `make setup` installs) with no
version bounds, for `make test-latest`. torch is left out: TORCH_SPEC pins it, and an
unpinned torch pulls GBs of CUDA wheels."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
specs = project["dependencies"]
specs += [s for e in ("dev", "default-corpus", "triton") for s in extras[e]]
names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in specs}
sys.stdout.write(" ".join(sorted(names - {"torch"})) + "\n")
