"""UNF layers and baselines over a :class:`~unf.spec.WeightSpaceSpec`.

All layers take and return weight-space features ``entry name -> (batch, channels, *entry_shape)`` (a
:class:`~unf.nn.features.WeightFeatures` or a plain ``dict``; the output has the same kind as the input).

- :class:`UNFLinear`: the maximally expressive permutation-equivariant linear layer (UNF, Zhou et al. 2024).
- :class:`UNF`: a stack of UNFLinear layers with a pointwise nonlinearity and optional :class:`EntryNorm`.
- :class:`InvariantPool` and :class:`UNFInvariant` (backbone -> pool -> MLP head).
- Baselines in the same API: :class:`DeepSetLayer` / :class:`DeepSet` and :class:`StatFeatures` /
  :class:`StatNN`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..spec import WeightSpaceSpec
from .basis import Plan, build_plan, diagonal_ops, reduction_tree, resolve_entries
from .features import WeightFeatures

__all__ = [
    "UNFLinear",
    "UNF",
    "EntryNorm",
    "EntryActivation",
    "InvariantPool",
    "UNFInvariant",
    "DeepSetLayer",
    "DeepSet",
    "StatFeatures",
    "StatNN",
]

Features = Mapping[str, torch.Tensor]


def _wrap(like: Features, spec: WeightSpaceSpec, out: dict[str, torch.Tensor]) -> Features:
    return WeightFeatures(spec, out, validate=False) if isinstance(like, WeightFeatures) else out


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _reduce_step(t: torch.Tensor, ops: Sequence[tuple[int, int]], perm: tuple[int, ...] | None,
                 dims: tuple[int, ...]) -> torch.Tensor:
    """One reduction: the diagonal view ``ops`` (then ``perm``) of ``t``, summed over ``dims``."""
    for d1, d2 in ops:
        t = t.diagonal(0, d1, d2)
    if perm is not None:
        t = t.permute(perm)
    return t.sum(dims) if dims else t


def _reduce_tree(xs: Sequence[torch.Tensor], reds: Sequence[tuple]) -> list[torch.Tensor]:
    """Run a reduction tree: each ``(parent, input, diagonal ops, permutation, summed dims)`` step starts from the
    diagonal view of an input (``parent is None``; later steps have no ops) or from an earlier step's result."""
    out: list[torch.Tensor] = []
    for parent, inp, ops, perm, mean_dims in reds:
        out.append(_reduce_step(xs[inp] if parent is None else out[parent], ops, perm, mean_dims))
    return out


