"""Measuring a model: top-1 accuracy, loss and agreement on a test set, predicted
distributions, multiply-adds, and a checkpoint's accuracy on the test set it was trained for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from featkd import distributed
from featkd.capture import call_model, logits_of
from featkd.checkpoint import load_checkpoint
from featkd.errors import CheckpointError
from featkd.runtime import autocast
from featkd.losses.base import IGNORE_INDEX


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or the tensors of a dict (a text batch: input ids, attention mask), on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def unpack(batch: Any, device: torch.device, channels_last: bool = False
           ) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, extra fields) of a batch, on `device`; extras come from dataset wrappers.
    Inputs are a tensor, or a dict of tensors passed to the model as keywords (text)."""
    x, y, *rest = batch
    extras = rest[0] if rest and isinstance(rest[0], dict) else {}
    x = to_device(x, device)
    if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True), to_device(extras, device)


def scored_positions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, sample of each) of what accuracy counts: one row per sample for
    classification; for token-level outputs (B, T, V), every labelled position."""
    if logits.dim() == 3:
        keep = targets != IGNORE_INDEX
        sample = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)
        return logits[keep], targets[keep], sample[keep]
    return logits, targets, torch.arange(len(targets), device=targets.device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             reference: nn.Module | None = None, channels_last: bool = False,
             keep_predictions: bool = False) -> dict[str, Any]:
    """Top-1 accuracy (%) and mean cross-entropy on `loader`, summed over all ranks; with
    `reference`, also the % of samples where both models predict the same class. With
    `keep_predictions`, "predictions" and "targets" hold every sample's class, in dataset order.

    For token-level outputs (a language model's (B, T, V) logits), accuracy and loss are over
    the labelled positions, and "correct" holds each sample's share of them predicted right."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct, total, loss sum, agree
    predictions, targets, correct = [], [], []
    try:
        for batch in loader:
            x, labels, _ = unpack(batch, device, channels_last)
            with autocast(device, precision):
                output = logits_of(call_model(model, x)).float()
                other = logits_of(call_model(reference, x)) if reference is not None else None
            logits, y, sample = scored_positions(output, labels)
            pred = logits.argmax(-1)
            counts[0] += (pred == y).sum()
            counts[1] += len(y)
            counts[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
            if other is not None:
                counts[3] += (pred == scored_positions(other, labels)[0].argmax(-1)).sum()
            if keep_predictions and output.dim() == 3:
                hits = torch.zeros(len(labels), device=device).index_add_(0, sample, (pred == y).float())
                seen = torch.zeros(len(labels), device=device).index_add_(0, sample, torch.ones_like(y, dtype=torch.float))
                correct.append(hits / seen.clamp_min(1))
            elif keep_predictions:
                predictions.append(pred)
                targets.append(y)
    finally:
        model.train(was_training)
    distributed.all_reduce_sum(counts)
    total = max(1.0, counts[1].item())
    result: dict[str, Any] = {"acc": 100.0 * counts[0].item() / total, "loss": counts[2].item() / total,
                              "agreement": 100.0 * counts[3].item() / total}
    if keep_predictions and correct:
        result["correct"], = _in_dataset_order(loader, torch.cat(correct))
    elif keep_predictions:
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
        out = [torch.softmax(logits_of(call_model(model, to_device(batch[0], device))).float(), -1).cpu()
               for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=getattr(dataset, "collate", None))]
    finally:
        model.train(was_training)
    return torch.cat(out)


def multiply_adds(model: nn.Module, example: Any, device: torch.device) -> int | None:
    """Multiply-adds of one forward of one sample (FLOPs / 2, counted by torch); `example` is
    that sample's input shape, or one batch-of-one input (a text batch's dict)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(example, (tuple, list)):
                example = torch.zeros((1, *example))
            call_model(model, to_device(example, device))
        return counter.get_total_flops() // 2
    except Exception:  # a model the counter cannot trace: report none rather than fail the run
        return None
    finally:
        model.train(was_training)


def evaluate_checkpoint(path: str | Path, device_name: str = "auto") -> dict[str, Any]:
    """Top-1 of the model in a featkd checkpoint on the test set of the config it was trained with."""
    from featkd.config import validate
    from featkd.data import build_data, make_loaders
    from featkd.models import count_parameters, model_from_checkpoint
    from featkd.runtime import resolve_device

    payload = load_checkpoint(path)
    if "config" not in payload or "model_name" not in payload:
        raise CheckpointError(f"{str(path)!r} has no training config; `featkd eval` needs a checkpoint of a featkd run.")
    config = validate(payload["config"])
    device = resolve_device(device_name)
    bundle = build_data(config.data.name, config.data.args)
    model = model_from_checkpoint(payload).to(device)
    _, test_loader = make_loaders(bundle.train, bundle.test, config.data, config.seed)
    result = evaluate(model, test_loader, device)
    return {"checkpoint": str(path), "model": payload["model_name"], "stage": payload.get("stage"),
            "epoch": payload.get("epoch"), "acc": result["acc"], "loss": result["loss"],
            "params": count_parameters(model), "samples": len(bundle.test)}
