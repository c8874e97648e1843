"""The op rule table: how each ATen op relates the axes of its inputs and outputs.

A rule receives the :class:`RuleContext` and the op's arguments bound by name (tensors replaced by
:class:`TVal`), and returns the output value(s). Rules may only *restrict* symmetry: they unify atoms (same
permutation) or fix them. Ops without a rule are handled by :func:`fallback`, which fixes every axis they touch.

Reading guide: ``RULES`` at the bottom maps op names (``aten.<name>``, overload ignored) to rules.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from .context import Lazy, RuleContext, TVal

__all__ = ["RULES", "fallback", "rule_for"]

Args = dict[str, Any]
Rule = Callable[[RuleContext, Args], Any]


def _tensors(x: Any) -> list[TVal]:
    if isinstance(x, TVal):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dims_arg(d: Any, ndim: int) -> list[int]:
    """A ``dim`` argument as a sorted list; None or [] mean every axis."""
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(ndim))
    if isinstance(d, int):
        d = [d]
    return sorted(_dim(int(i), ndim) for i in d)


def _short_name(ctx: RuleContext) -> str:
    return op_name(ctx.node.target).split(".")[-1]


# ---------------------------------------------------------------------------------------------- generic
def fallback(ctx: RuleContext, a: Args) -> Any:
    """No rule: every axis of every tensor the op touches becomes fixed (never claim a false symmetry)."""
    ctx.fix(*_tensors(a))
    return ctx.fresh_like_meta(ctx.node.meta.get("val"), fixed=True)


def identity(ctx: RuleContext, a: Args) -> TVal:
    """Same axes in, same axes out (casts, copies, dropout in eval, softmax along an axis)."""
    x = next(iter(a.values()))
    return TVal(list(x.dims), x.shape, x.uniform)


def elementwise(ctx: RuleContext, a: Args) -> TVal:
    """Pointwise ops with broadcasting: residual adds tie streams, a gated product ties both branches."""
    return ctx.broadcast(_tensors(a), ctx.out_shape())


def uniform_factory(ctx: RuleContext, a: Args) -> TVal:
    """zeros/ones/full/empty: all elements equal, so any permutation leaves them unchanged."""
    return ctx.fresh(ctx.out_shape(), uniform=True)


def fixed_factory(ctx: RuleContext, a: Args) -> Any:
    """arange/randn/eye...: positional or random content; every axis fixed."""
    return ctx.fresh_like_meta(ctx.node.meta["val"], fixed=True)


def skip(ctx: RuleContext, a: Args) -> None:
    return None


def getitem(ctx: RuleContext, a: Args) -> Any:
    seq, i = a["seq"], a["index"]
    if seq is None:
        return None
    item = seq[i]
    return item.force() if isinstance(item, Lazy) else item


# ---------------------------------------------------------------------------------------------- shapes
def reshape(ctx: RuleContext, a: Args) -> TVal:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: atoms re-cut into the new axes."""
    return ctx.reshape(a["self"], ctx.out_shape())


