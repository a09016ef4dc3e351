"""twinflow.ema.EmaTeacher: the one teacher type of TwinFlowLoss, the MNIST trainer and
``twinflow train`` (schedule and update arithmetic from the Rust core)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from twinflow import TwinFlowLoss
from twinflow._core import EmaSchedule
from twinflow.ema import EmaTeacher


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).double()


def test_copy_update_follows_the_warmup_schedule():
    model = _net()
    ema = EmaTeacher(0.99)
    ema.copy_model(model)
    assert ema.owns_module and ema.module is not model
    assert not any(p.requires_grad for p in ema.module.parameters())
    expected_d, d = [], 0.0
    for step in range(4):
        expected_d.append(d)
        d = d + (1 - d) * (0.99 - d) / 2
        before = [p.detach().clone() for p in ema.module.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
            model[1].running_mean.add_(1.0)
        got = ema.update()
        assert got == pytest.approx(expected_d[-1], abs=1e-12)
        for b, e, p in zip(before, ema.module.parameters(), model.parameters()):
            torch.testing.assert_close(e, got * b + (1 - got) * p.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean, rtol=0, atol=0)
    assert (ema.schedule.decay, ema.schedule.updates) == (pytest.approx(d), 4)


def test_frozen_teacher_never_moves():
    model = _net()
    ema = EmaTeacher(1.0)
    ema.copy_model(model)
    init = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update() is None
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, init[k])


def test_bound_teacher_is_used_by_the_loss_and_updated_only_by_its_owner():
    """``twinflow train``'s way: bind tensors the owner chose; the loss calls the module as
    the teacher without updating it, and its state_dict keeps no weights of it."""
    model = torch.nn.Linear(2, 2).double()
    teacher = copy.deepcopy(model).requires_grad_(False)
    calls = []

    def teacher_fn(x, t, tt, c=None):
        calls.append(x.shape[0])
        return teacher(x)

    loss_fn = TwinFlowLoss(ema_decay_rate=0.9)
    loss_fn.ema.bind(teacher_fn, list(teacher.parameters()), list(model.parameters()))
    before = copy.deepcopy(teacher.state_dict())
    x = torch.randn(8, 2, dtype=torch.float64)
    loss_fn(lambda x, t, tt, c=None: model(x), x, generator=torch.Generator().manual_seed(0))
    assert calls, "the bound teacher was not called"
    assert loss_fn.last_stats["ema_decay"] is None
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), "the loss updated a bound teacher"
    assert loss_fn.ema.update() == 0.0  # the owner's update: the first copies the weights
    state = loss_fn.state_dict()
    assert state["teacher"] is None and (state["ema_decay"], state["ema_updates"]) == (pytest.approx(0.45), 1)
    # restoring a schedule keeps the binding
    loss_fn.load_state_dict({"teacher": None, "ema_decay": 0.7, "ema_updates": 9})
    assert loss_fn.teacher is teacher_fn and (loss_fn.ema.schedule.decay, loss_fn.ema.schedule.updates) == (0.7, 9)


def test_state_dict_in_the_format_checkpoints_have_always_used():
    """{"teacher", "ema_decay", "ema_updates", "config"} — written by main before EmaTeacher
    existed — loads into a fresh loss, the copy being made from the next call's model."""
    model = _net()
    old = {"teacher": {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()},
           "ema_decay": 0.62, "ema_updates": 2, "config": TwinFlowLoss().config}
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    loss_fn = TwinFlowLoss()
    loss_fn.load_state_dict(torch.load(buf, weights_only=True))
    assert loss_fn.teacher is None  # pending until a model is seen
    loss_fn.ema.copy_model(model)
    for k, v in loss_fn.teacher.state_dict().items():
        assert torch.equal(v, old["teacher"][k]), k
    new = loss_fn.state_dict()
    assert set(new) == set(old) and (new["ema_decay"], new["ema_updates"]) == (0.62, 2)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="rate"):
        EmaSchedule(1.5)
    with pytest.raises(ValueError, match="EMA tensors"):
        EmaSchedule(0.9).update([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="shape"):
        EmaSchedule(0.9).update([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="decay"):
        EmaSchedule(0.9).load_state(2.0, 1)
    with pytest.raises(ValueError, match="EmaTeacher.bind"):
        EmaTeacher(0.9).bind(torch.nn.Identity(), [torch.zeros(1)], [])