class UNFLinear(nn.Module):
    """The UNF equivariant linear layer over all entries of ``spec``.

    ``out[i] = bias + sum over input entries j and valid partitions P of (i, j): W_P @ E_P(in[j])`` where each
    ``W_P`` is an ``out_channels x in_channels`` matrix (:mod:`unf.nn.basis` explains the terms ``E_P``).

    Execution (see :attr:`plan` / :meth:`describe`): every distinct reduction (diagonal + mean) of an input
    entry is computed once, from the smallest already-computed reduction that contains it; all terms that
    write the same output pattern are mixed by one matmul over the concatenated reductions, and patterns that
    read the very same reductions share that matmul (e.g. every output entry's "per-channel constant" comes
    from one ``(batch, sum C) @ (sum C, sum O)`` product). Broadcast writes are additions of broadcast views;
    diagonal writes add in place into a diagonal view of the output, so no full-size zero tensor is built.

    Backward (:attr:`fused`, default): the whole plan is one autograd node. Its backward is the transposed
    plan: the adjoint of every term is a term of the same kind with input and output swapped, so the output
    gradient is summed per output pattern (shared hierarchically like the input reductions), each mix's
    weight gradient is one matmul against the concatenated reductions saved in forward, the reductions'
    gradients come from one matmul per mix with the transposed weight, and they flow back through the
    reduction tree into the inputs. Under torch.func transforms (vmap, grad, functional_call inside them)
    and torch.compile every op is recorded with autograd instead. Double backward is not supported on the
    fused path (set ``layer.fused = False`` for it).

    Args:
        spec: the weight space.
        in_channels, out_channels: channels per weight.
        fixed: treatment of fixed (``None``) axes: ``"relax"`` (default; the UNF paper's relaxation, cost
            independent of fixed sizes), ``"exact"`` (fold fixed axes into channels: every equivariant map of
            the true group, parameters grow with the fixed sizes) or ``"auto"`` (exact up to
            ``exact_max_size``).
            See :mod:`unf.nn.basis`.
        exact_max_size: largest fixed axis treated exactly under ``"auto"``.
        relax_groups: ``"by_size"`` (default) or ``"per_axis"``: how relaxed fixed axes are grouped.
        positional_encoding: add a learned ``(in_channels, n)`` encoding along every relaxed fixed axis of
            every input entry (zero-initialised), which breaks the false symmetry of the relaxation (like
            NFN's ``io_embed``); the layer stays exactly equivariant under the true group.
        bias: learned constants for every output pattern that reads nothing from the input (one per channel
            and entry, plus one per diagonal pattern for entries with a repeated group such as ``W_hh``).
        init_scale: weights are ``N(0, init_scale^2 / fan_in)`` with ``fan_in = sum over the terms feeding an
            output entry of their input channels`` (``= in_channels * T_i``, as in the reference code).
    """

    #: Run the plan as one autograd node with the hand-written transposed-plan backward (and, without
    #: autograd, with in-place accumulation). ``False``: record every op with autograd (the path always
    #: taken under torch.func transforms and torch.compile; same results up to rounding).
    fused: bool = True

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, *, fixed: str = "relax",
                 exact_max_size: int = 16, relax_groups: str = "by_size", positional_encoding: bool = False,
                 bias: bool = True, init_scale: float = 1.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fixed = fixed
        entries, self.groups = resolve_entries(spec, fixed, exact_max_size, relax_groups)
        self.plan: Plan = build_plan(entries)
        plan = self.plan
        self.names = [e.name for e in entries]
        fk = {"device": device, "dtype": dtype}
        cin = [in_channels * e.fold for e in entries]
        cout = [out_channels * e.fold for e in entries]
        self._cin, self._cout = cin, cout

        # ---- inputs: positional encodings, folding of exact fixed axes
        self.pos_enc = nn.ParameterList()
        self._pe: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in entries]
        self._fold_in: list[tuple[tuple[int, ...] | None, tuple[int, ...]]] = []
        self._unfold_out: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []
        for i, e in enumerate(entries):
            if positional_encoding:
                for ax in e.relaxed_axes:
                    shape = [1] * (1 + len(e.shape))
                    shape[0], shape[1 + ax] = in_channels, e.shape[ax]
                    self._pe[i].append((len(self.pos_enc), tuple(shape)))
                    self.pos_enc.append(nn.Parameter(torch.zeros(in_channels, e.shape[ax], **fk)))
            if e.folded_axes:
                order = (0, 1) + tuple(2 + a for a in e.folded_axes) + tuple(2 + a for a in e.perm_axes)
                inv = tuple(sorted(range(len(order)), key=order.__getitem__))
                self._fold_in.append((order, (cin[i],) + e.sizes))
                self._unfold_out.append(((out_channels,) + tuple(e.shape[a] for a in e.folded_axes) + e.sizes,
                                         inv))
            else:
                self._fold_in.append((None, (cin[i],) + e.sizes))
                self._unfold_out.append(((out_channels,) + e.sizes, None))

        # ---- reductions
        self._reds = []
        red_scale: list[float] = []  # kept as self._red_scale: forward_rows folds it into its projections
        for r in plan.reductions:
            ops, perm = diagonal_ops(r.struct) if r.parent is None else ((), None)
            if perm is not None and perm == tuple(range(len(perm))):
                perm = None
            bsize = {b: n for b, n in zip(r.struct, entries[r.inp].sizes)}
            # reductions are plain sums; the 1/n of the mean is folded into the mixing weights' columns (one
            # small multiply per matmul instead of one per reduction, and no full-size division in backward)
            red_scale.append(1.0 / _prod([bsize[b] for b in bsize if b not in r.kept]))
            self._reds.append((r.parent, r.inp, ops, perm, r.mean_dims))
        self._red_scale = tuple(red_scale)

        # ---- mixes: weights, bias, and where each output piece goes
        fan_in = [0] * len(entries)
        for t in plan.terms:
            fan_in[t.out] += cin[t.inp]
        self.weights = nn.ParameterList()
        self.bias = None
        self._bias_mix = -1
        self._mixes = []
        self._contrib_count = 0
        contrib_of: list[list[tuple[int, int]]] = [[] for _ in entries]  # per entry: (numel, contrib id)
        kept_of: dict[int, frozenset[int]] = {}
        numel_of: dict[int, int] = {}
        self._diag_writes: list[list[tuple[int, tuple, tuple]]] = [[] for _ in entries]
        self._row_offsets: list[list[int]] = []
        self._col_offsets: list[list[int]] = []
        for m in plan.mixes:
            r0 = plan.reductions[m.parts[0][0]]
            kept_sizes = tuple(plan.entries[r0.inp].sizes[r0.struct.index(b)] for b in r0.kept)
            kept_sizes = tuple(kept_sizes[p - 2] for p in m.parts[0][1][2:])
            rows = [cout[plan.groups[g].out] for g in m.groups]
            cols = [cin[plan.reductions[rid].inp] for rid, _ in m.parts]
            self._row_offsets.append([sum(rows[:k]) for k in range(len(rows))])
            self._col_offsets.append([sum(cols[:k]) for k in range(len(cols))])
            w = torch.empty(sum(rows), sum(cols), **fk)
            off = 0
            for g, nr in zip(m.groups, rows):
                std = init_scale / math.sqrt(fan_in[plan.groups[g].out])
                nn.init.normal_(w[off:off + nr], 0.0, std)
                off += nr
            self.weights.append(nn.Parameter(w))
            exact = torch.cat([torch.full((n,), red_scale[rid], dtype=torch.float64) for (rid, _), n in
                               zip(m.parts, cols)])
            has_scale = bool((exact != 1).any())
            if has_scale:
                self._exact_buffer(f"_colscale{m.index}", exact, fk)
            if bias and not kept_sizes:
                if self.bias is not None:  # all "nothing kept" patterns read the same reductions
                    raise AssertionError("UNF plan has two constant-pattern mixes")
                self.bias = nn.Parameter(torch.zeros(sum(rows), **fk))
                self._bias_mix = m.index
            parts = tuple((rid, None if perm == tuple(range(len(perm))) else perm) for rid, perm in m.parts)
            outs = []
            for g in m.groups:
                grp = plan.groups[g]
                sizes_by_block = [1] * len(grp.kept_mask)
                it = iter(kept_sizes)
                for b, k in enumerate(grp.kept_mask):
                    if k:
                        sizes_by_block[b] = next(it)
                tail = (cout[grp.out],) + tuple(sizes_by_block)
                cid = self._contrib_count
                self._contrib_count += 1
                outs.append((cid, tail))
                if grp.is_diagonal:
                    ops, perm = diagonal_ops(grp.out_labels)
                    self._diag_writes[grp.out].append((cid, ops, perm))
                else:
                    contrib_of[grp.out].append((_prod(tail), cid))
                    kept_of[cid] = frozenset(b for b, k in enumerate(grp.kept_mask) if k)
                    numel_of[cid] = _prod(tail)
            self._mixes.append((parts, len(kept_sizes), tuple(rows), tuple(outs), m.index == self._bias_mix,
                                f"_colscale{m.index}" if has_scale else None))
        # add small broadcast contributions first so that few full-size passes are made
        self._plain = [tuple(c for _, c in sorted(lst)) for lst in contrib_of]
        # without autograd: add each broadcast contribution in place into the smallest other contribution
        # that carries a strict superset of its blocks (e.g. [H] into [H, qk] before [H, qk] goes into the
        # full [d, H, qk]), so that few full-size passes remain; the rest are summed largest first
        self._nested: list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]] = []
        for lst in contrib_of:
            order = sorted(lst, key=lambda nc: (nc[0], len(kept_of[nc[1]])))
            steps, rest = [], []
            for k, (_, a) in enumerate(order):
                sup = [b for _, b in order[k + 1:] if kept_of[a] < kept_of[b]]
                dst = min(sup, key=lambda b: (numel_of[b], b), default=None)
                if dst is None:
                    rest.append(a)
                else:
                    steps.append((a, dst))
            # the largest contributions' direct children go into the fresh sum instead of in place
            roots = set(rest)
            final = [a for a, d in steps if d in roots and len(roots) == 1]
            steps = [(a, d) for a, d in steps if not (d in roots and len(roots) == 1)]
            self._nested.append((tuple(steps), tuple(sorted(rest + final, key=lambda c: -numel_of[c]))))
        self._full_tail = [(cout[i],) + e.sizes for i, e in enumerate(entries)]

        # ---- backward (the transposed plan): the gradient of every output pattern is a sum of the output's
        # gradient over the pattern's broadcast blocks (on its diagonal for diagonal patterns), computed once
        # per distinct pattern from the smallest already-computed superset, like the input reductions
        gspecs: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        gkey: dict[tuple, int] = {}
        group_gspec: dict[int, int] = {}
        for g, grp in enumerate(plan.groups):
            key = (grp.out, grp.out_labels, tuple(b for b, k in enumerate(grp.kept_mask) if k))
            group_gspec[g] = gkey.setdefault(key, len(gspecs))
            if group_gspec[g] == len(gspecs):
                gspecs.append(key)
        greds, gnew = reduction_tree(entries, gspecs)
        self._greds = []
        for r in greds:
            ops, perm = diagonal_ops(r.struct) if r.parent is None else ((), None)
            if perm is not None and perm == tuple(range(len(perm))):
                perm = None
            self._greds.append((r.parent, r.inp, ops, perm, r.mean_dims))
        red_tail = []
        for r in plan.reductions:
            bsize = {b: n for b, n in zip(r.struct, entries[r.inp].sizes)}
            red_tail.append((cin[r.inp],) + tuple(bsize[b] for b in r.kept))
        self._mix_back = []
        for m, (parts, _nk, _rows, _outs, _hb, _sc) in zip(plan.mixes, self._mixes):
            gids = tuple(gnew[group_gspec[g]] for g in m.groups)
            pmeta = []
            for rid, perm in parts:
                tail = red_tail[rid]
                if perm is None:
                    pmeta.append((rid, tail[0], tail, None))
                else:
                    ptail = tuple(tail[d - 1] for d in perm[1:])
                    inv = tuple(sorted(range(len(perm)), key=perm.__getitem__))
                    pmeta.append((rid, tail[0], ptail, inv))
            self._mix_back.append((gids, tuple(pmeta)))
        # a reduction's gradient with its summed dims restored as size 1 (it broadcasts into its parent, or
        # into the input's diagonal view for base reductions)
        self._unsq: list[tuple[int, ...] | None] = []
        for r, tail in zip(plan.reductions, red_tail):
            if not r.mean_dims:
                self._unsq.append(None)
                continue
            full = list(tail)
            for d in r.mean_dims:
                full.insert(d - 1, 1)
            self._unsq.append(tuple(full))
        self._scale_names = [sc for *_, sc in self._mixes]
        # weight gradient sum_b gm_b @ c_b^T: bmm then a sum over the batch, or, where the (rows x cols) weight
        # is large next to the kept size K, one mm over batch-major copies of gm and c
        self._gw_mm = []
        for (_, nk, rows, outs, _, _), (_, pmeta) in zip(self._mixes, self._mix_back):
            R, C = sum(rows), sum(pm[1] for pm in pmeta)
            K = _prod(outs[0][1][1:])
            self._gw_mm.append(nk > 0 and R * C > 2 * (R + C) * K)
        # broadcast additions with a short contiguous run (a broadcast block inside the entry's axes) as a
        # small matmul against a 0/1 expansion matrix (see _add_into)
        tail_of = {cid: tail for *_, outs, _, _ in self._mixes for cid, tail in outs}
        self._expand_mats: dict[tuple, torch.Tensor] = {}
        self._step_spec = []
        for i, (steps, cids) in enumerate(self._nested):
            st = tuple(_bcast_spec(tail_of[d], tail_of[a]) for a, d in steps)
            if len(cids) > 2:  # the fresh sum of the largest and one child: take a child added directly best
                rest = sorted(cids[1:], key=lambda c: _bcast_spec(self._full_tail[i], tail_of[c]) is not None)
                cids = (cids[0],) + tuple(rest)
                self._nested[i] = (steps, cids)
            fin = tuple(_bcast_spec(self._full_tail[i], tail_of[c]) for c in cids)
            self._step_spec.append((st, fin))
        self._tree_spec = [None if r.parent is None or shape is None else _bcast_spec(red_tail[r.parent], shape)
                           for r, shape in zip(plan.reductions, self._unsq)]
        self._scaled = [mi for mi, n in enumerate(self._scale_names) if n is not None]
        # without autograd, a mix whose every group is an entry's largest contribution starts from the sum of
        # that entry's smaller contributions and lets its matmul accumulate onto it (baddbmm): one full-size
        # write fewer and no fresh sum. Mixes run by number of kept blocks, so those are ready first.
        self._mix_order = sorted(range(len(self._mixes)), key=lambda mi: self._mixes[mi][1])
        self._prefill: list[tuple | None] = []
        self._prefilled = [False] * len(entries)
        for mi, (parts, nk, _, outs, _, _) in enumerate(self._mixes):
            ok = nk > 0 and sum(cin[plan.reductions[rid].inp] for rid, _ in parts) > 1
            groups = []
            for g, (cid, tail) in zip(plan.mixes[mi].groups, outs):
                i = plan.groups[g].out
                cids = self._nested[i][1]
                ok = ok and not plan.groups[g].is_diagonal and cids[0] == cid and len(cids) > 1 and (
                    tail == self._full_tail[i])
                groups.append((i, cid))
            self._prefill.append(tuple(groups) if ok else None)
            if ok:
                for i, _ in groups:
                    self._prefilled[i] = True
        # per mix for backward: (nk, rows, has_bias, group grads, split sizes, parts (rid, entry, tail, inv), mm)
        self._bmix = tuple(
            (nk, rows, has_bias, gids, [pm[1] for pm in pmeta] if len(pmeta) > 1 else None,
             tuple((rid, plan.reductions[rid].inp, ptail, inv) for rid, _, ptail, inv in pmeta), gw_mm)
            for (_, nk, rows, _, has_bias, _), (gids, pmeta), gw_mm in zip(self._mixes, self._mix_back,
                                                                         self._gw_mm))
        # reductions in reverse order for the backward tree
        self._btree = tuple((r, red[0], red[1], red[2], red[3], self._unsq[r], self._tree_spec[r])
                            for r, red in reversed(list(enumerate(self._reds))))

    # ------------------------------------------------------------------ exact constant buffers
    def _exact_buffer(self, name: str, value: torch.Tensor, fk: dict) -> None:
        """A non-persistent buffer of constants (such as 1/n) kept in float64 too, so that converting the layer
        (``.double()``) gives the exact values, not a float32 rounding of them cast up."""
        self.__dict__.setdefault("_exact", {})[name] = value
        self.register_buffer(name, value.to(device=fk.get("device"), dtype=fk.get("dtype") or
                                            torch.get_default_dtype()), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        for name, value in self.__dict__.get("_exact", {}).items():  # re-derived after every conversion
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                self._buffers[name] = value.to(device=buf.device, dtype=buf.dtype)
        return out

    # ------------------------------------------------------------------ introspection
    @property
    def num_terms(self) -> int:
        return len(self.plan.terms)

    def describe(self, max_lines: int = 60) -> str:
        """The basis terms' count and the execution instructions (reductions and matmuls)."""
        return self.plan.describe(max_lines)

    def term_equations(self) -> list[str]:
        """One readable einsum-like line per basis term (see :meth:`unf.nn.basis.Term.equation`)."""
        return [t.equation(self.names) for t in self.plan.terms]

    def _term_block(self, t: int) -> tuple[int, slice, slice]:
        """Where term ``t``'s coefficient sits: (mix, rows, columns) of that mix's weight."""
        g, k = self.plan.term_group[t]
        term = self.plan.terms[t]
        mix_of = self.__dict__.get("_mix_of")  # group -> (mix, row block), built once
        if mix_of is None:
            mix_of = self.__dict__["_mix_of"] = {g: (mi, j) for mi, m in enumerate(self.plan.mixes)
                                                 for j, g in enumerate(m.groups)}
        mi, j = mix_of[g]
        r0, c0 = self._row_offsets[mi][j], self._col_offsets[mi][k]
        return mi, slice(r0, r0 + self._cout[term.out]), slice(c0, c0 + self._cin[term.inp])

    def term_coefficient(self, t: int) -> torch.Tensor:
        """The ``(out_channels', in_channels')`` coefficient of term ``t`` (a view of the mix weight; primes:
        times the folded fixed size of the output / input entry under exact treatment)."""
        mi, rows, cols = self._term_block(t)
        return self.weights[mi][rows, cols]

    def term_coefficients(self) -> list[torch.Tensor]:
        """Every term's *effective* ``(out_channels', in_channels')`` coefficient, read from
        :meth:`mix_weights` (so a tied subclass gives what it computes, e.g. :class:`RoleUNFLinear`'s averaging
        over the terms of one key). It multiplies the term's *mean* reduction, as in
        :meth:`unf.nn.basis.Term.equation`. Differentiable; one list per call."""
        weights = self.mix_weights()
        out = []
        for t in range(len(self.plan.terms)):
            mi, rows, cols = self._term_block(t)
            out.append(weights[mi][rows, cols])
        return out

    def bias_of(self, entry: str) -> torch.Tensor | None:
        """The per-channel constant of ``entry`` (``(out_channels',)``), or None without bias."""
        if self.bias is None:
            return None
        i = self.names.index(entry)
        m = self.plan.mixes[self._bias_mix]
        for j, g in enumerate(m.groups):
            grp = self.plan.groups[g]
            if grp.out == i and grp.is_scalar:
                r0 = self._row_offsets[self._bias_mix][j]
                return self.bias[r0:r0 + self._cout[i]]
        raise AssertionError("entry has no constant pattern")

    def bias_terms(self) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
        """Every learned constant: ``(entry name, output block labels, (out_channels',) values)``; labels
        with a repeated block put the constant on that diagonal (``(0, 0)``: a multiple of the identity)."""
        bias = self.bias_vector()  # (a subclass may tie its constants: read what the layer adds)
        if bias is None or self._bias_mix < 0:
            return []
        m = self.plan.mixes[self._bias_mix]
        out = []
        for j, g in enumerate(m.groups):
            grp = self.plan.groups[g]
            r0 = self._row_offsets[self._bias_mix][j]
            out.append((self.names[grp.out], grp.out_labels, bias[r0:r0 + self._cout[grp.out]]))
        return out

    # ------------------------------------------------------------------ forward
    def mix_weights(self) -> Sequence[torch.Tensor]:
        """The ``(sum rows, sum cols)`` weight of every mix, in plan order (subclasses may tie them)."""
        return self.weights

    def bias_vector(self) -> torch.Tensor | None:
        """The learned constants of the constant-pattern mix (``None`` without bias)."""
        return self.bias

    def forward(self, x: Features) -> Features:
        B = x[self.names[0]].shape[0]
        xs = []
        for i, name in enumerate(self.names):
            t = x[name]
            for pid, shape in self._pe[i]:
                t = t + self.pos_enc[pid].view(shape)
            order, tail = self._fold_in[i]
            if order is not None:
                t = t.permute(order)
            xs.append(t.reshape((B,) + tail))
        weights, bias = list(self.mix_weights()), self.bias_vector()
        if not self.fused or _under_transform():
            # torch.func transforms (vmap, grad, ...) and torch.compile trace the plain autograd path
            outs = self._run(xs, weights, bias, fast=False)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (*xs, *weights, bias) if t is not None):
            outs = _UNFLinearFn.apply(self, len(xs), bias, *xs, *weights)
        else:
            outs = self._run(xs, weights, bias, fast=True)
        out = {}
        for i, name in enumerate(self.names):
            acc = outs[i]
            shape, inv = self._unfold_out[i]
            if inv is not None:
                acc = acc.reshape((B,) + shape).permute(inv)
            out[name] = acc
        return _wrap(x, self.spec, out)

    def forward_rows(self, rows: Mapping[str, torch.Tensor], workspace: dict | None = None
                     ) -> dict[str, torch.Tensor]:
        """The layer on one sample given channels-last: ``rows[name]`` is ``(numel, in_channels)`` (the entry's
        elements in row-major order); returns ``name -> (out_channels, *entry shape)``.

        Project first, then reduce: every term's coefficient is applied to its input entry before the term's
        reduction (both are linear, so the result equals :meth:`forward` up to rounding). One matmul per entry
        projects its ``in_channels`` onto one ``out_channels`` slot per term reading it, and each term then
        reduces only its own slot. This beats the reduce-then-mix plan when ``out_channels`` times the terms per
        entry is below ``in_channels`` times the reductions per entry, and the big entries have small fixed axes
        (reductions over short trailing axes are slow): the learned optimizer's 1-channel read-out over a CNN is
        3-5x faster this way. It also reads channels-last activations directly (no transposed copy).

        ``workspace``: without autograd, a dict in which the projections' buffers are kept for the next call
        (fresh multi-MB allocations page-fault on every call); the caller owns it.

        Limit: layers with ``fixed="relax"`` and no positional encodings only (as every :class:`RoleUNFLinear`
        and the learned optimizer's read-out); folded exact axes would need the folding permutations here too,
        so other layers raise ``NotImplementedError`` and are evaluated with :meth:`forward`.
        """
        if any(order is not None for order, _ in self._fold_in) or len(self.pos_enc):
            raise NotImplementedError("forward_rows supports relaxed fixed axes without positional encodings "
                                      "(fixed='relax', positional_encoding=False); use forward()")
        plan = self._rows_plan()
        weights, bias = list(self.mix_weights()), self.bias_vector()
        flat = torch.cat([w.reshape(-1) for w in weights])
        fast = not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (flat, bias, *rows.values()) if t is not None))
        co = self.out_channels
        proj = []
        for i, name in enumerate(self.names):
            x = rows[name]
            if x.dim() != 2 or x.shape[1] != self.in_channels:
                raise ValueError(f"rows[{name!r}] must be (numel, {self.in_channels}), got {tuple(x.shape)}")
            idx, scale = plan["project"][i]
            if idx is None:
                proj.append(None)
                continue
            P = flat[idx.to(flat.device)] * scale.to(flat.device, flat.dtype)  # (slots * co, in_channels)
            proj.append(_project(P, x, fast, workspace, (id(self), i)).view((1, idx.shape[0]) +
                                                                             self._fold_in[i][1][1:]))
        contrib: list[torch.Tensor | None] = [None] * self._contrib_count
        for cid, tail, parts, bias_rows in plan["groups"]:
            acc = None
            for inp, slot, chain, perm in parts:
                t = proj[inp][:, slot * co:(slot + 1) * co]
                for step in chain:
                    t = _reduce_step(t, *step)
                if perm is not None:
                    t = t.permute(perm)
                acc = t if acc is None else acc + t
            if bias_rows is not None and bias is not None:
                acc = acc + bias[bias_rows[0]:bias_rows[1]]
            if fast and acc._base is not None:  # a view of a projection: the assembly adds into it in place
                acc = acc.clone()
            contrib[cid] = acc.reshape((1,) + tail)
        outs = self._assemble(contrib, 1, fast, None)
        return {name: acc[0].reshape((co,) + tuple(e_shape)) for name, acc, e_shape in
                zip(self.names, outs, (self._unfold_out[i][0][1:] for i in range(len(self.names))))}

    def _rows_plan(self) -> dict:
        """:meth:`forward_rows`'s instructions: per entry, where its projection rows sit in the flattened mix
        weights (and the reductions' 1/n they carry); per output pattern, its terms' (entry, slot, reduction
        chain from the entry, permutation)."""
        cached = self.__dict__.get("_rows_plan_cache")
        if cached is not None:
            return cached
        plan = self.plan
        co = self.out_channels
        offsets, off = [], 0  # where each mix weight starts in the flattened weights
        for parts, _, rows, _, _, _ in self._mixes:
            offsets.append(off)
            off += sum(rows) * sum(self._cin[plan.reductions[rid].inp] for rid, _ in parts)
        red_scale = self._red_scale
        chains = []
        for rid in range(len(plan.reductions)):
            steps, r = [], rid
            while r is not None:
                parent, _, ops, perm, dims = self._reds[r]
                steps.append((ops, perm, dims))
                r = parent
            chains.append(tuple(reversed(steps)))
        slot_rows: list[list[torch.Tensor]] = [[] for _ in self.names]
        slot_scale: list[list[float]] = [[] for _ in self.names]
        groups = []
        for mi, (parts, _nk, rows, outs, has_bias, _) in enumerate(self._mixes):
            ncols = sum(self._cin[plan.reductions[rid].inp] for rid, _ in parts)
            for j, (cid, tail) in enumerate(outs):
                r0 = self._row_offsets[mi][j]
                terms = []
                for k, (rid, perm) in enumerate(parts):
                    inp = plan.reductions[rid].inp
                    c0 = self._col_offsets[mi][k]
                    cin = self._cin[inp]
                    idx = (offsets[mi] + (r0 + torch.arange(co))[:, None] * ncols + c0 + torch.arange(cin)[None])
                    slot = len(slot_rows[inp])
                    slot_rows[inp].append(idx)
                    slot_scale[inp].append(red_scale[rid])
                    terms.append((inp, slot, chains[rid], perm))
                bias_rows = (r0, r0 + rows[j]) if has_bias else None
                groups.append((cid, tail, tuple(terms), bias_rows))
        project = []
        for i in range(len(self.names)):
            if not slot_rows[i]:
                project.append((None, None))
                continue
            idx = torch.cat(slot_rows[i])
            scale = torch.tensor(slot_scale[i], dtype=torch.float64).repeat_interleave(co)[:, None]
            project.append((idx, scale))
        cached = {"project": project, "groups": groups}
        self.__dict__["_rows_plan_cache"] = cached
        return cached

    def _run(self, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], bias: torch.Tensor | None,
             fast: bool, saved: list | None = None) -> list[torch.Tensor]:
        """The plan's forward on the folded inputs ``(B, C_in', *perm sizes)``; outputs in the same layout.

        ``fast``: no autograd is recording (in-place accumulation allowed); ``saved`` collects per mix the
        ``(concatenated reductions, scaled weight)`` for :meth:`_backward`."""
        B = xs[0].shape[0]
        red = _reduce_tree(xs, self._reds)
        contrib: list[torch.Tensor | None] = [None] * self._contrib_count
        if fast:  # one call scales every mix weight's columns by its reductions' 1/n
            buf, names, idx = self._buffers, self._scale_names, self._scaled
            scaled = torch._foreach_mul([weights[mi] for mi in idx], [buf[names[mi]] for mi in idx])
            weights = list(weights)
            for mi, w in zip(idx, scaled):
                weights[mi] = w
        if saved is not None:
            saved.extend([None] * len(self._mixes))
        for mi in self._mix_order if fast else range(len(self._mixes)):
            parts, nk, rows, outs, has_bias, scale_name = self._mixes[mi]
            ts = [red[r] if p is None else red[r].permute(p) for r, p in parts]
            c = ts[0] if len(ts) == 1 else torch.cat(ts, 1)
            w = weights[mi]
            if scale_name is not None and not fast:
                w = w * getattr(self, scale_name)
            pre = self._prefill[mi] if fast else None
            if nk == 0:
                m = torch.addmm(bias, c, w.t()) if has_bias else torch.mm(c, w.t())
            else:
                # bmm on a stride-0 expanded weight: no transposed copies of the activations (matmul's 2-D @
                # 3-D path folds the batch into rows and copies twice)
                if nk > 1:
                    c = c.reshape(B, c.shape[1], -1)
                if fast and c.shape[1] == 1:  # one input channel: an outer product, cheaper as a product
                    m = w.view(1, -1, 1) * c
                    w = w.expand(B, -1, -1)
                elif pre is not None:
                    m = c.new_empty((B, sum(rows), c.shape[2]))
                    pieces = m.split(rows, 1) if len(rows) > 1 else (m,)
                    for piece, (i, _) in zip(pieces, pre):
                        self._prefill_sum(piece.view((B,) + self._full_tail[i]), contrib, i)
                    w = w.expand(B, -1, -1)
                    m.baddbmm_(w, c)
                else:
                    w = w.expand(B, -1, -1)
                    m = torch.bmm(w, c)
            if saved is not None:
                saved[mi] = (c, w)
            pieces = m.split(rows, 1) if len(rows) > 1 else (m,)
            for piece, (cid, tail) in zip(pieces, outs):
                contrib[cid] = piece.reshape((B,) + tail)
        return self._assemble(contrib, B, fast, self._prefilled if fast else None)

    def _assemble(self, contrib: list, B: int, fast: bool, prefilled: Sequence[bool] | None) -> list[torch.Tensor]:
        """Every entry's output from its pattern contributions (broadcast adds, then diagonal writes).

        ``fast``: the contributions are the caller's to overwrite (in-place accumulation); ``prefilled[i]``:
        entry ``i``'s contributions were already summed into its largest one."""
        out = []
        for i in range(len(self.names)):
            if fast and prefilled is not None and prefilled[i]:  # already summed into the largest contribution
                cids = self._nested[i][1][:1]
            elif fast:  # contributions are pieces of this call's matmul outputs: free to add into
                steps, cids = self._nested[i]
                st, fin = self._step_spec[i]
                for (a, d), spec in zip(steps, st):
                    self._add_into(contrib[d], contrib[a], spec)
            else:
                cids = self._plain[i]
            acc = contrib[cids[0]]
            owned = False
            for k in range(1, len(cids)):
                t = contrib[cids[k]]
                if fast and owned and t.dim() == acc.dim() and all(
                        a >= b for a, b in zip(acc.shape, t.shape)):
                    self._add_into(acc, t, fin[k] if acc.shape[1:] == self._full_tail[i] else None)
                else:
                    acc = acc + t
                    owned = True
            if self._diag_writes[i]:
                full = (B,) + self._full_tail[i]
                if tuple(acc.shape) != full:  # only for degenerate specs; diagonal writes need a full tensor
                    acc = acc.expand(full).contiguous()
                for cid, ops, perm in self._diag_writes[i]:
                    v = acc
                    for d1, d2 in ops:
                        v = v.diagonal(0, d1, d2)
                    v.permute(perm).add_(contrib[cid])
            out.append(acc)
        return out

    def _prefill_sum(self, dst: torch.Tensor, contrib: list, i: int) -> None:
        """Write the sum of entry ``i``'s contributions but the largest into ``dst`` (full size)."""
        steps, cids = self._nested[i]
        st, fin = self._step_spec[i]
        for (a, d), spec in zip(steps, st):
            self._add_into(contrib[d], contrib[a], spec)
        if len(cids) == 2:
            dst.copy_(contrib[cids[1]])
            return
        torch.add(contrib[cids[1]], contrib[cids[2]], out=dst)
        for k in range(3, len(cids)):
            self._add_into(dst, contrib[cids[k]], fin[k])

    def _add_into(self, dst: torch.Tensor, src: torch.Tensor, spec: tuple | None) -> None:
        """``dst += src`` (``src`` broadcasts). With a ``spec`` from :func:`_bcast_spec` the trailing
        ``(q,)`` block of ``src`` is expanded into the ``(Q,)`` block of ``dst`` by a matmul with a 0/1 matrix
        (exact: one 1 per column), where TensorIterator would loop over short contiguous runs."""
        if spec is None or src.shape[0] != dst.shape[0]:
            dst.add_(src)
            return
        q, Q, key = spec
        ck = (key, dst.dtype, dst.device)
        E = self._expand_mats.get(ck)
        if E is None:
            src_t, dst_t = key
            idx = torch.arange(q, device=dst.device).view(src_t).expand(dst_t).reshape(-1)
            E = torch.zeros(q, Q, dtype=dst.dtype, device=dst.device)
            E[idx, torch.arange(Q, device=dst.device)] = 1
            self._expand_mats[ck] = E
        if dst.is_contiguous():
            dst.view(-1, Q).addmm_(src.reshape(-1, q), E)
        elif dst[0].is_contiguous():  # a batch-strided piece of a matmul output
            B = dst.shape[0]
            dst.view(B, -1, Q).baddbmm_(src.reshape(B, -1, q), E.expand(B, q, Q))
        else:
            dst.add_(src)

    def _backward(self, saved: list, grads: Sequence[torch.Tensor], need_x: Sequence[bool],
                  need_w: Sequence[bool], need_b: bool
                  ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | None]:
        """The transposed plan: gradients of the folded inputs, the mix weights and the bias vector.

        The adjoint of every term is a term of the same kind with input and output swapped: the output
        gradient is summed over the broadcast blocks of each output pattern (shared hierarchically as the
        input reductions are), one matmul per mix gives the gradients of the concatenated reductions and of
        the weight, and each reduction's gradient is broadcast back into its parent (last into the input,
        onto its diagonal for diagonal reductions)."""
        B = grads[0].shape[0]
        gr = _reduce_tree(grads, self._greds)
        any_x = any(need_x)
        gred: list[torch.Tensor | None] = [None] * len(self._reds)
        permuted: set[int] = set()
        gw: list[torch.Tensor | None] = [None] * len(self._mixes)
        gb = None
        for mi, ((nk, rows, has_bias, gids, splits, parts, gw_mm), (c, w)) in enumerate(zip(self._bmix, saved)):
            if nk > 1:
                gs = [gr[g].reshape(B, n, -1) for g, n in zip(gids, rows)]
            else:  # (B, rows) or (B, rows, K) already
                gs = [gr[g] for g in gids]
            gm = gs[0] if len(gs) == 1 else torch.cat(gs, 1)
            if has_bias and need_b:
                gb = gm.sum(0)
            if need_w[mi]:
                if nk == 0:
                    gw[mi] = torch.mm(gm.t(), c)
                elif gw_mm:
                    gw[mi] = torch.mm(gm.transpose(0, 1).reshape(gm.shape[1], -1),
                                      c.transpose(0, 1).reshape(c.shape[1], -1).t())
                else:
                    gw[mi] = torch.bmm(gm, c.transpose(1, 2)).sum(0)
            if any_x:
                # w: the scaled weight (expanded over the batch for bmm)
                if nk == 0:
                    gc = torch.mm(gm, w)
                elif gm.shape[1] == 1:  # one output row: an outer product
                    gc = w[0].view(1, -1, 1) * gm
                else:
                    gc = torch.bmm(w.transpose(1, 2), gm)
                pieces = gc.split(splits, 1) if splits is not None else (gc,)
                for piece, (rid, inp, ptail, inv) in zip(pieces, parts):
                    if not need_x[inp]:
                        continue
                    t = piece.reshape((B,) + ptail) if nk > 1 else piece
                    g = gred[rid]
                    if inv is not None:
                        t = t.permute(inv)
                        if g is None:
                            permuted.add(rid)
                    if g is None:
                        gred[rid] = t
                    elif inv is None and rid in permuted:
                        # accumulate into a row-major piece: a transposed gradient slows every later pass
                        gred[rid] = t.add_(g)
                        permuted.discard(rid)
                    else:
                        g.add_(t)
        idx = [mi for mi in self._scaled if gw[mi] is not None]
        if idx:  # the reductions' 1/n, folded into the weights' columns in forward
            buf, names = self._buffers, self._scale_names
            torch._foreach_mul_([gw[mi] for mi in idx], [buf[names[mi]] for mi in idx])
        gx: list[torch.Tensor | None] = [None] * len(self.names)
        if any_x:
            plain: list[list[torch.Tensor]] = [[] for _ in self.names]
            diag: list[list[tuple[torch.Tensor, tuple, tuple | None]]] = [[] for _ in self.names]
            for r, parent, inp, ops, perm, shape, spec in self._btree:
                t = gred[r]
                if t is None:
                    continue
                if shape is not None:
                    t = t.reshape((B,) + shape)
                if parent is not None:
                    g = gred[parent]
                    if g is None:
                        gred[parent] = t
                    elif spec is None or g.shape[1:] == t.shape[1:]:
                        gred[parent] = _accumulate(g, t)
                    else:
                        self._add_into(g, t, spec)
                elif ops:
                    diag[inp].append((t, ops, perm))
                else:
                    plain[inp].append(t)
            for i in range(len(self.names)):
                if not need_x[i]:
                    continue
                full = (B,) + self._fold_in[i][1]
                ts = sorted(plain[i], key=lambda t: t.numel())
                acc = None
                for t in ts:
                    acc = _accumulate(acc, t)
                if diag[i]:
                    if acc is None:
                        acc = grads[i].new_zeros(full)
                    elif tuple(acc.shape) != full:
                        acc = acc.expand(full).contiguous()
                    for t, ops, perm in diag[i]:
                        v = acc
                        for d1, d2 in ops:
                            v = v.diagonal(0, d1, d2)
                        if perm is not None:
                            v = v.permute(perm)
                        v.add_(t)
                if acc is None:
                    acc = grads[i].new_zeros(full)
                elif tuple(acc.shape) != full:
                    acc = acc.expand(full)
                elif acc.dim() > 2 and not acc[0].is_contiguous():
                    # a transposed gradient makes the next ops (e.g. an activation's backward) many times slower
                    acc = acc.contiguous()
                gx[i] = acc
        return gx, gw, gb

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"entries={len(self.names)}, terms={self.num_terms}, fixed={self.fixed!r}")


