"""Global magnitude pruning during a stage, with the stage's teachers distilling into the pruned
student (`train: {prune: {sparsity: 0.8, epochs: 3}}`).

At the start of each of the first `epochs` epochs, the weights of the model's `Conv` and
`Linear` layers (less the `keep` globs) with the smallest magnitudes across all of them are
set to zero, up to the sparsity of Zhu & Gupta's (2017) cubic schedule,
s_e = s (1 - (1 - e / epochs)^3) (one shot at epoch 1 with `epochs: 1`); the remaining epochs
fine-tune at the final sparsity. A pruned weight's gradient is masked, and the weight is
set back to zero after every optimizer step (momentum from before it was pruned would move it).

The mask lives in the weights themselves (a weight is pruned when it is exactly zero), not in
extra state, so state-dict keys, checkpoints, resume and export are those of an unpruned
model. (`torch.nn.utils.prune` would keep `weight_orig` and `weight_mask` in the state dict
until made permanent, which every loader of a student would then have to know about.)
Unstructured sparsity does not make dense kernels faster; it makes the weights compressible,
and the footprint reports it as `weight_sparsity`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from featkd.capture import glob_to_regex

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, keep: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The layers whose weights are pruned: convolutions and linear layers not matched by a `keep` glob."""
    kept = [glob_to_regex(pattern) for pattern in keep]
    return {name: m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and not any(r.match(name) for r in kept)}


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of exactly-zero weights over the model's convolutions and linear layers."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def scheduled_sparsity(final: float, epochs: int, epoch: int) -> float:
    """Zhu & Gupta's cubic ramp: the sparsity to reach at the start of `epoch` (1-based)."""
    done = min(epoch, epochs) / epochs
    return final * (1.0 - (1.0 - done) ** 3)


class MagnitudePruner:
    """Prunes `layers` to the scheduled global sparsity at each epoch start (`set_epoch`)."""

    def __init__(self, layers: dict[str, nn.Module], sparsity: float, epochs: int) -> None:
        self.layers, self.sparsity, self.epochs = layers, sparsity, epochs
        self.masks = {name: m.weight.detach() != 0 for name, m in layers.items()}
        self._handles = [m.weight.register_hook(lambda grad, name=name: grad * self.masks[name])
                         for name, m in layers.items()]
        # momentum carries a weight pruned after training began away from zero: put it back
        self._handles.append(register_optimizer_step_post_hook(lambda optimizer, args, kwargs: self.apply()))

    def apply(self) -> None:
        """Zero the pruned weights (after every optimizer step)."""
        with torch.no_grad():
            for name, m in self.layers.items():
                m.weight.mul_(self.masks[name])

    def set_epoch(self, epoch: int) -> None:
        target = scheduled_sparsity(self.sparsity, self.epochs, epoch)
        weights = [m.weight for m in self.layers.values()]
        magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])
        prune = int(round(target * magnitudes.numel()))
        with torch.no_grad():
            if prune > int((magnitudes == 0).sum()):
                threshold = torch.kthvalue(magnitudes.cpu(), prune).values.item()
                for w in weights:
                    w.masked_fill_(w.abs() <= threshold, 0.0)
            self.masks = {name: m.weight.detach() != 0 for name, m in self.layers.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def magnitude_pruning(model: nn.Module, sparsity: float, epochs: int = 1, keep: Sequence[str] = ()
                      ) -> Iterator[MagnitudePruner]:
    """A pruner of the model for the block; call its `set_epoch` at each epoch start."""
    pruner = MagnitudePruner(prunable_layers(model, keep), sparsity, epochs)
    try:
        yield pruner
    finally:
        pruner.close()


# -- structured: channels removed ------------------------------------------------------------


def prune_channels(model: nn.Module, example: object, fraction: float, keep: Sequence[str] = ()) -> int:
    """Remove `fraction` of the channels of every prunable layer, those of smallest L2 norm,
    with torch-pruning, which follows the dependencies (the batch norm after a convolution,
    the next layer's inputs) so that the model stays whole and really gets smaller. Layers
    matched by `keep`, and the layers that produce the model's output, keep their channels.
    Returns the number of parameters removed."""
    try:
        import torch_pruning as tp
    except ImportError:
        from featkd.errors import ConfigError

        raise ConfigError('prune.channels needs torch-pruning, an optional dependency: pip install "featkd[deploy]".'
                          ) from None
    from featkd.capture import call_model, eval_mode

    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        width = call_model(model, example).shape[-1]
    kept = [glob_to_regex(pattern) for pattern in keep]
    ignored = [m for name, m in model.named_modules() if isinstance(m, PRUNABLE) and (
        any(r.match(name) for r in kept)
        or (isinstance(m, nn.Linear) and m.out_features == width)
        or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == width))]
    with eval_mode(model):
        tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=fraction, ignored_layers=ignored).step()
        try:  # torch-pruning follows modules, not parameters a model uses directly
            with torch.no_grad():
                call_model(model, example)
        except RuntimeError as exc:
            from featkd.errors import ConfigError

            raise ConfigError(
                f"prune.channels: with its channels removed, {type(model).__name__} no longer runs "
                f"({str(exc).splitlines()[0]}): some of its layers depend on each other in a way torch-pruning does "
                "not follow (a parameter used directly, as a transformer's embeddings are). Keep those layers whole "
                "with prune.keep, or prune by magnitude instead (prune: {sparsity: 0.5})."
            ) from None
    model._featkd_pruned_channels = True
    return before - sum(p.numel() for p in model.parameters())


def structure_of(model: nn.Module) -> dict | None:
    """What a checkpoint must record to rebuild a model whose channels were pruned (module
    attributes, as torch-pruning saves them), or None for a model of its built shapes."""
    if not getattr(model, "_featkd_pruned_channels", False):
        return None
    import torch_pruning as tp

    return tp.state_dict(model)["attributions"]


def restore_structure(model: nn.Module, state: dict, structure: dict) -> None:
    """Reshape a freshly built `model` as recorded in `structure` (module attributes such as
    `out_channels`, saved by torch-pruning), then load `state`, the checkpoint's weights."""
    modules = dict(model.named_modules())
    for name, attributes in structure.items():
        module = modules.get(name)
        if module is None:
            continue
        for attribute, value in attributes.items():
            # sizes and settings only: parameters, buffers and submodules come from `state`
            if attribute in module.__dict__ and attribute != "training" and not isinstance(value, (torch.Tensor, dict)):
                setattr(module, attribute, value)
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            continue
        old = module._parameters.get(leaf)
        if old is None:
            old = module._buffers.get(leaf)
        if old is None or old.shape == tensor.shape:
            continue
        fresh = torch.empty(tensor.shape, dtype=old.dtype, device=old.device)  # where the model lives
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(fresh, requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = fresh
    model.load_state_dict(state)
    model._featkd_pruned_channels = True
