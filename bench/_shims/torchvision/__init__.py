"""Import-time stand-in for torchvision (see bench/_shims/README.md); no functionality."""

__version__ = "0.0+bench-shim"
from . import datasets, models  # noqa: E402,F401
