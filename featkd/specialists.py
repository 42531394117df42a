"""Specialist models (Hinton, Vinyals & Dean 2015, section 5).

A generalist model is trained on all classes. Classes it confuses are grouped into clusters
by k-means on the columns of the covariance matrix of its predicted distributions, with the
diagonal left out: a class's own variance would otherwise dominate its column and set apart
the classes it is surest of. Each specialist starts from the generalist's weights with a new
output layer over its cluster's classes plus one "dustbin" class for everything else, and
trains on data in which half the examples come from its cluster; its dustbin logit is then
raised by the log of the odds by which its classes were oversampled (the paper's correction
for the biased training set). At inference, for each input:

1. take the `top_n` most probable classes under the generalist, k;
2. the active specialists are those whose cluster meets k;
3. find the distribution q over all classes minimising
   KL(p_g || q) + sum over active m of KL(p_m || q_m),
   where q_m keeps q on m's classes and puts the rest of q's mass on its dustbin class.

The minimisation is done by expectation-maximisation steps, which lower the objective at
every step: q(c) <- (p_g(c) + sum_m r_m(c)) / (1 + #active), with r_m(c) = p_m(c) for c in m's
cluster and p_m(dustbin) q(c) / q(outside m's cluster) otherwise. `SpecialistEnsemble` does
all of this in its forward pass and returns log q, so it can teach a single student by KD.
`train_specialists` runs the whole method on a trained generalist (the `specialists` stage).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from featkd.errors import ConfigError
from featkd.evaluation import predicted_probabilities
from featkd.runtime import seed_everything


def confusion_clusters(probs: torch.Tensor, num_clusters: int, seed: int = 0) -> list[list[int]]:
    """Groups of classes the model confuses: k-means on the columns of the covariance of its
    predicted distributions (probs: N x C), diagonal zeroed, so that classes predicted together
    with the same classes fall together. A class left alone joins the cluster whose centre is
    nearest its column, so every cluster has two classes or more."""
    from sklearn.cluster import KMeans

    num_classes = probs.shape[1]
    if not 1 <= num_clusters <= num_classes // 2:
        raise ConfigError(f"specialists: clusters must be between 1 and {num_classes // 2} (two classes or more "
                          f"each), got {num_clusters}.")
    covariance = np.cov(probs.double().cpu().numpy(), rowvar=False)
    np.fill_diagonal(covariance, 0.0)
    kmeans = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(covariance)
    labels = kmeans.labels_.copy()
    for label in range(num_clusters):
        members = np.flatnonzero(labels == label)
        if len(members) == 1:
            distances = ((kmeans.cluster_centers_ - covariance[members[0]]) ** 2).sum(1)
            distances[label] = np.inf
            labels[members[0]] = int(distances.argmin())
    clusters = [sorted(int(c) for c in np.flatnonzero(labels == k)) for k in range(num_clusters)]
    return sorted(c for c in clusters if c)


def last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError("specialists: the generalist has no linear output layer to replace.")
    return names[-1]


def specialist_from(generalist: nn.Module, cluster: Sequence[int]) -> nn.Module:
    """A copy of the generalist whose output layer covers the cluster's classes plus a dustbin."""
    model = copy.deepcopy(generalist)
    path = last_linear(model).split(".")
    parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
    old: nn.Linear = getattr(parent, path[-1])
    setattr(parent, path[-1], nn.Linear(old.in_features, len(cluster) + 1).to(old.weight.device))
    model.requires_grad_(True)
    return model


class SpecialistLabels(Dataset):
    """A dataset relabelled for one specialist: cluster classes -> 0..n-1, every other class -> n."""

    def __init__(self, dataset: Dataset, cluster: Sequence[int], num_classes: int) -> None:
        self.dataset = dataset
        mapping = torch.full((num_classes,), len(cluster), dtype=torch.long)
        mapping[torch.as_tensor(list(cluster))] = torch.arange(len(cluster))
        self.mapping = mapping
        self.targets = mapping[torch.as_tensor(_targets(dataset)).long()]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (item[0], self.mapping[int(item[1])], *item[2:])


def _targets(dataset: Dataset) -> list[int]:
    targets = getattr(dataset, "targets", None)
    return list(targets) if targets is not None else [int(dataset[i][1]) for i in range(len(dataset))]


class SpecialtySampler(Sampler[int]):
    """Each epoch, as many samples as the dataset holds: `fraction` of them from the specialty
    (sampled with replacement), the rest from the other classes; seeded per epoch."""

    def __init__(self, in_specialty: torch.Tensor, fraction: float = 0.5, seed: int = 0) -> None:
        self.inside = torch.nonzero(in_specialty).flatten()
        self.outside = torch.nonzero(~in_specialty).flatten()
        self.fraction, self.seed, self.epoch = fraction, seed, 0
        self.size = len(in_specialty)

    @property
    def fraction_inside(self) -> float:
        """The share of each epoch drawn from the specialty."""
        return round(self.size * self.fraction) / self.size if len(self.outside) else 1.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_in = round(self.size * self.fraction_inside)
        picks = [self.inside[torch.randint(len(self.inside), (n_in,), generator=g)]]
        if len(self.outside):
            picks.append(self.outside[torch.randint(len(self.outside), (self.size - n_in,), generator=g)])
        order = torch.cat(picks)
        return iter(order[torch.randperm(len(order), generator=g)].tolist())


