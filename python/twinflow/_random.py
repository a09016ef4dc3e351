"""Random draws with diffusers' generator semantics (``diffusers.utils.torch_utils.randn_tensor``).

Every draw twinflow makes (sampler and scheduler noise, the training objective's times and
noises, the tutorials) goes through :func:`random_tensor`, so a generator behaves as it does in
a diffusers pipeline:

- a CPU generator with tensors on another device draws on the CPU and moves the result (the
  same numbers on every device, and ``torch.Generator().manual_seed(42)`` works with
  ``device="cuda"``);
- a generator on an accelerator cannot draw for another device: ValueError;
- a list of generators draws one row each (row i from generator i), a list of one is that
  generator.

With one generator on the tensors' own device (or none) the draw is exactly
``torch.randn(shape, generator=g, dtype=dtype, device=device)``: the same numbers as before.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]

__all__ = ["Generators", "check_generator", "draw_device", "random_tensor"]


def draw_device(generator: Optional[torch.Generator], device: torch.device) -> torch.device:
    """Where a draw for ``device`` with ``generator`` happens: the generator's device when it is
    the CPU, else ``device`` (ValueError when an accelerator's generator would serve another
    device)."""
    device = torch.device(device)
    if generator is None or generator.device.type == device.type:
        return device
    if generator.device.type == "cpu":
        return torch.device("cpu")
    raise ValueError(f"a generator on {generator.device} cannot draw a tensor for {device}: "
                     "give a CPU generator (its numbers are then the same on every device) or one "
                     f"on {device.type}")


def check_generator(generator: Generators, rows: Optional[int] = None) -> None:
    """TypeError unless ``generator`` is None, a ``torch.Generator`` or a list of them;
    ValueError when a list of several does not have one per row (``rows``; None: a list is
    refused, for draws of many shapes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) == 1 or (rows is not None and len(generator) == rows):
            return
        want = "one generator (its draws have many shapes)" if rows is None else f"one generator or {rows} (one per row)"
        raise ValueError(f"got a list of {len(generator)} generators, expected {want}")
    raise TypeError(f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}")


def _one(normal: bool, shape, generator, dtype, device) -> torch.Tensor:
    fn = torch.randn if normal else torch.rand
    where = draw_device(generator, device)
    out = fn(tuple(shape), generator=generator, dtype=dtype, device=where)
    return out if where == torch.device(device) else out.to(device)


def random_tensor(shape: Sequence[int], generator: Generators = None, *, dtype: torch.dtype,
                  device: Union[str, torch.device], normal: bool = True) -> torch.Tensor:
    """``torch.randn`` (``normal=False``: ``torch.rand``) of ``shape`` with diffusers' generator
    semantics (module docstring).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_tensor((2, 3), g, dtype=torch.float32, device="cpu").shape
        torch.Size([2, 3])
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            return _one(normal, shape, generator[0], dtype, device)
        if not shape or len(generator) != shape[0]:
            raise ValueError(f"a list of {len(generator)} generators draws one row each, but the tensor "
                             f"has shape {list(shape)}: give one generator per row (or a single one)")
        rows = [_one(normal, (1, *shape[1:]), g, dtype, device) for g in generator]
        return torch.cat(rows, 0)
    check_generator(generator)
    return _one(normal, shape, generator, dtype, device)
