"""Axis union-find with refinements: the bookkeeping behind the spec compiler.

Every axis of every tensor in the traced graph is a list of *atoms* (its row-major factors; a size-1 axis has
none). An atom stands for one index set of size > 1 that a single permutation may act on. Op rules make two
atoms *equal* (``union``: they must be permuted by the same permutation) or *fixed* (only the identity).

An atom's class can be *refined* once, in one of two ways, and the refinement is shared by every atom in
the class:

- ``prod``: the index set is a row-major product of child atoms (a reshape split ``768 -> 12 x 64``); the
  permutation is restricted to ``sigma_1 (x) sigma_2``.
- ``seg``: the index set is a concatenation of child atoms (a slice or split ``2304 -> 768 + 768 + 768``);
  the permutation is restricted to ``sigma_1 (+) sigma_2 (+) ...``.

Both restrictions are subgroups, so refining is always sound (it can only lose symmetry). Where two
refinements cannot be reconciled, the class is fixed. Invariant kept eagerly: a fixed class has only
fixed descendants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AxisGraph"]


@dataclass
class _Atom:
    size: int
    parent: int
    fixed: bool = False
    kind: str | None = None  # None, "prod" or "seg"; only meaningful on a class root
    children: list[int] = field(default_factory=list)


class AxisGraph:
    """Union-find over atoms with product/segment refinements (see module docstring)."""

    def __init__(self) -> None:
        self._atoms: list[_Atom] = []

    # ------------------------------------------------------------------ basics
    def new(self, size: int, fixed: bool = False) -> int:
        if size < 1:
            raise ValueError(f"atoms have size >= 1, got {size}")
        fixed = fixed or size == 1  # size-1 atoms only occur as segments; nothing to permute
        i = len(self._atoms)
        self._atoms.append(_Atom(size=size, parent=i, fixed=fixed))
        return i

    def new_dim(self, size: int, fixed: bool = False) -> list[int]:
        """Atoms of a fresh axis of ``size`` (empty for size 0 or 1)."""
        return [self.new(size, fixed)] if size > 1 else []

    def find(self, a: int) -> int:
        atoms = self._atoms
        root = a
        while atoms[root].parent != root:
            root = atoms[root].parent
        while atoms[a].parent != root:  # path compression
            atoms[a].parent, a = root, atoms[a].parent
        return root

    def size(self, a: int) -> int:
        return self._atoms[a].size

    def is_fixed(self, a: int) -> bool:
        return self._atoms[self.find(a)].fixed

    def refinement(self, a: int) -> tuple[str | None, list[int]]:
        r = self._atoms[self.find(a)]
        return r.kind, list(r.children)

    def _refine(self, a: int, kind: str, sizes: list[int]) -> list[int]:
        r = self.find(a)
        atom = self._atoms[r]
        assert atom.kind is None
        children = [self.new(s, atom.fixed) for s in sizes]
        atom = self._atoms[r]  # list may have grown
        atom.kind, atom.children = kind, children
        return children

    def compose(self, kind: str, parts: list[int]) -> int:
        """A fresh atom refined as the product / concatenation of existing atoms ``parts``."""
        if len(parts) == 1:
            return parts[0]
        total = 1 if kind == "prod" else 0
        for p in parts:
            total = total * self.size(p) if kind == "prod" else total + self.size(p)
        i = self.new(total)
        self._atoms[i].kind, self._atoms[i].children = kind, list(parts)
        return i

    # ------------------------------------------------------------------ fixing
    def fix(self, a: int) -> None:
        stack = [a]
        while stack:
            r = self.find(stack.pop())
            atom = self._atoms[r]
            if atom.fixed:
                continue
            atom.fixed = True
            stack.extend(atom.children)

    def fix_dims(self, dims: list[list[int]]) -> None:
        for d in dims:
            for a in d:
                self.fix(a)

    # ------------------------------------------------------------------ products
    def leaves(self, dim: list[int]) -> list[int]:
        """Expand product refinements: the current row-major factors of an axis."""
        out: list[int] = []
        stack = list(reversed(dim))
        while stack:
            r = self.find(stack.pop())
            atom = self._atoms[r]
            if atom.kind == "prod":
                stack.extend(reversed(atom.children))
            else:
                out.append(r)
        return out

    def split(self, a: int, outer: int) -> tuple[int, int]:
        """Refine leaf atom ``a`` as a product ``outer x (size/outer)``; returns the two factors."""
        r = self.find(a)
        atom = self._atoms[r]
        if atom.kind == "seg":
            # A concatenation cannot also be a product in our representation: give up the symmetry.
            self.fix(r)
            atom.kind, atom.children = None, []  # descendants already fixed; keep them fixed
            atom.fixed = True
        elif atom.kind == "prod":
            raise AssertionError("split() takes a leaf")
        c = self._refine(r, "prod", [outer, atom.size // outer])
        return c[0], c[1]

    def unify_dims(self, d1: list[int], d2: list[int]) -> bool:
        """Make two axes of equal total size carry the same permutation (common product refinement).

        Returns False (after fixing both) when their factorizations cannot be aligned.
        """
        a, b = self.leaves(d1), self.leaves(d2)
        i = j = 0
        while i < len(a) and j < len(b):
            sa, sb = self.size(a[i]), self.size(b[j])
            if sa == sb:
                self.union(a[i], b[j])
                i += 1
                j += 1
            elif sa > sb and sa % sb == 0:
                x, y = self.split(a[i], sb)
                a[i : i + 1] = [x, y]
            elif sb > sa and sb % sa == 0:
                x, y = self.split(b[j], sa)
                b[j : j + 1] = [x, y]
            else:
                self.fix_dims([a, b])
                return False
        if i < len(a) or j < len(b):
            self.fix_dims([a, b])
            return False
        return True

    # ------------------------------------------------------------------ segments
    def cover(self, a: int, start: int, stop: int) -> list[int]:
        """Atoms whose concatenation is ``[start, stop)`` of atom ``a`` (segmenting it as needed)."""
        r = self.find(a)
        atom = self._atoms[r]
        if start <= 0 and stop >= atom.size:
            return [r]
        if atom.kind == "prod":
            # a product cannot be cut along its flat index in our representation
            self.fix(r)
            atom.kind, atom.children = None, []
            atom.fixed = True
        if atom.kind is None:
            cuts = [c for c in (start, stop) if 0 < c < atom.size]
            sizes, prev = [], 0
            for c in cuts + [atom.size]:
                sizes.append(c - prev)
                prev = c
            self._refine(r, "seg", sizes)
        out: list[int] = []
        offset = 0
        for child in list(self._atoms[self.find(r)].children):
            size = self.size(child)
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                out.extend(self.cover(child, lo - offset, hi - offset))
            offset += size
        return out

    def _union_seq(self, la: list[int], lb: list[int]) -> None:
        """Unify two concatenations of atoms with equal total size."""
        la, lb = list(la), list(lb)
        i = j = 0
        while i < len(la) and j < len(lb):
            sa, sb = self.size(la[i]), self.size(lb[j])
            if sa == sb:
                self.union(la[i], lb[j])
                i += 1
                j += 1
            elif sa > sb:
                la[i : i + 1] = self.cover(la[i], 0, sb) + self.cover(la[i], sb, sa)
            else:
                lb[j : j + 1] = self.cover(lb[j], 0, sa) + self.cover(lb[j], sa, sb)

    # ------------------------------------------------------------------ union
    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        A, B = self._atoms[ra], self._atoms[rb]
        if A.size != B.size:
            raise AssertionError(f"union of atoms of sizes {A.size} and {B.size}")
        if A.kind is None and B.kind is not None:  # keep the refined one as root
            ra, rb, A, B = rb, ra, B, A
        fixed = A.fixed or B.fixed
        B.parent = ra
        b_kind, b_children = B.kind, B.children
        B.kind, B.children = None, []
        if fixed and not (A.fixed and B.fixed):
            A.fixed = False
            self.fix(ra)
            for c in b_children:
                self.fix(c)
        if b_kind is None:
            return
        if b_kind == A.kind == "prod":
            self.unify_dims(list(A.children), b_children)
        elif b_kind == A.kind == "seg":
            self._union_seq(list(A.children), b_children)
        else:  # product vs concatenation: no common refinement we can express
            self.fix(ra)
            for c in b_children:
                self.fix(c)
