"""Data-parallel training with torch.distributed (launched by torchrun).

Every rank draws the *same* global batch from the same RNG stream and keeps its own shard of it
(``rank``-th slice). Gradients are averaged by DistributedDataParallel, so an update with N
processes equals the single-process update on the full global batch up to float summation order,
and the RNG state is identical on every rank: a checkpoint resumes with any number of processes.
Only rank 0 writes checkpoints, logs and progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flowvae.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's rows of a global batch of n rows (n divisible by world)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else t[self.slice(t.shape[0])]


SINGLE = Shard()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: known before the group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: torch.device, global_batch: int) -> tuple[Shard, torch.device]:
    """Join the process group torchrun set up; returns this rank's shard and device."""
    if not launched_by_torchrun():
        return SINGLE, device
    world = int(os.environ["WORLD_SIZE"])
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size = {global_batch} is not divisible by the {world} processes — "
            f"choose a multiple of {world}"
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size()), device


def agree(loss: torch.Tensor, signalled: bool, shard: Shard) -> tuple[torch.Tensor, bool]:
    """(mean loss over ranks, whether any rank was signalled) — one small all-reduce."""
    if shard.world == 1:
        return loss, signalled
    packed = torch.stack([loss.float(), torch.tensor(float(signalled), device=loss.device)])
    dist.all_reduce(packed)
    return packed[0] / shard.world, bool(packed[1] > 0)


def gather_results(results: dict, shard: Shard) -> dict:
    """Merge every rank's {key: value} dict (values on the CPU); each rank gets the union."""
    if shard.world == 1:
        return results
    parts: list = [None] * shard.world
    dist.all_gather_object(parts, results)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def init_eval(device: torch.device) -> tuple[Shard, torch.device]:
    """Join torchrun's process group for a sharded evaluation (any number of processes);
    a plain single process gets SINGLE and its device back."""
    return init(device, global_batch=int(os.environ.get("WORLD_SIZE", "1")))


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
