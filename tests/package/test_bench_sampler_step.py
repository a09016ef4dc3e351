"""bench/sampler_step.py runs end to end on a tiny latent: cross-checks pass, and the finite
check's cost is timed in ABBA rounds (its own table), both variants on the same arrays."""

from __future__ import annotations

import contextlib
import io

from checks import load_script


def _bench():
    return load_script("bench/sampler_step.py")


def test_sampler_step_bench_runs_and_times_the_check_in_abba_rounds():
    bench = _bench()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(["--repeats", "2", "--number", "1", "--warmup", "0", "--shapes", "1x4x8x8",
                         "--ratios", "0", "1"])
    text = buf.getvalue()
    assert rc == 0, text
    assert "Cross-checks passed" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1×4×8×8 |") and line.count("|") == 6]
    assert [r.split("|")[2].strip() for r in rows] == ["0", "1"], text  # one check-cost row per s
    for r in rows:
        checked, unchecked, ratio = (float(c) for c in r.split("|")[3:6])
        assert checked > 0 and unchecked > 0 and ratio > 0


def test_time_paired_runs_each_variant_twice_per_round_in_abba_order():
    bench = _bench()
    calls = []
    c, u, r = bench.time_paired(lambda: calls.append("A"), lambda: calls.append("B"), repeats=3, number=2)
    assert calls == ["A", "A", "B", "B", "B", "B", "A", "A"] * 3
    assert c > 0 and u > 0 and r > 0
