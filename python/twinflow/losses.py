"""The TwinFlow training objective (SPEC §3) for any PyTorch training loop.

The loss itself runs in the Rust core (``twinflow._core.TwinFlowObjective``); this module
only keeps the teacher module (an EMA or frozen copy of the model) and its state.
Conventions (call order, random draws, dtypes): docs/training.md.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch

from ._core import TwinFlowObjective, barron_loss, l2_loss, split_sub_batches, time_weight

__all__ = ["TwinFlowLoss", "barron_loss", "l2_loss", "split_sub_batches", "time_weight"]

_STATS = ("loss", "base", "dist_match", "e2e", "mul", "any", "adv")


class TwinFlowLoss:
    """``loss = loss_fn(model, x, cond=None, uncond=None, teacher=None, generator=None)``.

    ``recipe`` is ``"twinflow"``, ``"rcgm"`` or ``"flow_matching"`` (SPEC §3.7); keyword
    settings override it: consistc_ratio, ema_decay_rate, enhanced_ratio, enhanced_range,
    time_dist_ctrl, estimate_order, loss ("barron" | "l2"), barron_alpha, barron_c,
    dist_match_cof, use_image_free, sub_batches ({"e2e", "mul", "any", "adv"} weights).

    ``model(x_t, t=t, tt=tt, c=cond_rows)`` must return the velocity. ``cond`` and
    ``uncond`` are lists of batch-first tensors; the guidance-enhanced target needs ``uncond``.
    The teacher is ``teacher=`` when given (used as is, its owner updates it), else a copy of
    ``model`` made on the first call: updated by EMA every call when 0 < ema_decay_rate < 1,
    frozen when it is 1; with 0 the online model itself (no copy) is the teacher. Settings
    whose terms never call a teacher (plain flow matching) make no copy.
    """

    def __init__(self, recipe: str = "twinflow", **settings: Any) -> None:
        self._objective = TwinFlowObjective(recipe, **settings)
        self.recipe = recipe
        self.teacher: Optional[torch.nn.Module] = None
        self._last: Optional[tuple] = None
        self._pending_teacher: Optional[Dict[str, torch.Tensor]] = None  # from load_state_dict

    @property
    def uses_teacher(self) -> bool:
        """Whether these settings ever call a teacher (so a copy or adapter must be kept)."""
        return bool(self._objective.needs_teacher)

    @property
    def config(self) -> Dict[str, Any]:
        """The effective settings (recipe plus overrides)."""
        return self._objective.to_dict()

    def __repr__(self) -> str:
        return f"TwinFlowLoss(recipe={self.recipe!r}, {self.config})"

    def __call__(self, model, x: torch.Tensor, cond: Optional[Sequence[torch.Tensor]] = None,
                 uncond: Optional[Sequence[torch.Tensor]] = None, teacher=None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        decay = None
        if teacher is None and self._objective.ema_decay_rate > 0 and self._objective.needs_teacher:
            if self.teacher is None:
                if not isinstance(model, torch.nn.Module):
                    raise TypeError("an EMA or frozen teacher needs model to be a torch.nn.Module "
                                    "(or pass teacher=, or set ema_decay_rate=0)")
                self.teacher = copy.deepcopy(model).requires_grad_(False)
                if self._pending_teacher is not None:
                    self.teacher.load_state_dict(self._pending_teacher)
                    self._pending_teacher = None
            self.teacher.train(model.training)
            if self._objective.ema_decay_rate < 1:
                decay = self._ema_update(model)
            teacher = self.teacher
        loss, stats, calls = self._objective(model, x, cond, uncond, teacher, generator)
        self._last = (stats, calls, decay)
        return loss

    def ema_update(self, ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
        """One EMA update of ``ema_params`` towards ``params`` (in place) on this loss's warm-up
        schedule; returns the decay used. For callers that keep their own teacher and pass it
        as ``teacher=`` (a LoRA adapter, FSDP shards): the schedule and ``state_dict()`` are the
        same as with the internal teacher."""
        return self._objective.ema_update(list(ema_params), list(params))

    def _ema_update(self, model: torch.nn.Module) -> float:
        decay = self.ema_update(self.teacher.parameters(), model.parameters())
        with torch.no_grad():  # buffers (e.g. BatchNorm statistics) follow the model
            for b_ema, b in zip(self.teacher.buffers(), model.buffers()):
                b_ema.copy_(b)
        return decay

    @property
    def last_stats(self) -> Dict[str, Any]:
        """Diagnostics of the last call: the loss and its terms, the mean L·w of each run
        (NaN for an empty run), the number of model calls and the EMA decay used (None
        without an internal EMA update). Reading it synchronises with the device."""
        if self._last is None:
            return {}
        stats, calls, decay = self._last
        out: Dict[str, Any] = dict(zip(_STATS, stats.tolist()))
        out["model_calls"] = calls
        out["ema_decay"] = decay
        return out

    def state_dict(self) -> Dict[str, Any]:
        decay, updates = self._objective.ema_state
        return {
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "ema_decay": decay,
            "ema_updates": updates,
            "config": self.config,
        }

    def load_state_dict(self, state: Dict[str, Any], model: Optional[torch.nn.Module] = None) -> None:
        """Restore the EMA state and teacher weights. The teacher module is rebuilt from
        ``model`` when given, else on the next call (from that call's model)."""
        self._objective.ema_state = (float(state["ema_decay"]), int(state["ema_updates"]))
        weights = state.get("teacher")
        self._pending_teacher = None
        if weights is None:
            self.teacher = None
            return
        if self.teacher is None:
            if model is None:
                self._pending_teacher = weights
                return
            self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.teacher.load_state_dict(weights)
