"""Distillation with a self-supervised task: SSKD (Xu et al., ECCV 2020), with the dataset
wrapper that brings each image's rotated copies into the batch.

The models must run on the rotated copies too, so the copies travel as rows of the batch
itself: `RotatedCopies` (the loss's `prepare_data`) turns B images into 4B rows, image i at
row 4i and its rotations by 90, 180 and 270 degrees at rows 4i + 1..3, with a `rotation`
field saying which is which. The copies carry the label -100, so the `ce` term learns from
the originals only (as the paper's cross-entropy does), and every other term of the config
sees all 4B rows: SSKD brings its own KD on the originals, so its configs drop `kd`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    Example,
    FeatureSetLoss,
    LossValue,
    PretrainStage,
    Shape,
    TermInputs,
    check_temperature,
    full_precision,
)

__all__ = ["ROTATIONS", "RotatedCopies", "SSKDLoss", "error_ranks", "kept_by_error_level", "rotated_copies"]

#: Copies of every image in an SSKD batch: the original and three quarter-turns.
ROTATIONS = 4


def rotated_copies(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (4, C, H, W): the image turned 0, 90, 180 and 270 degrees counter-clockwise."""
    return torch.stack([torch.rot90(image, k, dims=(1, 2)) for k in range(ROTATIONS)])


