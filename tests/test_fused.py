"""The fused Triton kernels of :mod:`optimizers.fused` on a CPU, through Triton's interpreter.

The interpreter must be chosen before Triton is imported, so the checks (``tests/fused_checks.py``) run in a
subprocess with ``TRITON_INTERPRET=1``. On a GPU, ``tests/test_cuda.py`` runs the same checks compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import optimizers as O

HERE = Path(__file__).resolve().parent


def test_fused_kernels_match_the_families_under_the_interpreter():
    pytest.importorskip("triton", reason="the fused kernels need Triton (optional; installed with the dev extra)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, str(HERE / "fused_checks.py"), "cpu"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "fused checks passed" in done.stdout


def test_fused_true_warns_where_the_kernels_cannot_apply():
    """On a CPU the kernels do not apply: ``fused=True`` warns and steps unfused (checked on the whole-buffer path
    that ``compile=True`` takes); the default is silent."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    for fused in (None, True):
        opt = O.LearnedOptimizer(model.parameters(), O.LearnedRule(O.DeepSet(hidden=16)), compile=True, fused=fused)
        flat = opt._flat_for(0, opt.param_groups[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt._reference_fn(flat)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert flat.workspace["fused"] is False
        if fused:
            assert any("fused=True: the fused kernels do not apply here" in m for m in messages), messages
        else:
            assert not messages
