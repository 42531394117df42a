import os

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


class TinyNet(nn.Module):
    """conv -> bn -> relu(inplace) -> conv -> pool -> fc, with a shared ReLU used twice."""

    def __init__(self, width: int = 4, classes: int = 3, in_channels: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def image_batch():
    torch.manual_seed(1)
    return torch.randn(5, 2, 8, 8)


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "_forward_hooks_with_kwargs", {})
        for m in model.modules()
    )

# test-only plug-in losses, importable by configs through `plugins:`
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "plugins"))