def transpose(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    d0, d1 = _dim(a["dim0"], x.ndim), _dim(a["dim1"], x.ndim)
    dims = list(x.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TVal(dims, ctx.out_shape(), x.uniform)


def t(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    return TVal(list(reversed(x.dims)), ctx.out_shape(), x.uniform)


def permute(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    return TVal([x.dims[_dim(d, x.ndim)] for d in a["dims"]], ctx.out_shape(), x.uniform)


def expand(ctx: RuleContext, a: Args) -> TVal:
    """Broadcast copies: a new or size-1 axis holds equal copies, so it may be permuted freely (GQA)."""
    x, shape = a["self"], ctx.out_shape()
    lead = len(shape) - x.ndim
    dims = [ctx.axes.new_dim(s) for s in shape[:lead]]
    for i, d in enumerate(x.dims):
        dims.append(d if x.shape[i] == shape[lead + i] else ctx.axes.new_dim(shape[lead + i]))
    return TVal(dims, shape, x.uniform)


def repeat(ctx: RuleContext, a: Args) -> TVal:
    """Tiling: the copy index is a free outer factor of each repeated axis."""
    x, reps, shape = a["self"], list(a["repeats"]), ctx.out_shape()
    lead = len(reps) - x.ndim
    dims = [ctx.axes.new_dim(r) for r in reps[:lead]]
    for i, d in enumerate(x.dims):
        dims.append(ctx.axes.new_dim(reps[lead + i]) + list(d))
    return TVal(dims, shape, x.uniform)


def repeat_interleave(ctx: RuleContext, a: Args) -> TVal:
    x, dim = a["self"], a.get("dim")
    if not isinstance(x, TVal) or dim is None or not isinstance(a.get("repeats"), int):
        return fallback(ctx, a)
    d = _dim(dim, x.ndim)
    dims = list(x.dims)
    dims[d] = list(dims[d]) + ctx.axes.new_dim(a["repeats"])
    return TVal(dims, ctx.out_shape(), x.uniform)


def _slice_value(ctx: RuleContext, x: TVal, d: int, start: int, stop: int, keep_dim: bool,
                 out_shape: tuple[int, ...]) -> TVal:
    if x.uniform:
        return ctx.fresh(out_shape, uniform=True)
    atoms = ctx.slice(x.dims[d], start, stop)
    if atoms is None:  # cut not aligned with the axis' factors: give up the axis
        ctx.axes.fix_dims([x.dims[d]])
        atoms = ctx.axes.new_dim(stop - start, fixed=True)
    dims = list(x.dims)
    if keep_dim:
        dims[d] = atoms
    else:
        del dims[d]
    return TVal(dims, out_shape)


def slice_(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    d = _dim(a["dim"], x.ndim)
    n = x.shape[d]
    start = a.get("start") or 0
    end = a.get("end")
    start = max(0, min(n, start + n if start < 0 else start))
    end = n if end is None else max(0, min(n, end + n if end < 0 else end))
    if a.get("step", 1) != 1:
        ctx.axes.fix_dims([x.dims[d]])
        return ctx.fresh(ctx.out_shape(), fixed=True) if not x.uniform else ctx.fresh(ctx.out_shape(), uniform=True)
    return _slice_value(ctx, x, d, start, max(start, end), True, ctx.out_shape())


def narrow(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    d = _dim(a["dim"], x.ndim)
    start = a["start"] + x.shape[d] if a["start"] < 0 else a["start"]
    return _slice_value(ctx, x, d, start, start + a["length"], True, ctx.out_shape())


def select(ctx: RuleContext, a: Args) -> TVal:
    x = a["self"]
    d = _dim(a["dim"], x.ndim)
    i = a["index"] + x.shape[d] if a["index"] < 0 else a["index"]
    return _slice_value(ctx, x, d, i, i + 1, False, ctx.out_shape())


def split(ctx: RuleContext, a: Args) -> list[TVal]:
    """split/split_with_sizes/chunk/unbind/tensor_split: contiguous segments along one axis."""
    x = a["self"]
    d = _dim(a.get("dim", 0), x.ndim)
    keep = _short_name(ctx) != "unbind"
    out, start = [], 0
    for i, meta in enumerate(ctx.node.meta["val"]):
        size = int(meta.shape[d]) if keep else 1
        out.append(_slice_value(ctx, x, d, start, start + size, keep, ctx.out_shape(i)))
        start += size
    return out


def copy(ctx: RuleContext, a: Args) -> TVal:
    """copy(self, src): the values are src's, broadcast to self's shape."""
    return ctx.broadcast([a["src"]], ctx.out_shape())


def _scatter_window(ctx: RuleContext, x: TVal, src: TVal, d: int, start: int, stop: int) -> TVal:
    """``x`` with ``[start, stop)`` along axis ``d`` replaced by ``src`` (same rank as ``x``)."""
    shape = ctx.out_shape()
    if src.uniform and x.uniform:
        return ctx.fresh(shape, uniform=True)
    dims: list[list[int]] = []
    for i in range(x.ndim):
        if i == d:
            dims.append([])
            continue
        if not x.uniform and not src.uniform:
            ctx.unify(x.dims[i], src.dims[i])
        dims.append((src if x.uniform else x).dims[i])
    if not x.uniform:
        window = ctx.slice(x.dims[d], start, stop)
        if window is None:
            ctx.fix(x, src)
            return ctx.fresh(shape, fixed=True)
        if not src.uniform:
            ctx.unify(window, src.dims[d])
        dims[d] = x.dims[d]
    else:  # writing into zeros: the untouched parts are constant, so they permute freely
        n = shape[d]
        middle = (ctx.axes.compose("prod", ctx.axes.leaves(src.dims[d])) if stop - start > 1
                  else ctx.axes.new(1))
        parts = [p for p in (ctx.axes.new(start) if start else None, middle,
                             ctx.axes.new(n - stop) if n > stop else None) if p is not None]
        dims[d] = [ctx.axes.compose("seg", parts)] if n > 1 else []
    return TVal(dims, shape)


def slice_scatter(ctx: RuleContext, a: Args) -> TVal:
    x, src = a["self"], a["src"]
    d = _dim(a.get("dim", 0), x.ndim)
    n = x.shape[d]
    start = a.get("start") or 0
    end = n if a.get("end") is None else min(n, a["end"] + n if a["end"] < 0 else a["end"])
    start = start + n if start < 0 else start
    if a.get("step", 1) != 1:
        return fallback(ctx, a)
    return _scatter_window(ctx, x, src, d, start, end)


def select_scatter(ctx: RuleContext, a: Args) -> TVal:
    x, src = a["self"], a["src"]
    d = _dim(a["dim"], x.ndim)
    i = a["index"] + x.shape[d] if a["index"] < 0 else a["index"]
    shape = list(src.shape)
    shape.insert(d, 1)
    src1 = TVal(list(src.dims[:d]) + [[]] + list(src.dims[d:]), tuple(shape), src.uniform)
    return _scatter_window(ctx, x, src1, d, i, i + 1)


def cat(ctx: RuleContext, a: Args) -> TVal:
    """Concatenation: the new axis is a sum of the pieces' axes; the other axes are tied across pieces."""
    shape = ctx.out_shape()
    d = _dim(a.get("dim", 0), len(shape))
    pieces = [v for v in a["tensors"] if isinstance(v, TVal) and 0 not in v.shape]
    if not pieces:
        return ctx.fresh(shape, uniform=True)
    if all(p.uniform for p in pieces):
        return ctx.fresh(shape, uniform=True)
    dims: list[list[int] | None] = [None] * len(shape)
    for p in pieces:
        if p.uniform:
            continue
        for i in range(len(shape)):
            if i == d:
                continue
            if dims[i] is None:
                dims[i] = p.dims[i]
            else:
                ctx.unify(dims[i], p.dims[i])
    parts = []
    for p in pieces:
        if p.uniform:
            parts.append(ctx.axes.new(p.shape[d]))
        elif p.shape[d] == 1:
            parts.append(ctx.axes.new(1))
        else:
            parts.append(ctx.axes.compose("prod", ctx.axes.leaves(p.dims[d])))
    dims[d] = [ctx.axes.compose("seg", parts)] if shape[d] > 1 else []
    dims = [x if x is not None else ctx.axes.new_dim(shape[i]) for i, x in enumerate(dims)]
    return TVal(dims, shape)


def stack(ctx: RuleContext, a: Args) -> TVal:
    shape = ctx.out_shape()
    d = _dim(a.get("dim", 0), len(shape))
    pieces = [v for v in a["tensors"] if isinstance(v, TVal) and not v.uniform]
    if not pieces:
        return ctx.fresh(shape, uniform=True)
    for p in pieces[1:]:
        for x, y in zip(pieces[0].dims, p.dims):
            ctx.unify(x, y)
    dims = list(pieces[0].dims)
    dims.insert(d, ctx.axes.new_dim(shape[d], fixed=True))  # which piece is which matters
    return TVal(dims, shape)


def pad(ctx: RuleContext, a: Args) -> TVal:
    """Constant padding: padded axes are positional, so they are fixed."""
    x, p = a["self"], list(a["pad"])
    dims = list(x.dims)
    shape = ctx.out_shape()
    for k in range(len(p) // 2):
        d = x.ndim - 1 - k
        if p[2 * k] or p[2 * k + 1]:
            ctx.axes.fix_dims([dims[d]])
            dims[d] = ctx.axes.new_dim(shape[d], fixed=True)
    return TVal(dims, shape)


def positional(*dim_args: str) -> Rule:
    """Ops whose result depends on positions along some axes (cumsum, flip, sort, argmax, tril): fix them."""

    def rule(ctx: RuleContext, a: Args) -> Any:
        x = a["self"]
        names = [n for n in dim_args if n in a]
        dims = set()
        for n in names:
            dims.update(_dims_arg(a[n], x.ndim))
        if dim_args == ("__last2__",):
            dims = {x.ndim - 2, x.ndim - 1}
        ctx.axes.fix_dims([x.dims[d] for d in dims])
        meta = ctx.node.meta["val"]
        metas = meta if isinstance(meta, (tuple, list)) else [meta]
        outs = []
        for m in metas:
            shape = tuple(int(s) for s in m.shape)
            if shape == x.shape:
                outs.append(TVal(list(x.dims), shape, x.uniform))
            elif len(shape) == x.ndim:  # an axis changed size (topk): keep the others
                outs.append(TVal([x.dims[i] if shape[i] == x.shape[i] else ctx.axes.new_dim(shape[i], True)
                                  for i in range(x.ndim)], shape))
            else:  # reduced (argmax without keepdim)
                outs.append(TVal([x.dims[i] for i in range(x.ndim) if i not in dims], shape))
        return type(meta)(outs) if isinstance(meta, (tuple, list)) else outs[0]

    return rule


# ---------------------------------------------------------------------------------------------- reductions
def reduction(ctx: RuleContext, a: Args) -> Any:
    """sum/mean/amax/var/norm... over some axes: invariant to any permutation of those axes."""
    x = a["self"]
    reduced = set(_dims_arg(a.get("dim"), x.ndim))
    keep = bool(a.get("keepdim", False))
    dims = []
    for i, d in enumerate(x.dims):
        if i in reduced:
            if keep:
                dims.append([])
        else:
            dims.append(d)
    meta = ctx.node.meta["val"]
    if isinstance(meta, (tuple, list)):  # var_mean, std_mean
        return type(meta)(TVal(list(dims), ctx.out_shape(i), x.uniform) for i in range(len(meta)))
    return TVal(dims, ctx.out_shape(), x.uniform)


def max_min(ctx: RuleContext, a: Args) -> Any:
    """max/min: elementwise with ``other``; over ``dim`` the indices are positions, so that axis is fixed."""
    if "other" in a:
        return elementwise(ctx, a)
    x = a["self"]
    if "dim" in a:
        ctx.axes.fix_dims([x.dims[_dim(a["dim"], x.ndim)]])
    return reduction(ctx, a)


# ---------------------------------------------------------------------------------------------- linear algebra
def linear(ctx: RuleContext, a: Args) -> TVal:
    x, w, b = a["input"], a["weight"], a.get("bias")
    ctx.unify(x.dims[-1], w.dims[-1])
    out_dims = w.dims[0] if w.ndim == 2 else []
    if isinstance(b, TVal) and not b.uniform and b.ndim == 1:
        ctx.unify(b.dims[0], out_dims)
    return TVal(list(x.dims[:-1]) + ([out_dims] if w.ndim == 2 else []), ctx.out_shape())


def _matmul_dims(ctx: RuleContext, x: TVal, y: TVal, shape: tuple[int, ...]) -> TVal:
    """Batched matrix product: contraction axes tied, batch axes broadcast, row/column axes carried."""
    kx = x.dims[-1]
    ky = y.dims[-2] if y.ndim >= 2 else y.dims[0]
    ctx.unify(kx, ky)
    rows = [x.dims[-2]] if x.ndim >= 2 else []
    cols = [y.dims[-1]] if y.ndim >= 2 else []
    nb = len(shape) - len(rows) - len(cols)
    bx = TVal(x.dims[:-2], x.shape[:-2]) if x.ndim > 2 else TVal([], ())
    by = TVal(y.dims[:-2], y.shape[:-2]) if y.ndim > 2 else TVal([], ())
    batch = ctx.broadcast([bx, by], shape[:nb]) if nb else TVal([], ())
    return TVal(batch.dims + rows + cols, shape)


def matmul(ctx: RuleContext, a: Args) -> TVal:
    x, y = a["self"], a.get("other", a.get("mat2"))
    return _matmul_dims(ctx, x, y, ctx.out_shape())


def addmm(ctx: RuleContext, a: Args) -> TVal:
    """addmm / baddbmm / addbmm-style: bias broadcast onto a matrix product (HF Conv1D)."""
    out = _matmul_dims(ctx, a["mat1"] if "mat1" in a else a["batch1"], a["mat2"] if "mat2" in a else a["batch2"],
                       ctx.out_shape())
    return ctx.broadcast([out, a["self"]], ctx.out_shape()) if isinstance(a["self"], TVal) else out


def einsum(ctx: RuleContext, a: Args) -> Any:
    eq = a["equation"].replace(" ", "")
    ops = a["tensors"]
    if "..." in eq or "->" not in eq:
        return fallback(ctx, a)
    lhs, rhs = eq.split("->")
    letters: dict[str, list[int]] = {}
    for spec, v in zip(lhs.split(","), ops):
        if v.uniform:
            continue
        for ch, d in zip(spec, v.dims):
            if ch in letters:
                ctx.unify(letters[ch], d)
            else:
                letters[ch] = d
    shape = ctx.out_shape()
    return TVal([letters.get(ch) or ctx.axes.new_dim(s) for ch, s in zip(rhs, shape)], shape)


def embedding(ctx: RuleContext, a: Args) -> TVal:
    """Token lookup: the vocabulary axis is indexed by (fixed) inputs, the feature axis is carried."""
    w, idx = a["weight"], a["indices"]
    ctx.axes.fix_dims([w.dims[0]])
    ctx.fix(idx)
    return TVal(list(idx.dims) + [w.dims[1]], ctx.out_shape())


def gather(ctx: RuleContext, a: Args) -> TVal:
    """gather along ``dim``: positions along it are data, so that axis is fixed; other axes pair up."""
    x, idx = a["self"], a["index"]
    d = _dim(a["dim"], x.ndim)
    ctx.axes.fix_dims([x.dims[d]])
    for i in range(x.ndim):
        if i != d:
            if x.shape[i] == idx.shape[i] and not x.uniform and not idx.uniform:
                ctx.unify(x.dims[i], idx.dims[i])
            else:
                ctx.fix(x, idx)
                return ctx.fresh(ctx.out_shape(), fixed=True)
    return TVal(list(idx.dims), ctx.out_shape())


def index_select(ctx: RuleContext, a: Args) -> TVal:
    """index_select along ``dim``: that axis is indexed by data (fixed); the rest are carried."""
    x, idx = a["self"], a["index"]
    d = _dim(a["dim"], x.ndim)
    ctx.axes.fix_dims([x.dims[d]])
    ctx.fix(idx)
    dims = list(x.dims)
    dims[d] = idx.dims[0] if idx.ndim else []
    return TVal(dims, ctx.out_shape())


def _conv(ctx: RuleContext, x: TVal, w: TVal, b: Any, groups: int, transposed: bool) -> TVal:
    """Convolutions: channels are permutable (grouped: group x within-group); spatial axes are fixed."""
    k = w.ndim - 2
    c = x.ndim - k - 1
    shape = ctx.out_shape()
    ctx.axes.fix_dims(list(x.dims[c + 1 :]) + list(w.dims[2:]))
    if groups == 1:
        cin, cout = (w.dims[0], w.dims[1]) if transposed else (w.dims[1], w.dims[0])
        ctx.unify(x.dims[c], cin)
        out_ch = cout
    elif not transposed:
        g = ctx.axes.new_dim(groups)
        ci = ctx.axes.new_dim(x.shape[c] // groups)
        co = ctx.axes.new_dim(w.shape[0] // groups)
        ctx.unify(x.dims[c], g + ci)
        ctx.unify(w.dims[1], ci)
        ctx.unify(w.dims[0], g + co)
        out_ch = g + co
    else:
        ctx.fix(x, w, b)
        return ctx.fresh(shape, fixed=True)
    if isinstance(b, TVal) and not b.uniform:
        ctx.unify(b.dims[0], out_ch)
    dims = list(x.dims[:c]) + [out_ch] + [ctx.axes.new_dim(s, fixed=True) for s in shape[c + 1 :]]
    return TVal(dims, shape)


def conv(ctx: RuleContext, a: Args) -> TVal:
    name = _short_name(ctx)
    transposed = bool(a.get("transposed", False)) or name.startswith("conv_transpose")
    return _conv(ctx, a["input"], a["weight"], a.get("bias"), int(a.get("groups", 1)), transposed)


def pool(ctx: RuleContext, a: Args) -> Any:
    """Spatial pooling acts on the trailing spatial axes (fixed); leading axes (batch, channels) are carried."""
    name = _short_name(ctx)
    k = int(next(ch for ch in reversed(name) if ch.isdigit()))
    x = a["self"]
    ctx.axes.fix_dims(list(x.dims[x.ndim - k :]))
    meta = ctx.node.meta["val"]

    def one(i: int | None) -> TVal:
        shape = ctx.out_shape(i)
        return TVal(list(x.dims[: x.ndim - k]) + [ctx.axes.new_dim(s, True) for s in shape[x.ndim - k :]], shape)

    if isinstance(meta, (tuple, list)):
        return type(meta)(one(i) for i in range(len(meta)))
    return one(None)


# ---------------------------------------------------------------------------------------------- normalisation
def _tie(ctx: RuleContext, dims: list[int], *vals: Any) -> None:
    for v in vals:
        if isinstance(v, TVal) and not v.uniform:
            ctx.unify(dims, [a for d in v.dims for a in d])


def layer_norm(ctx: RuleContext, a: Args) -> Any:
    """LayerNorm / RMSNorm over the trailing axes: statistics are permutation invariant; gain/bias follow."""
    x = a["input"]
    k = len(a["normalized_shape"])
    for i in range(k):
        d = x.dims[x.ndim - k + i]
        for v in (a.get("weight"), a.get("bias")):
            if isinstance(v, TVal) and not v.uniform:
                ctx.unify(d, v.dims[i])
    meta = ctx.node.meta["val"]
    if isinstance(meta, (tuple, list)):  # native_layer_norm: (out, mean, rstd)
        stats = [TVal(list(x.dims[: x.ndim - k]) + [[] for _ in range(k)], ctx.out_shape(i))
                 for i in (1, 2)]
        return (TVal(list(x.dims), ctx.out_shape(0)), *stats)
    return TVal(list(x.dims), ctx.out_shape())


def batch_norm(ctx: RuleContext, a: Args) -> Any:
    """BatchNorm / InstanceNorm: per-channel (axis 1) affine and running statistics follow the channels."""
    x = a["input"]
    ch = x.dims[1]
    _tie(ctx, ch, a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var"))
    meta = ctx.node.meta["val"]
    if isinstance(meta, (tuple, list)):
        outs = [TVal(list(x.dims), ctx.out_shape(0))]
        for i in range(1, len(meta)):
            shape = ctx.out_shape(i)
            outs.append(TVal([ch] if shape == (x.shape[1],) else ctx.fresh(shape, fixed=True).dims, shape))
        return tuple(outs)
    return TVal(list(x.dims), ctx.out_shape())


def group_norm(ctx: RuleContext, a: Args) -> TVal:
    """GroupNorm: channels = groups x channels-per-group; both factors may be permuted."""
    x, G = a["input"], int(a["num_groups"])
    g = ctx.axes.new_dim(G)
    cg = ctx.axes.new_dim(x.shape[1] // G)
    ctx.unify(x.dims[1], g + cg)
    _tie(ctx, g + cg, a.get("weight"), a.get("bias"))
    return TVal(list(x.dims), ctx.out_shape())


def prelu(ctx: RuleContext, a: Args) -> TVal:
    x, w = a["self"], a["weight"]
    if w.shape[0] > 1:
        ctx.unify(x.dims[1], w.dims[0])
    return TVal(list(x.dims), ctx.out_shape())


# ---------------------------------------------------------------------------------------------- attention
def sdpa(ctx: RuleContext, a: Args) -> TVal:
    """softmax(q k^T + mask) v: q/k feature axes tied, k/v sequence axes tied, heads batched (GQA aware)."""
    q, k, v = a["query"], a["key"], a["value"]
    shape = ctx.out_shape()
    ctx.unify(q.dims[-1], k.dims[-1])
    ctx.unify(k.dims[-2], v.dims[-2])
    # batch axes (..., heads): k and v share them; q may have rep x more heads (grouped-query attention)
    for dk, dv in zip(k.dims[:-2], v.dims[:-2]):
        ctx.unify(dk, dv)
    nb = q.ndim - 2
    batch: list[list[int]] = []
    for i in range(nb):
        qi, ki = q.shape[i], k.shape[i - nb + k.ndim - 2] if k.ndim - 2 >= nb - i else 1
        kd = k.dims[i - nb + k.ndim - 2] if k.ndim - 2 >= nb - i else []
        if qi == ki:
            ctx.unify(q.dims[i], kd)
        elif ki == 1:
            pass
        elif qi % ki == 0 and i == nb - 1:  # heads: query head h uses kv head h // rep
            ctx.unify(q.dims[i], kd + ctx.axes.new_dim(qi // ki))
        else:
            ctx.fix(q, k, v)
            return ctx.fresh(shape, fixed=True)
        batch.append(q.dims[i])
    mask = a.get("attn_mask")
    if isinstance(mask, TVal) and not mask.uniform:
        scores = TVal(batch + [q.dims[-2], k.dims[-2]], tuple(q.shape[:-1]) + (k.shape[-2],))
        ctx.broadcast([scores, mask], scores.shape)
    if a.get("is_causal"):
        ctx.axes.fix_dims([q.dims[-2], k.dims[-2]])
    return TVal(batch + [q.dims[-2], v.dims[-1]], shape)


# ---------------------------------------------------------------------------------------------- recurrent
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def rnn(ctx: RuleContext, a: Args) -> Any:
    """Fused lstm/gru/rnn: per layer and direction one hidden group; gate rows are segments of it."""
    name = _short_name(ctx)
    gates = _GATES[name]
    x, hx, params = a["input"], a["hx"], list(a["params"])
    layers, bidir = int(a["num_layers"]), bool(a["bidirectional"])
    dirs = 2 if bidir else 1
    per = 4 if a["has_biases"] else 2
    if len(params) != layers * dirs * per or any(not isinstance(p, TVal) for p in params):  # proj_size etc.
        return fallback(ctx, a)
    hidden_size = params[1].shape[1]
    hiddens: list[list[list[int]]] = []  # [layer][direction] -> atoms
    for layer in range(layers):
        row = []
        for d in range(dirs):
            h = ctx.axes.new_dim(hidden_size)
            w_ih, w_hh, *biases = params[(layer * dirs + d) * per : (layer * dirs + d + 1) * per]
            ctx.unify(w_hh.dims[1], h)
            for p in (w_ih, w_hh, *biases):
                rows = p.dims[0]
                if hidden_size > 1:
                    for gi in range(gates):
                        seg = ctx.slice(rows, gi * hidden_size, (gi + 1) * hidden_size)
                        ctx.unify(seg, h)
            if layer == 0:
                ctx.unify(w_ih.dims[1], x.dims[-1])
            else:
                prev = hiddens[-1]
                feats = prev[0] if dirs == 1 else [ctx.axes.compose("seg", prev[0] + prev[1])]
                ctx.unify(w_ih.dims[1], feats)
            row.append(h)
        hiddens.append(row)
    last = hiddens[-1]
    out_feat = last[0] if dirs == 1 else ([ctx.axes.compose("seg", last[0] + last[1])] if hidden_size > 1 else [])
    output = TVal(list(x.dims[:-1]) + [out_feat], ctx.out_shape(0))
    all_h = [h for row in hiddens for h in row]
    states = [s for s in (hx if isinstance(hx, (list, tuple)) else [hx]) if isinstance(s, TVal)]
    for s in states:  # an initial state that is not all-equal ties every layer's hidden group
        if not s.uniform:
            ctx.axes.fix_dims([s.dims[0]])
            for h in all_h:
                ctx.unify(s.dims[-1], h)

    def final_state(i: int) -> Lazy:
        def make() -> TVal:
            shape = ctx_shape[i]
            dims = ctx.fresh(shape, fixed=True).dims
            dims[-1] = ctx.axes.new_dim(shape[-1])
            for h in all_h:
                ctx.unify(dims[-1], h)
            return TVal(dims, shape)

        return Lazy(make)

    ctx_shape = [ctx.out_shape(i) for i in range(len(ctx.node.meta["val"]))]
    return (output, *[final_state(i) for i in range(1, len(ctx_shape))])


# ---------------------------------------------------------------------------------------------- the table
_ELEMENTWISE = """
abs neg sign sgn exp exp2 expm1 log log1p log2 log10 sqrt rsqrt square reciprocal sin cos tan asin acos atan
sinh cosh tanh asinh acosh atanh erf erfc erfinv floor ceil round trunc frac sigmoid logit relu relu6 gelu silu
mish elu selu celu leaky_relu hardtanh hardsigmoid hardswish softplus softshrink hardshrink threshold
log_sigmoid clamp clamp_min clamp_max nan_to_num isnan isinf isfinite logical_not bitwise_not
add sub rsub mul div true_divide floor_divide remainder fmod pow maximum minimum fmax fmin atan2 hypot copysign
eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor where masked_fill
lerp addcmul addcdiv xlogy
"""
_IDENTITY = """
clone contiguous alias detach lift_fresh_copy lift_fresh to _to_copy type_as dropout native_dropout
feature_dropout alpha_dropout feature_alpha_dropout softmax _softmax log_softmax _log_softmax
_safe_softmax view_as_real_copy dequantize
"""
_RESHAPE = """
view reshape _unsafe_view view_copy flatten unflatten squeeze unsqueeze squeeze_copy unsqueeze_copy
"""
_REDUCTION = """
sum mean amax amin prod var std var_mean std_mean logsumexp norm linalg_vector_norm any all nansum nanmean
"""
_UNIFORM_FACTORIES = """
zeros ones full empty zeros_like ones_like full_like empty_like new_zeros new_ones new_full new_empty
empty_strided new_empty_strided scalar_tensor empty_permuted
"""
_FIXED_FACTORIES = """
arange linspace logspace eye rand randn randint rand_like randn_like randint_like randperm bernoulli
normal tril_indices triu_indices
"""
_SKIPPED = """
_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range sym_constrain_range_for_size
_functional_sym_constrain_range _functional_assert_async sym_size sym_numel sym_stride
"""

RULES: dict[str, Rule] = {}
for _names, _rule in ((_ELEMENTWISE, elementwise), (_IDENTITY, identity), (_RESHAPE, reshape),
                      (_REDUCTION, reduction), (_UNIFORM_FACTORIES, uniform_factory),
                      (_FIXED_FACTORIES, fixed_factory), (_SKIPPED, skip)):
    for _n in _names.split():
        RULES[f"aten.{_n}"] = _rule

RULES.update({
    "getitem": getitem,
    "aten.transpose": transpose, "aten.swapaxes": transpose, "aten.swapdims": transpose,
    "aten.t": t, "aten.numpy_T": t,
    "aten.permute": permute,
    "aten.expand": expand, "aten.expand_copy": expand,
    "aten.repeat": repeat, "aten.repeat_interleave": repeat_interleave,
    "aten.slice": slice_, "aten.narrow": narrow, "aten.select": select,
    "aten.split": split, "aten.split_with_sizes": split, "aten.chunk": split, "aten.unbind": split,
    "aten.tensor_split": split, "aten.unsafe_split": split,
    "aten.copy": copy, "aten.slice_scatter": slice_scatter, "aten.select_scatter": select_scatter,
    "aten.cat": cat, "aten.concat": cat, "aten.concatenate": cat, "aten.stack": stack,
    "aten.constant_pad_nd": pad,
    "aten.cumsum": positional("dim"), "aten.cumprod": positional("dim"), "aten.cummax": positional("dim"),
    "aten.cummin": positional("dim"), "aten.logcumsumexp": positional("dim"),
    "aten.flip": positional("dims"), "aten.roll": positional("dims"),
    "aten.sort": positional("dim"), "aten.argsort": positional("dim"), "aten.topk": positional("dim"),
    "aten.argmax": positional("dim"), "aten.argmin": positional("dim"), "aten.kthvalue": positional("dim"),
    "aten.tril": positional("__last2__"), "aten.triu": positional("__last2__"),
    "aten.max": max_min, "aten.min": max_min,
    "aten.linear": linear,
    "aten.matmul": matmul, "aten.mm": matmul, "aten.bmm": matmul,
    "aten.addmm": addmm, "aten.baddbmm": addmm,
    "aten.einsum": einsum,
    "aten.embedding": embedding, "aten.gather": gather, "aten.index_select": index_select,
    "aten.convolution": conv, "aten.conv1d": conv, "aten.conv2d": conv, "aten.conv3d": conv,
    "aten.conv_transpose1d": conv, "aten.conv_transpose2d": conv, "aten.conv_transpose3d": conv,
    "aten.layer_norm": layer_norm, "aten.native_layer_norm": layer_norm, "aten.rms_norm": layer_norm,
    "aten.batch_norm": batch_norm, "aten.native_batch_norm": batch_norm, "aten.instance_norm": batch_norm,
    "aten._native_batch_norm_legit_no_training": batch_norm, "aten._native_batch_norm_legit": batch_norm,
    "aten._native_batch_norm_legit_functional": batch_norm,
    "aten.group_norm": group_norm, "aten.prelu": prelu, "aten._prelu_kernel": prelu,
    "aten.scaled_dot_product_attention": sdpa,
    "aten.lstm": rnn, "aten.gru": rnn, "aten.rnn_tanh": rnn, "aten.rnn_relu": rnn,
})
for _n in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
           "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
           "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "lp_pool1d", "lp_pool2d"):
    RULES[f"aten.{_n}"] = pool


def op_name(target: Any) -> str:
    """``aten.linear`` for ``torch.ops.aten.linear.default``; ``getitem`` for ``operator.getitem``."""
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        ns = getattr(target, "namespace", "aten")
        return f"{ns}.{packet.__name__}"
    return getattr(target, "__name__", str(target))


def rule_for(target: Any) -> tuple[str, Rule | None]:
    """The rule for an op; in-place variants (``add_``) use their functional rule."""
    name = op_name(target)
    rule = RULES.get(name)
    if rule is None and name.endswith("_") and not name.endswith("__"):
        rule = RULES.get(name[:-1])
    return name, rule
