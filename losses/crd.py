"""Contrastive representation distillation (CRD), with everything it needs kept here:
embedding heads, the memory bank, negative sampling on the device, and the dataset wrapper
that adds each sample's index to its batch. The trainer knows nothing of CRD: it calls the
generic `prepare_data` hook, and passes batch fields by name.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, DistillLoss, full_precision


class WithIndex(Dataset):
    """A dataset whose items also carry their index: (x, y) -> (x, y, {"index": i})."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        item = self.dataset[index]
        extras = dict(item[2]) if len(item) > 2 and isinstance(item[2], dict) else {}
        extras["index"] = index
        return item[0], item[1], extras

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def dataset_targets(dataset: Any) -> torch.Tensor:
    """All labels of a map-style dataset, from `.targets` if it has them, else by reading items."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long).reshape(-1)


@LOSSES.register("crd")
class CRDLoss(DistillLoss):
    """Contrastive representation distillation (Tian et al. 2020).

    Student and teacher embeddings pass through linear heads to `feat_dim` and are
    L2-normalized (e_s, e_t). Memory banks hold a running embedding of every training sample
    per side. With the sample's own index as positive and K negatives from other classes,
    h(e, m) = exp(e . m / T) / Z, Z fixed at the first step to n * mean h; the NCE loss per
    side is -[log h+/(h+ + K/n) + sum_neg log (K/n)/(h- + K/n)], averaged over the batch; the
    term is the sum of the two sides (teacher anchors against the student bank and student
    anchors against the teacher bank). Banks are updated with momentum after each step.
    Negatives are drawn on the device each step (with replacement), never in the data loader.
    """

    consumes = "features"
    relational = True
    default_weight = 0.8
    has_shape_dependent_parameters = True
    batch_keys = ("index",)

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, negatives: Literal["other_class", "any"] = "other_class") -> None:
        super().__init__()
        if feat_dim < 1 or num_negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ConfigError("crd: feat_dim and num_negatives must be >= 1, temperature > 0, 0 <= momentum < 1.")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.temperature, self.momentum, self.negatives = temperature, momentum, negatives
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None
        self.num_samples = 0
        self._normalizers_set = False  # mirrors `normalizers >= 0` without a device sync per step

    def bind(self, student_shapes, teacher_shapes) -> None:
        if len(student_shapes) != 1:
            raise ConfigError(f"crd: contrasts one pair of embeddings, got {len(student_shapes)} pairs.")
        self.embed_student = nn.Linear(math.prod(student_shapes[0]), self.feat_dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes[0]), self.feat_dim)

    def prepare_data(self, dataset: Any) -> Dataset:
        """Size the memory banks to the training set and add sample indices to its items."""
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ConfigError("crd: needs a map-style training set (with len() and indexing) to index its memory bank.")
        labels = dataset_targets(dataset)
        n = len(labels)
        device = self.embed_student.weight.device if self.embed_student is not None else torch.device("cpu")
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        generator = torch.Generator().manual_seed(0)
        for name in ("memory_student", "memory_teacher"):
            bank = (torch.rand(n, self.feat_dim, generator=generator) * 2 - 1) * bound
            self.register_buffer(name, bank.to(device))
        order = torch.sort(labels, stable=True)
        counts = torch.bincount(labels)
        self.register_buffer("labels", labels.to(device))
        self.register_buffer("class_order", order.indices.to(device))
        self.register_buffer("class_start", (torch.cumsum(counts, 0) - counts).to(device))
        self.register_buffer("class_count", counts.to(device))
        self.register_buffer("normalizers", torch.full((2,), -1.0, device=device))
        self._normalizers_set = False
        self.num_samples = n
        return WithIndex(dataset)

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of negatives for the samples `index`, drawn on the device."""
        k, n = self.num_negatives, self.num_samples
        if self.negatives == "other_class":
            label = self.labels[index]
            start, count = self.class_start[label][:, None], self.class_count[label][:, None]
            if (count >= n).any():
                raise ConfigError("crd: negatives='other_class' needs at least two classes in the training set.")
            position = (torch.rand(len(index), k, device=index.device) * (n - count)).long()
            position = position + (position >= start).long() * count
            return self.class_order[position]
        drawn = torch.randint(0, n - 1, (len(index), k), device=index.device)
        return drawn + (drawn >= index[:, None]).long()

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE loss of (B, 1 + K) normalized scores whose first column is the positive."""
        noise = self.num_negatives / self.num_samples
        eps = 1e-7
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        negative = torch.log(noise / (scores[:, 1:] + noise + eps)).sum(1)
        return -(positive + negative).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.embed_student is None:
            raise ConfigError("crd: its embedding heads are built from probed shapes; pass example_input.")
        if self.num_samples == 0:
            raise ConfigError(
                "crd: needs the training set's size and each sample's index. Wrap the training set with "
                "`train_set = distiller.prepare_data(train_set)` before building the DataLoader, and pass the "
                "batch's indices: distiller(x, y, index=index) (the featkd trainer does both)."
            )
        index = torch.as_tensor(index, device=self.labels.device).long()
        e_s = F.normalize(self.embed_student(full_precision(student.flatten(1))), dim=1)
        e_t = F.normalize(self.embed_teacher(full_precision(teacher.detach().flatten(1))), dim=1)
        candidates = torch.cat([index[:, None], self.sample_negatives(index)], dim=1)  # (B, 1 + K)
        with torch.no_grad():
            bank_s = self.memory_student[candidates]
            bank_t = self.memory_teacher[candidates]
        # teacher anchors against the student bank, student anchors against the teacher bank
        scores_t = torch.exp(torch.bmm(bank_s, e_t[:, :, None]).squeeze(2) / self.temperature)
        scores_s = torch.exp(torch.bmm(bank_t, e_s[:, :, None]).squeeze(2) / self.temperature)
        if not self._normalizers_set:  # fixed once, from the first batch, as in the paper's code
            with torch.no_grad():
                first = self.normalizers < 0
                fresh = torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_samples
                self.normalizers.copy_(torch.where(first, fresh, self.normalizers))
            self._normalizers_set = True
        loss_s = self._nce(scores_s / self.normalizers[0])
        loss_t = self._nce(scores_t / self.normalizers[1])
        with torch.no_grad():
            for bank, embedding in ((self.memory_student, e_s), (self.memory_teacher, e_t)):
                mixed = bank[index] * self.momentum + embedding.detach() * (1 - self.momentum)
                bank[index] = F.normalize(mixed, dim=1)
        return {"student": loss_s, "teacher": loss_t}

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}, negatives={self.negatives!r}, num_samples={self.num_samples}")
