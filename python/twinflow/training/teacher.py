"""The teacher TwinFlowLoss calls (SPEC §3.2), kept by the trainer and passed as ``teacher=``.

- full fine-tuning: an EMA copy of the model (sharded like it under FSDP2);
- LoRA ("old adapter" scheme): a second, frozen peft adapter ``teacher`` on the same frozen
  base, switched in for the teacher's calls, so the base weights are never copied;
- ema_decay_rate = 0: none (the online model is the teacher, as in TwinFlowLoss).

The EMA itself is TwinFlowLoss's (``loss_fn.ema_update``, its warm-up schedule and state):
once per optimizer step, before the teacher is used; emd = 1 freezes the initial copy.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import List, Optional

import torch
from torch import nn

from .models import adapter_to_float32

TEACHER_ADAPTER, ONLINE_ADAPTER = "teacher", "default"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class Teacher:
    def __init__(self, module, ema_params: List[torch.Tensor], online_params: List[torch.Tensor], rate: float):
        self.module = module
        self.ema_params = [_local(p) for p in ema_params]
        self.online_params = [_local(p) for p in online_params]
        self.rate = rate

    def update(self, loss_fn) -> Optional[float]:
        if self.rate >= 1.0:  # frozen initial copy
            return None
        with torch.no_grad():
            return loss_fn.ema_update(self.ema_params, [p.detach() for p in self.online_params])


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


def make_teacher(loss_fn, model: nn.Module, *, lora: bool) -> Optional[Teacher]:
    """The teacher for these loss settings, built from the unwrapped model before it is
    wrapped (DDP) or sharded (FSDP2); a full copy must then be bound with ``bind_full``.
    None when the online model is the teacher or no teacher is ever called."""
    rate = float(loss_fn.config["ema_decay_rate"])
    if rate <= 0.0 or not loss_fn.uses_teacher:
        return None
    if lora:
        transformer = model.transformer
        cfg = transformer.peft_config[ONLINE_ADAPTER]
        with warnings.catch_warnings():  # a second adapter is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(copy.deepcopy(cfg), adapter_name=TEACHER_ADAPTER)
        adapter_to_float32(transformer, TEACHER_ADAPTER)
        transformer.set_adapter(ONLINE_ADAPTER)
        ema, online = lora_pairs(transformer)
        with torch.no_grad():
            for e, o in zip(ema, online):
                e.copy_(o)
                e.requires_grad_(False)
        return Teacher(_AdapterTeacher(model, transformer), ema, online, rate)
    copy_ = copy.deepcopy(model).requires_grad_(False)
    return Teacher(copy_, [], [], rate)


def bind_full(teacher: Teacher, model: nn.Module, shard_fn=None) -> None:
    """Full fine-tuning: pair the copy's parameters with the model's, after both are sharded."""
    if shard_fn is not None:
        teacher.module = shard_fn(teacher.module)
    teacher.ema_params = [_local(p) for p in teacher.module.parameters()]
    teacher.online_params = [_local(p) for p in model.parameters()]
