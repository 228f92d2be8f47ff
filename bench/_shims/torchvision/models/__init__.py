"""Names torchdistill's model zoo imports; unusable by design (see bench/_shims/README.md)."""

from . import densenet, detection, quantization, resnet, segmentation  # noqa: F401
