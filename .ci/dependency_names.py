"""Print the names of saelab's dependencies (and the extras `make setup` installs) with no
version bounds, for `make test-latest`. torch is left out: TORCH_SPEC pins it, and an
unpinned torch pulls GBs of CUDA wheels."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
specs = project["dependencies"] + [
    spec for extra in ("dev", "default-corpus", "triton") for spec in project["optional-dependencies"][extra]
]
names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in specs}
print(" ".join(sorted(names - {"torch"})))
