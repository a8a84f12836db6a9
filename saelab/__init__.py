"""saelab: a sparse-autoencoder workbench (harvest, train, evaluate, inspect, steer)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

from saelab.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
