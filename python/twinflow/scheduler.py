"""TwinFlowScheduler: the UnifiedSampler as a diffusers scheduler (drop-in for
FlowMatchEulerDiscreteScheduler).

    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, stochast_ratio=1.0)

Every model evaluation is one `step`, computed by the Rust core's stepper (the same code as
``UnifiedSampler.sample``); the noise of stochastic steps is drawn here. Order 2 duplicates
timesteps like FlowMatchHeunDiscreteScheduler, so a pipeline calls its transformer 2n − 1
times. Keys of a FlowMatchEuler config that do not apply here (shift, use_dynamic_shifting,
...) are ignored, and with ``time_grid="ucgm"`` the sigmas/mu that pipelines pass are ignored
too.

Reproducibility: stochastic steps draw from ``generator`` when `step` gets one. Stock
pipelines (QwenImage, ZImage, SD3) never pass it, so otherwise the scheduler seeds one
generator per row from a hash of that row of the first sample it steps (the initial latents,
drawn from the pipeline's generator): the same pipeline seed gives the same image every run,
and an image does not depend on the other images of its batch (with one generator per image,
``generator=[...]``, batching prompts gives the images of one-prompt calls).

Presets by step count: ``preset_for_steps(n)`` maps 1 → "1-nfe", 2 → "2-nfe", ≥ 3 → "4-nfe"
(docs/algorithm.md §2 table); ``scheduler_for_steps(n)`` is that preset as a scheduler, and
``TwinFlowPresetScheduler`` re-applies the mapping at every ``set_timesteps`` (what
``twinflow.load_pipeline`` installs).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ._core import SAMPLER_SETTINGS, SamplerSettings, Stepper
from . import _random

__all__ = ["TwinFlowScheduler", "TwinFlowSchedulerOutput", "TwinFlowPresetScheduler", "preset_for_steps",
           "scheduler_for_steps"]

_TIME_GRIDS = ("ucgm", "pipeline")
# Types, defaults and ranges of the sampler settings come from the Rust core's declaration.
_SETTING = {s["name"]: s for s in SAMPLER_SETTINGS}
_DEFAULT = {name: s["default"] for name, s in _SETTING.items()}
_MAX_STEPS = int(_SETTING["sampling_steps"]["max"])


def _is_step_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= _MAX_STEPS

# Which TwinFlowScheduler a patched transformer last read tt from (diffusers_patch calls
# ``_note_tt_read``), per thread: `step` refuses to advance when the model read another one's.
_READS = threading.local()


def _reads() -> Tuple[int, Optional[weakref.ref]]:
    return getattr(_READS, "count", 0), getattr(_READS, "last", None)


@dataclass
class TwinFlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class TwinFlowScheduler(SchedulerMixin, ConfigMixin):
    """UCGM unified sampling (docs/algorithm.md §2) for flow-matching pipelines.

    Args:
        num_train_timesteps: timestep scale of the pipeline (``timesteps = t · scale``).
        stochast_ratio, extrapol_ratio, sampling_order, time_dist_ctrl, rfba_gap_steps,
        sampling_style: as for :class:`twinflow.UnifiedSampler`.
        time_grid: ``"ucgm"`` (the UnifiedSampler grid for ``num_inference_steps``) or
            ``"pipeline"``: the sigmas (or timesteps) passed to ``set_timesteps``, unchanged; a
            pipeline that passes neither (``StableDiffusion3Pipeline``) gets its own schedule,
            the sigmas ``FlowMatchEulerDiscreteScheduler`` with this config (``shift``,
            ``use_dynamic_shifting`` and the like kept from ``from_config``; its defaults
            otherwise) would use for ``num_inference_steps`` (and ``mu``).

    A transformer patched with ``diffusers_patch`` reads ``tt`` from this scheduler (wired
    with ``diffusers_patch.set_target_time``); ``step`` raises ValueError when the model call
    before it read another TwinFlowScheduler's ``tt`` (a scheduler swapped in after wiring the
    transformer to the old one).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        stochast_ratio: Union[float, str] = _DEFAULT["stochast_ratio"],
        extrapol_ratio: float = _DEFAULT["extrapol_ratio"],
        sampling_order: int = _DEFAULT["sampling_order"],
        time_dist_ctrl: Sequence[float] = _DEFAULT["time_dist_ctrl"],
        rfba_gap_steps: Sequence[float] = _DEFAULT["rfba_gap_steps"],
        sampling_style: str = _DEFAULT["sampling_style"],
        time_grid: str = "ucgm",
    ):
        if time_grid not in _TIME_GRIDS:
            raise ValueError(f"time_grid: expected one of {_TIME_GRIDS}, got {time_grid!r}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: must be a positive int, got {num_train_timesteps!r}")
        self._sampler(1)  # validates every sampler setting now, naming the field
        # Lists, as JSON gives them back: a saved and reloaded config equals the original.
        self.register_to_config(time_dist_ctrl=[float(v) for v in time_dist_ctrl],
                                rfba_gap_steps=[float(v) for v in rfba_gap_steps])
        self.tt = torch.zeros(1, dtype=torch.float32)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.num_inference_steps: Optional[int] = None
        self._stepper: Optional[Stepper] = None
        self._begin_index: Optional[int] = None
        self._generator: Optional[List[torch.Generator]] = None
        self._started = False
        self._evals: List[tuple] = []
        self._reads_seen = 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "TwinFlowScheduler":
        """A published preset ("1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step") as a
        scheduler; pass its step count as the pipeline's num_inference_steps."""
        settings = SamplerSettings.preset(name).to_dict()
        settings.pop("sampling_steps")
        settings.update(overrides)
        return cls(**settings)

    def _sampler(self, steps: int) -> SamplerSettings:
        c = self.config
        return SamplerSettings(
            sampling_steps=steps, stochast_ratio=c.stochast_ratio, extrapol_ratio=c.extrapol_ratio,
            sampling_order=c.sampling_order, time_dist_ctrl=tuple(c.time_dist_ctrl),
            rfba_gap_steps=tuple(c.rfba_gap_steps), sampling_style=c.sampling_style)

    @property
    def step_index(self) -> Optional[int]:
        """Index of the next model evaluation (None before the first step)."""
        return self._stepper.position if self._started else None

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        """Build the evaluation schedule. ``mu`` (dynamic shifting) matters only with
        ``time_grid="pipeline"`` when the pipeline passes no sigmas (the stock schedule)."""
        scale = self.config.num_train_timesteps
        if self.config.time_grid == "pipeline":
            if sigmas is None and timesteps is not None:
                sigmas = [float(t) / scale for t in timesteps]
            if sigmas is None:
                sigmas = self._stock_sigmas(num_inference_steps, mu)
            grid = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
            while grid and grid[-1] == 0.0:  # a trailing terminal 0 is implied
                grid.pop()
            stepper = Stepper(self._sampler(max(1, len(grid))), grid)
        else:
            steps = num_inference_steps
            if steps is None:
                given = sigmas if sigmas is not None else timesteps
                if given is None:
                    raise ValueError("num_inference_steps: required (or pass sigmas/timesteps)")
                steps = len(given)
            if not _is_step_count(steps):
                raise ValueError(f"num_inference_steps: must be an int in [1, {_MAX_STEPS}], got {steps!r}")
            stepper = Stepper(self._sampler(steps))
        evals = stepper.evals
        eval_t = torch.tensor([e.t for e in evals], dtype=torch.float64)
        self._stepper = stepper
        self._evals = evals
        self.timesteps = (eval_t * scale).to(dtype=torch.float32, device=device)
        self.sigmas = torch.cat([eval_t, eval_t.new_zeros(1)]).to(torch.float32)
        self.num_inference_steps = len(evals)
        self._begin_index = None
        self._started = False
        self._generator = None
        self._reads_seen = _reads()[0]
        device = torch.device(device) if device is not None else self.tt.device
        if self.tt.device != device:
            # A new tensor: wire transformers with set_target_time(transformer, scheduler), which
            # reads scheduler.tt at every call, to follow the move.
            self.tt = self.tt.to(device)
        self.tt.fill_(evals[0].tt)

    def _stock_sigmas(self, num_inference_steps: Optional[int], mu: Optional[float]) -> List[float]:
        """The sigmas FlowMatchEulerDiscreteScheduler with this config would run (the
        pipeline's own schedule when it passes no sigmas), without the terminal 0."""
        import inspect

        from diffusers import FlowMatchEulerDiscreteScheduler

        n = num_inference_steps
        if not _is_step_count(n):
            raise ValueError(f'time_grid="pipeline": without sigmas or timesteps, num_inference_steps must be an int '
                             f"in [1, {_MAX_STEPS}], got {n!r}")
        known = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
        stock = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in self.config.items() if k in known})
        if stock.config.use_dynamic_shifting and mu is None:
            raise ValueError('time_grid="pipeline": the config asks for dynamic shifting but the pipeline passed no mu')
        stock.set_timesteps(n, mu=mu)
        return [float(s) for s in stock.sigmas[:-1]]

    def _note_tt_read(self) -> None:
        _READS.count = _reads()[0] + 1
        _READS.last = weakref.ref(self)

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep, dtype=schedule.dtype, device=schedule.device)
        hits = (schedule == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t)} is not one of the scheduler's timesteps")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             **unused) -> Union[TwinFlowSchedulerOutput, Tuple[torch.Tensor]]:
        """One model evaluation of the sampler: returns the sample for the next call (the
        final sample after the last one)."""
        if self._stepper is None:
            raise ValueError("set_timesteps must be called before step")
        count, last = _reads()
        if count != self._reads_seen and last is not None and last() is not self:
            raise ValueError("TwinFlowScheduler.step: the transformer read its target time tt from another "
                             "TwinFlowScheduler, not this one (was the scheduler swapped after wiring?). Wire it "
                             "to the pipeline: diffusers_patch.set_target_time(pipe.transformer, pipe) "
                             "(what twinflow.load_pipeline does), or to this scheduler")
        self._reads_seen = count
        if not self._started:
            start = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            self._stepper.position = start
            self._started = True
        if generator is None and self._generator is None:  # one per row: rows independent of their batch
            self._generator = [torch.Generator(device=sample.device).manual_seed(_seed_of(sample[i:i + 1]))
                               for i in range(sample.shape[0])]
        # Work in at least float32 (as FlowMatchEuler does); return the model's dtype.
        work = torch.promote_types(sample.dtype, torch.float32)
        k = self._stepper.position
        eps = None
        if k < len(self._evals) and self._evals[k].noise:
            eps = _random.random_tensor(sample.shape, generator if generator is not None else self._generator,
                                dtype=work, device=sample.device)
        prev = self._stepper.step(sample.to(work), model_output.to(work), eps)
        prev = prev.to(model_output.dtype)
        k = self._stepper.position
        if k < len(self._evals):
            self.tt.fill_(self._evals[k].tt)
        if not return_dict:
            return (prev,)
        return TwinFlowSchedulerOutput(prev_sample=prev)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = σ·noise + (1 − σ)·sample, σ = timestep / num_train_timesteps."""
        sigma = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype)
        sigma = (sigma / self.config.num_train_timesteps).flatten()
        while sigma.dim() < sample.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# Presets by step count (docs/algorithm.md §2 table); twinflow.load_pipeline installs TwinFlowPresetScheduler.

def preset_for_steps(steps: int) -> str:
    """The published preset for a step count: 1 → "1-nfe", 2 → "2-nfe", ≥ 3 → "4-nfe"."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
    return {1: "1-nfe", 2: "2-nfe"}.get(steps, "4-nfe")


