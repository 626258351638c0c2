"""Ranks: who this process is, and the few collectives the engine needs. No-ops in one process.

The meters (epoch sums), the non-finite-loss check and the stop-on-signal decision go through
here, so that with several ranks they agree: every rank sees the same reduced numbers and
stops at the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_primary() -> bool:
    """The rank that writes files and prints (rank 0)."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (unchanged in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (the other dims equal on all ranks; the
    first may differ, e.g. after skipped images); itself alone without a process group."""
    if not active():
        return tensor
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(n) for n in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (a stop request, a non-finite loss)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).

    NCCL when this process has a GPU (then ``cuda:LOCAL_RANK`` becomes its device), gloo otherwise.
    Returns True when a group was created here (the caller then ends it with :func:`shutdown`).
    """
    import os

    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise :func:`any_rank` of several flags in one collective."""
    if not active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
