"""Values flowing through the traced graph, and the helpers op rules use to relate their axes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .axes import AxisGraph

__all__ = ["TVal", "Lazy", "RuleContext"]


@dataclass
class TVal:
    """A tensor in the graph: per axis, its list of atoms (row-major factors; empty for size 1).

    ``uniform`` marks tensors whose elements are all equal and independent of the weights (``zeros``,
    ``full``...): any permutation leaves them unchanged, so they constrain nothing.
    """

    dims: list[list[int]]
    shape: tuple[int, ...]
    uniform: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)


class Lazy:
    """A tuple element whose constraints apply only if the graph reads it (e.g. an RNN's final state)."""

    def __init__(self, make) -> None:
        self._make = make
        self._value = None

    def force(self) -> Any:
        if self._value is None:
            self._value = self._make()
        return self._value


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


class RuleContext:
    """What a rule sees: the axis graph plus helpers that express common axis relations."""

    def __init__(self, axes: AxisGraph) -> None:
        self.axes = axes
        self.node = None  # the node being processed (for messages)

    # ------------------------------------------------------------------ building values
    def fresh(self, shape, fixed: bool = False, uniform: bool = False) -> TVal:
        shape = tuple(int(s) for s in shape)
        return TVal([self.axes.new_dim(s, fixed) for s in shape], shape, uniform)

    def fresh_like_meta(self, meta: Any, fixed: bool = True, uniform: bool = False) -> Any:
        """Fresh values shaped like a node's ``meta['val']`` (tensor, or nested tuple/list of tensors)."""
        if isinstance(meta, torch.Tensor):
            return self.fresh(_shape(meta), fixed=fixed, uniform=uniform)
        if isinstance(meta, (tuple, list)):
            return type(meta)(self.fresh_like_meta(m, fixed, uniform) for m in meta)
        return None

    def out_shape(self, index: int | None = None) -> tuple[int, ...]:
        meta = self.node.meta["val"]
        return _shape(meta if index is None else meta[index])

    # ------------------------------------------------------------------ relating axes
    def fix(self, *vals: Any) -> None:
        for v in vals:
            if isinstance(v, TVal):
                self.axes.fix_dims(v.dims)
            elif isinstance(v, (tuple, list)):
                self.fix(*v)
            elif isinstance(v, Lazy):
                self.fix(v.force())

    def unify(self, d1: list[int], d2: list[int]) -> None:
        self.axes.unify_dims(d1, d2)

    def broadcast(self, vals: list[TVal], out_shape: tuple[int, ...]) -> TVal:
        """Elementwise op over broadcast operands: aligned axes must carry the same permutation."""
        n = len(out_shape)
        dims: list[list[int] | None] = [None] * n
        real = [v for v in vals if not v.uniform and v.ndim <= n]
        for v in real:
            for k in range(1, v.ndim + 1):
                if v.shape[-k] == 1:
                    continue
                if dims[n - k] is None:
                    dims[n - k] = v.dims[-k]
                else:
                    self.unify(dims[n - k], v.dims[-k])
        # axes along which every real operand is broadcast: the result is constant there, any permutation works
        out = [d if d is not None else self.axes.new_dim(out_shape[i]) for i, d in enumerate(dims)]
        return TVal(out, tuple(out_shape), uniform=not real)

    def reshape(self, x: TVal, shape: tuple[int, ...]) -> TVal:
        """Row-major reshape: the atoms are re-cut into the new axes (splitting atoms where needed)."""
        if x.uniform:
            return self.fresh(shape, uniform=True)
        leaves = self.axes.leaves([a for d in x.dims for a in d])
        out: list[list[int]] = []
        i = 0
        for size in shape:
            dim: list[int] = []
            prod = 1
            while prod < size and i < len(leaves):
                a = leaves[i]
                s = self.axes.size(a)
                if prod * s <= size and size % (prod * s) == 0:
                    dim.append(a)
                    prod *= s
                    i += 1
                elif s % (size // prod) == 0 and size % prod == 0:
                    outer, inner = self.axes.split(a, size // prod)
                    leaves[i : i + 1] = [outer, inner]
                else:
                    return self._failed_reshape(x, shape)
            if prod != size:
                return self._failed_reshape(x, shape)
            out.append(dim)
        if i != len(leaves):
            return self._failed_reshape(x, shape)
        return TVal(out, tuple(shape))

    def _failed_reshape(self, x: TVal, shape: tuple[int, ...]) -> TVal:
        self.fix(x)
        return self.fresh(shape, fixed=True)

    def slice(self, dim: list[int], start: int, stop: int) -> list[int] | None:
        """Atoms of ``[start, stop)`` along an axis with atoms ``dim``; None when not expressible."""
        leaves = self.axes.leaves(dim)
        if not leaves:
            return []
        inner = 1
        for a in leaves[1:]:
            inner *= self.axes.size(a)
        if start % inner or stop % inner:
            return None
        covered = self.axes.cover(leaves[0], start // inner, stop // inner)
        if (stop - start) // inner == 1:  # a single index of the outer factor: no axis left there
            return leaves[1:]
        return [self.axes.compose("seg", covered)] + leaves[1:]
