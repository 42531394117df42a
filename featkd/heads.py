"""The student as it answers at inference when its method replaces its classifier.

Most methods leave the student's output alone. SimKD (and SRD when asked) classify one of the
student's features through a head the method trains or borrows: a projector and the teacher's
classifier. Such a loss returns the head from `inference_head()`; the Distiller wraps the student
with it (`Distiller.deployed`), and everything after uses the wrapped student: the per-epoch
evaluation, the summary's accuracy and footprint, the checkpoints, `featkd eval`, `predict`
and `export`.

    deployed = distiller.deployed        # a HeadedStudent, or the student itself
    logits = deployed(x)                 # network up to the feature, then the head

A checkpoint keeps the head as `head_payload()`: the loss that built it, the feature, the
arguments its `build_head` rebuilds it from, and its weights; `with_head` puts it back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featkd.capture import first_tensor, resolve, select_item, unwrap
from featkd.errors import CheckpointError, ConfigError

__all__ = ["HeadedStudent", "PooledClassifierHead", "global_pool", "head_payload", "with_head"]


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *positions) averaged over the positions; a (B, C) vector as it is."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


class PooledClassifierHead(nn.Module):
    """projector -> global average pooling over the positions -> classifier.

    `pool_to` first average-pools a map to that spatial size (SimKD's alignment of a larger
    student map with the teacher's); a (B, C) vector has no positions to pool."""

    def __init__(self, projector: nn.Module, classifier: nn.Linear, pool_to: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.projector, self.classifier = projector, classifier
        self.pool_to = tuple(pool_to) if pool_to else None

    def project(self, feature: torch.Tensor) -> torch.Tensor:
        """The projected feature (what the method's loss compares with the teacher's)."""
        if self.pool_to is not None:
            pool = nn.functional.adaptive_avg_pool1d if len(self.pool_to) == 1 else nn.functional.adaptive_avg_pool2d
            feature = pool(feature, self.pool_to)
        return self.projector(feature)

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        return self.classifier(global_pool(projected))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(feature))


class HeadedStudent(nn.Module):
    """The student network run up to `feature`, whose value `head` turns into the logits.

    The network still computes its own output, which is dropped (its cost is counted in the
    footprint); the feature is taken by a hook held only during each forward, so the network
    is left as it was."""

    def __init__(self, network: nn.Module, feature: str, head: nn.Module, loss: str, args: dict[str, Any]) -> None:
        super().__init__()
        spec = resolve(network, feature, "student")[0]
        if spec.port not in ("out", "in") or spec.call is not None:
            raise ConfigError(f"{loss}: the student feature its head reads must be a module's output or input "
                              f"('layer3', 'fc:in'), not {feature!r}.")
        self.network, self.head = network, head
        self.feature, self.loss, self.args = feature, loss, dict(args)
        self._spec = spec

    def forward(self, x: Any = None, **keywords: Any) -> torch.Tensor:
        # one named input (images, signals), or a text model's keyword inputs: as the network takes them
        inputs = () if x is None else (x,)
        seen: list[Any] = []
        module = unwrap(self.network).get_submodule(self._spec.module)
        if self._spec.port == "in":
            handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args))
        else:
            handle = module.register_forward_hook(lambda _m, _args, output: seen.append(output))
        try:
            self.network(*inputs, **keywords)
        finally:
            handle.remove()
        value = seen[-1]
        if self._spec.item is not None:
            value = select_item(value, self._spec.item)
        return self.head(first_tensor(value))

    def describe(self) -> str:
        """One line for the summary: whose head, on what, and what it adds."""
        added = sum(p.numel() for p in self.head.parameters())
        return (f"answers through {self.loss}'s head on its feature {self.feature!r} ({added:,} parameters: "
                f"{type(self.head).__name__}), not its own output")


def head_payload(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint keeps of a headed student's head (None for a plain student)."""
    if not isinstance(model, HeadedStudent):
        return None
    return {"loss": model.loss, "feature": model.feature, "args": model.args,
            "state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()}}


def with_head(network: nn.Module, payload: dict[str, Any] | None) -> nn.Module:
    """The network wrapped with the head a checkpoint recorded; the network itself without one."""
    if not payload:
        return network
    from featkd.losses import LOSSES

    try:
        head = LOSSES.get(payload["loss"]).build_head(**payload["args"])
        head.load_state_dict(payload["state"])
    except (AttributeError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's student head ({payload.get('loss', '?')}) cannot be rebuilt: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}.") from None
    device = next(iter(network.parameters()), torch.empty(0)).device
    return HeadedStudent(network, payload["feature"], head.to(device), payload["loss"], payload["args"])
