"""Random draws follow diffusers' generator semantics (``randn_tensor``) in the sampler, the
scheduler and the loss: a CPU generator serves any device, a list draws one row each.

Without an accelerator, "another device" is ``meta`` (a CPU generator cannot draw there, as it
cannot on CUDA) and the draw site is recorded by a spy on ``torch.randn``/``torch.rand``.
"""

from __future__ import annotations

import pytest
import torch

from twinflow import TwinFlowLoss, UnifiedSampler
from twinflow._random import check_generator, draw_device, random_tensor

F32 = dict(dtype=torch.float32)


def test_one_generator_on_the_device_draws_as_torch_does():
    for normal, fn in [(True, torch.randn), (False, torch.rand)]:
        got = random_tensor((3, 4), torch.Generator().manual_seed(5), **F32, device="cpu", normal=normal)
        want = fn((3, 4), generator=torch.Generator().manual_seed(5), **F32)
        assert torch.equal(got, want)
    torch.manual_seed(9)
    a = random_tensor((2, 2), None, **F32, device="cpu")
    torch.manual_seed(9)
    assert torch.equal(a, torch.randn(2, 2))


def test_draw_device_follows_diffusers():
    cpu, cuda = torch.Generator(), torch.device("cuda")
    assert draw_device(cpu, cuda) == torch.device("cpu")  # drawn on the CPU, then moved
    assert draw_device(None, cuda) == cuda
    assert draw_device(cpu, "cpu") == torch.device("cpu")


def test_a_cpu_generator_draws_on_the_cpu_for_another_device(monkeypatch):
    sites = []
    real = torch.randn

    def spy(*args, **kwargs):
        sites.append(torch.device(kwargs["device"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    out = random_tensor((2, 3), torch.Generator().manual_seed(1), **F32, device="meta")
    assert out.device.type == "meta" and out.shape == (2, 3)
    assert sites == [torch.device("cpu")]


def test_a_list_of_generators_draws_one_row_each():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    out = random_tensor((3, 2, 2), gens, **F32, device="cpu")
    for i, s in enumerate((3, 4, 5)):
        assert torch.equal(out[i:i + 1], torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(s)))
    one = random_tensor((3, 2), [torch.Generator().manual_seed(3)], **F32, device="cpu")
    assert torch.equal(one, torch.randn((3, 2), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="one generator per row"):
        random_tensor((4, 2), gens, **F32, device="cpu")


def test_bad_generators_are_named():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        check_generator(42)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        check_generator([torch.Generator(), "x"], 2)
    with pytest.raises(ValueError, match="list of 2 generators"):
        check_generator([torch.Generator(), torch.Generator()])  # the loss takes one


def _velocity(x, t, tt):
    return 0.5 * x + t.view(-1, 1) - 0.2 * tt.view(-1, 1)


def test_sampler_rows_from_a_list_equal_rows_drawn_alone():
    """A batch sampled with one generator per row equals each row sampled alone with its own."""
    s = UnifiedSampler.preset("2-nfe")  # a stochastic step: noise is drawn
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    batch = s.sample(_velocity, noise, generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i in range(3):
        alone = s.sample(_velocity, noise[i:i + 1], generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(batch[i:i + 1], alone)
    with pytest.raises(ValueError, match="list of 2 generators"):
        s.sample(_velocity, noise, generator=[torch.Generator(), torch.Generator()])


def _spy(monkeypatch):
    """Records (shape, normal) of every draw made through twinflow._random.random_tensor."""
    import twinflow._random as r

    seen, real = [], r.random_tensor

    def spy(shape, generator=None, **kw):
        seen.append((tuple(shape), kw.get("normal", True)))
        return real(shape, generator, **kw)

    monkeypatch.setattr(r, "random_tensor", spy)
    return seen


def test_sampler_and_scheduler_draw_through_random_tensor(monkeypatch):
    """So they get its device handling (a CPU generator serves CUDA noise); same numbers."""
    from twinflow import TwinFlowScheduler

    s = UnifiedSampler.preset("4-nfe")  # stochastic steps
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    before = s.sample(_velocity, noise, generator=torch.Generator().manual_seed(1))
    seen = _spy(monkeypatch)
    after = s.sample(_velocity, noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before, after) and seen and all(shape == (2, 3) for shape, _ in seen)
    seen.clear()
    sch = TwinFlowScheduler.preset("4-nfe")
    sch.set_timesteps(4)
    x = noise
    for t in sch.timesteps:
        x = sch.step(0.5 * x, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert seen and all(shape == (2, 3) and normal for shape, normal in seen)


def test_every_draw_of_the_loss_goes_through_random_tensor(monkeypatch):
    """The loss's seven draws (docs/training.md, "Random draws") come from random_tensor, so
    they get its device handling; the numbers are those of torch.rand/randn with the generator."""
    def model(x, t, tt, c=None):
        return x * t.view(-1, 1) + tt.view(-1, 1)

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    before = TwinFlowLoss("twinflow", ema_decay_rate=0.0)(model, x, generator=torch.Generator().manual_seed(1))
    seen = _spy(monkeypatch)
    after = TwinFlowLoss("twinflow", ema_decay_rate=0.0)(model, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before, after)
    # t, the two time fractions, the fakes' noise (adv rows), the noise, τ and its noise (e2e rows)
    assert seen == [((8,), False), ((8,), False), ((8,), False), ((2, 2), True), ((8, 2), True),
                    ((2,), False), ((2, 2), True)], seen
