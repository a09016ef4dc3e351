"""One TwinFlow training step (docs/algorithm.md §3, conventions in docs/training.md).

:func:`training_step` is the whole step as a short Python function: it makes the model calls
(independent no-grad calls batched into one) and the random draws (``torch.rand``/``randn``
with the caller's generator, diffusers' semantics, in the documented order), and hands the
tensors to the Rust core's parts (``twinflow._core.Plan``), which do the arithmetic: times,
one-step fakes, noisy inputs, the guidance-enhanced and RCGM targets, the weighted loss and
distribution matching. So a researcher can step through it, and a profiler or
``torch.compile`` sees every model call.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import _core
from ._core import Plan, TwinFlowObjective
from . import _random
from ._random import Generators

__all__ = ["training_step"]

Rows = Tuple[int, int]
# One part of a model call: its rows of the batch and whether it sees the unconditional
# conditioning (else the conditional one).
Part = Tuple[Rows, bool]



class _Calls:
    """The model and the teacher behind the step: casts inputs to x's dtype, slices the
    conditioning to each part's rows, checks outputs, counts calls."""

    def __init__(self, model: Callable, teacher: Optional[Callable], cond, uncond, dtype: torch.dtype,
                 batch: bool) -> None:
        self.model, self.teacher = model, teacher if teacher is not None else model
        self.cond, self.uncond = cond, uncond
        self.dtype, self.batch = dtype, batch
        self.count = 0

    def _rows(self, part: Part):
        (start, stop), unconditional = part
        lst = self.uncond if unconditional else self.cond
        return None if lst is None else [c[start:stop] for c in lst]

    def _invoke(self, net: Callable, x, t, tt, c) -> torch.Tensor:
        self.count += 1
        out = net(x, t=t, tt=tt, c=c)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__}")
        return out

    def __call__(self, teacher: bool, x, t, tt, parts: List[Part]) -> torch.Tensor:
        """One call of the model (or the teacher) on the parts' rows, laid one after another."""
        net = self.teacher if teacher else self.model
        x, t, tt = x.to(self.dtype), t.to(self.dtype), tt.to(self.dtype)
        pieces = [self._rows(p) for p in parts]
        joined, c = _join(pieces)
        if joined:
            out = self._invoke(net, x, t, tt, c)
        else:  # the parts' conditioning cannot be concatenated: one call each
            sizes = [stop - start for (start, stop), _ in parts]
            outs = []
            for xi, ti, tti, ci in zip(x.split(sizes), t.split(sizes), tt.split(sizes), pieces):
                outs.append(_checked(self._invoke(net, xi, ti, tti, ci), xi))
            out = torch.cat(outs)
        return _checked(out, x)

    def independent(self, teacher: bool, inputs: List[tuple]) -> List[torch.Tensor]:
        """Independent no-grad calls ``(x, t, tt, part)``, one output each: one call on the
        concatenated inputs when batching."""
        with torch.no_grad():
            if not self.batch or len(inputs) < 2:
                return [self(teacher, x, t, tt, [part]) for x, t, tt, part in inputs]
            x, t, tt = (torch.cat([i[k] for i in inputs]) for k in range(3))
            out = self(teacher, x, t, tt, [i[3] for i in inputs])
            return list(out.split([i[0].shape[0] for i in inputs]))


