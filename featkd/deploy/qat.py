"""Quantization-aware training: a stage trains its model as ONNX Runtime's int8 will run it
(`featkd export --quantize int8`), so that distillation can recover what int8 loses (Mishra &
Marr 2018, "Apprentice"; Polino et al. 2018, "Model compression via distillation and
quantization"). Turn it on for a stage with `train: {quantization_aware: true}`.

Inside the stage, every `nn.Conv1d/2d/3d` and `nn.Linear` of the model computes with
fake-quantized weights and inputs (rounded to int8 values in the forward pass; gradients pass
straight through within the representable range, torch's `fake_quantize_*` ops):

- weights per output channel, symmetric, int8 in [-127, 127], scale max|w| / 127: the rule
  ONNX Runtime's quantizer applies to per-channel int8 weights, so the weights trained here
  round to the very values the export holds (for a convolution followed by a batch norm,
  which the export folds into it, the folded weight: see `_QuantAwareConv`);
- inputs per tensor, asymmetric, uint8, over a range that follows the training batches (an
  exponential moving average of each batch's min and max, the first batch taken as it is, 0
  always inside it), which ONNX Runtime's calibration re-measures on training inputs.

The modules keep their names, parameters and state-dict keys, so hooks, adapters,
checkpoints and resume work as in any stage; after the stage the model is a plain float
model again, with the weights QAT trained. The observed ranges are not checkpointed: a
resumed QAT stage observes them afresh from its next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

#: how far each training batch moves an input range (PyTorch's moving-average observers' 0.01)
MOMENTUM = 0.01
WEIGHT_MAX = 127  # symmetric int8: [-127, 127]


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding of a weight, straight-through gradients."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / WEIGHT_MAX).clamp_min(1e-12).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -WEIGHT_MAX, WEIGHT_MAX)


def fake_quantize_input(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per-tensor asymmetric uint8 rounding of an activation over [low, high] (0 included)."""
    low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / 255).clamp_min(1e-12)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point, 0, 255)


class _QuantAware:
    """The forward of a quantization-aware layer; mixed into the layer's own class."""

    qat_range: torch.Tensor  # (2,) the observed input range: min, max (nan before the first batch)

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                batch = torch.stack([x.detach().min(), x.detach().max()]).float()
                if torch.isnan(self.qat_range).any():
                    self.qat_range.copy_(batch)
                else:
                    self.qat_range.lerp_(batch, MOMENTUM)
        if torch.isnan(self.qat_range).any():  # evaluated before any training batch: nothing to round to
            return x
        return fake_quantize_input(x, self.qat_range[0], self.qat_range[1])


class _QuantAwareLinear(_QuantAware, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantized_input(x), fake_quantize_weight(self.weight), self.bias)


class _QuantAwareConv(_QuantAware):
    """A convolution; when a batch norm follows it alone, the export folds the two, so the
    weight rounded is the folded one, w * gamma / sqrt(running_var + eps), and the product is
    scaled back before the batch norm (Jacob et al. 2018, section 3.2)."""

    qat_norm: nn.modules.batchnorm._BatchNorm | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantized_input(x)
        norm = self.qat_norm
        if norm is None:
            return self._conv_forward(x, fake_quantize_weight(self.weight), self.bias)
        gamma = norm.weight if norm.affine else torch.ones_like(norm.running_var)
        factor = gamma / torch.sqrt(norm.running_var + norm.eps)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        y = self._conv_forward(x, fake_quantize_weight(self.weight * factor.reshape(shape)), None)
        y = y / factor.reshape((1, -1) + (1,) * (self.weight.dim() - 2))
        return y if self.bias is None else y + self.bias.reshape((1, -1) + (1,) * (self.weight.dim() - 2))


class _QuantAwareConv1d(_QuantAwareConv, nn.Conv1d):
    pass


class _QuantAwareConv2d(_QuantAwareConv, nn.Conv2d):
    pass


class _QuantAwareConv3d(_QuantAwareConv, nn.Conv3d):
    pass


#: exact layer types made quantization-aware (subclasses with forwards of their own are left alone)
QUANT_AWARE = {nn.Linear: _QuantAwareLinear, nn.Conv1d: _QuantAwareConv1d, nn.Conv2d: _QuantAwareConv2d,
               nn.Conv3d: _QuantAwareConv3d}


def conv_norm_pairs(model: nn.Module) -> dict[str, str]:
    """Convolutions whose output goes to a batch norm and nowhere else (what an export folds),
    as {conv name: norm name}, found by tracing the model with torch.fx; none where it cannot
    be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # dynamic control flow: no folding is simulated
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1 \
                and type(modules.get(source.target)) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) \
                and modules[node.target].track_running_stats:
            pairs[str(source.target)] = str(node.target)
    return pairs


class QuantizationAware:
    """The layers a `quantization_aware` block made quantization-aware (`names`), with a way
    to run the plain float model for a while (`suspended`)."""

    def __init__(self, swapped: list[tuple[str, nn.Module, type]]) -> None:
        self._swapped = swapped
        self.names = [name for name, _, _ in swapped]

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The float model inside the block (to measure what the export starts from)."""
        kinds = [(module, type(module)) for _, module, _ in self._swapped]
        for _, module, original in self._swapped:
            module.__class__ = original
        try:
            yield
        finally:
            for module, kind in kinds:
                module.__class__ = kind


@contextmanager
def quantization_aware(model: nn.Module) -> Iterator[QuantizationAware]:
    """Within the block, the model's linear and convolution layers train and evaluate with
    int8 fake quantization (see the module docstring)."""
    folded = conv_norm_pairs(model)
    modules = dict(model.named_modules())
    swapped = []
    for name, module in model.named_modules():
        kind = QUANT_AWARE.get(type(module))
        if kind is None:
            continue
        original = type(module)
        module.register_buffer("qat_range", torch.full((2,), float("nan"), device=module.weight.device),
                               persistent=False)
        if issubclass(kind, _QuantAwareConv):  # a reference, not a submodule: names and state stay as they were
            object.__setattr__(module, "qat_norm", modules[folded[name]] if name in folded else None)
        module.__class__ = kind
        swapped.append((name, module, original))
    try:
        yield QuantizationAware(swapped)
    finally:
        for _, module, original in swapped:
            module.__class__ = original
            del module._buffers["qat_range"]
            module.__dict__.pop("qat_norm", None)
