"""saelab: a sparse-autoencoder workbench (harvest, train, evaluate, inspect, steer)."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

from saelab.errors import UserError  # noqa: E402

if TYPE_CHECKING:  # what _LAZY provides, for type checkers and editors
    from saelab.export import export_saelens, export_sparsify
    from saelab.interop import load_sae, load_saelens, load_sparsify
    from saelab.sae import SparseCoder
    from saelab.steering import (
        ablate,
        add,
        clamp,
        compare_generations,
        generate,
        load_model,
        next_token_probs,
        steer,
        top_latents,
    )

# The notebook API, imported on first use: `import saelab` (and so the CLI) stays free of
# torch and transformer-lens until one of these is asked for.
_LAZY = {
    "SparseCoder": "saelab.sae",
    "load_model": "saelab.steering",
    "load_sae": "saelab.interop",
    "steer": "saelab.steering",
    "add": "saelab.steering",
    "clamp": "saelab.steering",
    "ablate": "saelab.steering",
    "generate": "saelab.steering",
    "compare_generations": "saelab.steering",
    "top_latents": "saelab.steering",
    "next_token_probs": "saelab.steering",
    "export_saelens": "saelab.export",
    "export_sparsify": "saelab.export",
    "load_saelens": "saelab.interop",
    "load_sparsify": "saelab.interop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = ["UserError", "__version__", *_LAZY]  # pyright: ignore[reportUnsupportedDunderAll]
