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

from featkd import distributed
from featkd.data import WithIndex, with_index
from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeaturePairLoss, full_precision

__all__ = ["CRDLoss", "WithIndex", "dataset_targets"]


#: Negatives per block in the shared-negative NCE: bounds the (B, block) temporaries.
NEGATIVE_BLOCK = 2048


class _SharedNCE(torch.autograd.Function):
    """NCE of anchors against K negatives shared by the batch, in blocks of negatives.

    loss = (1/B) sum_i [softplus(log c_i - s_i0 + log Z) + sum_j keep_ij softplus(s_ij - log Z - log c_i)]
    with s = anchor . row / T for the positive and the K negative rows, c_i = (kept negatives of
    row i) / n. This equals the NCE loss -[log h+/(h+ + c) + sum log c/(h- + c)] with
    h = exp(s) / Z, computed block by block; backward needs only the rows and the (B, K)
    weights sigmoid(.) that forward keeps, never the (B, K) scores.
    """

    @staticmethod
    def forward(ctx, anchor, positive_rows, negative_rows, keep, log_c, log_z, temperature):  # type: ignore[override]
        z0 = log_c + log_z - (anchor * positive_rows).sum(1) / temperature
        sig0 = torch.sigmoid(z0)
        total = _softplus(z0, sig0).sum()
        shift = -(log_z + log_c)[:, None]
        weights = torch.empty_like(keep)
        for start in range(0, len(negative_rows), NEGATIVE_BLOCK):
            block = slice(start, start + NEGATIVE_BLOCK)
            z = torch.addmm(shift, anchor, negative_rows[block].t(), alpha=1.0 / temperature)
            sig = torch.sigmoid(z)
            total = total + torch.dot(_softplus(z, sig).flatten(), keep[:, block].flatten())
            torch.mul(sig, keep[:, block], out=weights[:, block])
        ctx.save_for_backward(positive_rows, sig0, negative_rows, weights)
        ctx.temperature = temperature
        return total / len(anchor)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        positive_rows, sig0, negative_rows, weights = ctx.saved_tensors
        grad_anchor = torch.addmm(-sig0[:, None] * positive_rows, weights, negative_rows)
        return grad_anchor * (grad / (len(positive_rows) * ctx.temperature)), None, None, None, None, None, None


def _softplus(z: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)) from z and sigmoid(z): max(z, 0) - log(sigmoid(|z|)), stable for any z,
    and several times faster than F.softplus on CPU."""
    return z.clamp_min(0) - torch.where(z >= 0, sig, 1 - sig).log()


def dataset_targets(dataset: Any) -> torch.Tensor:
    """All labels of a map-style dataset, from `.targets` if it has them, else by reading items."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.long).reshape(-1)


