"""Train the MNIST UNet with ``TwinFlowLoss`` (recipes twinflow | rcgm | flow_matching).

One ``torch.Generator`` drives everything random (data order, label dropout, the loss's
draws), and it is saved with the checkpoint, so a resumed run continues exactly where an
uninterrupted one would be (same thread count and device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ... import __version__
from ...losses import LOSS_SETTINGS, TwinFlowLoss
from .checkpoint import load_train_state, load_weights, read_config, save_checkpoint, shipped_checkpoint
from .data import load_mnist
from .unet import MnistUNet

__all__ = ["TrainSettings", "train", "parse_duration", "METHODS", "to_model_input"]

METHODS = ("twinflow", "rcgm", "flow_matching")
LR_SCHEDULES = ("constant", "cosine")
_BUDGET_KEYS = ("epochs", "max_steps", "time_budget", "checkpoint_every")  # may change on resume


@dataclass
class TrainSettings:
    method: str = "twinflow"
    epochs: int = 10
    max_steps: Optional[int] = None        # stop after this many optimizer steps in all
    time_budget: Optional[float] = None    # seconds of training in all (resumes add up)
    batch_size: int = 128
    lr: float = 1e-3
    label_dropout: float = 0.1             # rows trained as unconditional (null label)
    ema_decay: float = 0.999               # sampling weights; warm-up (1+n)/(10+n)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    train_subset: Optional[int] = None     # first N training images (tests, quick looks)
    network: Dict[str, Any] = field(default_factory=lambda: {"width": 16, "mults": [1, 2, 4]})
    loss_overrides: Dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None        # start network and EMA from this checkpoint (fine-tuning)
    lr_schedule: str = "constant"          # "constant", or "cosine" from lr to 0 over lr_decay_steps
    lr_decay_steps: Optional[int] = None   # the cosine's length in this run's steps (then lr stays 0)
    lr_decay_start: int = 0                # constant lr before this step, then the cosine

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if (self.lr_schedule == "cosine") != (self.lr_decay_steps is not None):
            raise ValueError("lr_decay_steps goes with lr_schedule 'cosine' (its length) and only with it, got "
                             f"lr_schedule {self.lr_schedule!r}, lr_decay_steps {self.lr_decay_steps!r}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be >= 1, got {self.lr_decay_steps}")
        if self.lr_decay_start < 0 or (self.lr_decay_start and self.lr_schedule != "cosine"):
            raise ValueError(f"lr_decay_start must be >= 0 and goes with lr_schedule 'cosine', got lr_decay_start "
                             f"{self.lr_decay_start}, lr_schedule {self.lr_schedule!r}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(f"train_subset ({self.train_subset}) must be >= batch_size ({self.batch_size})")
        known = [s["name"] for s in LOSS_SETTINGS]
        unknown = sorted(set(self.loss_overrides) - set(known))
        if unknown:
            raise ValueError(f"loss_overrides: no loss setting named {', '.join(map(repr, unknown))}; "
                             f"the settings are {', '.join(known)}")


def lr_at(s: TrainSettings, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based, this run's own steps): a pure
    function of the step, so a resumed run follows the same schedule. The cosine's length and
    start are settings of their own, not ``max_steps``, which may change on resume; before
    ``lr_decay_start`` the lr is constant, so a constant-lr run's checkpoint at that step is also
    this schedule's."""
    if s.lr_schedule == "constant" or step < s.lr_decay_start:
        return s.lr
    k = min(step - s.lr_decay_start, s.lr_decay_steps)
    return 0.5 * s.lr * (1.0 + math.cos(math.pi * k / s.lr_decay_steps))


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h' → seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m:
        raise ValueError(f"time budget: expected a duration like 600, 90s, 10m or 1.5h, got {text!r}")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise ValueError(f"time budget must be > 0, got {text!r}")
    return value


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float [N, 1, 28, 28] in [−1, 1], channels-last (3× faster convs on CPU)."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last)


