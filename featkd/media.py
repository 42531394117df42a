"""Pictures of what the feature terms compare, for the W&B run of a stage (`logger.media: true`).

For each active feature term of a Distiller, `feature_panels` captures its (student, teacher)
feature pairs on a fixed batch, as the term reads them before any adapter, and draws one
panel:

- conv maps (C, H, W) of a term that compares samples one by one (AT, FitNets, ...): each
  side's spatial attention, normalize(mean_c f^2) as AT defines it, for the first samples;
- anything else, and every relational term (SP, RKD, ...): the samples' cosine similarity
  matrix on each side.

Capturing never changes training: the models run in eval mode without gradients (batch-norm
statistics untouched, train/eval flags restored) and the random state is put back, so a run
with pictures ends with the weights of one without. Only rank 0 draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from featkd import distributed
from featkd.data import collate_of
from featkd.distiller import Distiller
from featkd.evaluation import to_device
from featkd.logging import WandbLogger
from featkd.losses.feature import attention_map
from featkd.runtime import rng_state, set_rng_state
from featkd.terms import Pair

#: samples in the fixed batch (similarity matrices) and of them, columns of attention maps
BATCH = 16
MAP_SAMPLES = 4


def fixed_batch(dataset: Dataset, device: torch.device, size: int = BATCH) -> Any:
    """The inputs of the first `size` samples of `dataset` (a test set), on `device`; read
    item by item, not through a DataLoader, whose iterator would draw from the random state."""
    state = rng_state()
    try:
        items = [dataset[i] for i in range(min(size, len(dataset)))]  # type: ignore[arg-type]
        batch = (collate_of(dataset) or default_collate)(items)
    finally:
        set_rng_state(state)
    return to_device(batch[0], device)


def feature_panels(distiller: Distiller, inputs: Any) -> dict[str, np.ndarray]:
    """term name -> an RGB picture (H, W, 3, uint8) of its teacher and student features on
    `inputs`, for every active term that reads features."""
    state = rng_state()
    try:
        return {term.name: draw(term.name, distiller.term_features(term.name, inputs),
                                attention=not term.module.relational and isinstance(inputs, torch.Tensor))
                for term in distiller.active_terms() if term.module.reads_features}
    finally:
        set_rng_state(state)


def draw(name: str, pairs: list[tuple[Pair, torch.Tensor, torch.Tensor]], attention: bool) -> np.ndarray:
    """One term's panel: per pair, teacher above student (attention maps of the first samples
    where both sides are conv maps and `attention`), else side by side (sample similarity)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = attention and all(s.dim() == 4 and t.dim() == 4 for _, s, t in pairs)
    rows = [(f"{side} {label}", tensor) for pair, s, t in pairs
            for side, tensor, label in (("teacher", t, pair.teacher), ("student", s, pair.student))]
    if maps:
        samples = min(MAP_SAMPLES, len(rows[0][1]))
        figure = Figure(figsize=(1.5 * samples + 1.0, 1.4 * len(rows) + 0.4), dpi=80, layout="constrained")
        for r, (label, tensor) in enumerate(rows):
            pictures = attention_map(tensor.float()).view(len(tensor), *tensor.shape[2:]).cpu()
            for c in range(samples):
                axis = figure.add_subplot(len(rows), samples, r * samples + c + 1)
                axis.imshow(pictures[c].numpy(), cmap="viridis")
                axis.set_xticks([])
                axis.set_yticks([])
                if c == 0:
                    axis.set_ylabel(label, fontsize=7)
        title = f"{name}: spatial attention, samples 0-{samples - 1}"
    else:
        figure = Figure(figsize=(5.0, 2.4 * len(pairs) + 0.4), dpi=80, layout="constrained")
        for r, (label, tensor) in enumerate(rows):
            flat = F.normalize(tensor.float().flatten(1), dim=1)
            axis = figure.add_subplot(len(pairs), 2, r + 1)
            axis.imshow((flat @ flat.T).cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
            axis.set_title(label, fontsize=7)
            axis.set_xticks([])
            axis.set_yticks([])
        title = f"{name}: cosine similarity of the {len(rows[0][1])} samples"
    figure.suptitle(title, fontsize=8)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def epoch_pictures(distiller: Distiller, inputs: Any, run: WandbLogger, epochs: int) -> Callable[[int, int], None]:
    """What `fit` calls after each epoch is logged (`StageSettings.epoch_end`): at the first
    and the last epoch, the feature panels as `media/<term>` images in that epoch's row."""

    def log(epoch: int, step: int) -> None:
        if epoch not in (1, epochs) or distributed.rank() != 0:
            return
        import wandb

        panels = feature_panels(distiller, inputs)
        if panels:
            run.log_rich({f"media/{name}": wandb.Image(picture, caption=f"epoch {epoch}")
                          for name, picture in panels.items()}, step)

    return log
