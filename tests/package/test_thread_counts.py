"""The ``exact`` tests under ``OMP_NUM_THREADS=1`` and ``2``.

Bit-for-bit promises (a sharded folder gives the single file's image, a saved pipeline reloads
to the same image, two processes give one process's weights) must not hold only because one
thread happens to take one reduction order: a layout dependence that one thread hides shows
under two. Each thread count runs the whole ``exact`` set in a fresh interpreter (the two at
once), so the
OpenMP pool and torch's intra-op threads start with that count (``OMP_NUM_THREADS``), the
tiny-model fixtures use it (``TWINFLOW_TEST_THREADS``) and the torchrun workers get it.

``.ci/run`` leaves the ``exact`` tests out of its main pytest run (``-m "not exact"``): they run
here, twice, instead of three times.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest


from tiny_pipelines import THREADS_ENV  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_exact_tests_hold_at_one_and_two_threads(tmp_path):
    # The two interpreters run side by side: the results do not depend on timing, and the
    # wall time is about one run's instead of two.
    runs = {}
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{THREADS_ENV: str(threads)})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "exact",
               "--basetemp", str(tmp_path / f"t{threads}"), str(TESTS)]
        runs[threads] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                         cwd=TESTS.parent)
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
