"""The CIFAR architectures of the distillation benchmark (CRD, Tian et al. 2020), registered as
`resnet20`, `resnet32x4`, `wrn_40_2`, `vgg13`, ... They follow their papers' descriptions:

- ResNet for CIFAR (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic blocks
  (16, 32, 64 channels; `x4` variants 64, 128, 256 after a 32-channel stem), depth 6n + 2;
- Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks, stages of 16k,
  32k, 64k channels, (d - 4) / 6 blocks each;
- VGG with batch norm (Simonyan & Zisserman 2015), five stages of 3x3 convs with max-pooling
  between them, on 32x32 inputs.

All of them name their stages `layer1..layerN`, pool into `fc:in` and classify with `fc`, so
the same feature names work across teachers and students.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featkd.models import MODELS, GlobalPool


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: stem, `layer1..3` of basic blocks, global pool, `fc`."""

    def __init__(self, depth: int, num_classes: int, input_shape: Sequence[int], widths: Sequence[int] = (16, 16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        stem, *stages = widths
        self.conv1 = nn.Conv2d(input_shape[0], stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        channels = stem
        for index, width in enumerate(stages, start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(channels, width, 2 if (index > 1 and b == 0) else 1))
                channels = width
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.pool = GlobalPool()
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv, BN-ReLU-conv, plus the (projected) input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-k: stem, `layer1..3` of pre-activation blocks (16k, 32k, 64k), BN-ReLU, pool, `fc`."""

    def __init__(self, depth: int, widen: int, num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        channels = 16
        for index, width in enumerate((16 * widen, 32 * widen, 64 * widen), start=1):
            blocks = []
            for b in range(n):
                blocks.append(WideBlock(channels, width, 2 if (index > 1 and b == 0) else 1))
                channels = width
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = GlobalPool()
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))))


VGG_STAGES = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(nn.Module):
    """VGG with batch norm: `layer1..5` of 3x3 conv-BN-ReLU, max-pooling between stages, pool, `fc`."""

    def __init__(self, depth: int, num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        channels = input_shape[0]
        for index, widths in enumerate(VGG_STAGES[depth], start=1):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index > 1 else []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.pool = GlobalPool()
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, 6):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(self.pool(x))


def _init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _register_resnet(depth: int, widths: tuple[int, ...], suffix: str = "") -> None:
    def build(num_classes: int, input_shape: Sequence[int]) -> CifarResNet:
        return CifarResNet(depth, num_classes, input_shape, widths)

    build.__doc__ = f"CIFAR ResNet-{depth}{suffix} (He et al. 2016): stages of {', '.join(map(str, widths[1:]))} channels."
    MODELS.add(f"resnet{depth}{suffix}", build)


def _register_wrn(depth: int, widen: int) -> None:
    def build(num_classes: int, input_shape: Sequence[int]) -> WideResNet:
        return WideResNet(depth, widen, num_classes, input_shape)

    build.__doc__ = f"Wide ResNet WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016) for CIFAR."
    MODELS.add(f"wrn_{depth}_{widen}", build)


def _register_vgg(depth: int) -> None:
    def build(num_classes: int, input_shape: Sequence[int]) -> CifarVGG:
        return CifarVGG(depth, num_classes, input_shape)

    build.__doc__ = f"VGG-{depth} with batch norm (Simonyan & Zisserman 2015) for 32x32 images."
    MODELS.add(f"vgg{depth}", build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(_depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register_resnet(_depth, (32, 64, 128, 256), "x4")
for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
for _depth in VGG_STAGES:
    _register_vgg(_depth)