def _optimizer_state(opt: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, flat: Dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


class _Run:
    """Model, EMA copy, optimizer, loss and generator of one training run."""

    def __init__(self, s: TrainSettings, device: torch.device):
        torch.manual_seed(s.seed)
        self.model = MnistUNet(**s.network).to(device).to(memory_format=torch.channels_last)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        self.loss_fn = TwinFlowLoss(recipe=s.method, **s.loss_overrides)
        self.gen = torch.Generator(device=device).manual_seed(s.seed)
        self.perm: Optional[torch.Tensor] = None
        self.progress = {"step": 0, "epoch": 0, "position": 0, "elapsed_s": 0.0, "images": 0}

    def init_from(self, source: Path) -> Dict[str, Any]:
        """Online weights and EMA from a trained checkpoint's sampling weights (its EMA, what
        its samples and metrics came from); returns what the run's config records of it."""
        base = read_config(source)
        net = json.loads(json.dumps(self.model.config))
        if base["network"] != net:
            diff = sorted(k for k in set(net) | set(base["network"]) if net.get(k) != base["network"].get(k))
            pairs = ", ".join(f"{k}: {base['network'].get(k)!r} there, {net.get(k)!r} here" for k in diff)
            raise ValueError(f"--init-from {source}: its network differs from this run's ({pairs}); "
                             "train with the same network settings (e.g. --width)")
        weights = load_weights(source, self.model)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(weights[k])
                self.ema[k].copy_(weights[k])
        progress = base.get("progress", {})
        # A base that was itself fine-tuned brings its whole budget along.
        spent = base.get("total") or {"steps": progress.get("step", 0), "images": progress.get("images", 0),
                                      "elapsed_s": progress.get("elapsed_s", 0.0)}
        return {"path": str(source), "method": base.get("method"), "steps": int(spent["steps"]),
                "images": int(spent["images"]), "elapsed_s": float(spent["elapsed_s"]),
                "command": base.get("command")}

    def ema_update(self, decay: float) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].lerp_(v, 1.0 - decay)
                else:
                    self.ema[k].copy_(v)

    def state(self) -> Dict[str, torch.Tensor]:
        out = {f"online.{k}": v for k, v in self.model.state_dict().items()}
        out.update(_optimizer_state(self.opt))
        teacher = self.loss_fn.state_dict()["teacher"]
        if teacher is not None:
            out.update({f"teacher.{k}": v for k, v in teacher.items()})
        out["rng.generator"] = self.gen.get_state()
        if self.perm is not None:
            out["data.perm"] = self.perm
        return out

    def restore(self, flat: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor], info: Dict[str, Any]) -> None:
        self.model.load_state_dict({k[7:]: v for k, v in flat.items() if k.startswith("online.")})
        self.ema = {k: v.to(self.ema[k].device) for k, v in ema.items()}
        _load_optimizer_state(self.opt, flat)
        teacher = {k[8:]: v for k, v in flat.items() if k.startswith("teacher.")}
        self.loss_fn.load_state_dict({"teacher": teacher or None, **info["loss_state"]}, model=self.model)
        self.gen.set_state(flat["rng.generator"])
        self.perm = flat.get("data.perm")
        self.progress = dict(info["progress"])


def _resume(run: _Run, out: Path, s: TrainSettings) -> bool:
    if not (out / "config.json").is_file():
        return False
    config = read_config(out)
    saved = config.get("settings", {})
    fixed = {k: v for k, v in dataclasses.asdict(s).items() if k not in _BUDGET_KEYS}
    # A setting added after the checkpoint was written reads as its default there.
    defaults = {f.name: json.loads(json.dumps(getattr(TrainSettings(), f.name))) for f in dataclasses.fields(s)}
    diff = [k for k, v in fixed.items() if json.loads(json.dumps(v)) != saved.get(k, defaults[k])]
    if diff:
        raise ValueError(f"{out} holds a checkpoint trained with other settings ({', '.join(diff)}); "
                         "use another --output-dir or the same settings to resume")
    flat = load_train_state(out)
    if flat is None:
        raise ValueError(f"{out}: checkpoint has no train_state.safetensors, cannot resume")
    from safetensors.torch import load_file
    run.restore(flat, load_file(str(out / "model.safetensors")), config)
    return True


def _init_from(run: _Run, out: Path, s: TrainSettings, resumed: bool) -> Optional[Dict[str, Any]]:
    """The base checkpoint's record; its weights are loaded only on a fresh start (a resumed
    run already holds fine-tuned weights, restored from its own checkpoint)."""
    if s.init_from is None:
        return None
    source = shipped_checkpoint(s.init_from)
    if source.resolve() == out.resolve():
        raise ValueError(f"--init-from {s.init_from}: that is the output directory itself; "
                         "a run in it continues by running its own command again")
    if resumed:
        return read_config(out).get("init_from")
    return run.init_from(source)


