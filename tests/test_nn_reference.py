"""A plain per-term reference for UNFLinear, and checks that the fast path matches it.

The reference evaluates every basis term on its own with ``torch.einsum``: diagonals and mean reductions on
the input side, the term's own coefficient, then broadcasts (products with ones) and diagonal writes (products
with identity matrices, i.e. materialised) on the output side. It shares nothing with the fast path but the
term list and the parameter storage. ``benchmarks/bench_unf.py`` imports it for the speed ratio.
"""

from __future__ import annotations

import string

import pytest
import torch

from unf.nn import UNF, UNFLinear, WeightFeatures
from unf.spec import WeightSpaceSpec

L = string.ascii_lowercase.replace("b", "").replace("o", "").replace("c", "")  # b, c, o name batch/channels


def _expand_output(r: torch.Tensor, out_labels: tuple[int, ...], kept: tuple[int, ...],
                   sizes: dict[int, int]) -> torch.Tensor:
    """``r``: ``(B, O, *kept blocks)`` -> ``(B, O, *output axes)`` with broadcasts and diagonal writes."""
    blocks = list(dict.fromkeys(out_labels))
    sub = "".join(L[b] for b in kept)
    ops, subs = [r], [f"bo{sub}"]
    for b in blocks:
        if b not in kept:  # output-only letter: broadcast
            ops.append(torch.ones(sizes[b], dtype=r.dtype))
            subs.append(L[b])
    full = torch.einsum(",".join(subs) + "->bo" + "".join(L[b] for b in blocks), *ops)
    # repeated output letters: write onto the diagonal through identity matrices
    extra = iter(string.ascii_uppercase)
    seen: set[int] = set()
    out_sub, ops, subs = "", [full], ["bo" + "".join(L[b] for b in blocks)]
    for b in out_labels:
        if b in seen:
            fresh = next(extra)
            ops.append(torch.eye(sizes[b], dtype=r.dtype))
            subs.append(L[b] + fresh)
            out_sub += fresh
        else:
            seen.add(b)
            out_sub += L[b]
    return torch.einsum(",".join(subs) + "->bo" + out_sub, *ops)


def reference_unf_linear(layer: UNFLinear, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-term evaluation of ``layer`` (same parameters) on features ``x``."""
    entries = layer.plan.entries
    B = next(iter(x.values())).shape[0]
    xs = []
    pe = iter(layer.pos_enc)
    for e in entries:
        t = x[e.name]
        if len(layer.pos_enc):
            for ax in e.relaxed_axes:
                p = next(pe)
                shape = [1] * t.dim()
                shape[1], shape[2 + ax] = p.shape
                t = t + p.view(shape)
        order = [0, 1] + [2 + a for a in e.folded_axes] + [2 + a for a in e.perm_axes]
        xs.append(t.permute(order).reshape(B, -1, *e.sizes))
    outs: list[torch.Tensor | None] = [None] * len(entries)
    for term in layer.plan.terms:
        sizes = dict(enumerate(term.block_sizes))
        kept, reduced = term.kept, term.reduced
        denom = 1
        for b in reduced:
            denom *= sizes[b]
        r = torch.einsum("bc" + "".join(L[b] for b in term.in_labels) + "->bc" + "".join(L[b] for b in kept),
                         xs[term.inp]) / denom
        r = torch.einsum("oc,bc...->bo...", layer.term_coefficient(term.index), r)
        y = _expand_output(r, term.out_labels, kept, sizes)
        outs[term.out] = y if outs[term.out] is None else outs[term.out] + y
    for name, labels, value in layer.bias_terms():
        i = layer.names.index(name)
        sizes = dict(zip(labels, entries[i].sizes))
        outs[i] = outs[i] + _expand_output(value.view(1, -1).expand(B, -1), labels, (), sizes)
    result = {}
    for e, y in zip(entries, outs):
        folded = [e.shape[a] for a in e.folded_axes]
        y = y.reshape(B, layer.out_channels, *folded, *e.sizes)
        order = [0, 1] + [2 + a for a in e.folded_axes] + [2 + a for a in e.perm_axes]
        inv = sorted(range(len(order)), key=order.__getitem__)
        result[e.name] = y.permute(inv)
    return result


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- specs
def mlp_spec(fixed_io: bool = False) -> WeightSpaceSpec:
    i = None if fixed_io else "in"
    o = None if fixed_io else "out"
    return WeightSpaceSpec.from_axes({"W1": [("h", 5), (i, 4)], "b1": [("h", 5)], "W2": [(o, 3), ("h", 5)],
                                      "b2": [(o, 3)]})


def rnn_spec() -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({"W_ih": [("h", 4), (None, 3)], "W_hh": [("h", 4), ("h", 4)],
                                      "b_h": [("h", 4)], "W_out": [(None, 2), ("h", 4)],
                                      "b_out": [(None, 2)]})


def head_spec() -> WeightSpaceSpec:
    """3-axis head views: q and k share the head-dim group, v and o another, one residual group."""
    return WeightSpaceSpec.from_axes({
        "q": [("d", 3), ("H", 2), ("qk", 2)], "k": [("d", 3), ("H", 2), ("qk", 2)],
        "v": [("d", 3), ("H", 2), ("vo", 2)], "o": [("H", 2), ("vo", 2), ("d", 3)],
        "g": [("d", 3)], "scalar": [], "emb": [(None, 4), ("d", 3)]})


def cnn_spec() -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({"c1": [("c1", 3), (None, 2), (None, 3), (None, 3)], "b1": [("c1", 3)],
                                      "c2": [("c2", 4), ("c1", 3), (None, 3), (None, 3)], "b2": [("c2", 4)],
                                      "fc": [(None, 2), ("c2", 4)], "fb": [(None, 2)]})


SPECS = {"mlp": mlp_spec(), "mlp_fixed": mlp_spec(True), "rnn": rnn_spec(), "heads": head_spec(),
         "cnn": cnn_spec()}


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).detach().pow(2).sum()) for k in a)
    den = sum(float(b[k].detach().pow(2).sum()) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("fixed,pe", [("relax", False), ("relax", True), ("exact", False), ("auto", True)])
def test_fast_path_matches_reference(name: str, fixed: str, pe: bool) -> None:
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    layer = UNFLinear(spec, 2, 3, fixed=fixed, exact_max_size=2, positional_encoding=pe, dtype=torch.float64)
    _randomize(layer, gen)  # random biases and encodings too, so every path is exercised
    x = WeightFeatures.randn(spec, 3, 2, generator=gen, dtype=torch.float64).as_dict()
    fast = layer(x)
    ref = reference_unf_linear(layer, x)
    assert rel_err(fast, ref) <= 1e-10
    for n in fast:
        assert fast[n].shape == x[n].shape[:1] + (3,) + x[n].shape[2:]


def test_stack_matches_reference_and_grads() -> None:
    spec = SPECS["rnn"]
    gen = torch.Generator().manual_seed(1)
    model = UNF(spec, [1, 4, 4, 2], dtype=torch.float64)
    x = WeightFeatures.randn(spec, 2, 1, generator=gen, dtype=torch.float64).as_dict()
    y = x
    for layer in model.layers:
        y = reference_unf_linear(layer, y) if isinstance(layer, UNFLinear) else layer(y)
    assert rel_err(model(x), y) <= 1e-10
    # gradients of a scalar loss agree too
    gf = torch.autograd.grad(sum(t.pow(2).sum() for t in model(x).values()), list(model.parameters()))
    gr = torch.autograd.grad(sum(t.pow(2).sum() for t in y.values()), list(model.parameters()))
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
