"""UNF layers: basis counts, completeness, fast path vs a per-term reference, equivariance, gradients."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import unf
from unf import WeightSpaceSpec
from unf.nn.batch import permute_features, random_features
from unf.nn.linear import UNFLinear, layer_groups
from unf.nn.models import UNF, InvariantPool, StatNN, UNFInvariant
from unf.nn.terms import bell, count_pair_terms, pair_terms
from unf.nn.testing import assert_equivariant, assert_invariant

from .zoo import ARCHITECTURES, build

MLP_643210 = {"W1": [("h", 32), ("in", 64)], "b1": [("h", 32)], "W2": [("out", 10), ("h", 32)], "b2": [("out", 10)]}

SMALL_SPECS = {
    "mlp": {"W1": [("h", 3), ("i", 2)], "b1": [("h", 3)], "W2": [("o", 2), ("h", 3)], "b2": [("o", 2)]},
    "rnn": {"Whh": [("h", 4), ("h", 4)], "b": [("h", 4)], "Wih": [("h", 4), ("x", 2)]},
    "heads": {"q": [("d", 2), ("H", 2), ("k", 2)], "o": [("H", 2), ("v", 2), ("d", 2)], "ln": [("d", 2)]},
    "vector_pair": {"u": [("a", 3)], "v": [("a", 3)]},
}


# ---------------------------------------------------------------------------------------------- counting
def test_bell_numbers():
    assert [bell(n) for n in range(7)] == [1, 1, 2, 5, 15, 52, 203]


@pytest.mark.parametrize("out_groups, in_groups, expected", [
    (("a",), ("a",), 2), (("a", "b"), ("a", "b"), 4), (("h", "h"), ("h", "h"), 15), (("h",), ("h", "h"), 5),
])
def test_pair_counts_from_the_paper(out_groups, in_groups, expected):
    assert count_pair_terms(out_groups, in_groups) == expected == len(pair_terms("o", out_groups, "i", in_groups))


def test_pair_terms_match_bell_formula_on_random_patterns():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        p, q = (int(torch.randint(0, 4, (1,), generator=gen)) for _ in range(2))
        out = tuple("xyz"[int(torch.randint(0, 3, (1,), generator=gen))] for _ in range(p))
        inp = tuple("xyz"[int(torch.randint(0, 3, (1,), generator=gen))] for _ in range(q))
        terms = pair_terms("o", out, "i", inp)
        assert len(terms) == count_pair_terms(out, inp) == len(set(terms))


def test_mlp_reference_layer_has_32_terms_and_1028_parameters():
    layer = UNFLinear(WeightSpaceSpec.from_axes(MLP_643210), in_channels=32, out_channels=1)
    assert len(layer.terms) == 32
    assert sum(p.numel() for p in layer.parameters()) == 1028


# ---------------------------------------------------------------------------------------------- completeness
def _flat_size(spec):
    return sum(math.prod(e.shape) for e in spec.entries)


def _perm_matrix(spec, perm):
    """Matrix of the spec permutation acting on the flattened weight space (one channel)."""
    d = _flat_size(spec)
    cols = []
    for k in range(d):
        basis = torch.zeros(d, dtype=torch.float64)
        basis[k] = 1
        feats = _unflatten(spec, basis)
        cols.append(_flatten(spec, permute_features(spec, feats, perm)))
    return torch.stack(cols, dim=1)


def _flatten(spec, feats):
    return torch.cat([feats[e.name].reshape(-1) for e in spec.entries])


def _unflatten(spec, vec):
    out, offset = {}, 0
    for e in spec.entries:
        n = math.prod(e.shape)
        out[e.name] = vec[offset : offset + n].view(1, 1, *e.shape)
        offset += n
    return out


def _generators(spec):
    """Two generators of each S_n (a transposition and an n-cycle), as spec permutations."""
    identity = spec.identity_permutation()
    gens = []
    for g, n in spec.groups.items():
        if n < 2:
            continue
        swap = torch.arange(n)
        swap[0], swap[1] = 1, 0
        cycle = torch.roll(torch.arange(n), 1)
        for p in (swap, cycle):
            gens.append({**identity, g: p})
    return gens


def _term_matrices(layer, spec):
    """Each basis term (1 in, 1 out channel) as a (D, D) matrix, by applying it alone to basis vectors."""
    d = _flat_size(spec)
    mats = []
    with torch.no_grad():
        for target, _ in layer.term_weights():
            for w in layer.weights:
                w.zero_()
            for t, w in layer.term_weights():
                if t == target:
                    w.fill_(1.0)
            cols = [_flatten(spec, layer(_unflatten(spec, torch.eye(d, dtype=torch.float64)[k])))
                    for k in range(d)]
            mats.append(torch.stack(cols, dim=1))
    return mats


@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_terms_span_exactly_the_equivariant_maps(name):
    spec = WeightSpaceSpec.from_axes(SMALL_SPECS[name])
    layer = UNFLinear(spec, 1, 1, bias=False).double()
    d = _flat_size(spec)
    # null space of T -> P T - T P over the generators: all equivariant linear maps
    eye = torch.eye(d, dtype=torch.float64)
    blocks = []
    for perm in _generators(spec):
        p = _perm_matrix(spec, perm)
        blocks.append(torch.kron(p, eye) - torch.kron(eye, p.T.contiguous()))  # row-major vec(P T - T P)
    constraints = torch.cat(blocks)
    sv = torch.linalg.svdvals(constraints)
    null_dim = int((sv < 1e-9).sum()) + (d * d - sv.numel() if sv.numel() < d * d else 0)
    mats = _term_matrices(layer, spec)
    stacked = torch.stack([m.reshape(-1) for m in mats])
    assert torch.linalg.matrix_rank(stacked) == len(mats)  # linearly independent
    assert len(mats) == null_dim  # and as many as the equivariant maps: a basis
    for m in mats:  # each term is equivariant
        for perm in _generators(spec):
            p = _perm_matrix(spec, perm)
            torch.testing.assert_close(p @ m, m @ p)
    expected = sum(count_pair_terms(layer_groups(o, "relax")[0], layer_groups(i, "relax")[0])
                   for o in spec.entries for i in spec.entries)
    assert len(mats) == expected


# ---------------------------------------------------------------------------------------------- reference
def _term_tensor(term, out_shape, in_shape, dtype=torch.float64):
    """The definitional basis map of a term: E[out_idx, in_idx] = 1 where letters agree, scaled by 1/|reduced|."""
    e = torch.zeros(*out_shape, *in_shape, dtype=dtype)
    sizes = {}
    for l, n in zip(term.out_letters + term.in_letters, out_shape + in_shape):
        sizes[l] = n
    letters = sorted(sizes)
    for values in itertools.product(*[range(sizes[l]) for l in letters]):
        assign = dict(zip(letters, values))
        idx = tuple(assign[l] for l in term.out_letters) + tuple(assign[l] for l in term.in_letters)
        e[idx] = 1.0
    reduced = math.prod(sizes[l] for l in term.reduced)
    return e / reduced


def reference_forward(layer: UNFLinear, spec: WeightSpaceSpec, x: dict) -> dict:
    """Plain per-term implementation: y_o = sum_terms W_t (E_t x_i) + b_o."""
    out = {e.name: torch.zeros(x[e.name].shape[0], layer.out_channels, *e.shape, dtype=torch.float64)
           for e in spec.entries}
    shapes = {e.name: e.shape for e in spec.entries}
    for term, w in layer.term_weights():
        e_t = _term_tensor(term, shapes[term.out_entry], shapes[term.in_entry])
        n_out, n_in = len(shapes[term.out_entry]), len(shapes[term.in_entry])
        mapped = torch.tensordot(x[term.in_entry], e_t, dims=(list(range(2, 2 + n_in)),
                                                               list(range(n_out, n_out + n_in))))
        out[term.out_entry] += torch.einsum("oc,bc...->bo...", w, mapped)
    for e in spec.entries:
        out[e.name] += layer.bias[layer._bias_keys[e.name]].view(1, -1, *[1] * len(e.shape))
    return out


REFERENCE_SPECS = {**SMALL_SPECS, "mlp_with_fixed": {"W1": [("h", 3), (None, 2)], "b1": [("h", 3)],
                                                     "W2": [(None, 2), ("h", 3)], "b2": [(None, 2)]}}


@pytest.mark.parametrize("name", sorted(REFERENCE_SPECS))
def test_fast_path_equals_per_term_reference(name):
    torch.manual_seed(0)
    spec = WeightSpaceSpec.from_axes(REFERENCE_SPECS[name])
    layer = UNFLinear(spec, 3, 2).double()
    with torch.no_grad():
        for b in layer.bias.values():
            b.normal_()
    x = random_features(spec, 2, 3, torch.Generator().manual_seed(1), torch.float64)
    fast, ref = layer(x), reference_forward(layer, spec, x)
    for k in fast:
        assert (fast[k] - ref[k]).abs().max() <= 1e-10


# ---------------------------------------------------------------------------------------------- equivariance
@pytest.fixture(scope="module")
def zoo_specs():
    cache = {}

    def get(name):
        if name not in cache:
            model, x = build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = derive_params_spec(model, x)
        return cache[name]

    return get


def derive_params_spec(model, x):
    return unf.derive_spec(model, x).parameters_only()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_three_layer_unf_is_equivariant_on_derived_specs(zoo_specs, name):
    spec = zoo_specs(name)
    torch.manual_seed(0)
    net = UNF(spec, [1, 3, 3, 1]).double()
    x = random_features(spec, 2, 1, torch.Generator().manual_seed(0), torch.float64)
    assert assert_equivariant(net, spec, x, trials=10, rtol=1e-10) <= 1e-10
    inv = UNFInvariant(spec, hidden=3, layers=2).double()
    assert assert_invariant(inv, spec, x, trials=10, rtol=1e-10) <= 1e-10


def test_exact_fixed_mode_and_positional_encodings_are_equivariant(zoo_specs):
    spec = zoo_specs("mlp")
    x = random_features(spec, 2, 2, torch.Generator().manual_seed(0), torch.float64)
    for layer in (UNFLinear(spec, 2, 3, fixed="exact"), UNFLinear(spec, 2, 3, positional=True)):
        layer = layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        assert_equivariant(layer, spec, x, trials=10, rtol=1e-10)
    exact = UNFLinear(spec, 2, 3, fixed="exact")
    relaxed = UNFLinear(spec, 2, 3)
    assert sum(p.numel() for p in exact.parameters()) > sum(p.numel() for p in relaxed.parameters())


def test_exact_mode_breaks_the_false_symmetry_of_fixed_axes():
    spec = WeightSpaceSpec.from_axes({"W": [("h", 3), (None, 2)]})
    layer = UNFLinear(spec, 1, 1, fixed="exact").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = random_features(spec, 1, 1, torch.Generator().manual_seed(0), torch.float64)
    swapped = {"W": x["W"].flip(-1)}  # permuting the fixed axis is not a symmetry: outputs need not follow
    assert not torch.allclose(layer(swapped)["W"], layer(x)["W"].flip(-1))


def test_baselines_are_invariant(zoo_specs):
    spec = zoo_specs("cnn_bn")
    x = random_features(spec, 3, 1, torch.Generator().manual_seed(0), torch.float64)
    assert_invariant(StatNN(spec).double(), spec, x, rtol=1e-10)
    assert_invariant(lambda f: InvariantPool(spec, "max")(f), spec, x, rtol=1e-12)


def test_gradcheck_on_a_tiny_spec():
    spec = WeightSpaceSpec.from_axes({"W": [("h", 2), ("h", 2)], "b": [("h", 2)], "v": [(None, 2), ("h", 2)]})
    layer = UNFLinear(spec, 2, 2).double()
    x = random_features(spec, 1, 2, torch.Generator().manual_seed(0), torch.float64)
    names = [e.name for e in spec.entries]

    def fn(*tensors):
        out = layer(dict(zip(names, tensors)))
        return tuple(out[n] for n in names)

    inputs = tuple(x[n].requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs)
    weights = list(layer.parameters())
    assert all(p.grad is None for p in weights)
    sum(o.sum() for o in fn(*inputs)).backward()
    assert all(p.grad is not None for p in weights)
