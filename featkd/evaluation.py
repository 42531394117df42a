"""Measuring a model: top-1 accuracy, loss and agreement on a test set, predicted
distributions, multiply-adds, and a checkpoint's accuracy on the test set it was trained for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from featkd import distributed
from featkd.capture import logits_of
from featkd.checkpoint import load_checkpoint
from featkd.errors import CheckpointError
from featkd.runtime import autocast


def unpack(batch: Any, device: torch.device, channels_last: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, extra fields) of a batch, on `device`; extras come from dataset wrappers."""
    x, y, *rest = batch
    extras = rest[0] if rest and isinstance(rest[0], dict) else {}
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True), moved


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             reference: nn.Module | None = None, channels_last: bool = False,
             keep_predictions: bool = False) -> dict[str, Any]:
    """Top-1 accuracy (%) and mean cross-entropy on `loader`, summed over all ranks; with
    `reference`, also the % of samples where both models predict the same class. With
    `keep_predictions`, "predictions" and "targets" hold every sample's class, in dataset order."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct, total, loss sum, agree
    predictions, targets = [], []
    try:
        for batch in loader:
            x, y, _ = unpack(batch, device, channels_last)
            with autocast(device, precision):
                logits = logits_of(model(x)).float()
                other = logits_of(reference(x)).argmax(1) if reference is not None else None
            pred = logits.argmax(1)
            counts[0] += (pred == y).sum()
            counts[1] += len(y)
            counts[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
            if other is not None:
                counts[3] += (pred == other).sum()
            if keep_predictions:
                predictions.append(pred)
                targets.append(y)
    finally:
        model.train(was_training)
    distributed.all_reduce_sum(counts)
    total = max(1.0, counts[1].item())
    result: dict[str, Any] = {"acc": 100.0 * counts[0].item() / total, "loss": counts[2].item() / total,
                              "agreement": 100.0 * counts[3].item() / total}
    if keep_predictions:
        result["predictions"], result["targets"] = _in_dataset_order(loader, torch.cat(predictions), torch.cat(targets))
    return result


def _in_dataset_order(loader: DataLoader, *values: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample values of this rank's shard, gathered from every rank and put in dataset order."""
    index = torch.as_tensor(list(iter(loader.sampler)), device=values[0].device)
    index = distributed.gather_rows(index)
    out = []
    for value in values:
        full = torch.empty(int(index.max()) + 1 if len(index) else 0, dtype=value.dtype, device=value.device)
        full[index] = distributed.gather_rows(value)
        out.append(full.cpu())
    return out


@torch.no_grad()
def predicted_probabilities(model: nn.Module, dataset: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """A model's predicted distributions over a dataset (eval mode), N x C."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(logits_of(model(batch[0].to(device))).float(), 1).cpu()
               for batch in DataLoader(dataset, batch_size=batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int | None:
    """Multiply-adds of one forward of one sample (FLOPs / 2, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *input_shape), device=device))
        return counter.get_total_flops() // 2
    except Exception:  # a model the counter cannot trace: report none rather than fail the run
        return None
    finally:
        model.train(was_training)


def evaluate_checkpoint(path: str | Path, device_name: str = "auto") -> dict[str, Any]:
    """Top-1 of the model in a featkd checkpoint on the test set of the config it was trained with."""
    from featkd.config import validate
    from featkd.data import build_data, make_loaders
    from featkd.models import build_model, count_parameters
    from featkd.runtime import resolve_device

    payload = load_checkpoint(path)
    if "config" not in payload or "model_name" not in payload:
        raise CheckpointError(f"{str(path)!r} has no training config; `featkd eval` needs a checkpoint of a featkd run.")
    config = validate(payload["config"])
    device = resolve_device(device_name)
    bundle = build_data(config.data.name, config.data.args)
    model = build_model(payload["model_name"], payload["num_classes"], payload["input_shape"], payload["model_args"])
    model.load_state_dict(payload["model"])
    model.to(device)
    _, test_loader = make_loaders(bundle.train, bundle.test, config.data, config.seed)
    result = evaluate(model, test_loader, device)
    return {"checkpoint": str(path), "model": payload["model_name"], "stage": payload.get("stage"),
            "epoch": payload.get("epoch"), "acc": result["acc"], "loss": result["loss"],
            "params": count_parameters(model), "samples": len(bundle.test)}