class RotatedCopies(Dataset):
    """An image dataset whose batches hold every image with its three rotations (SSKD's input).

    Item i is (the 4 rotations of image i, its label, its extras); `collate` lays B items out
    as 4B rows, row 4i + r being image i turned r quarter-turns. Labels: the image's own at
    rows 4i, -100 at the copies (no label: `ce` leaves them out). Extras: each field repeated
    on the 4 rows of its image, plus `rotation` (r, per row) and `view` (the item's view x 4
    + r, so a teacher output cache keeps each rotated copy apart; `replayable_views` is 4
    times the wrapped set's). Sampling, `targets` and `views` are the wrapped set's.
    """

    #: Marks a dataset (or a wrapper around one) whose batches already hold rotated copies.
    rotated_copies = True

    def __init__(self, dataset: Dataset) -> None:
        if getattr(dataset, "collate", None) is not None:
            raise ConfigError(
                "sskd: rotates images, but this training set batches its items itself (text is padded per batch). "
                "Use SSKD on image data: items (C, H, W) with H == W."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        image = item[0]
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[1] != image.shape[2]:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ConfigError(
                f"sskd: turns every image by 90 degrees, so it needs square images (C, H, W) with H == W; got an "
                f"item of {shape}. Crop or resize the images to a square."
            )
        extras = dict(item[2]) if len(item) > 2 and isinstance(item[2], dict) else {}
        return rotated_copies(image), item[1], extras

    @property
    def replayable_views(self) -> int | None:
        views = getattr(self.dataset, "replayable_views", None)
        return None if views is None else views * ROTATIONS

    def collate(self, items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """4B rows of images, 4B labels (-100 at the copies) and the extras, per row."""
        images = torch.stack([item[0] for item in items])  # (B, 4, C, H, W)
        batch = len(images)
        labels = torch.as_tensor(default_collate([item[1] for item in items])).long().reshape(batch)
        row_labels = torch.full((batch, ROTATIONS), IGNORE_INDEX, dtype=torch.long)
        row_labels[:, 0] = labels
        extras = default_collate([item[2] for item in items]) if items[0][2] else {}
        extras = {k: torch.as_tensor(v).repeat_interleave(ROTATIONS, dim=0) for k, v in extras.items()}
        rotation = torch.arange(ROTATIONS).repeat(batch)
        extras["view"] = extras.get("view", torch.zeros_like(rotation)) * ROTATIONS + rotation
        extras["rotation"] = rotation
        return images.flatten(0, 1), row_labels.flatten(), extras

    def __getattr__(self, name: str) -> Any:  # targets, views, samples, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def error_ranks(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries score above the true one: 0 when the row's top entry is the
    truth (ties count for the truth). Rows whose truth is -100 (no label) rank 0."""
    labelled = truth != IGNORE_INDEX
    own = scores.gather(1, truth.clamp_min(0)[:, None])
    return ((scores > own).sum(1) * labelled).long()


def kept_by_error_level(ranks: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's error-level filter: every correct row (rank 0), and of the w wrong ones the
    floor(w x ratio) of smallest rank (the least wrong; equal ranks in row order). A bool mask."""
    wrong = int((ranks > 0).sum())
    count = len(ranks) - wrong + int(wrong * ratio)
    order = torch.sort(ranks, stable=True).indices[:count]
    return torch.zeros_like(ranks, dtype=torch.bool).index_fill(0, order, True)


def _kl_rows(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) summed over the kept rows, divided by their number (0 with none)."""
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
    kept = keep.to(kl.dtype)
    return (kl * kept).sum() / kept.sum().clamp_min(1.0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities between the rows of a (n, D) and of b (m, D)."""
    return F.normalize(a, dim=1, eps=1e-8) @ F.normalize(b, dim=1, eps=1e-8).t()


class ProjectionHead(nn.Sequential):
    """SSKD's self-supervision head on an embedding: Linear(D, D), ReLU, Linear(D, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


@LOSSES.register("sskd")
class SSKDLoss(FeatureSetLoss):
    """Self-supervised KD (Xu, Liu, Li & Loy, "Knowledge Distillation Meets Self-Supervision",
    ECCV 2020): the student also learns how the teacher relates rotated images to originals.

    A batch holds B images x_i and their copies turned by 90, 180 and 270 degrees (the
    training set goes through `prepare_data`, see `RotatedCopies`). Each side has a
    projection head h (Linear-ReLU-Linear on its embedding, here the captured feature) giving
    z = h(f); the similarity of copy j to image i is A_ji = cos(z~_j, z_i), a (3B, B) matrix.
    First the teacher's head alone learns to find each copy's original (the `pretrain` stage,
    cross-entropy of the rows of A^t with the copy's own image as the class), then, with
    KL = sum_rows KL(softmax(t / T) || softmax(s / T)) / rows,

        L = kd_weight T_kd^2 KL(originals) + tf_weight T_tf^2 KL(kept copies, logits)
            + ss_weight T_ss^2 KL(kept copies, A^t vs A^s)

    with T_kd = T_tf = 4, T_ss = 0.5 and weights 0.9, 2.7 and 10 (the paper's code; its
    cross-entropy on the originals is the `ce` term at 0.1). "Kept copies": the teacher's
    mistakes are filtered by error level: a copy is wrong when the teacher does not rank its
    label (tf) or its own image (ss) first; all right copies are kept, and of the w wrong ones
    the floor(w x ratio) of smallest rank, tf_ratio = 1.0 and ss_ratio = 0.75 (copies of equal
    rank in row order, where the paper's code leaves the choice to an unstable sort). The
    student's head trains with the student; the teacher's is fixed after its stage.

    Reads one pair of embeddings (`fc:in` on featkd's CNNs; any shape, flattened), the
    logits of both models and the labels. A batch of B images is 4B rows for every model and
    term. The copies are turned from the image as the training set gives it, augmented once;
    the paper's code flips an image once and then crops each of its four copies on its own.
    """

    relational = True
    needs_targets = True
    has_shape_dependent_parameters = True
    batch_keys = ("rotation",)
    example = Example("fc:in", "fc:in")
    pretrain = PretrainStage(
        trains=("loss",), epochs=60, uses_student=False,
        description="the teacher's self-supervision head learns to find each rotated copy's original image",
    )

    def __init__(self, kd_weight: float = 0.9, tf_weight: float = 2.7, ss_weight: float = 10.0,
                 kd_temperature: float = 4.0, tf_temperature: float = 4.0, ss_temperature: float = 0.5,
                 tf_ratio: float = 1.0, ss_ratio: float = 0.75) -> None:
        super().__init__()
        for name, value in (("kd_weight", kd_weight), ("tf_weight", tf_weight), ("ss_weight", ss_weight)):
            if not value >= 0:
                raise ConfigError(f"sskd: {name} must be >= 0 (0 turns its part off), got {value}.")
        check_temperature("sskd (kd_temperature)", kd_temperature)
        check_temperature("sskd (tf_temperature)", tf_temperature)
        check_temperature("sskd (ss_temperature)", ss_temperature)
        for name, value in (("tf_ratio", tf_ratio), ("ss_ratio", ss_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"sskd: {name} is the fraction of the teacher's wrong copies kept, in [0, 1]; "
                                  f"got {value}.")
        self.kd_weight, self.tf_weight, self.ss_weight = kd_weight, tf_weight, ss_weight
        self.kd_temperature, self.tf_temperature, self.ss_temperature = kd_temperature, tf_temperature, ss_temperature
        self.tf_ratio, self.ss_ratio = tf_ratio, ss_ratio
        self.student_head: ProjectionHead | None = None
        self.teacher_head: ProjectionHead | None = None

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if len(student_shapes) != 1:
            raise ConfigError(f"sskd: reads one pair of embeddings (e.g. student: 'fc:in', teacher: 'fc:in'), got "
                              f"{len(student_shapes)} pairs.")
        self.student_head = ProjectionHead(math.prod(student_shapes[0]))
        self.teacher_head = ProjectionHead(math.prod(teacher_shapes[0]))

    def prepare_data(self, dataset: Any) -> Any:
        """The training set with every image's rotated copies in its batches."""
        return dataset if getattr(dataset, "rotated_copies", False) else RotatedCopies(dataset)

    def evaluate(self, inputs: TermInputs, objective: Callable[..., LossValue] | None = None) -> LossValue:
        # besides its pair of embeddings, SSKD reads both models' logits and the labels
        return (objective or self)(inputs.students, inputs.teachers, inputs.student_logits, inputs.teacher_logits,
                                   inputs.targets, **inputs.keywords(self))

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor], student_logits: torch.Tensor,
                teacher_logits: Any, targets: torch.Tensor, rotation: torch.Tensor) -> dict[str, torch.Tensor]:
        heads = self._heads()
        groups = self._groups(rotation, len(student_logits))
        if not isinstance(teacher_logits, torch.Tensor):
            raise ConfigError("sskd: distils one teacher's logits (give the Distiller one teacher).")
        s_logits = full_precision(student_logits).reshape(groups, ROTATIONS, -1)
        t_logits = full_precision(teacher_logits.detach()).reshape(groups, ROTATIONS, -1)
        labels = targets.reshape(groups, ROTATIONS)[:, 0].repeat_interleave(ROTATIONS - 1)

        t = self.kd_temperature
        kd = _kl_rows(F.log_softmax(s_logits[:, 0] / t, 1), F.log_softmax(t_logits[:, 0] / t, 1),
                      torch.ones(groups, dtype=torch.bool, device=s_logits.device))

        t = self.tf_temperature
        log_t_copies = F.log_softmax(t_logits[:, 1:].flatten(0, 1) / t, 1)
        keep_tf = kept_by_error_level(error_ranks(log_t_copies, labels), self.tf_ratio)
        tf = _kl_rows(F.log_softmax(s_logits[:, 1:].flatten(0, 1) / t, 1), log_t_copies, keep_tf)

        z_s = heads[0](full_precision(students[0]).flatten(1)).reshape(groups, ROTATIONS, -1)
        with torch.no_grad():  # the teacher's head is fixed after its own stage
            z_t = heads[1](full_precision(teachers[0].detach()).flatten(1)).reshape(groups, ROTATIONS, -1)
        sim_s = _cosine(z_s[:, 1:].flatten(0, 1), z_s[:, 0])
        sim_t = _cosine(z_t[:, 1:].flatten(0, 1), z_t[:, 0])
        own = torch.arange(groups, device=sim_t.device).repeat_interleave(ROTATIONS - 1)
        keep_ss = kept_by_error_level(error_ranks(sim_t, own), self.ss_ratio)
        t = self.ss_temperature
        ss = _kl_rows(F.log_softmax(sim_s / t, 1), F.log_softmax(sim_t / t, 1), keep_ss)

        return {"kd": self.kd_weight * self.kd_temperature**2 * kd,
                "tf": self.tf_weight * self.tf_temperature**2 * tf,
                "ss": self.ss_weight * self.ss_temperature**2 * ss}

    def pretrain_loss(self, students: list[torch.Tensor | None], teachers: list[torch.Tensor],
                      student_logits: torch.Tensor | None, teacher_logits: Any, targets: torch.Tensor | None,
                      rotation: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each copy's similarities to the batch's originals, its own being the class."""
        heads = self._heads()
        groups = self._groups(rotation, len(teachers[0]))
        z_t = heads[1](full_precision(teachers[0].detach()).flatten(1)).reshape(groups, ROTATIONS, -1)
        similarity = _cosine(z_t[:, 1:].flatten(0, 1), z_t[:, 0])
        own = torch.arange(groups, device=similarity.device).repeat_interleave(ROTATIONS - 1)
        return F.cross_entropy(similarity, own)

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        # the teacher's head is fixed after its own stage; distillation trains the student's
        return self.student_head.parameters() if self.student_head is not None else iter(())

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        return self.teacher_head.parameters() if self.teacher_head is not None else iter(())

    def _heads(self) -> tuple[ProjectionHead, ProjectionHead]:
        if self.student_head is None or self.teacher_head is None:
            raise ConfigError("sskd: its projection heads are built from probed shapes; pass example_input to the "
                              "Distiller.")
        return self.student_head, self.teacher_head

    @staticmethod
    def _groups(rotation: torch.Tensor, rows: int) -> int:
        """B, for a batch of 4B rows in `RotatedCopies`' layout (checked)."""
        rotation = torch.as_tensor(rotation).reshape(-1)
        layout = torch.arange(ROTATIONS, device=rotation.device).repeat(max(rows // ROTATIONS, 1))
        if len(rotation) != rows or rows % ROTATIONS or not torch.equal(rotation.long(), layout):
            raise ConfigError(
                f"sskd: expects each image followed by its 3 rotated copies (rows 4i..4i+3, rotation 0, 1, 2, 3), "
                f"got {rows} rows with rotations {rotation[:8].tolist()}... Build the loader from "
                "`distiller.prepare_data(train_set)` with its `collate` (featkd.data.collate_of), and keep its rows "
                "in order."
            )
        return rows // ROTATIONS

    def extra_repr(self) -> str:
        return (f"kd_weight={self.kd_weight}, tf_weight={self.tf_weight}, ss_weight={self.ss_weight}, "
                f"kd_temperature={self.kd_temperature}, tf_temperature={self.tf_temperature}, "
                f"ss_temperature={self.ss_temperature}, tf_ratio={self.tf_ratio}, ss_ratio={self.ss_ratio}")