_PROJECT_CHUNK = 8192


def _project(P: torch.Tensor, x: torch.Tensor, fast: bool, workspace: dict | None, key: tuple) -> torch.Tensor:
    """``P @ x.T``: ``(S, C) @ (n, C).T -> (S, n)``. Without autograd in column blocks written in place (each
    block's rows of ``x`` stay in cache; 2x faster than one big product on a CPU), into a reused buffer."""
    if not fast or x.shape[0] <= _PROJECT_CHUNK:
        return torch.mm(P, x.t())
    shape = (P.shape[0], x.shape[0])
    buf = None if workspace is None else workspace.get(key)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != x.dtype or buf.device != x.device:
        buf = x.new_empty(shape)
        if workspace is not None:
            workspace[key] = buf
    for s in range(0, shape[1], _PROJECT_CHUNK):
        torch.mm(P, x[s:s + _PROJECT_CHUNK].t(), out=buf[:, s:s + _PROJECT_CHUNK])
    return buf


def _under_transform() -> bool:
    """Whether a torch.func transform or torch.compile is tracing (they take the plain autograd path)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()


def _bcast_spec(dst_tail: Sequence[int], src_tail: Sequence[int]) -> tuple | None:
    """How to add a ``(B, *src_tail)`` tensor into a ``(B, *dst_tail)`` one (tails: channels, then axes;
    ``src_tail`` has 1 on broadcast axes): None for a plain broadcast add, else ``(q, Q, key)`` for
    :meth:`UNFLinear._add_into`. A matmul pays off where the rows before the first broadcast axis are many and
    the blocks from it on are short (the plain add's inner loop runs over a few elements only)."""
    j = next((k for k in range(1, len(dst_tail)) if src_tail[k] == 1 and dst_tail[k] != 1), None)
    if j is None:
        return None
    rows, Q, q = _prod(dst_tail[:j]), _prod(dst_tail[j:]), _prod(src_tail[j:])
    if rows < 64 or rows * Q < 8192 or q > 16 or Q > 512 or (q == 1 and Q >= 16):
        return None
    return q, Q, (tuple(src_tail[j:]), tuple(dst_tail[j:]))


def _accumulate(acc: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """``acc + t`` in place where ``acc`` (a tensor the caller owns) already has the broadcast shape."""
    if acc is None:
        return t
    if acc.dim() == t.dim() and all(a >= b for a, b in zip(acc.shape, t.shape)):
        return acc.add_(t)
    return acc + t


class _UNFLinearFn(torch.autograd.Function):
    """:meth:`UNFLinear._run` as one autograd node whose backward is the transposed plan
    (:meth:`UNFLinear._backward`): no per-op autograd bookkeeping for the plan's many small ops."""

    @staticmethod
    def forward(ctx, layer: UNFLinear, n_x: int, bias: torch.Tensor | None, *tensors: torch.Tensor):
        xs, weights = tensors[:n_x], tensors[n_x:]
        saved: list = []
        outs = layer._run(xs, weights, bias, fast=True, saved=saved)
        ctx.layer, ctx.n_x = layer, n_x
        ctx.save_for_backward(*(t for pair in saved for t in pair))
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        layer, n_x = ctx.layer, ctx.n_x
        need = ctx.needs_input_grad
        flat = ctx.saved_tensors
        saved = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
        gx, gw, gb = layer._backward(saved, grads, need[3:3 + n_x], need[3 + n_x:], need[2])
        return (None, None, gb, *gx, *gw)


class EntryActivation(nn.Module):
    """Apply a pointwise function to every entry (equivariant for any spec)."""

    def __init__(self, fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Features) -> Features:
        out = {n: self.fn(t) for n, t in x.items()}
        return WeightFeatures(x.spec, out, validate=False) if isinstance(x, WeightFeatures) else out


class EntryNorm(nn.Module):
    """Per-entry, per-channel RMS normalisation with a learned gain (statistics over all of an entry's
    elements, so it is equivariant under any permutation of them)."""

    def __init__(self, spec: WeightSpaceSpec, channels: int, eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.eps = eps
        self.gain = nn.ParameterList([nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
                                      for _ in spec.entries])

    def forward(self, x: Features) -> Features:
        out = {}
        for e, g in zip(self.spec.entries, self.gain):
            t = x[e.name]
            dims = tuple(range(2, t.dim()))
            ms = t.pow(2).mean(dims, keepdim=True) if dims else t.pow(2)
            out[e.name] = t * torch.rsqrt(ms + self.eps) * g.view((1, -1) + (1,) * len(dims))
        return _wrap(x, self.spec, out)


class UNF(nn.Module):
    """A stack of :class:`UNFLinear` layers with a pointwise nonlinearity between them.

    Args:
        spec: the weight space.
        channels: ``[c_0, c_1, ..., c_L]`` (e.g. ``[1, 16, 16, 1]`` is three layers).
        activation: module class or instance applied pointwise after every layer but the last
            (also after the last with ``final_activation=True``).
        norm: insert an :class:`EntryNorm` before each activation.
        positional_encoding: learned encodings on relaxed fixed axes in the first layer (see UNFLinear).
        **linear_kwargs: passed to every :class:`UNFLinear` (``fixed``, ``init_scale``, ``dtype``, ...).
    """

    def __init__(self, spec: WeightSpaceSpec, channels: Sequence[int],
                 activation: type[nn.Module] | nn.Module = nn.ReLU, norm: bool = False,
                 final_activation: bool = False, positional_encoding: bool = False, **linear_kwargs) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError("channels needs at least [in, out]")
        self.spec = spec
        layers: list[nn.Module] = []
        n = len(channels) - 1
        for k in range(n):
            layers.append(UNFLinear(spec, channels[k], channels[k + 1],
                                    positional_encoding=positional_encoding and k == 0, **linear_kwargs))
            if k < n - 1 or final_activation:
                if norm:
                    layers.append(EntryNorm(spec, channels[k + 1], device=linear_kwargs.get("device"),
                                            dtype=linear_kwargs.get("dtype")))
                act = activation() if isinstance(activation, type) else activation
                layers.append(EntryActivation(act))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Features) -> Features:
        for layer in self.layers:
            x = layer(x)
        return x


class InvariantPool(nn.Module):
    """Pool every entry over its permuted axes; fixed axes are kept as features.

    Output: ``(batch, out_features)``, entries concatenated in spec order, each ``channels * prod(kept fixed
    sizes)`` wide. Fixed axes longer than ``max_fixed_size`` (e.g. a vocabulary) are pooled too (that keeps
    invariance and bounds the width). ``mode``: ``"mean"``, ``"sum"`` or ``"max"``.
    """

    def __init__(self, spec: WeightSpaceSpec, channels: int, mode: str = "mean",
                 max_fixed_size: int | None = 64) -> None:
        super().__init__()
        if mode not in ("mean", "sum", "max"):
            raise ValueError(f"mode must be mean, sum or max, got {mode!r}")
        self.spec, self.mode, self.channels = spec, mode, channels
        self._dims = []
        width = 0
        for e in spec.entries:
            pooled, kept = [], 1
            for ax, (g, n) in enumerate(zip(e.axes, e.shape)):
                if g is not None or (max_fixed_size is not None and n > max_fixed_size):
                    pooled.append(2 + ax)
                else:
                    kept *= n
            self._dims.append(tuple(pooled))
            width += channels * kept
        self.out_features = width

    def forward(self, x: Features) -> torch.Tensor:
        outs = []
        for e, dims in zip(self.spec.entries, self._dims):
            t = x[e.name]
            if dims:
                if self.mode == "mean":
                    t = t.mean(dims)
                elif self.mode == "sum":
                    t = t.sum(dims)
                else:
                    t = t.amax(dims)
            outs.append(t.reshape(t.shape[0], -1))
        return torch.cat(outs, 1)


def _mlp(sizes: Sequence[int], activation: type[nn.Module], **fk) -> nn.Sequential:
    mods: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[k], sizes[k + 1], **fk))
        if k < len(sizes) - 2:
            mods.append(activation())
    return nn.Sequential(*mods)