def combine(general: torch.Tensor, specialists: Sequence[torch.Tensor], clusters: Sequence[Sequence[int]],
            top_n: int = 1, iterations: int = 50) -> torch.Tensor:
    """q minimising KL(p_g || q) + sum_active KL(p_m || q_m), by EM steps; returns log q (B x C).

    general: generalist probabilities (B x C); specialists: each specialist's probabilities
    over its cluster + dustbin (B x (n_m + 1)).
    """
    batch, classes = general.shape
    top = general.topk(min(top_n, classes), dim=1).indices
    members = torch.zeros(len(clusters), classes, dtype=torch.bool, device=general.device)
    for m, cluster in enumerate(clusters):
        members[m, list(cluster)] = True
    active = members[:, top].any(-1).T.to(general.dtype)  # (B, M): cluster meets the generalist's top classes
    if len(clusters) == 0 or not bool(active.any()):
        return general.clamp_min(1e-12).log()
    inside = []  # each specialist's probabilities placed on the full class axis, zero outside its cluster
    dustbin = []
    for m, (probs, cluster) in enumerate(zip(specialists, clusters)):
        full = torch.zeros_like(general)
        full[:, list(cluster)] = probs[:, :-1]
        inside.append(full)
        dustbin.append(probs[:, -1])
    inside_t, dustbin_t = torch.stack(inside, 1), torch.stack(dustbin, 1)  # (B, M, C), (B, M)
    outside = ~members  # (M, C)
    q = general.clone()
    for _ in range(iterations):
        mass_out = (q[:, None, :] * outside).sum(-1).clamp_min(1e-12)  # (B, M)
        share = dustbin_t[:, :, None] * q[:, None, :] * outside / mass_out[:, :, None]
        evidence = ((inside_t + share) * active[:, :, None]).sum(1)  # (B, C)
        q = (general + evidence) / (1 + active.sum(1, keepdim=True))
    return q.clamp_min(1e-12).log()


class SpecialistEnsemble(nn.Module):
    """Generalist + specialists, combined as in the paper; forward returns log q (usable as logits)."""

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], clusters: Sequence[Sequence[int]],
                 top_n: int = 1, iterations: int = 50) -> None:
        super().__init__()
        self.generalist = generalist
        self.specialists = nn.ModuleList(specialists)
        self.clusters = [list(c) for c in clusters]
        self.top_n, self.iterations = top_n, iterations

    def payload(self) -> dict[str, Any]:
        """What a checkpoint keeps of the ensemble: the clusters and the specialists' weights."""
        return {"kind": "specialists", "clusters": self.clusters,
                "specialists": [expert.state_dict() for expert in self.specialists]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        general = torch.softmax(self.generalist(x).float(), dim=1)
        specialists = [torch.softmax(s(x).float(), dim=1) for s in self.specialists]
        return combine(general, specialists, self.clusters, self.top_n, self.iterations)


#: trains one specialist in place: (name, model, its classes, train loader, test loader)
FitSpecialist = Callable[[str, nn.Module, list[int], DataLoader, DataLoader], None]


def train_specialists(generalist: nn.Module, train_set: Dataset, test_set: Dataset, num_classes: int, settings: Any,
                      batch_size: int, eval_batch_size: int, seed: int, device: torch.device,
                      fit: FitSpecialist, name: str = "specialists") -> SpecialistEnsemble:
    """Cluster the classes `generalist` confuses on `train_set`, train a specialist for each
    cluster with `fit` (named `<name>-<m>`), correct its dustbin for the oversampling, and
    return their ensemble with the generalist.

    `settings` is a `SpecialistsConfig` (clusters, top_n, specialty_fraction, iterations).
    """
    seed_everything(seed)
    probs = predicted_probabilities(generalist, train_set, eval_batch_size, device)
    clusters = confusion_clusters(probs, settings.clusters, seed)
    experts = []
    for m, cluster in enumerate(clusters):
        expert = specialist_from(generalist, cluster)
        relabelled = SpecialistLabels(train_set, cluster, num_classes)
        in_specialty = relabelled.targets < len(cluster)
        sampler = SpecialtySampler(in_specialty, settings.specialty_fraction, seed + m)
        loader = DataLoader(relabelled, batch_size=batch_size, sampler=sampler, drop_last=True)
        test_loader = DataLoader(SpecialistLabels(test_set, cluster, num_classes), batch_size=eval_batch_size)
        fit(f"{name}-{m}", expert, cluster, loader, test_loader)
        correct_dustbin(expert, float(in_specialty.float().mean()), sampler.fraction_inside)
        experts.append(expert)
    return SpecialistEnsemble(generalist, experts, clusters, settings.top_n, settings.iterations).to(device)


def dustbin_correction(share_in_data: float, share_in_training: float) -> float:
    """log of the odds by which a specialist's classes were oversampled in its training data:
    what its dustbin logit must gain for its outputs to follow the data's class frequencies."""
    if not 0 < share_in_data < 1 or not 0 < share_in_training < 1:
        return 0.0
    return math.log((share_in_training / share_in_data) / ((1 - share_in_training) / (1 - share_in_data)))


@torch.no_grad()
def correct_dustbin(expert: nn.Module, share_in_data: float, share_in_training: float) -> None:
    """Raise the specialist's dustbin logit (its output layer's last bias) by `dustbin_correction`."""
    head = expert.get_submodule(last_linear(expert))
    head.bias[-1] += dustbin_correction(share_in_data, share_in_training)


def load_specialists(payload: dict[str, Any], generalist: nn.Module, settings: Any,
                     device: torch.device) -> SpecialistEnsemble:
    """The ensemble saved in a specialists stage's checkpoint (see `SpecialistEnsemble.payload`)."""
    experts = [specialist_from(generalist, c) for c in payload["clusters"]]
    for expert, state in zip(experts, payload["specialists"]):
        expert.load_state_dict(state)
    return SpecialistEnsemble(generalist, experts, payload["clusters"], settings.top_n, settings.iterations).to(device)
