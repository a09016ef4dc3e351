"""Shared test setup. Tests live in folders by subject (sampler/, training/, families/,
pipelines/, safety/, mnist/, package/); the helpers in this folder — tiny random-weight pipelines
(``tiny_pipelines``, ``tiny_openuni``), the error checks (``checks``), the plain-PyTorch
reference transcriptions (``ucgm_reference``, ``twinflow_reference``) and the recorded
objective outputs (``objective_golden``) — are imported by name from every test file; this puts
the folder on ``sys.path`` once, also when pytest runs a single file or from another directory.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Under pytest-xdist (`.ci/run` runs `-n 2` on 2 cores) each worker and the processes it starts
# get one OpenMP thread unless a test asks for more: two workers with two threads each spin-wait
# for cores the other holds, and a 25 s notebook took minutes. PASSIVE keeps the threads of a
# test that does ask for more (the 2-thread run of the exact tests) from spinning the same way.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
