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


def test_a_failing_first_call_falls_back_to_the_unfused_forward(monkeypatch):
    """Kernels that do not compile on a GPU or Triton build (simulated) warn once and leave ``f``'s own forward."""
    pytest.importorskip("triton", reason="fused_forward is None without Triton")
    from optimizers import fused
    from optimizers.features import Segments, step_encoding

    def broken(self, *args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(fused._FusedStack, "__call__", broken)
    f = O.DeepSet(hidden=16)
    seg = Segments.from_sizes([5, 7])
    tf, sf = torch.randn(8, 12), step_encoding(torch.tensor(2.0))
    forward = fused.fused_forward(f)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="the fused Triton layers failed on cpu .*no kernel image"):
            first = forward(tf, sf, seg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = forward(tf, sf, seg)
        want = f.forward_factored(tf, sf, seg)
    assert torch.equal(first, want) and torch.equal(second, want)