def scheduler_for_steps(steps: int, **overrides) -> TwinFlowScheduler:
    """A TwinFlowScheduler with the preset of `steps` (``preset_for_steps``); keywords override
    its settings. Pass the same `steps` as the pipeline's num_inference_steps."""
    return TwinFlowScheduler.preset(preset_for_steps(steps), **overrides)


def _preset_step_settings(steps: int) -> dict:
    # The 1/2/4-NFE presets differ only in these two settings (docs/algorithm.md §2 table).
    s = SamplerSettings.preset(preset_for_steps(steps)).to_dict()
    return {"stochast_ratio": s["stochast_ratio"], "rfba_gap_steps": [float(v) for v in s["rfba_gap_steps"]]}


class TwinFlowPresetScheduler(TwinFlowScheduler):
    """A TwinFlowScheduler whose ``stochast_ratio`` and ``rfba_gap_steps`` follow the published
    preset of each call's step count (``preset_for_steps``); the other settings (style, order,
    extrapolation, time warp) are its config's. One object for every step count, so a
    transformer wired to it stays wired. (Its own ``stochast_ratio``/``rfba_gap_steps`` are
    replaced at every ``set_timesteps``.)"""

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        steps = num_inference_steps
        if steps is None:  # QwenImage/ZImage pipelines pass only sigmas (one per step)
            given = sigmas if sigmas is not None else timesteps
            steps = len(given) if given is not None else None
        if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
            self.register_to_config(**_preset_step_settings(steps))
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def _seed_of(sample: torch.Tensor) -> int:
    """A seed from all values of `sample` (the initial latents)."""
    data = sample.detach().to("cpu", torch.float32).contiguous()
    return int.from_bytes(hashlib.blake2b(data.numpy().tobytes(), digest_size=8).digest(), "little") >> 1