def _checked(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if out.shape != x.shape:
        raise ValueError(f"model returned a tensor of shape {list(out.shape)}, expected {list(x.shape)} "
                         "(the shape of x_t)")
    return out


def _join(pieces):
    """(True, the parts' conditioning lists joined row-wise) when they can be — all None, or
    lists of equal length whose tensors agree in trailing shape, dtype and device — else
    (False, None)."""
    if all(p is None for p in pieces):
        return True, None
    if any(p is None for p in pieces) or len({len(p) for p in pieces}) != 1:
        return False, None
    out = []
    for items in zip(*pieces):
        first = items[0]
        if any(i.dim() == 0 or i.shape[1:] != first.shape[1:] or i.dtype != first.dtype
               or i.device != first.device for i in items):
            return False, None
        out.append(torch.cat(items))
    return True, out


def _gamma(plan: Plan, a: float, n: int, rand, randn) -> torch.Tensor:
    """Gamma(a) of n values by Marsaglia–Tsang rejection (each round: a normal, then a uniform
    per pending row); a < 1 through Gamma(a + 1)·U^(1/a)."""
    if a < 1.0:
        g = _gamma(plan, a + 1.0, n, rand, randn)
        return plan.gamma_boost(g, rand(n), a)
    out, pending = plan.gamma_start(n)
    for _ in range(_core.GAMMA_MAX_ROUNDS):  # the Rust walk's own bound (src/train/time.rs)
        m = pending.shape[0]
        if m == 0:
            return out
        pending = plan.gamma_round(out, pending, randn(m), rand(m), a)
    raise ValueError("Gamma sampling did not converge (check time_dist_ctrl)")


def training_step(objective: TwinFlowObjective, model: Callable, x: torch.Tensor,
                  cond: Optional[Sequence[torch.Tensor]] = None, uncond: Optional[Sequence[torch.Tensor]] = None,
                  teacher: Optional[Callable] = None, generator: Generators = None,
                  batch_calls: bool = True) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """One step of ``objective``'s loss on batch ``x``: ``(loss, stats, model_calls)``, the
    stats in ``STAT_NAMES`` order. ``model(x_t, t=t, tt=tt, c=cond_rows)`` returns the
    velocity; ``teacher`` (same signature) serves the teacher's terms, the model when None.
    ``twinflow.TwinFlowLoss`` keeps the teacher and calls this."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if teacher is not None and not callable(teacher):
        raise TypeError(f"teacher must be callable, got {type(teacher).__name__}")
    plan = objective.plan(x, cond, uncond)
    cond = None if cond is None else list(cond)
    uncond = None if uncond is None else list(uncond)
    calls = _Calls(model, teacher, cond, uncond, x.dtype, batch_calls)
    ck, dev, B, rest = plan.compute_dtype, x.device, plan.rows, tuple(x.shape[1:])
    rand = lambda n: _random.random_tensor((n,), generator, dtype=ck, device=dev, normal=False)  # noqa: E731
    randn_ck = lambda n: _random.random_tensor((n,), generator, dtype=ck, device=dev)  # noqa: E731
    noise = lambda n: _random.random_tensor((n, *rest), generator, dtype=x.dtype, device=dev)  # noqa: E731
    everything: Rows = (0, B)

    # §3.1, draws 1–3: t (uniform, or Beta from two Gamma draws), then two uniforms.
    b1, b2, _ = plan.time_dist_ctrl
    if b1 == 1.0 and b2 == 1.0:
        raw = rand(B)
    else:
        raw = plan.beta_ratio(_gamma(plan, b1, B, rand, randn_ck), _gamma(plan, b2, B, rand, randn_ck))
    t, tt = plan.times(raw, rand(B), rand(B))

    # Call 1, draw 4: one-step fakes z' − F(z', 1, 0) on the fake rows.
    rows = plan.fake_rows
    if rows is None:
        data = plan.with_fakes(x)
    else:
        n = rows[1] - rows[0]
        z = noise(n)
        with torch.no_grad():
            f1 = calls(False, z, torch.ones(n, dtype=ck, device=dev), torch.zeros(n, dtype=ck, device=dev),
                       [(rows, False)])
        data = plan.with_fakes(x, z, f1)

    # Draw 5: x_t and the plain target (the adv rows' times become −t).
    x_t, target = plan.noisy_inputs(data, noise(B), t, tt)

    # Call 2: the prediction, the only call autograd records.
    f = calls(False, x_t, t, tt, [(everything, False)]).to(ck)
    fd = f.detach()

    # Calls 3, 4: the teacher's conditional and unconditional velocities (§3.3).
    rows = plan.enhance_rows(uncond is not None)
    if rows is not None:
        xs, ts = x_t[rows[0]:rows[1]], t[rows[0]:rows[1]]
        v_c, v_u = calls.independent(True, [(xs, ts, ts, (rows, False)), (xs, ts, ts, (rows, True))])
        plan.enhance(target, t, v_c, v_u)

    # Calls 5 … 4+N: the RCGM walk (§3.4), each call from the last one's output.
    rcgm = plan.rcgm(x_t, target, fd, t, tt)
    if rcgm is not None:
        walk, from_teacher = rcgm
        with torch.no_grad():
            while (inputs := walk.next()) is not None:
                xk, s, s_next = inputs
                walk.give(calls(from_teacher, xk, s, s_next, [(plan.rcgm_rows, False)]).to(ck))
        plan.set_rcgm_target(target, walk)

    lw, base = plan.weighted_loss(f, target, t, tt)

    # Draws 6, 7 and the last two calls: distribution matching on the e2e rows (§3.6).
    dm = None
    if plan.dist_matching:
        e2e = plan.runs[0]
        n = e2e[1] - e2e[0]
        tau = rand(n)
        with torch.no_grad():
            x_tau = plan.dist_matching_input(x_t, f, t, tau, noise(n))
            v_fake, v_real = calls.independent(False, [(x_tau, -tau, -tau, (e2e, False)), (x_tau, tau, tau, (e2e, False))])
        dm = plan.dist_matching_term(f, v_fake, v_real)

    loss, stats = plan.finish(base, dm, lw)
    return loss, stats, calls.count
