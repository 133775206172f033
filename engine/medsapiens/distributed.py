"""Several processes under `torchrun --nproc_per_node N`: the one torch.distributed set-up that `train` (DDP) and
`detect` (each process its share of the images) share.

torchrun says who a process is in the environment (WORLD_SIZE, RANK, LOCAL_RANK); without it there is one
process and nothing here imports torch.
"""
from __future__ import annotations

import os
from datetime import timedelta


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup(device, timeout: timedelta | None = None) -> tuple[int, int]:
    """(rank, world size), joining torchrun's process group on the first call: NCCL when `device` is a GPU one
    and CUDA is there (each process on its own GPU), gloo otherwise. ITK (the atlas's registration) then takes as
    many threads as torch (torchrun's OMP_NUM_THREADS, 1 by default), so N processes share the cores instead of
    each taking all of them. timeout: how long a collective waits for the slowest process (torch's default,
    30 min, where None)."""
    world = world_size()
    if world == 1:
        return 0, 1
    import SimpleITK as sitk
    import torch

    if not torch.distributed.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group("nccl" if gpu else "gloo", **({"timeout": timeout} if timeout else {}))
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(torch.get_num_threads())
    return torch.distributed.get_rank(), world


def process_device(device):
    """The device this process computes on: under torchrun with GPUs, its own (cuda:LOCAL_RANK) unless told cpu;
    otherwise `device` as given."""
    if world_size() == 1 or device == "cpu":
        return device
    import torch

    return f"cuda:{local_rank()}" if torch.cuda.is_available() else device


def gather(value) -> list:
    """Every process's `value` (picklable), on every process, in rank order."""
    import torch

    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def barrier() -> None:
    import torch

    torch.distributed.barrier()


def leave() -> None:
    """Wait for every process, then leave the process group (its threads end before the interpreter does)."""
    import torch

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
