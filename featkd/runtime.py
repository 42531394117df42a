"""Devices and seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from featkd.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available here; use device=cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' asked for, but MPS is not available here; use device=cpu or auto.")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

