"""Checks of the fused Triton kernels (:mod:`optimizers.fused`) against the families' own forward passes.

Run on a CPU by ``tests/test_fused.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton's interpreter must be
chosen before Triton is imported), and on a GPU by ``tests/test_cuda.py`` in process. Each check raises on failure.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

import optimizers as O
import unf
from optimizers.features import Segments, step_encoding
from optimizers.fused import BLOCK, CHUNK, _readout_for, _segment_rows, _tree, fused_forward, fused_layer, segment_sums
from optimizers.registry import _resolve, load_rule


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = {
        "mlp": (nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), torch.randn(4, 64)),
        "cnn": (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), torch.randn(2, 3, 8, 8)),
    }
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return out
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    out["gpt2"] = (GPT2LMHeadModel(cfg), torch.randint(0, 50, (1, 8)))
    return out


def _families(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Module, Segments]]:
    params = list(model.parameters())
    per_tensor = Segments.from_sizes([p.numel() for p in params])
    spec = unf.derive_spec(model, x).parameters_only()
    family = O.UNFFamily(spec, hidden=32, layers=3)
    named = dict(model.named_parameters())
    entries = family.bind([named[n] for n in spec.sources])
    shipped = load_rule(_resolve("unf-mnist1d-synthlm")).f.transfer(spec)  # trained weights, keys partly missing
    shipped.bind([named[n] for n in spec.sources])
    return {"perparam": (O.PerParamMLP(hidden=32), per_tensor),
            "perparam-deep": (O.PerParamMLP(hidden=16, layers=3), per_tensor),
            "deepset": (O.DeepSet(hidden=32), per_tensor),
            "deepset-1": (O.DeepSet(hidden=16, layers=1), per_tensor),
            "deepset-entries": (O.DeepSet(hidden=32), entries),  # several runs per segment (GPT-2's split qkv)
            "unf": (family, entries),
            "unf-shipped": (shipped, entries)}


def _unfused(f: nn.Module, tf: torch.Tensor, sf: torch.Tensor, segments: Segments) -> torch.Tensor:
    factored = getattr(f, "forward_factored", None)
    if factored is not None:
        return factored(tf, sf, segments)
    n = tf.shape[1]
    return f(torch.cat([tf.T, sf.expand(n, sf.shape[0])], 1), segments)


def check_families(device: str) -> None:
    """The fused forward equals each family's own, on MLPs, CNNs and a GPT-2, and is deterministic (all cases are
    run; the failures are reported together)."""
    failures = []
    for mname, (model, x) in _models().items():
        for fname, (f, segments) in _families(model, x).items():
            if mname == "gpt2" and fname not in ("deepset-entries", "unf"):  # (the interpreter is slow)
                continue
            if fname != "unf-shipped":
                _randomize(f, seed=len(fname))
            f = f.to(device)
            seg = segments.to(device)
            n = seg.ids.numel()
            g = torch.Generator().manual_seed(1)
            tf = torch.randn(8, n, generator=g).to(device)
            sf = step_encoding(torch.tensor(17.0)).to(device)
            fused = fused_forward(f)
            if fused is None:
                failures.append(f"{mname}/{fname}: not covered")
                continue
            want = _unfused(f, tf, sf, seg)
            # the UNF family: its read-out from the kernel's projections where every entry is one run of the flat
            # vector (the MLP and CNN; GPT-2's split qkv is not), else from stored hidden activations; both checked
            paths = [True, False] if fname.startswith("unf") else [None]
            if fname.startswith("unf") and (_readout_for(f, seg, torch.device(device)) is None) != (mname == "gpt2"):
                failures.append(f"{mname}/{fname}: projected read-out applies: "
                                f"{_readout_for(f, seg, torch.device(device)) is not None}")
            for projected in paths:
                if projected is not None:
                    f.fused_readout = projected
                got = fused(tf, sf, seg)
                name = f"{mname}/{fname}" + ("" if projected is not False else " (hidden read-out)")
                if got.shape != want.shape or got.shape != (n,):
                    failures.append(f"{name}: shape {tuple(got.shape)}, want {(n,)}")
                    continue
                # (atol scaled: the UNF read-out sums thousands of terms: its rounding grows with its largest outputs)
                scale = float(want.abs().max())  # (no autograd here)
                try:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
                except AssertionError as err:
                    failures.append(f"{name}: {str(err).splitlines()[0]} "
                                    f"(max |diff| {float((got - want).abs().max()):.2e}, max |want| {scale:.2e})")
                if device != "cpu" and not torch.equal(got, fused(tf, sf, seg)):  # (the interpreter: deterministic)
                    failures.append(f"{name}: not deterministic")
            if fname.startswith("unf"):
                f.fused_readout = True
    assert not failures, "\n".join(failures)


def check_rule_steps(device: str) -> None:
    """Five steps of :meth:`LearnedRule.update` with ``factored=fused`` equal the unfused steps (to rounding),
    with NaN/Inf gradients in the mix."""
    model, x = _models()["cnn"]
    spec = unf.derive_spec(model, x).parameters_only()
    for f in (O.DeepSet(hidden=32), O.UNFFamily(spec, hidden=32)):
        _randomize(f, seed=3)
        rule = O.LearnedRule(f, beta=0.05).to(device)
        named = dict(model.named_parameters())
        params = [named[n] for n in spec.sources]
        seg = (f.bind(params) if isinstance(f, O.UNFFamily) else
               Segments.from_sizes([p.numel() for p in params])).to(device)
        fused = fused_forward(f)
        g = torch.Generator().manual_seed(4)
        param = torch.cat([p.detach().reshape(-1) for p in params]).to(device)
        states = [O.rule.init(param.numel(), device), O.rule.init(param.numel(), device)]
        a = b = param
        for step in range(5):
            grad = torch.randn(param.numel(), generator=g).to(device) * 0.1
            if step == 2:
                grad[3], grad[-1] = float("nan"), float("inf")
            a, states[0], skip_a = rule.update(a, grad, states[0], seg, factored=fused)
            b, states[1], skip_b = rule.update(b, grad, states[1], seg)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(states[0].momenta, states[1].momenta, rtol=1e-5, atol=1e-6)
            assert torch.equal(skip_a, skip_b)


def check_layer_edges(device: str) -> None:
    """Segments longer than a block, several runs per segment, an empty segment, and the read-out only."""
    run_segments = (0, 2, 3, 0)  # segment 0 appears as two runs; segment 1 is empty
    ids = torch.repeat_interleave(torch.tensor(run_segments), torch.tensor([BLOCK * 2 + 5, 3, BLOCK + 1, 7]))
    seg = Segments.from_ids(ids, 4).to(device)
    assert seg.sizes is not None and seg.run_segments == run_segments
    n = ids.numel()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, n, generator=g).to(device)
    w = torch.randn(32, 8, generator=g).to(device)
    table = torch.randn(32, 4, generator=g).to(device)
    proj = torch.randn(32, generator=g).to(device)
    y, sums, out = fused_layer(x, w, table, seg, project=proj)
    want = torch.relu(w @ x + table[:, seg.ids])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    want_sums = torch.zeros(4, 32, device=device).index_add_(0, seg.ids, want.T)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)
    assert torch.equal(sums[1], torch.zeros(32, device=device))
    torch.testing.assert_close(out, proj @ want, rtol=1e-5, atol=1e-4)
    none, sums2, out2 = fused_layer(x, w, table, seg, store=False, project=proj)
    assert none is None and torch.equal(sums2, sums) and torch.equal(out2, out)
    y3, no_sums, _ = fused_layer(x, w, table, seg, sums=False)
    assert no_sums is None and torch.equal(y3, y)
    # a projection per segment: the first rows[segment] rows of project[segment] @ y, the rest left unwritten
    projs = torch.randn(4, 16, 32, generator=g).to(device)
    n_rows = torch.tensor([3, 16, 1, 7], dtype=torch.int32, device=device)
    none, sums4, many = fused_layer(x, w, table, seg, store=False, project=projs, rows=n_rows)
    assert none is None and many.shape == (16, n)
    torch.testing.assert_close(sums4, want_sums, rtol=1e-5, atol=1e-4)  # (another kernel build: another sum order)
    per_element = torch.einsum("nrc,cn->rn", projs[seg.ids], want)
    written = torch.arange(16, device=device)[:, None] < n_rows[seg.ids][None, :]
    torch.testing.assert_close(many[written], per_element[written], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(segment_sums(x, seg), torch.zeros(4, 8, device=device).index_add_(0, seg.ids, x.T),
                               rtol=1e-5, atol=1e-4)
    # the tree that sums block rows by segment: several levels, empty segments, a segment of exactly CHUNK rows
    counts = [3 * CHUNK + 5, 0, 1, CHUNK, CHUNK * CHUNK + 2]
    rows = torch.randn(sum(counts), 4, generator=g, dtype=torch.float64).float().to(device)
    tree = _tree(counts, torch.device(device))
    assert len(tree) == 3
    got = _segment_rows(rows, tree)
    want_rows = torch.stack([part.sum(0) for part in rows.split(counts)])
    torch.testing.assert_close(got, want_rows, rtol=1e-5, atol=1e-3)


def check_autograd_falls_back(device: str) -> None:
    """With autograd recording (meta-gradients), the fused forward is the family's own, gradients included."""
    model, x = _models()["mlp"]
    f = O.DeepSet(hidden=16).to(device)
    seg = Segments.from_sizes([p.numel() for p in model.parameters()]).to(device)
    n = seg.ids.numel()
    tf = torch.randn(8, n, device=device)
    sf = step_encoding(torch.tensor(3.0)).to(device)
    got = fused_forward(f)(tf, sf, seg)
    assert got.requires_grad
    assert torch.equal(got, f.forward_factored(tf, sf, seg))


def check_unsupported() -> None:
    """Families the kernels do not cover get None (the optimizer then steps unfused)."""
    assert fused_forward(O.DeepSet(hidden=24)) is None  # not a power of two
    assert fused_forward(O.DeepSet(hidden=8)) is None  # below tl.dot's 16
    assert fused_forward(O.DeepSet(hidden=32, layers=0)) is None
    assert fused_forward(nn.Linear(19, 1)) is None


def run_all(device: str) -> None:
    # a kernel that fails on its first call would fall back to the unfused forward with a RuntimeWarning and so
    # pass every comparison: make that an error here
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_unsupported()
        check_layer_edges(device)
        check_autograd_falls_back(device)
        with torch.no_grad():  # (the optimizer steps without autograd: the kernels' path)
            check_families(device)
            check_rule_steps(device)


if __name__ == "__main__":
    run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("fused checks passed")
