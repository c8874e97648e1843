"""Unit tests of the axis union-find with product / segment refinements."""

from __future__ import annotations

from unf.compiler.axes import AxisGraph


def test_union_and_fix_propagate():
    g = AxisGraph()
    a, b, c = g.new(4), g.new(4), g.new(4)
    g.union(a, b)
    assert g.find(a) == g.find(b) != g.find(c)
    g.fix(c)
    g.union(b, c)
    assert g.is_fixed(a)


def test_unify_dims_finds_common_product_refinement():
    g = AxisGraph()
    x = g.new(24)
    y1, y2 = g.new(4), g.new(6)
    assert g.unify_dims([x], [y1, y2])
    assert [g.size(a) for a in g.leaves([x])] == [4, 6]
    # a second, finer factorisation refines further
    z = [g.new(2), g.new(2), g.new(6)]
    assert g.unify_dims([x], z)
    assert [g.size(a) for a in g.leaves([x])] == [2, 2, 6]
    assert g.find(g.leaves([x])[2]) == g.find(y2) == g.find(z[2])


def test_incompatible_products_fix_everything():
    g = AxisGraph()
    x, y = [g.new(6), g.new(4)], [g.new(4), g.new(6)]
    assert not g.unify_dims(x, y)
    assert all(g.is_fixed(a) for a in x + y)


def test_cover_segments_and_fixed_parent_fixes_children():
    g = AxisGraph()
    a = g.new(10)
    mid = g.cover(a, 3, 7)
    assert [g.size(m) for m in mid] == [4]
    kind, children = g.refinement(a)
    assert kind == "seg" and [g.size(c) for c in children] == [3, 4, 3]
    # a wider cover reuses and refines the segmentation
    wide = g.cover(a, 2, 8)
    assert sum(g.size(m) for m in wide) == 6
    g.fix(a)
    assert all(g.is_fixed(c) for c in children)


def test_union_of_two_segmentations_aligns_boundaries():
    g = AxisGraph()
    a, b = g.new(8), g.new(8)
    a1, a2 = g.cover(a, 0, 4)[0], g.cover(a, 4, 8)[0]
    b_parts = [g.cover(b, 0, 2)[0], g.cover(b, 2, 8)[0]]
    g.union(a, b)
    assert g.find(b_parts[0]) in [g.find(x) for x in g.cover(a1, 0, 2)]
    assert not g.is_fixed(a2)


def test_product_versus_segments_is_fixed():
    g = AxisGraph()
    a, b = g.new(6), g.new(6)
    g.unify_dims([a], [g.new(2), g.new(3)])  # a = 2 x 3
    g.cover(b, 0, 3)  # b = 3 + 3
    g.union(a, b)
    assert g.is_fixed(a) and g.is_fixed(b)


def test_size_one_atoms_are_fixed_and_dims_of_one_are_empty():
    g = AxisGraph()
    assert g.new_dim(1) == [] and g.new_dim(0) == []
    assert g.is_fixed(g.new(1))
