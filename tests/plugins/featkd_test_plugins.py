"""Losses used by the tests to make a run fail on purpose (loaded with `plugins:`)."""

import torch

from featkd.losses import LOSSES, DistillLoss


@LOSSES.register("nan_after")
class NaNAfter(DistillLoss):
    """Zero until `steps` calls have been made, then NaN (to test non-finite handling)."""

    needs_teacher = False

    def __init__(self, steps: int = 5) -> None:
        super().__init__()
        self.steps = steps
        self.calls = 0

    def forward(self, student_logits, teacher_logits=None, targets=None):
        self.calls += 1
        value = student_logits.sum() * 0.0
        return value + float("nan") if self.calls > self.steps else value
