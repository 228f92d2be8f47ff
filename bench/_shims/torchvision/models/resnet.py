from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision shim: image models are unavailable (bench/_shims/README.md)")


def conv1x1(*args, **kwargs):
    raise RuntimeError("torchvision shim: image models are unavailable (bench/_shims/README.md)")
