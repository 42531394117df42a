"""Multi-process training with torch.distributed (DDP), launched by `torchrun`.

    torchrun --nproc_per_node 2 -m featkd.cli train configs/quickstart.yaml

Each process trains on its shard of every epoch (`ShardedSampler`); `data.batch_size` is the
batch of one process, so the global batch is `batch_size x world_size`. DDP wraps only what
a stage trains (`TrainedParts`): the student with its buffers, and the adapters' and losses'
trained parameters. Teachers are not wrapped: they are frozen, in eval mode and run under
no_grad on every rank. Per-sample state of a loss (CRD's memory banks) is not a DDP buffer:
the loss keeps it identical on every rank itself. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from featkd.errors import FeatkdError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def setup(device_name: str) -> torch.device:
    """Join the process group torchrun described; return this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _gather_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """`x` (detached) from every rank, in rank order; ranks may hold different numbers of rows."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [part[: int(n)] for part, n in zip(parts, sizes)]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along the batch, without gradient."""
    return torch.cat(_gather_parts(x)) if is_distributed() else x


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along the batch; gradients flow to this rank's part only."""
    if not is_distributed():
        return x
    parts = _gather_parts(x)
    parts[rank()] = x
    return torch.cat(parts)


def gradient_scale(value: torch.Tensor) -> torch.Tensor:
    """Same value, gradient times the world size.

    A loss over the gathered global batch sends each rank gradients for its own samples only;
    DDP then averages over ranks, which would divide the global loss's gradient by the world
    size. Scaling it back makes two processes of batch b match one process of batch 2b.
    """
    n = world_size()
    return value if n == 1 else value * n - value.detach() * (n - 1)


class TrainedParts(nn.Module):
    """What DDP keeps in step across processes: the parameters a training objective updates,
    and the student's buffers when it trains the student. Calling it runs the objective.

    The objective (a Distiller, or a method's pre-training) is held, not registered, so its
    teachers, frozen parts and per-sample loss state are never broadcast or reduced.
    """

    def __init__(self, objective: Any, trained: list[nn.Parameter]) -> None:
        super().__init__()
        in_student = {id(p) for p in objective.student.parameters()}
        if any(id(p) in in_student for p in trained):
            self.student = objective.student
        self.others = nn.ParameterList([p for p in trained if id(p) not in in_student])
        object.__setattr__(self, "objective", objective)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.objective(*args, **kwargs)


def wrap_for_training(objective: Any, trained: list[nn.Parameter]) -> Any:
    """The objective itself in one process; in DDP, its `trained` parameters wrapped so that
    their gradients are averaged over processes. The graph is searched for unused parameters
    at every step only if the objective says some may go without a gradient."""
    if not is_distributed() or not trained:
        return objective
    return nn.parallel.DistributedDataParallel(TrainedParts(objective, trained),
                                               find_unused_parameters=objective.leaves_parameters_unused)


def explain_unused_parameters(exc: RuntimeError) -> FeatkdError | None:
    """DDP's complaint about a parameter that got no gradient, as a message saying what to do."""
    if "did not receive grad" not in str(exc) and "finished reduction in the prior iteration" not in str(exc):
        return None
    return FeatkdError(
        "multi-process training: a trained parameter received no gradient in a step (DDP needs every one "
        "of them, and featkd searches for unused parameters only when a term says it leaves some unused). "
        "If the student has parameters its forward does not use, freeze them (`freeze:` in an explicit "
        f"stage); a custom loss with such parameters sets `leaves_parameters_unused = True`. DDP said: "
        f"{str(exc).splitlines()[0]}"
    )


class ShardedSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank: a permutation seeded by (seed, epoch),
    split as indices[rank::world_size]. With `drop_last`, every rank gets the same count and
    no sample is repeated; without it, shards differ by at most one and nothing is padded.
    One process (world size 1) sees the whole permutation, so 2 processes x batch b and 1
    process x batch 2b visit the same samples per step. With `views` = R (a dataset of R fixed
    views per sample), epoch e visits view (e - 1) mod R: index i + view x size."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 num_replicas: int | None = None, rank_: int | None = None, views: int = 1) -> None:
        self.size = size
        self.views = views
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: len(self) * self.num_replicas]
        offset = ((self.epoch - 1) % self.views) * self.size if self.views > 1 else 0
        return iter(i + offset for i in order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.num_replicas
        return math.ceil((self.size - self.rank) / self.num_replicas)
