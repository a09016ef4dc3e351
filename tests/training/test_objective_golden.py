"""TwinFlowLoss gives the loss, diagnostics, gradients and model-call counts recorded in
tests/data/objective_golden.safetensors (tests/objective_golden.py: the three recipes and the
settings that change the step's control flow), recorded before the step's driver moved from
Rust to Python (issue 20). On the kind of machine that recorded them the comparison is exact;
elsewhere it allows float rounding: a few float32 ulps of the values' scale, propagated
through the step's ~100 operations (rtol 1e-5; float64: 1e-12).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from objective_golden import CASES, GOLDEN, machine, run_case

pytestmark = pytest.mark.exact


def _recorded(name):
    with safe_open(str(GOLDEN), "pt") as f:
        meta = json.loads(f.metadata()["machine"])
        prefix = f"{name}/"
        return meta, {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_match_the_recording(name):
    meta, want = _recorded(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: a conv's backward sums in another order on 2 threads
    try:
        got = run_case(name)
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(want)
    same_machine = meta == machine()
    for k, w in want.items():
        g = got[k]
        if same_machine or k.startswith("calls"):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,  # NaN: an empty run's mean
                                       msg=lambda m: f"{name}: {k} differs from the recording: {m}")
        else:
            rtol = 1e-12 if w.dtype == torch.float64 and "stats" not in k else 1e-5
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()), equal_nan=True)