@LOSSES.register("crd")
class CRDLoss(FeaturePairLoss):
    """Contrastive representation distillation (Tian et al. 2020).

    Student and teacher embeddings pass through linear heads to `feat_dim` and are
    L2-normalized (e_s, e_t). Memory banks hold a running embedding of every training sample
    per side. With the sample's own index as positive and K negatives from other classes,
    h(e, m) = exp(e . m / T) / Z, Z fixed at the first step to n * mean h; the NCE loss per
    side is -[log h+/(h+ + K/n) + sum_neg log (K/n)/(h- + K/n)], averaged over the batch; the
    term is the sum of the two sides (teacher anchors against the student bank and student
    anchors against the teacher bank). Banks are updated with momentum after each step.
    Negatives are drawn on the device each step (with replacement), never in the data loader.

    By default the K negatives are drawn once per batch and shared by its samples (each row
    ignoring its own class), which needs one (K, dim) gather and a matrix product instead of a
    (B, K, dim) gather: every positive still meets K noise samples from the same distribution,
    at a fraction of the memory traffic. `share_negatives=False` draws K per sample, as the
    paper's code does.

    In a multi-process (DDP) run the banks stay identical on every process: each step's
    indices and embeddings are gathered from all processes for the bank update (with
    `gather: true` the loss already sees them all), and Z is set from the global first batch.
    """

    relational = True
    default_weight = 0.8
    example = Example("fc:in", "fc:in", params={"num_negatives": 64})
    has_shape_dependent_parameters = True
    batch_keys = ("index",)

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, negatives: Literal["other_class", "any"] = "other_class",
                 share_negatives: bool = True) -> None:
        super().__init__()
        if feat_dim < 1 or num_negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ConfigError("crd: feat_dim and num_negatives must be >= 1, temperature > 0, 0 <= momentum < 1.")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.temperature, self.momentum, self.negatives = temperature, momentum, negatives
        self.share_negatives = share_negatives
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
        return with_index(dataset)

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of negatives for each sample of `index`, drawn on the device."""
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

    def sample_shared_negatives(self, device: torch.device) -> torch.Tensor:
        """(K,) indices drawn once for the whole batch, on the device."""
        return torch.randint(0, self.num_samples, (self.num_negatives,), device=device)

    def _nce(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """NCE loss of (B, 1 + K) normalized scores whose first column is the positive; `keep`
        (B, K) marks the negatives that count for each row (all of them when None)."""
        eps = 1e-7
        if keep is None:
            noise = torch.full_like(scores[:, 0], self.num_negatives / self.num_samples)
            negative = torch.log(noise[:, None] / (scores[:, 1:] + noise[:, None] + eps)).sum(1)
        else:
            noise = keep.sum(1).to(scores.dtype) / self.num_samples
            negative = (torch.log(noise[:, None] / (scores[:, 1:] + noise[:, None] + eps)) * keep).sum(1)
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
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
        if self.share_negatives:
            losses = self._shared_losses(e_s, e_t, index)
        else:
            losses = self._per_sample_losses(e_s, e_t, index)
        self._update_banks(index, e_s.detach(), e_t.detach())  # the scores above used copies of the rows
        return losses

    @torch.no_grad()
    def _update_banks(self, index: torch.Tensor, e_s: torch.Tensor, e_t: torch.Tensor) -> None:
        """Momentum update of the rows of this step's samples, from every process's samples."""
        if not self.sees_global_batch:
            index, e_s, e_t = (distributed.gather_rows(v) for v in (index, e_s, e_t))
        for bank, embedding in ((self.memory_student, e_s), (self.memory_teacher, e_t)):
            bank[index] = F.normalize(bank[index] * self.momentum + embedding * (1 - self.momentum), dim=1)

    def _set_normalizers(self, means: list[torch.Tensor]) -> None:
        """Z = n x mean score of the first batch, per side, fixed from then on (the paper's code)."""
        if not self._normalizers_set:
            with torch.no_grad():
                mean = torch.stack(means)
                if not self.sees_global_batch:  # every process's first batch, so all processes agree
                    mean = distributed.all_reduce_sum(mean) / distributed.world_size()
                first = self.normalizers < 0
                self.normalizers.copy_(torch.where(first, mean * self.num_samples, self.normalizers))
            self._normalizers_set = True

    def _per_sample_losses(self, e_s, e_t, index) -> dict[str, torch.Tensor]:
        """Each sample's own K negatives: gathers (B, 1 + K, dim) from each bank."""
        candidates = torch.cat([index[:, None], self.sample_negatives(index)], dim=1)
        with torch.no_grad():
            bank_s, bank_t = self.memory_student[candidates], self.memory_teacher[candidates]
        # teacher anchors against the student bank, student anchors against the teacher bank
        scores_t = torch.exp(torch.bmm(bank_s, e_t[:, :, None]).squeeze(2) / self.temperature)
        scores_s = torch.exp(torch.bmm(bank_t, e_s[:, :, None]).squeeze(2) / self.temperature)
        self._set_normalizers([scores_s.mean(), scores_t.mean()])
        return {"student": self._nce(scores_s / self.normalizers[0], None),
                "teacher": self._nce(scores_t / self.normalizers[1], None)}

    def _shared_losses(self, e_s, e_t, index) -> dict[str, torch.Tensor]:
        """K negatives shared by the batch, one block of them at a time; a row ignores the
        negatives of its own class (or itself, with negatives='any')."""
        negatives = self.sample_shared_negatives(index.device)
        if self.negatives == "other_class":
            keep = self.labels[index][:, None] != self.labels[negatives][None, :]
        else:
            keep = index[:, None] != negatives[None, :]
        if not self._normalizers_set:
            self._set_normalizers([self._mean_score(e_s, self.memory_teacher, index, negatives, keep),
                                   self._mean_score(e_t, self.memory_student, index, negatives, keep)])
        log_z = self.normalizers.log()
        keep = keep.to(e_s.dtype)
        log_c = torch.log(keep.sum(1) / self.num_samples)
        out = {}
        # student anchors against the teacher bank, teacher anchors against the student bank
        for side, anchor, bank, z in (("student", e_s, self.memory_teacher, log_z[0]),
                                      ("teacher", e_t, self.memory_student, log_z[1])):
            out[side] = _SharedNCE.apply(anchor, bank.index_select(0, index), bank.index_select(0, negatives),
                                         keep, log_c, z, self.temperature)
        return out

    @torch.no_grad()
    def _mean_score(self, anchor, bank, index, negatives, keep: torch.Tensor) -> torch.Tensor:
        scores = torch.cat([(anchor * bank[index]).sum(1, keepdim=True), anchor @ bank[negatives].t()], 1)
        counted = torch.cat([torch.ones_like(keep[:, :1]), keep], 1)
        return torch.exp(scores[counted] / self.temperature).mean()

    @classmethod
    def smoke_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        # a smoke run's tiny training set cannot feed 16384 negatives any faster than 256
        return {**params, "num_negatives": min(params.get("num_negatives", 16384), 256)}

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}, negatives={self.negatives!r}, share_negatives={self.share_negatives}, "
                f"num_samples={self.num_samples}")
