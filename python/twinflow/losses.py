"""The TwinFlow training objective (docs/algorithm.md §3) for any PyTorch training loop.

The step is :func:`twinflow.objective.training_step` (Python makes the model calls and the
random draws, the Rust core's ``Plan`` does the arithmetic); this module keeps the teacher
(:class:`twinflow.ema.EmaTeacher`) and the last step's diagnostics.
The settings are declared once, in Rust: ``_core.LOSS_SETTINGS`` (name, type, default,
bounds, doc), shown in ``TwinFlowLoss.__doc__``. Conventions (call order, random draws,
dtypes): docs/training.md.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Sequence, Tuple

import torch

from ._core import LOSS_SETTINGS, STAT_NAMES, TwinFlowObjective, barron_loss, l2_loss, split_sub_batches, time_weight
from ._random import check_generator
from .ema import EmaTeacher
from .objective import training_step

__all__ = ["TwinFlowLoss", "EmaTeacher", "LOSS_SETTINGS", "barron_loss", "l2_loss", "split_sub_batches",
           "time_weight"]

_STATS = tuple(STAT_NAMES)


def _settings_doc() -> str:
    """One line per setting of ``LOSS_SETTINGS``: name, type, default, bounds, doc."""
    lines = []
    for s in LOSS_SETTINGS:
        b = s["bounds"]
        rng = ""
        if b is not None:
            lo, lo_open, hi = b
            rng = f"; {'(' if lo_open else '['}{lo}, {hi}]"
        choices = f"; one of {', '.join(map(repr, s['choices']))}" if s["choices"] else ""
        lines.append(f"    {s['name']} ({s['type']}, default {s['default']!r}{rng}{choices}): {s['doc']}.")
    return "\n".join(lines)


class TwinFlowLoss:
    """``loss = loss_fn(model, x, cond=None, uncond=None, teacher=None, generator=None)``.

    ``recipe`` is ``"twinflow"``, ``"rcgm"`` or ``"flow_matching"`` (docs/algorithm.md §3.7); keyword
    settings (``LOSS_SETTINGS``; defaults are the TwinFlow recipe's) override it:

{settings}

    ``model(x_t, t=t, tt=tt, c=cond_rows)`` must return the velocity. ``cond`` and
    ``uncond`` are lists of batch-first tensors; the guidance-enhanced target needs ``uncond``.
    The teacher is ``teacher=`` when given (used as is, its owner updates it), else a copy of
    ``model`` made on the first call: updated by EMA every call when 0 < ema_decay_rate < 1,
    frozen when it is 1; with 0 the online model itself (no copy) is the teacher. Settings
    whose terms never call a teacher (plain flow matching) make no copy. A trainer that
    keeps its own teacher binds it to ``loss_fn.ema`` (:meth:`EmaTeacher.bind`) and calls
    ``loss_fn.ema.update()`` itself; the loss then uses it without updating it.

    ``batch_calls`` (default True): independent no-grad calls of one step (the teacher's
    conditional and unconditional calls; the two distribution-matching calls) run as one
    call on the concatenated rows; set False for a model whose rows are not independent
    (BatchNorm in training mode).
    """

    # The settings are written out for type checkers and IDEs (None: the recipe's value);
    # tests/package/test_typed_surface.py checks them against LOSS_SETTINGS.
    def __init__(self, recipe: Literal["twinflow", "rcgm", "flow_matching"] = "twinflow", *,
                 batch_calls: bool = True, consistc_ratio: Optional[float] = None,
                 ema_decay_rate: Optional[float] = None, enhanced_ratio: Optional[float] = None,
                 enhanced_range: Optional[Tuple[float, float]] = None,
                 time_dist_ctrl: Optional[Tuple[float, float, float]] = None,
                 estimate_order: Optional[int] = None, loss: Optional[Literal["barron", "l2"]] = None,
                 barron_alpha: Optional[float] = None, barron_c: Optional[float] = None,
                 dist_match_cof: Optional[float] = None, use_image_free: Optional[bool] = None,
                 sub_batches: Optional[Dict[str, float]] = None) -> None:
        self._objective = TwinFlowObjective(
            recipe, consistc_ratio=consistc_ratio, ema_decay_rate=ema_decay_rate, enhanced_ratio=enhanced_ratio,
            enhanced_range=enhanced_range, time_dist_ctrl=time_dist_ctrl, estimate_order=estimate_order,
            loss=loss, barron_alpha=barron_alpha, barron_c=barron_c, dist_match_cof=dist_match_cof,
            use_image_free=use_image_free, sub_batches=sub_batches)
        self.recipe = recipe
        self.batch_calls = bool(batch_calls)
        self.ema = EmaTeacher(self._objective.ema_decay_rate)
        self._last: Optional[tuple] = None

    @property
    def teacher(self):
        """The teacher the loss calls (None until a copy is made, or when the online model is it)."""
        return self.ema.module

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
        check_generator(generator)  # one: the step's draws have many shapes, not one row each
        decay = None
        if teacher is None and self.ema.rate > 0 and self._objective.needs_teacher:
            if self.ema.module is None:
                if not isinstance(model, torch.nn.Module):
                    raise TypeError("an EMA or frozen teacher needs model to be a torch.nn.Module "
                                    "(or pass teacher=, or set ema_decay_rate=0)")
                self.ema.copy_model(model)
            if self.ema.owns_module:  # our copy: follows this call's model, updated every call
                self.ema.module.train(model.training)
                self.ema.online_params, self.ema.online_buffers = list(model.parameters()), list(model.buffers())
                decay = self.ema.update()
            teacher = self.ema.module
        loss, stats, calls = training_step(self._objective, model, x, cond, uncond, teacher, generator,
                                           self.batch_calls)
        self._last = (stats, calls, decay)
        return loss

    def ema_update(self, ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
        """One EMA update of ``ema_params`` towards ``params`` (in place) on this loss's warm-up
        schedule; returns the decay used. For callers that keep their own teacher and pass it
        as ``teacher=``; prefer binding it to ``self.ema`` (:meth:`EmaTeacher.bind`)."""
        return self.ema.schedule.update(list(ema_params), list(params))

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
        """``{"teacher": the copied teacher's weights or None, "ema_decay", "ema_updates", "config"}``."""
        return {**self.ema.state_dict(), "config": self.config}

    def load_state_dict(self, state: Dict[str, Any], model: Optional[torch.nn.Module] = None) -> None:
        """Restore the EMA state and teacher weights. The teacher module is rebuilt from
        ``model`` when given, else on the next call (from that call's model)."""
        self.ema.load_state_dict(state, model)


TwinFlowLoss.__doc__ = TwinFlowLoss.__doc__.format(settings=_settings_doc())
