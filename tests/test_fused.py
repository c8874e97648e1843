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


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = x + torch.relu(self.a(x))
        return self.out(h + torch.relu(self.b(h)))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.out = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.attn(x, x, x)[0].mean(1))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.RNN(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def _readout_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "residual": (_Residual(), torch.randn(3, 8)),
        "attention": (_Attention(), torch.randn(2, 5, 8)),
        "depthwise-conv": (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.Flatten(),
                                         nn.Linear(96, 2)), torch.randn(2, 4, 6, 6)),
        "gru": (nn.GRU(3, 5), torch.randn(4, 2, 3)),
        "mlp": (nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)),
                torch.randn(4, 12)),
        "cnn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), torch.randn(2, 3, 6, 6)),
        "conv1d-layernorm": (nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.LayerNorm(48),
                                           nn.Linear(48, 4, bias=False)), torch.randn(3, 2, 8)),
        "batchnorm": (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2)),
                      torch.randn(6, 5)),
        "embedding": (nn.Sequential(nn.Embedding(11, 6), nn.Flatten(), nn.Linear(18, 4)),
                      torch.randint(0, 11, (2, 3))),
    }


@pytest.mark.parametrize("name", list(_readout_models()))
def test_projected_unf_readout_equals_the_readout_on_hidden_activations(name):
    """The UNF read-out from per-entry projections (what the last fused kernel writes; emulated here in plain torch,
    with the rows a kernel leaves unwritten set to NaN) equals :meth:`UNFFamily.unf_readout` on the hidden
    activations, on architectures of several kinds, for two seeds of weights and activations (no Triton needed)."""
    import unf
    from optimizers.fused import _UNFReadout

    model, x = _readout_models()[name]
    spec = unf.derive_spec(model, x).parameters_only()
    named = dict(model.named_parameters())
    for seed in (7, 8):
        f = O.UNFFamily(spec, hidden=16, layers=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in f.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        seg = f.bind([named[n] for n in spec.sources])
        readout = _UNFReadout.build(f, torch.device("cpu"))
        assert readout is not None, "every entry of these models is one run of the flat vector"
        n = seg.ids.numel()
        h = torch.relu(torch.randn(16, n, generator=g))
        row = torch.randn(16, generator=g)
        with torch.no_grad():
            src = readout.source(row)
            proj, rows = readout.projections(src)
            buf = torch.full((proj.shape[1], n), float("nan"))
            for k in range(seg.n):
                cols = (seg.ids == k).nonzero().squeeze(1)
                buf[:int(rows[k]), cols] = proj[k, :int(rows[k])] @ h[:, cols]
            sums = torch.zeros(seg.n, 16).index_add_(0, seg.ids, h.T)
            got = buf[0] + readout(buf, sums, src)
            want = row @ h + f.unf_readout(h.mT)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_projected_unf_readout_declines_a_recurrent_weight():
    """An RNN's ``W_hh`` has the hidden group on both axes: its read-out writes diagonals, which the projected
    read-out does not do, so it declines (None: the hidden activations are kept)."""
    import unf
    from optimizers.fused import _UNFReadout

    model = _Recurrent()
    x = torch.randn(2, 5, 4)
    spec = unf.derive_spec(model, x).parameters_only()
    f = O.UNFFamily(spec, hidden=16, layers=1)
    named = dict(model.named_parameters())
    f.bind([named[n] for n in spec.sources])
    assert f._tiling is not None and any(f.head._diag_writes)
    assert _UNFReadout.build(f, torch.device("cpu")) is None


def test_projected_unf_readout_declines_entries_that_are_not_one_run():
    """GPT-2's attention weights are split into q, k, v views of one tensor: not one run each in their own layout,
    so the read-out keeps the hidden activations (None here)."""
    transformers = pytest.importorskip("transformers")
    import unf
    from optimizers.fused import _UNFReadout

    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    spec = unf.derive_spec(model, torch.randint(0, 20, (1, 4))).parameters_only()
    f = O.UNFFamily(spec, hidden=16, layers=1)
    named = dict(model.named_parameters())
    f.bind([named[n] for n in spec.sources])
    assert f._tiling is None and _UNFReadout.build(f, torch.device("cpu")) is None
