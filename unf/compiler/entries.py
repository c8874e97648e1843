"""From solved atoms to spec entries: cut each state-dict tensor into views whose axes carry one group each."""

from __future__ import annotations

from dataclasses import dataclass

from .axes import AxisGraph

__all__ = ["Tree", "axis_tree", "cut_entries"]


@dataclass(frozen=True)
class Tree:
    """Structure of one axis: a leaf (``root`` = group atom, None when fixed), a product or a concatenation."""

    kind: str  # "leaf" | "prod" | "seg"
    size: int
    root: int | None = None
    children: tuple[Tree, ...] = ()

    @property
    def fixed_leaf(self) -> bool:
        return self.kind == "leaf" and self.root is None


def _fixed(size: int) -> Tree:
    return Tree("leaf", size)


def axis_tree(axes: AxisGraph, dim: list[int]) -> Tree:
    """The (simplified) structure of a tensor axis with atoms ``dim``."""
    if not dim:
        return _fixed(1)
    if len(dim) > 1:
        return _simplify("prod", [axis_tree(axes, [a]) for a in dim])
    r = axes.find(dim[0])
    if axes.is_fixed(r):
        return _fixed(axes.size(r))
    kind, children = axes.refinement(r)
    if kind is None:
        return Tree("leaf", axes.size(r), root=r)
    return _simplify(kind, [axis_tree(axes, [c]) for c in children])


def _simplify(kind: str, subs: list[Tree]) -> Tree:
    flat: list[Tree] = []
    for s in subs:
        flat.extend(s.children if s.kind == kind else (s,))
    size = 1 if kind == "prod" else 0
    for s in flat:
        size = size * s.size if kind == "prod" else size + s.size
    if all(s.fixed_leaf for s in flat):
        return _fixed(size)
    if kind == "prod":  # merge neighbouring fixed factors (e.g. a flattened spatial block) and drop 1s
        merged: list[Tree] = []
        for s in flat:
            if s.size == 1:
                continue
            if s.fixed_leaf and merged and merged[-1].fixed_leaf:
                merged[-1] = _fixed(merged[-1].size * s.size)
            else:
                merged.append(s)
        flat = merged
        if len(flat) == 1:
            return flat[0]
    return Tree(kind, size, children=tuple(flat))


@dataclass(frozen=True)
class Cut:
    """One entry of a source tensor: how to view it, its shape, the group atom per axis, its index block."""

    steps: tuple[tuple, ...]
    shape: tuple[int, ...]
    roots: tuple[int | None, ...]
    block: tuple[tuple[int, int], ...]


def cut_entries(trees: list[Tree]) -> list[Cut]:
    """Enumerate the entries of a tensor whose axes have structures ``trees``.

    Products become ``view`` splits, concatenations become ``narrow`` blocks (one entry per combination).
    """
    block = tuple((0, t.size) for t in trees)
    return _cut(list(trees), (), block, list(range(len(trees))))


def _cut(axes: list[Tree], steps: tuple, block: tuple, src: list[int | None]) -> list[Cut]:
    if any(t.kind == "prod" for t in axes):
        new_axes: list[Tree] = []
        new_src: list[int | None] = []
        for t, s in zip(axes, src):
            if t.kind == "prod":
                new_axes.extend(t.children)
                new_src.extend([None] * len(t.children))
            else:
                new_axes.append(t)
                new_src.append(s)
        steps = steps + (("view", tuple(t.size for t in new_axes)),)
        return _cut(new_axes, steps, block, new_src)
    for i, t in enumerate(axes):
        if t.kind == "seg":
            out: list[Cut] = []
            offset = 0
            for child in t.children:
                b = block
                if src[i] is not None:  # still a whole source axis: record the index range
                    b = list(block)
                    base = block[src[i]][0]
                    b[src[i]] = (base + offset, base + offset + child.size)
                    b = tuple(b)
                out += _cut(axes[:i] + [child] + axes[i + 1 :], steps + (("narrow", i, offset, child.size),),
                            b, src)
                offset += child.size
            return out
    return [Cut(steps, tuple(t.size for t in axes), tuple(t.root for t in axes), block)]
