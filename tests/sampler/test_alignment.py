"""Loaded weights live in torch-allocated memory (``twinflow._alignment``): the file layout a
model came from (single file, shards, an in-memory build) must not change its bits.

safetensors maps each tensor where its bytes lie in the file, so a loaded tensor's address
modulo 64 depends on the layout, and CPU kernels treat an unaligned head differently (the
cause of the last-bit differences in issue 18). ``align_module`` copies exactly the tensors
that are misaligned or non-contiguous and keeps everything else as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch


import tiny_pipelines  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
from twinflow import load_pipeline  # noqa: E402
from twinflow._alignment import ALIGNMENT, align_module, is_aligned  # noqa: E402


def _misaligned(values: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """`values` copied to an address `shift` elements past a 64-byte boundary."""
    flat = torch.empty(values.numel() + shift, dtype=values.dtype)
    out = flat[shift:].view(values.shape)
    out.copy_(values)
    assert out.data_ptr() % ALIGNMENT != 0
    return out


def test_misaligned_parameters_and_buffers_move_and_keep_their_values_and_objects():
    m = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    weight, bias = m[0].weight, m[0].bias
    want = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        weight.data = _misaligned(weight.data)
        m[1].running_mean = _misaligned(m[1].running_mean)
    bias_ptr = bias.data_ptr()
    assert align_module(m) == 2
    assert m[0].weight is weight and weight.requires_grad, "the Parameter object and its flag stay"
    assert bias.data_ptr() == bias_ptr, "an aligned tensor is not copied"
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
        assert v.is_contiguous() and (v.numel() == 0 or v.data_ptr() % ALIGNMENT == 0), k
    assert align_module(m) == 0, "idempotent"


def test_non_contiguous_and_tied_tensors():
    a, b = torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(6, 4, bias=False)
    shared = torch.nn.Parameter(torch.randn(4, 6).t())  # a transposed view: not contiguous
    a.weight = shared
    b.weight = shared  # tied: one Parameter in two modules
    m = torch.nn.ModuleList([a, b])
    want = shared.detach().clone()
    assert align_module(m) == 1
    assert a.weight is b.weight is shared and shared.is_contiguous() and torch.equal(shared, want)


def test_what_is_left_alone():
    assert is_aligned(torch.empty(0))
    assert is_aligned(torch.empty(3, device="meta"))
    assert is_aligned(torch.zeros(4, 4).to_sparse())
    assert not is_aligned(_misaligned(torch.arange(8.0)))
    m = torch.nn.Linear(2, 2, device="meta")
    assert align_module(m) == 0 and m.weight.device.type == "meta"


@pytest.mark.parametrize("layout", ["aux", "sharded"])
@pytest.mark.parametrize("model", ["sd3", "qwen-image"])
def test_every_loaded_tensor_is_aligned(model, layout):
    """Whatever the file layout, load_pipeline hands back every component in aligned memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, layout), model)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for k, v in comp.state_dict(keep_vars=True).items():
                assert is_aligned(v), f"{name}.{k} at {v.data_ptr() % ALIGNMENT} bytes past alignment"


def test_docstring_example_runs():
    import doctest

    from twinflow import _alignment

    result = doctest.testmod(_alignment)
    assert result.attempted > 0 and result.failed == 0
