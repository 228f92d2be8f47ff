from torch import nn


class _DenseBlock(nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision shim: image models are unavailable (bench/_shims/README.md)")


class _Transition(_DenseBlock):
    pass
