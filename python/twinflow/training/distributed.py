"""PyTorch's own distributed engine: torchrun's environment, DDP and FSDP2 (``fully_shard``)."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (one all-reduce)."""
        if not self.enabled:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t)
        return t.item() == 0.0

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); a plain
    process is a world of one. NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world: int, lora: bool) -> str:
    """none | ddp | fsdp for this run: one process needs no wrapper; auto picks FSDP2 for full
    fine-tuning and DDP for LoRA."""
    if world == 1:
        return "none"
    if strategy == "none":
        raise ValueError(f"training.strategy: 'none' cannot run on {world} processes (use auto, ddp or fsdp)")
    if strategy == "auto":
        return "ddp" if lora else "fsdp"
    return strategy


def shard(module: nn.Module, transformer: nn.Module, block_attrs, *, reshard_root: bool = False) -> nn.Module:
    """FSDP2: each transformer block is a unit, then the root (the rest). A module that never
    runs backward (the EMA teacher) needs ``reshard_root``: FSDP2 keeps the root unsharded
    until the next backward, so forward passes would miss in-place updates of its shards."""
    from torch.distributed.fsdp import fully_shard

    for attr in block_attrs:
        for block in getattr(transformer, attr, ()):
            fully_shard(block)
    return fully_shard(module, reshard_after_forward=True if reshard_root else None)


def wrap(module: nn.Module, strategy: str, d: Dist, *, transformer: nn.Module, block_attrs) -> nn.Module:
    """The module to train: itself (one process), DDP, or sharded in place with FSDP2."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The transformers' buffers (positional tables) never change: no per-call broadcast.
        return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)
    if strategy == "fsdp":
        return shard(module, transformer, block_attrs)
    return module


def no_grad_sync(model: nn.Module, strategy: str, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches before the last one."""
    if sync or strategy == "none":
        return contextlib.nullcontext()
    if strategy == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2; set back by the next synced micro-batch

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return restore()

