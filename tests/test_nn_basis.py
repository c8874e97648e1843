"""Completeness of the UNF basis: term counts, Bell formula, null-space dimension, linear independence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unf.nn import UNFLinear, bell, count_terms, enumerate_terms, pair_term_count, resolve_entries
from unf.nn.basis import build_plan, set_partitions
from unf.spec import WeightSpaceSpec

from .test_nn_reference import SPECS, single_thread  # noqa: F401 (autouse fixture)


def test_bell_numbers_and_partitions() -> None:
    assert [bell(n) for n in range(8)] == [1, 1, 2, 5, 15, 52, 203, 877]
    for n in range(7):
        parts = set_partitions(n)
        assert len(parts) == bell(n) == len(set(parts))


@pytest.mark.parametrize("axes_out,axes_in,expected", [
    ([("a", 3)], [("a", 3)], 2),  # vector <- vector
    ([("a", 3), ("b", 4)], [("a", 3), ("b", 4)], 4),  # matrix <- matrix
    ([("h", 4), ("h", 4)], [("h", 4), ("h", 4)], 15),  # W_hh <- W_hh
    ([("h", 4)], [("h", 4), ("h", 4)], 5),  # b_h <- W_hh
])
def test_pair_counts_from_the_paper(axes_out, axes_in, expected) -> None:
    spec = WeightSpaceSpec.from_axes({"o": axes_out, "i": axes_in})
    entries, _ = resolve_entries(spec)
    assert pair_term_count(entries[0], entries[1]) == expected
    terms = [t for t in enumerate_terms(entries) if t.out == 0 and t.inp == 1]
    assert len(terms) == expected


def test_mlp_reference_counts() -> None:
    """UNF paper Table 3: the MLP 64-32-10 UNF[1] layer has 32 terms and 1,028 parameters."""
    spec = WeightSpaceSpec.from_axes({"W1": [("h", 32), ("in", 64)], "b1": [("h", 32)],
                                      "W2": [("out", 10), ("h", 32)], "b2": [("out", 10)]})
    layer = UNFLinear(spec, 32, 1)
    assert layer.num_terms == 32 == count_terms(layer.plan.entries)
    assert sum(p.numel() for p in layer.parameters()) == 1028
    # a derived-style spec (fixed input/output axes) relaxes to the same layer
    fixed = WeightSpaceSpec.from_axes({"W1": [("h", 32), (None, 64)], "b1": [("h", 32)],
                                       "W2": [(None, 10), ("h", 32)], "b2": [(None, 10)]})
    layer = UNFLinear(fixed, 32, 1)
    assert layer.num_terms == 32 and sum(p.numel() for p in layer.parameters()) == 1028
    # the plan shares reductions and matmuls: 12 distinct reductions, 6 matmuls for 32 terms
    assert len(layer.plan.reductions) == 12 and len(layer.plan.mixes) == 6
    assert "terms" in layer.describe() and len(layer.term_equations()) == 32


# ---------------------------------------------------------------------------------------------- numerics
def _perm_matrix(spec: WeightSpaceSpec, name: str, perm: dict[str, torch.Tensor]) -> np.ndarray:
    """Matrix of a spec permutation acting on the flattened entry ``name``."""
    e = spec[name]
    d = int(np.prod(e.shape)) if e.shape else 1
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *e.shape)
    out = spec.permute_views({n.name: (basis if n.name == name else torch.zeros(1, *n.shape)) for n in
                              spec.entries}, perm, batch_dims=1)[name]
    return out.reshape(d, d).T.numpy()


def _generators(spec: WeightSpaceSpec) -> list[dict[str, torch.Tensor]]:
    """A transposition and an n-cycle per group (they generate S_n), identity on the others."""
    gens = []
    for g, n in spec.groups.items():
        if n < 2:
            continue
        for p in (torch.tensor([1, 0] + list(range(2, n))), torch.roll(torch.arange(n), 1)):
            perm = spec.identity_permutation()
            perm[g] = p
            gens.append(perm)
    return gens


def _null_dim(mats_out: list[np.ndarray], mats_in: list[np.ndarray]) -> int:
    """dim{L : M_o L = L M_i for every generator}, by the rank of the stacked commutation constraints."""
    do, di = mats_out[0].shape[0], mats_in[0].shape[0]
    rows = [np.kron(mo, np.eye(di)) - np.kron(np.eye(do), mi.T) for mo, mi in zip(mats_out, mats_in)]
    if not rows:
        return do * di
    return do * di - np.linalg.matrix_rank(np.concatenate(rows))


def _dense_term(term, entries) -> np.ndarray:
    """The term E_P as a dense (out numel, in numel) matrix (all axes permuted, mean over reduced blocks)."""
    o, i = entries[term.out], entries[term.inp]
    shape = o.sizes + i.sizes
    labels = term.out_labels + term.in_labels
    E = np.zeros(shape)
    for idx in itertools.product(*(range(n) for n in shape)):
        val = {}
        if all(val.setdefault(b, v) == v for b, v in zip(labels, idx)):
            E[idx] = 1.0
    for b in term.reduced:
        E /= term.block_sizes[b]
    return E.reshape(int(np.prod(o.sizes)), int(np.prod(i.sizes)))


def _relaxed_spec(entries) -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({e.name: list(zip(e.groups, e.sizes)) for e in entries})


@pytest.mark.parametrize("name", ["mlp", "mlp_fixed", "rnn", "heads", "cnn"])
def test_basis_is_complete_and_independent(name: str) -> None:
    """Per pair: #terms = Bell formula = dim of the null space of the commutation constraints, terms commute
    with the generators and are linearly independent (group sizes >= indices per group in every pair)."""
    entries, _ = resolve_entries(SPECS[name])
    rspec = _relaxed_spec(entries)
    gens = _generators(rspec)
    mats = {e.name: [_perm_matrix(rspec, e.name, g) for g in gens] for e in entries}
    terms = enumerate_terms(entries)
    assert len(terms) == count_terms(entries)
    for (oi, o), (ii, i) in itertools.product(enumerate(entries), repeat=2):
        if np.prod(o.sizes) * np.prod(i.sizes) > 2000 and name == "cnn":
            continue  # keep the dense check small; other pairs of the same shapes are covered
        pair = [t for t in terms if t.out == oi and t.inp == ii]
        dense = [_dense_term(t, entries) for t in pair]
        null = _null_dim(mats[o.name], mats[i.name])
        assert len(pair) == pair_term_count(o, i) == null, (o.name, i.name)
        stacked = np.stack([d.ravel() for d in dense])
        assert np.linalg.matrix_rank(stacked) == len(pair)
        for mo, mi in zip(mats[o.name], mats[i.name]):
            for d in dense:
                assert np.abs(mo @ d - d @ mi).max() < 1e-12


def test_small_groups_still_span() -> None:
    """With a group smaller than its index count the terms are dependent but still span the whole space."""
    spec = WeightSpaceSpec.from_axes({"W": [("h", 2), ("h", 2)]})
    entries, _ = resolve_entries(spec)
    gens = _generators(spec)
    m = [_perm_matrix(spec, "W", g) for g in gens]
    terms = enumerate_terms(entries)
    dense = np.stack([_dense_term(t, entries).ravel() for t in terms])
    null = _null_dim(m, m)  # 8 = orbits of S_2 on pairs of matrix positions
    assert len(terms) == 15 > null and np.linalg.matrix_rank(dense) == null == 8


def _layer_maps(layer: UNFLinear, spec: WeightSpaceSpec) -> np.ndarray:
    """One dense map (D x D) per parameter coordinate of a 1->1 channel layer without bias."""
    sizes = [int(np.prod(e.shape)) if e.shape else 1 for e in spec.entries]
    D = sum(sizes)
    eye = torch.eye(D, dtype=torch.float64)
    x, off = {}, 0
    for e, n in zip(spec.entries, sizes):
        x[e.name] = eye[:, off:off + n].reshape(D, 1, *e.shape)
        off += n
    params = list(layer.parameters())
    maps = []
    with torch.no_grad():
        for p in params:
            p.zero_()
        for p in params:
            for k in range(p.numel()):
                p.view(-1)[k] = 1.0
                y = layer(x)
                maps.append(torch.cat([y[e.name].reshape(D, -1) for e in spec.entries], 1).T.numpy())
                p.view(-1)[k] = 0.0
    return np.stack(maps)


@pytest.mark.parametrize("name,fixed", [("rnn", "exact"), ("mlp_fixed", "exact"), ("rnn", "relax"),
                                        ("heads", "auto")])
def test_layer_spans_all_equivariant_maps(name: str, fixed: str) -> None:
    """The layer itself (c=1, no bias): its maps are independent in the parameters and their number equals
    the dimension of all maps commuting with the group the layer uses. Under ``exact`` that group is the true
    one (fixed axes never permuted); under ``relax``/``auto`` relaxed fixed axes are permuted too."""
    spec = SPECS[name]
    layer = UNFLinear(spec, 1, 1, fixed=fixed, exact_max_size=2, bias=False, dtype=torch.float64)
    entries = layer.plan.entries
    gspec = WeightSpaceSpec.from_axes({e.name: [
        (e.groups[e.perm_axes.index(ax)] if ax in e.perm_axes else None, n) for ax, n in enumerate(e.shape)]
        for e in entries})
    gens = _generators(gspec)
    mats = {e.name: [_perm_matrix(gspec, e.name, g) for g in gens] for e in entries}
    if not gens:
        mats = {e.name: [np.eye(int(np.prod(e.shape)))] for e in entries}
    total_null = sum(_null_dim(mats[o.name], mats[i.name]) for o in entries for i in entries)
    maps = _layer_maps(layer, gspec)
    n_params = sum(p.numel() for p in layer.parameters())
    assert maps.shape[0] == n_params == total_null
    assert np.linalg.matrix_rank(maps.reshape(len(maps), -1)) == n_params
    # every map commutes with every generator (on the whole space)
    big = [np.block([[m if a == b else np.zeros((mats[a][k].shape[0], mats[b][k].shape[0]))
                      for b in mats for m in [mats[a][k]]] for a in mats]) for k in range(len(gens))]
    for g in big:
        assert max(np.abs(g @ m - m @ g).max() for m in maps) < 1e-12


def test_plan_shares_reductions() -> None:
    entries, _ = resolve_entries(SPECS["heads"])
    plan = build_plan(entries)
    keys = {(r.inp, r.struct, r.kept) for r in plan.reductions}
    assert len(keys) == len(plan.reductions)  # each distinct reduction computed once
    assert len(plan.mixes) < len(plan.groups) < len(plan.terms)
    # reductions are derived from the smallest available superset
    for r in plan.reductions:
        if r.parent is not None:
            assert set(r.kept) < set(plan.reductions[r.parent].kept)