class UNFInvariant(nn.Module):
    """Invariant model: :class:`UNF` backbone (activation after every layer) -> :class:`InvariantPool` -> MLP.

    Args:
        spec: the weight space.
        channels: backbone channels ``[c_in, ..., c_last]``.
        out_features: size of the prediction.
        head_hidden: hidden widths of the MLP head.
        pool: pooling mode; ``max_fixed_size`` as in :class:`InvariantPool`.
        **unf_kwargs: passed to :class:`UNF` (``norm``, ``fixed``, ``positional_encoding``, ``dtype``, ...).
    """

    def __init__(self, spec: WeightSpaceSpec, channels: Sequence[int], out_features: int,
                 head_hidden: Sequence[int] = (64,), pool: str = "mean", max_fixed_size: int | None = 64,
                 activation: type[nn.Module] = nn.ReLU, **unf_kwargs) -> None:
        super().__init__()
        self.backbone = UNF(spec, channels, activation=activation, final_activation=True, **unf_kwargs)
        self.pool = InvariantPool(spec, channels[-1], pool, max_fixed_size)
        fk = {k: unf_kwargs[k] for k in ("device", "dtype") if k in unf_kwargs}
        self.head = _mlp([self.pool.out_features, *head_hidden, out_features], activation, **fk)

    def forward(self, x: Features) -> torch.Tensor:
        return self.head(self.pool(self.backbone(x)))


