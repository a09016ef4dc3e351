"""The ``exact`` tests under ``OMP_NUM_THREADS=1`` and ``2``.

Bit-for-bit promises (a sharded folder gives the single file's image, a saved pipeline reloads
to the same image, two processes give one process's weights) must not hold only because one
thread happens to take one reduction order: a layout dependence that one thread hides shows
under two. Each thread count runs the whole ``exact`` set in a fresh interpreter, so the OpenMP
pool and torch's intra-op threads start with that count (``OMP_NUM_THREADS``), the tiny-model
fixtures use it (``TWINFLOW_TEST_THREADS``) and the torchrun workers get it.

A run that is itself a 1-thread run of the ``exact`` tests (``.ci/run``: pytest-xdist workers,
which tests/conftest.py gives ``OMP_NUM_THREADS=1``, with the ``exact`` tests selected) counts
as the 1-thread run: only the 2-thread run is started here, and each set runs twice, not three
times. ``pytest -m "not exact"`` (or a run with more threads) starts both.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest


from tiny_pipelines import THREADS_ENV  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parents[1]


def _exact_here_at_one_thread(session) -> int:
    """How many ``exact`` tests this session runs itself at one thread (0 when it runs them at
    more, or none)."""
    import torch

    from tiny_pipelines import tiny_threads

    if not (os.environ.get("OMP_NUM_THREADS") == "1" and torch.get_num_threads() == 1 and tiny_threads() == 1):
        return 0
    return sum(1 for item in session.items if item.get_closest_marker("exact"))


def _start(threads: int, tmp_path: pathlib.Path) -> subprocess.Popen:
    # A plain pytest run: without the xdist worker's variables (tests/conftest.py reads them).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(OMP_NUM_THREADS=str(threads), **{THREADS_ENV: str(threads)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "exact",
           "--basetemp", str(tmp_path / f"t{threads}"), str(TESTS)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS.parent)


def _finish(runs: dict) -> int:
    """Wait for every run; each must pass. Returns how many tests passed (the same set in each)."""
    passed = 0
    for threads, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            for p in runs.values():
                p.kill()
            raise
        tail = out[-6000:] + err[-2000:]
        assert proc.returncode == 0, f"`exact` tests failed at {threads} thread(s):\n{tail}"
        summary = out.strip().splitlines()[-1]
        assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
        passed = int(re.search(r"(\d+) passed", summary).group(1))
    return passed


@pytest.mark.slow
def test_exact_tests_hold_at_one_and_two_threads(tmp_path, request):
    here = _exact_here_at_one_thread(request.session)
    # Where both thread counts run here, the two interpreters run side by side: the results do
    # not depend on timing, and the wall time is about one run's instead of two.
    passed = _finish({threads: _start(threads, tmp_path) for threads in ((2,) if here else (1, 2))})
    if 0 < here < passed:
        # This session selected only some of the exact tests: the others still need their
        # 1-thread run.
        _finish({1: _start(1, tmp_path)})
