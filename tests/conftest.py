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
