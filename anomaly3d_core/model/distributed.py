"""Multi-process training with DistributedDataParallel, under ``torchrun``.

``torchrun --nproc_per_node=N -m anomaly3d_core fit ...`` starts N ranks; each prepares the same
patches (same seed), trains on its shard of every epoch's shuffled batches, and DDP averages the
gradients, so every rank ends with the same weights. Rank 0 alone writes files and logs.
The backend is NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group ``torchrun`` describes in the environment (idempotent)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device | None:
    """This rank's GPU under torchrun, else ``None`` (let the config decide)."""
    if active() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