class DeepSetLayer(nn.Module):
    """DeepSet baseline: ``y_e = Gamma x_e + Lambda mean_e(x_e) + b`` with ``Gamma``, ``Lambda``, ``b`` shared
    across entries (a per-element map plus per-entry pooled context, as in the learned-optimizer DeepSet).

    Equivariant under every permutation of each entry's elements, hence under any spec's group.
    ``per_entry=True`` gives every entry its own ``Gamma``, ``Lambda``, ``b``.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, per_entry: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec, self.per_entry = spec, per_entry
        k = len(spec.entries) if per_entry else 1
        fk = {"device": device, "dtype": dtype}
        bound = 1.0 / math.sqrt(2 * in_channels)
        self.gamma = nn.Parameter(torch.empty(k, out_channels, in_channels, **fk).uniform_(-bound, bound))
        self.lam = nn.Parameter(torch.empty(k, out_channels, in_channels, **fk).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(k, out_channels, **fk))
        self._numel = [_prod(e.shape) for e in spec.entries]

    def forward(self, x: Features) -> Features:
        flats = [x[e.name].flatten(2) for e in self.spec.entries]
        if self.per_entry:
            out = {}
            for i, (e, f) in enumerate(zip(self.spec.entries, flats)):
                y = torch.matmul(self.gamma[i], f) + (torch.matmul(self.lam[i], f.mean(2, keepdim=True))
                                                      + self.bias[i].view(1, -1, 1))
                out[e.name] = y.reshape(y.shape[:2] + e.shape)
            return _wrap(x, self.spec, out)
        # one matmul over all entries; per-entry contexts expanded back to their elements
        flat = torch.cat(flats, 2)
        means = torch.stack([f.mean(2) for f in flats], 2)  # (B, C, E)
        ctx = torch.matmul(self.lam[0], means) + self.bias[0].view(1, -1, 1)
        counts = torch.tensor(self._numel, device=flat.device)
        y = torch.matmul(self.gamma[0], flat) + ctx.repeat_interleave(counts, dim=2,
                                                                      output_size=flat.shape[2])
        out = {}
        for e, part in zip(self.spec.entries, y.split(self._numel, 2)):
            out[e.name] = part.reshape(part.shape[:2] + e.shape)
        return _wrap(x, self.spec, out)


class DeepSet(nn.Module):
    """A stack of :class:`DeepSetLayer` with a pointwise nonlinearity between layers."""

    def __init__(self, spec: WeightSpaceSpec, channels: Sequence[int],
                 activation: type[nn.Module] = nn.ReLU, final_activation: bool = False, **kw) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        n = len(channels) - 1
        for k in range(n):
            layers.append(DeepSetLayer(spec, channels[k], channels[k + 1], **kw))
            if k < n - 1 or final_activation:
                layers.append(EntryActivation(activation()))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Features) -> Features:
        for layer in self.layers:
            x = layer(x)
        return x


class StatFeatures(nn.Module):
    """StatNN features (Unterthiner et al. 2020): per entry and channel, mean, variance and the 0, 25, 50, 75
    and 100 % quantiles of its elements. Output ``(batch, entries * channels * 7)``; invariant under any
    permutation of each entry's elements."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: WeightSpaceSpec, channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.out_features = len(spec.entries) * channels * (2 + len(self.QUANTILES))

    def forward(self, x: Features) -> torch.Tensor:
        outs = []
        for e in self.spec.entries:
            f = x[e.name].flatten(2)
            n = f.shape[2]
            s = f.sort(dim=2).values  # sort-based quantiles: no size limit, linear interpolation
            pos = torch.tensor([q * (n - 1) for q in self.QUANTILES], dtype=f.dtype, device=f.device)
            lo = pos.floor().long()
            hi = pos.ceil().long()
            frac = pos - lo.to(f.dtype)
            q = s[:, :, lo] * (1 - frac) + s[:, :, hi] * frac
            var = f.var(2, unbiased=False)
            outs.append(torch.cat([f.mean(2, keepdim=True), var.unsqueeze(2), q], 2).flatten(1))
        return torch.cat(outs, 1)


class StatNN(nn.Module):
    """StatNN baseline: :class:`StatFeatures` -> MLP."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_features: int,
                 hidden: Sequence[int] = (64, 64), activation: type[nn.Module] = nn.ReLU,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.features = StatFeatures(spec, in_channels)
        self.head = _mlp([self.features.out_features, *hidden, out_features], activation, device=device,
                         dtype=dtype)

    def forward(self, x: Features) -> torch.Tensor:
        return self.head(self.features(x))
