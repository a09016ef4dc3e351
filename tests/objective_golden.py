"""Recorded outputs of ``TwinFlowLoss`` (loss, diagnostics, gradients, model calls) for the three
recipes and the settings that change its control flow, so a rewrite of how the step is driven
(issue 20: Python drives the model calls and draws, Rust the arithmetic) is checked bit for bit
against what the package computed before it.

    python tests/objective_golden.py          # records tests/data/objective_golden.safetensors

The file records where it was made (CPU model, torch version, threads): on that kind of machine
tests/training/test_objective_golden.py compares exactly; elsewhere within float rounding (reductions may
run in another order on another CPU's vector units).
"""

from __future__ import annotations

import json
import pathlib
import platform

import torch

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "objective_golden.safetensors"

# name: (recipe, settings, dtype, with uncond, batch_calls, calls made in a row)
CASES = {
    "twinflow": ("twinflow", dict(ema_decay_rate=0.0), torch.float32, True, True, 1),
    "twinflow_unbatched": ("twinflow", dict(ema_decay_rate=0.0), torch.float32, True, False, 1),
    "twinflow_ema_teacher": ("twinflow", {}, torch.float32, True, True, 2),
    "twinflow_frozen_teacher": ("twinflow", dict(ema_decay_rate=1.0), torch.float32, True, True, 2),
    "twinflow_no_uncond": ("twinflow", dict(ema_decay_rate=0.0), torch.float32, False, True, 1),
    "twinflow_beta_times": ("twinflow", dict(ema_decay_rate=0.0, time_dist_ctrl=(0.7, 1.3, 0.9), estimate_order=3,
                                             loss="l2", enhanced_range=(0.0, 1.5)), torch.float32, True, True, 1),
    "twinflow_image_free": ("twinflow", dict(ema_decay_rate=1.0, use_image_free=True), torch.float32, True, True, 1),
    "twinflow_float64": ("twinflow", dict(ema_decay_rate=0.0), torch.float64, True, True, 1),
    "rcgm": ("rcgm", dict(ema_decay_rate=0.0), torch.float32, True, True, 1),
    "flow_matching": ("flow_matching", {}, torch.float32, True, True, 1),
}


class Net(torch.nn.Module):
    """A tiny conditional conv net: F(x, t, tt, c=[labels]); label 10 is the null class."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1).to(dtype)
        self.emb = torch.nn.Embedding(11, 2).to(dtype)
        self.time = torch.nn.Linear(2, 2).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)

    def forward(self, x, t, tt, c=None):
        h = self.conv(x)
        h = h + self.time(torch.stack([t, tt], 1))[:, :, None, None]
        if c is not None:
            h = h + self.emb(c[0])[:, :, None, None]
        return torch.tanh(h) + 0.5 * x


def run_case(name, loss_cls=None):
    """{tensor name: tensor} of one case: per call i, loss_i, stats_i, calls_i and the gradients."""
    if loss_cls is None:
        from twinflow import TwinFlowLoss as loss_cls
    recipe, settings, dtype, with_uncond, batch, repeats = CASES[name]
    model = Net(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 2, 4, 4, generator=g, dtype=dtype)
    labels = torch.arange(11) % 10
    loss_fn = loss_cls(recipe, batch_calls=batch, **settings)
    out = {}
    for i in range(repeats):
        loss = loss_fn(model, x, cond=[labels], uncond=[torch.full_like(labels, 10)] if with_uncond else None,
                       generator=g)
        loss.backward()
        s = loss_fn.last_stats
        out[f"loss_{i}"] = loss.detach().reshape(1)
        out[f"stats_{i}"] = torch.tensor([s[k] for k in ("loss", "base", "dist_match", "e2e", "mul", "any", "adv")],
                                         dtype=torch.float64)
        out[f"calls_{i}"] = torch.tensor([s["model_calls"]])
        with torch.no_grad():  # then a plain SGD step, so a teacher copy and the model differ
            for n, p in model.named_parameters():
                out[f"grad_{i}.{n}"] = p.grad.detach().clone()
                p -= 0.5 * p.grad
                p.grad = None
    return out


def machine():
    cpu = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__}


def record():
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors = {f"{name}/{k}": v.contiguous() for name in CASES for k, v in run_case(name).items()}
    GOLDEN.parent.mkdir(exist_ok=True)
    save_file(tensors, str(GOLDEN), metadata={"machine": json.dumps(machine()), "threads": "1"})
    print(f"wrote {len(tensors)} tensors of {len(CASES)} cases to {GOLDEN}")


if __name__ == "__main__":
    record()
