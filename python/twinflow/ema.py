"""The teacher of the TwinFlow objective: one type for every trainer.

``TwinFlowLoss`` owns one :class:`EmaTeacher`. By default it copies the model on the first
call and updates the copy on every call; ``twinflow train`` instead binds its own teacher
(a LoRA adapter, or a copy sharded like the model) with :meth:`EmaTeacher.bind` and updates
it once per optimizer step. The schedule and the update arithmetic are the Rust core's
(``_core.EmaSchedule``, src/train/ema.rs); docs/training.md § EMA.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ._core import EmaSchedule

__all__ = ["EmaTeacher"]


class EmaTeacher:
    """An EMA (0 < rate < 1) or frozen (rate = 1) teacher and its warm-up schedule.

    ``module`` is what the objective calls as the teacher; ``ema_params`` follow
    ``online_params`` by ``ema ← d·ema + (1 − d)·θ`` with the schedule's decay d, and
    ``ema_buffers`` copy ``online_buffers``. With rate = 0 there is no teacher (the online
    model is used) but the schedule still exists, so its state is saved like any other.
    """

    def __init__(self, rate: float) -> None:
        self.schedule = EmaSchedule(rate)
        self.module: Optional[Callable[..., Any]] = None
        #: whether this object made ``module`` (a copy of the model): then its weights are
        #: part of :meth:`state_dict`; a bound teacher's owner saves them itself.
        self.owns_module = False
        self.ema_params: Sequence[torch.Tensor] = ()
        self.online_params: Sequence[torch.Tensor] = ()
        self.ema_buffers: Sequence[torch.Tensor] = ()
        self.online_buffers: Sequence[torch.Tensor] = ()
        self._pending: Optional[Dict[str, torch.Tensor]] = None  # weights loaded before the copy exists

    @property
    def rate(self) -> float:
        return self.schedule.rate

    @property
    def frozen(self) -> bool:
        return self.rate >= 1.0

    def copy_model(self, model: torch.nn.Module) -> None:
        """Make the teacher a copy of ``model`` (without gradients), restoring weights loaded
        by :meth:`load_state_dict` before the copy existed."""
        teacher = copy.deepcopy(model).requires_grad_(False)
        if self._pending is not None:
            teacher.load_state_dict(self._pending)
            self._pending = None
        self.bind(teacher, list(teacher.parameters()), list(model.parameters()),
                  list(teacher.buffers()), list(model.buffers()))
        self.owns_module = True

    def bind(self, module: Callable[..., Any], ema_params: Sequence[torch.Tensor],
             online_params: Sequence[torch.Tensor], ema_buffers: Sequence[torch.Tensor] = (),
             online_buffers: Sequence[torch.Tensor] = ()) -> None:
        """Use ``module`` as the teacher, with these tensor pairs for the update (e.g. local
        FSDP2 shards, or the teacher adapter's LoRA weights). Its owner saves its weights."""
        if len(ema_params) != len(online_params) or len(ema_buffers) != len(online_buffers):
            raise ValueError(f"EmaTeacher.bind: {len(ema_params)} EMA parameters for {len(online_params)} "
                             f"online ones, {len(ema_buffers)} EMA buffers for {len(online_buffers)}")
        self.module, self.owns_module = module, False
        self.ema_params, self.online_params = list(ema_params), list(online_params)
        self.ema_buffers, self.online_buffers = list(ema_buffers), list(online_buffers)

    def update(self) -> Optional[float]:
        """One EMA step of the bound tensors; returns the decay used (None when frozen)."""
        if self.frozen:
            return None
        with torch.no_grad():
            decay = self.schedule.update(list(self.ema_params), [p.detach() for p in self.online_params])
            for b_ema, b in zip(self.ema_buffers, self.online_buffers):  # e.g. BatchNorm statistics
                b_ema.copy_(b)
        return decay

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self) -> Dict[str, Any]:
        """``{"teacher": weights of a copy this object made (else None), "ema_decay": d,
        "ema_updates": n}`` — the format TwinFlowLoss checkpoints have always used."""
        own = self.owns_module and isinstance(self.module, torch.nn.Module)
        return {"teacher": self.module.state_dict() if own else None,
                "ema_decay": self.schedule.decay, "ema_updates": self.schedule.updates}

    def load_state_dict(self, state: Dict[str, Any], model: Optional[torch.nn.Module] = None) -> None:
        """Restore the schedule and, for a copied teacher, its weights: into the copy, or a
        new copy of ``model``, or on the next :meth:`copy_model`. ``"teacher": None`` drops a
        copy (it is made again from the next call's model); a bound teacher stays bound."""
        self.schedule.load_state(float(state["ema_decay"]), int(state["ema_updates"]))
        weights = state.get("teacher")
        self._pending = None
        if weights is None:
            if self.owns_module:
                self.module, self.owns_module = None, False
            return
        if self.module is None:
            if model is None:
                self._pending = weights
                return
            self.copy_model(model)
        self.module.load_state_dict(weights)