def train(settings: TrainSettings, output_dir, data_dir=None, device="cpu", resume: bool = True,
          progress: bool = True, on_step: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Train (or resume) into `output_dir`; returns the final config.json content.

    Stops at ``epochs``, ``max_steps`` or ``time_budget``, whichever comes first, and on
    KeyboardInterrupt — each time after writing a checkpoint. ``images``/``labels`` replace
    the MNIST training set (tests)."""
    from tqdm.auto import tqdm

    s = settings
    s.validate()
    device = torch.device(device)
    out = Path(output_dir)
    if images is None:
        images, labels = load_mnist("train", data_dir)
    if s.train_subset is not None:
        images, labels = images[: s.train_subset], labels[: s.train_subset]
    data = to_model_input(images).to(device)
    labels = labels.to(device)
    n = data.shape[0]
    if n < s.batch_size:
        raise ValueError(f"batch_size {s.batch_size} is larger than the training set ({n} images)")
    steps_per_epoch = n // s.batch_size

    run = _Run(s, device)
    resumed = resume and _resume(run, out, s)
    base = _init_from(run, out, s, resumed)
    null = run.model.null_labels(s.batch_size, device)
    p = run.progress
    total = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)

    def config(status: str) -> Dict[str, Any]:
        extra = {}
        if base is not None:  # the whole budget, the base model's training included
            extra = {"init_from": base, "total": {"steps": base["steps"] + p["step"],
                                                  "images": base["images"] + p["images"],
                                                  "elapsed_s": round(base["elapsed_s"] + p["elapsed_s"], 2)}}
        return {"network": run.model.config, "settings": dataclasses.asdict(s), "method": s.method,
                "progress": dict(p), **extra, "status": status, "steps_per_epoch": steps_per_epoch,
                "loss_state": {k: v for k, v in run.loss_fn.state_dict().items() if k in ("ema_decay", "ema_updates")},
                "loss_config": run.loss_fn.config, "twinflow_version": __version__}

    def checkpoint(status: str) -> Dict[str, Any]:
        cfg = config(status)
        save_checkpoint(out, run.ema, cfg, run.state())
        return cfg

    def budget_left() -> bool:
        if p["step"] >= total:
            return False
        return s.time_budget is None or p["elapsed_s"] < s.time_budget

    bar = tqdm(total=total, initial=p["step"], desc=f"mnist {s.method}", disable=not progress,
               unit="step", dynamic_ncols=True)
    log = (out / "log.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    status = "running"
    run.model.train()
    stop = _StopRequest()
    try:
        while budget_left():
            if stop.requested:  # only here, between whole steps: the checkpoint holds no half step
                raise KeyboardInterrupt(stop.requested)
            if run.perm is None or p["position"] + s.batch_size > n:
                if run.perm is not None:
                    p["epoch"] += 1
                p["position"] = 0
                run.perm = torch.randperm(n, generator=run.gen, device=device)
            t0 = time.perf_counter()
            idx = run.perm[p["position"]: p["position"] + s.batch_size]
            p["position"] += s.batch_size
            x, y = data[idx], labels[idx]
            drop = torch.rand(s.batch_size, generator=run.gen, device=device) < s.label_dropout
            y = torch.where(drop, null, y)
            loss = run.loss_fn(run.model, x, cond=[y], uncond=[null], generator=run.gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {p['step']}; the last "
                                         f"checkpoint in {out} is the last good state")
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in run.opt.param_groups:
                group["lr"] = lr_at(s, p["step"])
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
            run.opt.step()
            p["step"] += 1
            p["images"] += s.batch_size
            run.ema_update(min(s.ema_decay, (1 + p["step"]) / (10 + p["step"])))
            p["elapsed_s"] += time.perf_counter() - t0
            stats = run.loss_fn.last_stats
            bar.set_postfix(loss=f"{stats['loss']:.4f}", epoch=p["epoch"], refresh=False)  # this step's
            bar.update(1)
            if p["step"] % 25 == 0 or p["step"] == 1:
                with open(log, "a") as f:
                    f.write(json.dumps({"step": p["step"], "elapsed_s": round(p["elapsed_s"], 2),
                                        **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}) + "\n")
            if on_step is not None:
                on_step(p["step"], stats)
            if p["step"] % s.checkpoint_every == 0:
                checkpoint("running")
        status = "finished"
    except KeyboardInterrupt:
        # A second signal forces a stop mid-step: then keep the last periodic checkpoint.
        status = "interrupted" if not stop.forced else "aborted"
        raise
    finally:
        bar.close()
        try:
            # Not after an error: the weights may be what made the loss non-finite.
            if status in ("finished", "interrupted"):
                checkpoint(status)
        finally:
            stop.restore()  # after the save: a signal during it only sets the flag
    return config(status) | {"resumed": resumed}


class _StopRequest:
    """SIGTERM (a job scheduler, ``kill``) and Ctrl-C ask the loop to stop after the step in
    progress, which then checkpoints and raises KeyboardInterrupt: a signal never splits a
    step, so resuming equals an uninterrupted run. A second signal stops at once, without
    a checkpoint (the previous one stays). Only in the main thread, where Python allows
    signal handlers; elsewhere the defaults stay."""

    def __init__(self):
        import signal
        import threading

        self.requested: Optional[str] = None
        self.forced = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.requested is not None:
            self.forced = True
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name} (second)")
        self.requested = f"signal {signal.Signals(signum).name}"

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
