"""The teacher TwinFlowLoss calls (docs/algorithm.md §3.2) in ``twinflow train``: the loss's own
:class:`twinflow.ema.EmaTeacher` (``loss_fn.ema``), bound here to

- full fine-tuning: an EMA copy of the model (sharded like it under FSDP2);
- LoRA ("old adapter" scheme): a second, frozen peft adapter ``teacher`` on the same frozen
  base, switched in for the teacher's calls, so the base weights are never copied;
- ema_decay_rate = 0: none (the online model is the teacher, as in TwinFlowLoss).

The trainer updates it once per optimizer step (``loss_fn.ema.update()``), before the
teacher is used; emd = 1 freezes the initial copy. Its schedule is saved with
``loss_fn.state_dict()``; its weights by the trainer (``transformer_ema``, ``lora_teacher``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Optional

import torch
from torch import nn

from ..ema import EmaTeacher
from .models import adapter_to_float32

TEACHER_ADAPTER, ONLINE_ADAPTER = "teacher", "default"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class _AdapterTeacher:
    """Calls the (unwrapped) model with the teacher adapter active."""

    def __init__(self, model: nn.Module, transformer: nn.Module):
        self.model, self.transformer = model, transformer

    @contextlib.contextmanager
    def active(self):
        # peft's set_adapter also flips requires_grad; the flags are restored before backward.
        self.transformer.set_adapter(TEACHER_ADAPTER)
        try:
            yield
        finally:
            self.transformer.set_adapter(ONLINE_ADAPTER)

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.model(*args, **kwargs)


def lora_pairs(transformer: nn.Module):
    """(teacher adapter params, online adapter params), matched by name."""
    params = dict(transformer.named_parameters())
    tag_t, tag_o = f".{TEACHER_ADAPTER}.", f".{ONLINE_ADAPTER}."
    online = sorted(k for k in params if tag_o in k and "lora_" in k)
    return [params[k.replace(tag_o, tag_t)] for k in online], [params[k] for k in online]


def make_teacher(loss_fn, model: nn.Module, *, lora: bool) -> Optional[EmaTeacher]:
    """Bind ``loss_fn.ema`` to the teacher for these loss settings, built from the unwrapped
    model before it is wrapped (DDP) or sharded (FSDP2); a full copy must then be re-bound
    with ``bind_full``. Returns it; None when the online model is the teacher or no teacher
    is ever called."""
    ema = loss_fn.ema
    if ema.rate <= 0.0 or not loss_fn.uses_teacher:
        return None
    if lora:
        transformer = model.transformer
        cfg = transformer.peft_config[ONLINE_ADAPTER]
        with warnings.catch_warnings():  # a second adapter is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(copy.deepcopy(cfg), adapter_name=TEACHER_ADAPTER)
        adapter_to_float32(transformer, TEACHER_ADAPTER)
        transformer.set_adapter(ONLINE_ADAPTER)
        ema_params, online = lora_pairs(transformer)
        with torch.no_grad():
            for e, o in zip(ema_params, online):
                e.copy_(o)
                e.requires_grad_(False)
        ema.bind(_AdapterTeacher(model, transformer), [_local(p) for p in ema_params], [_local(p) for p in online])
    else:
        ema.bind(copy.deepcopy(model).requires_grad_(False), [], [])
    return ema


def bind_full(teacher: EmaTeacher, model: nn.Module, shard_fn=None) -> None:
    """Full fine-tuning: pair the copy's parameters with the model's (local shards), after
    both are sharded. Buffers are not paired: the trainer's models keep none that change."""
    module = teacher.module if shard_fn is None else shard_fn(teacher.module)
    teacher.bind(module, [_local(p) for p in module.parameters()], [_local(p) for p in model.parameters()])
