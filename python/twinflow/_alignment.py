"""Loaded weights in torch's own memory layout, so the same weights give the same bits.

diffusers and transformers hand back the tensors that safetensors maps from the file: each
starts wherever its bytes lie in that file, so its address modulo 64 depends on the file
layout (single file or shards, which tensors precede it, the header's length). The CPU
kernels (oneDNN/MKL GEMM, vectorised reductions) take a different path for the unaligned
head of a buffer, so the same weights at another alignment can give results that differ in
the last bit. A tensor torch allocates itself is 64-byte aligned (c10's CPU allocator), so
a model built in memory, its saved-and-reloaded copy and its sharded copy only agree bit for
bit once every loaded tensor is moved into such memory: ``align_module`` does that (docs/
decisions.md, "Loaded weights are realigned").

Only CPU tensors that are misaligned or non-contiguous are copied, one at a time, so the peak
cost is one tensor; aligned tensors, GPU tensors, meta tensors and tensor subclasses (e.g.
quantized weights) are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ALIGNMENT", "align_module", "is_aligned"]

#: c10's CPU allocator alignment (bytes): where torch puts every tensor it allocates itself.
ALIGNMENT = 64


def is_aligned(t: torch.Tensor) -> bool:
    """Whether `t` needs no copy: not a plain dense CPU tensor, or contiguous at an address that
    is a multiple of ``ALIGNMENT`` (an empty tensor is always aligned)."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or t.layout != torch.strided:
        return True
    return t.numel() == 0 or (t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0)


def align_module(module: nn.Module) -> int:
    """Move each misaligned or non-contiguous CPU parameter and buffer of `module` into freshly
    allocated (aligned, contiguous) memory, keeping the Parameter objects (optimisers, hooks and
    ties see the same objects) and their values; returns how many tensors were copied.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     m.weight.data = torch.zeros(7)[1:7].view(2, 3)  # an address 4 bytes past aligned
        >>> align_module(m), m.weight.data_ptr() % ALIGNMENT
        (1, 0)
    """
    copied: dict = {}  # tied weights: one copy per shared tensor

    def fresh(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copied:
            copied[key] = t.detach().clone(memory_format=torch.contiguous_format)
        return copied[key]

    with torch.no_grad():
        for sub in module.modules():
            for p in sub._parameters.values():
                if p is not None and not is_aligned(p):
                    p.data = fresh(p)
            for name, b in list(sub._buffers.items()):
                if b is not None and not is_aligned(b):
                    sub._buffers[name] = fresh(b)
    return len(copied)
