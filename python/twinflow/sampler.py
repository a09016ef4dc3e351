"""UnifiedSampler: the UCGM sampler, as a short Python loop over the Rust core's stepper.

Noise → image in one function (``UnifiedSampler.sample``): for every model evaluation of the
schedule, call the model here, draw the noise here (``torch.randn`` with your generator), and
let ``twinflow._core.Stepper.step`` do the update (x̂/ẑ estimates, noise mixing,
extrapolation, the Heun corrector; ``src/stepper.rs`` and ``src/update.rs``). The settings,
with their types, defaults and ranges, are declared once in the Rust core and listed in
``twinflow._core.SAMPLER_SETTINGS``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Literal, Optional, Tuple, Union

import torch

from ._core import SAMPLER_SETTINGS, SamplerSettings, Stepper
from . import _random
from ._random import Generators, check_generator

__all__ = ["UnifiedSampler"]

# The settings that shape the samples (constructor arguments, in order) and the run-time switches.
_SAVED = [s["name"] for s in SAMPLER_SETTINGS if s["saved"]]
_SWITCHES = [s["name"] for s in SAMPLER_SETTINGS if not s["saved"]]


class UnifiedSampler:
    # The docstring is filled in from SAMPLER_SETTINGS below; the signature is written out for
    # type checkers and IDEs, and tests/package/test_typed_surface.py checks it against that table.

    def __init__(self, sampling_steps: int = 20, stochast_ratio: Union[float, Literal["SDE"]] = 0.0,
                 extrapol_ratio: float = 0.0, sampling_order: int = 1,
                 time_dist_ctrl: Tuple[float, float, float] = (1.0, 1.0, 1.0),
                 rfba_gap_steps: Tuple[float, float] = (0.0, 0.0),
                 sampling_style: Literal["few", "mul", "any"] = "few", *,
                 use_fused_kernel: bool = True, check_finite: bool = True) -> None:
        self._settings = SamplerSettings(
            sampling_steps=sampling_steps, stochast_ratio=stochast_ratio, extrapol_ratio=extrapol_ratio,
            sampling_order=sampling_order, time_dist_ctrl=time_dist_ctrl, rfba_gap_steps=rfba_gap_steps,
            sampling_style=sampling_style, use_fused_kernel=use_fused_kernel, check_finite=check_finite)

    @classmethod
    def _of(cls, settings: SamplerSettings) -> "UnifiedSampler":
        sampler = cls.__new__(cls)
        sampler._settings = settings
        return sampler

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "UnifiedSampler":
        """A published preset ("1-nfe", "2-nfe", "4-nfe", "any-step", "multi-step"), optionally
        with settings overridden by keyword."""
        return cls._of(SamplerSettings.preset(name, **overrides))

    def sample(self, model: Callable[..., torch.Tensor], noise: torch.Tensor,
               generator: Generators = None, progress: bool = False,
               return_trajectory: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """Draw samples from ``noise`` with ``model(x_t, t=t, tt=tt, **model_kwargs)``, the
        velocity at x_t (t and tt: shape [B], noise's dtype and device).

        Returns x̂ of the last interval (noise's shape, dtype and device), or with
        ``return_trajectory=True`` the stack [noise, x̂_0, …, x̂_{n−1}]. Stochastic steps draw
        ``torch.randn(..., generator=generator)`` as diffusers does (``randn_tensor``): a CPU generator
        serves noise on any device, a list of generators draws one row each; ``progress`` shows
        a tqdm bar.
        """
        stepper = Stepper(self._settings)
        stepper.check_noise(noise)
        check_generator(generator, noise.shape[0])
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        batch, like = (noise.shape[0],), dict(dtype=noise.dtype, device=noise.device)
        trajectory = None
        if return_trajectory:  # row i + 1 receives x̂ of interval i
            trajectory = noise.new_empty((len(stepper.grid), *noise.shape))
            trajectory[0] = noise
        x = noise
        with _progress_bar(progress, self.nfe) as bar:
            for e in stepper.evals:
                velocity = model(x, t=torch.full(batch, e.t, **like), tt=torch.full(batch, e.tt, **like),
                                 **model_kwargs)
                eps = _random.random_tensor(noise.shape, generator, **like) if e.noise else None
                xhat = trajectory[e.interval + 1] if trajectory is not None and not e.corrector else None
                x = stepper.step(x, velocity, eps, xhat)
                bar.update(1)
        return trajectory if trajectory is not None else x

    def sampling_loop(self, inital_noise_z: torch.Tensor, sampling_model: Callable[..., torch.Tensor],
                      **kwargs: Any) -> torch.Tensor:
        """The published call shape: ``sampling_loop(noise, model, sampling_steps=..., ...,
        **model_kwargs)``. Sampler settings given here override this sampler's for this call
        (``generator`` and ``progress`` are passed on); returns the trajectory."""
        overrides = {k: kwargs.pop(k) for k in _SAVED if k in kwargs}
        run = dict(generator=kwargs.pop("generator", None), progress=bool(kwargs.pop("progress", False)))
        sampler = self._of(self._settings.replace(**overrides))
        return sampler.sample(sampling_model, inital_noise_z, return_trajectory=True, **run, **kwargs)

    @property
    def timesteps(self) -> torch.Tensor:
        """The time grid t_0 > … > t_n = 0 (float64)."""
        return self._settings.timesteps

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return self._settings.nfe

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a dict (keyword arguments of the constructor)."""
        return self._settings.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def _setting_property(spec: Dict[str, Any]) -> property:
    name = spec["name"]

    def get(self: UnifiedSampler) -> Any:
        return self._settings.get(name)

    def set_switch(self: UnifiedSampler, value: Any) -> None:
        self._settings = self._settings.replace(**{name: value})

    # The settings that shape the samples are read-only; the run-time switches are writable.
    return property(get, None if spec["saved"] else set_switch, doc=spec["doc"])


def _progress_bar(show: bool, total: int):
    """A tqdm bar, or a stand-in that does nothing (both are context managers)."""
    if not show:
        return _NO_BAR
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="nfe")


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, n: int) -> None:
        pass


_NO_BAR = _NoBar()


def _describe(spec: Dict[str, Any]) -> str:
    default = spec["default"]
    return (f"    {spec['name']} ({spec['type']}, default {default!r}): {spec['doc']} "
            f"Must be {spec['range']}.")


for _spec in SAMPLER_SETTINGS:
    setattr(UnifiedSampler, _spec["name"], _setting_property(_spec))

UnifiedSampler.__doc__ = "\n".join([
    "UCGM unified sampler: ``sample(model, noise)`` runs the model once per evaluation of its",
    "schedule (``nfe`` in all) over the time grid ``timesteps``.",
    "",
    "Args:",
    *(_describe(s) for s in SAMPLER_SETTINGS if s["saved"]),
    "",
    "Run-time switches (keywords here, writable attributes later):",
    *(_describe(s) for s in SAMPLER_SETTINGS if not s["saved"]),
    "",
    "Example:",
    "    >>> s = UnifiedSampler.preset(\"2-nfe\")",
    "    >>> x0 = s.sample(model, torch.randn(4, 16, 64, 64), generator=torch.Generator().manual_seed(0))",
])
