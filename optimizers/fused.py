"""Fused per-element layers for the learned optimizers' ``f`` on a GPU (Triton).

Every family's ``f`` is a stack of per-element layers ``y = relu(W x + c[segment])`` over the flat parameter
vector: the DeepSet layers (``c`` = the pooled term ``P mean_segment(x)`` plus the bias), the per-parameter MLP's
layers (``c`` = the bias), then a 1-channel read-out. Written op by op, each layer is a matmul that writes a
``(hidden, N)`` activation, a kernel that adds ``c`` by segment and applies the ReLU (reading and writing it again),
and a reduction for the next layer's segment means (reading it a third time): for a 1M-parameter model every
pass moves 128 MB. One kernel here does the whole layer in one pass over its input: it reads ``x`` (channels
first), multiplies by ``W`` in registers (``tl.dot`` at fp32 accuracy, :data:`PRECISION`), adds ``c`` by
segment, applies the ReLU, writes ``y`` once (or not at all, for the last hidden layer of a family that only
needs its read-out) and emits per-block column sums of ``y``, which a tree of small launches turns into segment
sums in a fixed order (deterministic: no atomics; the first layer's input means come the same way). The last
hidden layer also writes its 1-channel read-out ``w . y``, so the family's output layer never rereads ``y``.

Blocks never straddle a segment: every block of ``BLOCK`` elements lies in one contiguous run of one segment, so
the kernel reads one column of ``c`` per block. The block table (segment, start, stop) is built once per
:class:`~optimizers.features.Segments` and device.

:func:`fused_forward` returns ``f``'s factored forward (``(8, N)`` tensor features, ``(11,)`` step features ->
``(N,)``) built on these kernels, for the families it covers (:class:`~optimizers.families.PerParamMLP`,
:class:`~optimizers.families.DeepSet`, :class:`~optimizers.unf_family.UNFFamily` with power-of-two hidden widths
>= 16), or None. The UNF family's equivariant read-out (a 1-channel UNF layer over the spec's entries) is
computed project-first from the last layer's kernel, which writes a few projection rows per element instead of the
hidden activations (:class:`_UNFReadout`); where that does not apply (an entry that is not one run of the flat
vector, such as GPT-2's split q/k/v) it runs on the stored hidden activations. Results equal the unfused forward to
float rounding (sums in another order); ``tests/test_fused.py`` checks this on a CPU with Triton's interpreter (and
the read-out's bookkeeping in plain torch on more architectures), ``tests/test_cuda.py`` on a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from .compiled import fallback_after_failure, summary
from .families import DeepSet, PerParamMLP, _fold_shared
from .features import Segments

#: whether Triton is installed (the fused path is optional: without it every family runs unfused); the kernels
#: module imports it on first use
HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["available", "fused_forward", "fused_layer", "segment_sums", "BLOCK"]

#: elements per program; blocks never straddle a segment (module docstring)
BLOCK = 256
#: warps per program (``benchmarks/bench_fused.py`` times the settings)
NUM_WARPS = 4
#: ``tl.dot``'s precision: "ieee" (fp32 multiply-adds) or "tf32x3" (tensor cores, three passes: fp32-level
#: accuracy); ``benchmarks/bench_fused.py`` times both and reports their errors
PRECISION = "tf32x3"
#: most projection rows per segment the last layer writes for the UNF read-out (:class:`_UNFReadout`); a
#: read-out that needs more keeps the hidden activations instead
MAX_PROJECT_ROWS = 64
#: rows of block sums one program of the segment-sum tree adds up
CHUNK = 128

FactoredForward = Callable[[torch.Tensor, torch.Tensor, Segments], torch.Tensor]


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: Triton importable and a CUDA device (on a CPU, Triton's
    interpreter runs them too, for the tests, but slowly)."""
    return HAS_TRITON and torch.device(device).type == "cuda"


_KERNELS = None


def _kernels():
    """:mod:`optimizers._fused_kernels`, imported (with Triton) on first use (a global afterwards: traced by
    ``torch.compile`` as a constant, no import statement in the traced step)."""
    global _KERNELS
    if _KERNELS is None:
        from . import _fused_kernels
        _KERNELS = _fused_kernels
    return _KERNELS


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tree(counts: list[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The levels of a tree that sums rows grouped by segment (``counts[s]`` rows for segment ``s``, in order) down
    to one row per segment: each level's (start, stop) input rows per output row, output rows again grouped by
    segment. A fixed order of additions (deterministic, unlike atomics) and a fixed number of launches."""
    levels = []
    while True:
        start, stop, new, offset = [], [], [], 0
        for c in counts:
            pieces = max(1, -(-c // CHUNK))
            for j in range(pieces):
                start.append(offset + j * CHUNK)
                stop.append(offset + min(c, (j + 1) * CHUNK))
            new.append(pieces)
            offset += c
        levels.append((torch.tensor(start, dtype=torch.int64, device=device),
                       torch.tensor(stop, dtype=torch.int64, device=device)))
        if all(c == 1 for c in new):
            return levels
        counts = new


def _blocks(segments: Segments, device: torch.device) -> tuple:
    """(segment, start, stop) of every block, grouped by segment, and the tree that sums per-block rows into
    per-segment rows (:func:`_tree`); built once per segments, block size and device."""
    key = ("fused_blocks", BLOCK, device)
    hit = segments._cache.get(key)
    if hit is None:
        runs = segments
        if runs.sizes is None and runs.ids.numel():  # more runs than Segments records: find them all
            runs = Segments.from_ids(runs.ids.cpu(), runs.n, max_runs=runs.ids.numel())
        per_seg: list[list[tuple[int, int]]] = [[] for _ in range(segments.n)]
        a = 0
        for seg, size in zip(runs.run_segments or range(len(runs.sizes or ())), runs.sizes or ()):
            per_seg[seg].extend((s, min(s + BLOCK, a + size)) for s in range(a, a + size, BLOCK))
            a += size
        seg_of, start, stop = [], [], []
        for seg, blocks in enumerate(per_seg):
            seg_of += [seg] * len(blocks)
            start += [a for a, _ in blocks]
            stop += [b for _, b in blocks]
        hit = (*(torch.tensor(v, dtype=torch.int64, device=device) for v in (seg_of, start, stop)),
               _tree([len(blocks) for blocks in per_seg], device))
        segments._cache[key] = hit
    return hit


def _segment_rows(part: torch.Tensor, tree: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-block rows (n_blocks, C), grouped by segment -> per-segment sums (T, C), by the tree's launches."""
    for start, stop in tree:
        out = part.new_empty(start.numel(), part.shape[1])
        _kernels().rows_sum_kernel[(start.numel(),)](part, out, start, stop, C=part.shape[1], CHUNK=CHUNK)
        part = out
    return part


def segment_sums(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Segment sums of channels-first ``x`` (C, N) -> (T, C), in a fixed order (the kernels' blocks, then a tree)."""
    c, n = x.shape
    _, start, stop, tree = _blocks(segments, x.device)
    k_pad = _next_power_of_2(c)
    part = x.new_empty(max(start.numel(), 1), k_pad)
    if start.numel():
        _kernels().block_sum_kernel[(start.numel(),)](x.contiguous(), part, start, stop, n, c, K_PAD=k_pad,
                                                      BLOCK_N=BLOCK)
    else:
        part.zero_()
    return _segment_rows(part, tree)[:, :c]


def _precision(device: torch.device) -> str:
    """:data:`PRECISION`, or "ieee" where tensor cores cannot take fp32 inputs (before Ampere; Triton's
    interpreter on a CPU)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return PRECISION
    return "ieee"


def fused_layer(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, segments: Segments,
                store: bool = True, project: torch.Tensor | None = None, sums: bool = True,
                rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``y = relu(weight @ x + table[:, segment])`` for channels-first ``x`` (C_in, N), ``weight`` (C_out, C_in),
    ``table`` (C_out, T). Returns ``(y or None, segment sums of y (T, C_out) or None, projection or None)``.

    ``store=False`` skips writing ``y`` (only its sums and projection are needed); ``sums=False`` skips the
    segment sums (a layer without pooling next). ``project`` (C_out,) adds the 1-channel read-out ``project @ y``
    (N,); ``project`` (T, R, C_out) with ``rows`` (T,) ints gives every segment its own projection: the first
    ``rows[segment]`` rows of ``project[segment] @ y`` are written to an (R, N) result (R a power of two >= 16;
    the other rows of a segment's columns are left unwritten)."""
    c_in, n = x.shape
    c_out = weight.shape[0]
    device = x.device
    seg_of, start, stop, tree = _blocks(segments, device)
    n_blocks = seg_of.numel()
    y = torch.empty(c_out, n, device=device, dtype=torch.float32) if store else x  # (x: an unused pointer)
    part = torch.empty(max(n_blocks, 1), c_out, device=device, dtype=torch.float32)
    n_proj = 1
    if project is not None and project.dim() == 3:
        n_proj = project.shape[1]
        if rows is None or not _width_ok(n_proj):
            raise ValueError(f"a per-segment projection needs rows and a power-of-two >= 16 row count, got "
                             f"{n_proj} rows")
        out = torch.empty(n_proj, n, device=device, dtype=torch.float32)
    else:
        out = torch.empty(n, device=device, dtype=torch.float32) if project is not None else x
    proj = project.contiguous() if project is not None else weight
    if n_blocks:
        _kernels().layer_kernel[(n_blocks,)](
            x.contiguous(), weight.contiguous(), table.contiguous(), y, part, proj, out,
            rows if rows is not None else seg_of, seg_of, start, stop,
            n, table.shape[1], c_in, K_PAD=max(16, _next_power_of_2(c_in)), C_OUT=c_out, BLOCK_N=BLOCK,
            STORE_Y=store, PROJECT=project is not None, N_PROJ=n_proj, PRECISION=_precision(device),
            num_warps=NUM_WARPS)
    else:
        part.zero_()
    return ((y if store else None), _segment_rows(part, tree) if sums else None,
            (out if project is not None else None))


def _width_ok(c: int) -> bool:
    return c >= 16 and c & (c - 1) == 0


def _means(sums: torch.Tensor, segments: Segments) -> torch.Tensor:
    """(T, C) segment sums -> (C, T) segment means."""
    return (sums / segments.counts.to(sums.device).unsqueeze(1)).T


class _FusedStack:
    """A stack of fused layers ``(element linear, pooling linear or None)``, then a 1-channel read-out of the same
    form; the first layer folds in the step features (as the families' ``forward_factored`` do)."""

    def __init__(self, hidden: list[tuple[nn.Linear, nn.Linear | None]], out: tuple[nn.Linear, nn.Linear | None],
                 keep_hidden: bool):
        self.hidden, self.out, self.keep_hidden = hidden, out, keep_hidden

    def __call__(self, tensor_features: torch.Tensor, step_features: torch.Tensor, segments: Segments,
                 readout: _UNFReadout | None = None, source: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(read-out (N,), last hidden activations (hidden, N) if kept and no readout, the readout's
        projections (R, N) or None, the last layer's segment sums (T, hidden) or None)``. With ``readout``, the
        last layer projects onto its rows (gathered from ``source``, :meth:`_UNFReadout.source`) instead of
        keeping the hidden activations (row 0 is the read-out)."""
        x, shared = tensor_features, step_features
        mean = _means(segment_sums(x, segments), segments) if self.hidden[0][1] is not None else None  # (C, T)
        h = sums = rows = None
        for i, (elem, pool) in enumerate(self.hidden):
            weight, bias = elem.weight, elem.bias
            pooled = pool.weight if pool is not None else None
            if shared is not None:  # a constant channel's segment mean is itself (families.DeepSetLayer)
                k = x.shape[0]
                both = weight + pooled if pooled is not None else weight
                bias = _fold_shared(both, bias, k, shared)
                weight = weight[:, :k]
                pooled = pooled[:, :k] if pooled is not None else None
                shared = None
            table = bias.unsqueeze(1).expand(-1, segments.n)
            if pooled is not None:
                table = table + pooled @ mean
            last = i == len(self.hidden) - 1
            pools_next = (self.out if last else self.hidden[i + 1])[1] is not None
            project, n_rows = None, None
            if last:
                project = self.out[0].weight[0]
                if readout is not None:
                    project, n_rows = readout.projections(source)
            y, sums, proj = fused_layer(x, weight, table, segments,
                                        store=not last or (self.keep_hidden and readout is None),
                                        project=project, sums=pools_next or (last and readout is not None),
                                        rows=n_rows)
            mean = _means(sums, segments) if pools_next else None
            x = h = y
        if readout is not None:
            proj, rows = proj[0], proj
        out_elem, out_pool = self.out
        const = out_elem.bias.reshape(1, 1).expand(1, segments.n) if out_elem.bias is not None else None
        if out_pool is not None:
            pooled_out = out_pool.weight @ mean  # (1, T)
            const = pooled_out if const is None else const + pooled_out
        result = proj if const is None else proj + const[0].index_select(0, segments.ids.to(proj.device))
        return result, h, rows, sums


class _UNFReadout:
    """The UNF family's equivariant read-out (a 1-channel :class:`unf.nn.UNFLinear`) computed from the last fused
    layer instead of from stored hidden activations: project first, as :meth:`unf.nn.UNFLinear.forward_rows`
    does, with the projections made inside the layer kernel.

    Every term of the read-out applies a coefficient row (hidden,) to an input entry and then sums over some of
    its axes. Three kinds (each an exact rewriting; only the order of float additions changes):

    - a term from an entry to itself with no reduction (the per-element term): its row is added to the kernel's
      row 0, which is also the DeepSet read-out, so it costs nothing extra;
    - a term that sums over all of an entry's axes: its row dotted with the entry's segment sum of the hidden
      activations (the kernel's block sums, needed anyway for the next pooling);
    - any other term: the kernel writes its projection as one more row for that entry, and the term's reductions
      run on that 1-channel row.

    So the (hidden, N) activations are never written, and the rest reads a few 1-channel rows per element.
    Built for a bound family whose entries each lie in one contiguous run of the flat vector in their own
    layout (``UNFFamily._tiling``) and whose read-out has no diagonal writes, folded axes or positional
    encodings; :meth:`build` returns None otherwise (the caller then keeps the hidden activations)."""

    @classmethod
    def build(cls, f, device: torch.device) -> _UNFReadout | None:
        head = f.head
        if (f._tiling is None or any(head._diag_writes) or len(head.pos_enc) or head.out_channels != 1
                or any(order is not None for order, _ in head._fold_in)):
            return None
        plan = cls(f, device)
        return plan if plan.n_rows <= MAX_PROJECT_ROWS and plan.broadcastable else None

    def __init__(self, f, device: torch.device):
        from unf.nn.layers import _reduce_step  # (the one implementation of a reduction step)

        self._reduce_step = _reduce_step
        head = f.head
        self.head = head
        rows_plan = head._rows_plan()
        hidden = head.in_channels
        n_flat = sum(w.numel() for w in head.mix_weights())
        ds_row, zero = n_flat, n_flat + hidden  # places in the source vector (flat weights, DeepSet row, 0)
        seg_of = {e.name: k for k, e in enumerate(f.spec.entries)}
        self.n_segments = len(f.spec.entries)
        entry_of = {cid: i for i, cids in enumerate(head._plain) for cid in cids}
        sizes = [head._fold_in[i][1][1:] for i in range(len(head.names))]
        self.place = [(seg_of[name], *f._slices[name], sizes[i]) for i, name in enumerate(head.names)]
        # per segment: lists of (source rows summed into it, their scales) for each projection row
        proj_rows: list[list[list[tuple[int, float]]]] = [[[(ds_row, 1.0)]] for _ in range(self.n_segments)]
        full_rows: list[tuple[int, int, float]] = []  # (segment, source row, scale) of whole-entry sums
        full_slot: list[int] = []  # per whole-entry term: the slot of its group (their values are summed per slot)
        n_slots = 0
        const_slot, const_seg, const_bias = [], [], []  # groups of whole-entry terms only: per-segment constants
        self.groups = []  # groups with per-row terms: (cid, tail, row terms, bias rows, slot or None)
        self.broadcastable = True  # False: a group of whole-entry terms with a shape to fill (not expected)
        for cid, tail, terms, bias_rows in rows_plan["groups"]:
            out_entry = entry_of[cid]
            kept, n_full = [], 0
            for inp, slot, chain, perm in terms:
                idx, scale = rows_plan["project"][inp]
                src, sc = int(idx[slot, 0]), float(scale[slot, 0])  # (a row's columns are consecutive)
                seg = self.place[inp][0]
                plain = all(not ops and step_perm is None for ops, step_perm, _ in chain)
                shape = torch.empty((1, 1) + tuple(sizes[inp]), device="meta")
                for step in chain:
                    shape = _reduce_step(shape, *step)
                if plain and all(not dims for *_, dims in chain) and perm is None and inp == out_entry and (
                        tail == head._full_tail[out_entry]):
                    proj_rows[seg][0].append((src, sc))  # the per-element term: into row 0
                elif plain and shape.numel() == 1:  # (its value broadcasts: only the group's sum is needed)
                    full_rows.append((seg, src, sc))
                    full_slot.append(n_slots)  # (the slot this group gets below)
                    n_full += 1
                else:
                    proj_rows[seg].append([(src, sc)])
                    kept.append(((inp, len(proj_rows[seg]) - 1), chain, perm))
            gslot = None
            if n_full or (not kept and bias_rows is not None):
                gslot, n_slots = n_slots, n_slots + 1
            if kept:
                self.groups.append((cid, tail, tuple(kept), bias_rows, gslot))
            elif gslot is not None:  # only whole-entry sums and the bias: one constant for the output entry
                self.broadcastable &= all(d == 1 for d in tail)
                const_slot.append(gslot)
                const_seg.append(self.place[out_entry][0])
                const_bias.append(-1 if bias_rows is None else bias_rows[0])
        self.order = [head.names.index(name) for name in f._tiling]
        self.n_rows = max(16, _next_power_of_2(max(len(r) for r in proj_rows)))
        depth = max(len(row) for rows in proj_rows for row in rows)
        index = torch.full((self.n_segments, self.n_rows, depth), zero, dtype=torch.int64)
        scale = torch.zeros(self.n_segments, self.n_rows, depth, 1, dtype=torch.float64)
        for seg, rows in enumerate(proj_rows):
            for r, row in enumerate(rows):
                for k, (src, sc) in enumerate(row):
                    index[seg, r, k], scale[seg, r, k, 0] = src, sc
        cols = torch.arange(hidden)
        self.index = (index.unsqueeze(-1) + cols).clamp_max(zero).to(device)  # (T, R, depth, hidden)
        self.scale = scale.to(device, torch.float32)
        self.rows = torch.tensor([len(r) for r in proj_rows], dtype=torch.int32, device=device)
        self.full_index = torch.tensor([src for _, src, _ in full_rows], dtype=torch.int64).reshape(-1, 1)
        self.full_index = (self.full_index + cols).to(device)
        self.full_scale = torch.tensor([sc for *_, sc in full_rows], dtype=torch.float32, device=device).reshape(-1, 1)
        self.full_seg = torch.tensor([seg for seg, *_ in full_rows], dtype=torch.int64, device=device)
        # sums by slot and by segment as products with 0/1 matrices: one op each, and deterministic on a GPU
        # (index_add adds with atomics there, which would break bit-identical graph replays)
        self.to_slots = _one_hot(full_slot, n_slots, device)  # (slots, whole-entry terms)
        self.const_slot = torch.tensor(const_slot, dtype=torch.int64, device=device)
        self.to_segments = _one_hot(const_seg, self.n_segments, device)  # (segments, constant groups)
        self.const_bias = torch.tensor(const_bias, dtype=torch.int64, device=device)  # -1: none

    def source(self, readout_row: torch.Tensor) -> torch.Tensor:
        """The flat vector the projections and whole-entry terms gather their rows from: the read-out layer's
        current weights, then ``readout_row`` (the DeepSet read-out's row), then a 0; made once per step."""
        weights = [w.reshape(-1) for w in self.head.mix_weights()]
        return torch.cat(weights + [readout_row.reshape(-1), readout_row.new_zeros(1)])

    def projections(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every segment's (R, hidden) projection (row 0: the DeepSet read-out's row plus the per-element terms)
        and its number of rows, from :meth:`source`."""
        return (src[self.index] * self.scale).sum(2), self.rows

    def __call__(self, rows: torch.Tensor, sums: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The read-out's (N,) output but its per-element terms (already in row 0), from the kernel's projection
        rows (R, N) and the last layer's segment sums (T, hidden). The whole-entry terms (one per pair of entries)
        are a handful of vectorised ops: their values, summed per group, then per output entry. ``src``: from
        :meth:`source`."""
        bias = self.head.bias_vector()
        full = (src[self.full_index] * self.full_scale * sums[self.full_seg]).sum(1)  # (whole-entry terms,)
        slots = self.to_slots @ full
        value = slots[self.const_slot]
        if bias is not None:
            value = value + torch.cat([bias.reshape(-1), bias.new_zeros(1)])[self.const_bias]
        seg_const = self.to_segments @ value
        contrib = {}
        for cid, tail, terms, bias_rows, gslot in self.groups:
            acc = None
            for (inp, r), chain, perm in terms:
                _, start, n, sizes = self.place[inp]
                t = rows[r, start:start + n].view((1, 1) + tuple(sizes))
                for step in chain:
                    t = self._reduce_step(t, *step)
                if perm is not None:
                    t = t.permute(perm)
                acc = t if acc is None else acc + t
            if gslot is not None:
                acc = acc + slots[gslot]
            if bias_rows is not None and bias is not None:
                acc = acc + bias[bias_rows[0]:bias_rows[1]]
            contrib[cid] = acc.reshape((1,) + tail)
        outs = []
        for i in self.order:
            seg, _, _, sizes = self.place[i]
            full_shape = (1, 1) + tuple(sizes)
            acc = seg_const[seg]
            for cid in self.head._plain[i]:
                if cid in contrib:
                    acc = acc + contrib[cid]
            outs.append(acc.expand(full_shape).reshape(-1))
        return torch.cat(outs)


def _one_hot(index: list[int], rows: int, device: torch.device) -> torch.Tensor:
    """The (rows, len(index)) float 0/1 matrix with a 1 at (index[j], j)."""
    out = torch.zeros(rows, len(index))
    out[torch.tensor(index, dtype=torch.int64), torch.arange(len(index))] = 1.0
    return out.to(device)


def _readout_for(f, segments: Segments, device: torch.device) -> _UNFReadout | None:
    """:class:`_UNFReadout` for the UNF family ``f`` bound to ``segments``, built once per segments and device
    (None where it does not apply)."""
    key = ("fused_unf_readout", device)
    hit = segments._cache.get(key)
    if hit is None or hit[0] is not f.head:
        hit = segments._cache[key] = (f.head, _UNFReadout.build(f, device))
    return hit[1]


def fused_forward(f: nn.Module) -> FactoredForward | None:
    """``f``'s factored forward (``(8, N)`` tensor features, ``(11,)`` step features, segments -> ``(N,)``) on the
    fused kernels, or None where they do not apply (another family, a hidden width that is not a power of two
    >= 16, no hidden layer). Reads ``f``'s weights at every call (meta-training updates them in place). The kernels
    have no backward pass: where autograd would record, the function runs ``f``'s own forward instead. If the first
    call fails (a GPU or Triton build the kernels do not compile for), it warns once and runs ``f``'s own forward
    from then on."""
    from .unf_family import UNFFamily  # (unf_family imports the rule, which imports this module's users)

    if not HAS_TRITON:
        return None
    ds = f.deepset if isinstance(f, UNFFamily) else f
    if isinstance(ds, DeepSet):
        if not ds.layers:
            return None
        hidden = [(layer.elem, layer.pool) for layer in ds.layers]
        out = (ds.out.elem, ds.out.pool)
    elif isinstance(ds, PerParamMLP):
        linears = [m for m in ds.net if isinstance(m, nn.Linear)]
        others = [m for m in ds.net if not isinstance(m, nn.Linear)]
        if len(linears) < 2 or not all(isinstance(m, nn.ReLU) for m in others):
            return None
        hidden = [(m, None) for m in linears[:-1]]
        out = (linears[-1], None)
    else:
        return None
    if (not all(_width_ok(elem.weight.shape[0]) and elem.bias is not None for elem, _ in hidden)
            or out[0].weight.shape[0] != 1):
        return None
    stack = _FusedStack(hidden, out, keep_hidden=isinstance(f, UNFFamily))

    def own(tensor_features: torch.Tensor, step_features: torch.Tensor, segments: Segments) -> torch.Tensor:
        if hasattr(f, "forward_factored"):
            return f.forward_factored(tensor_features, step_features, segments)
        n = tensor_features.shape[-1]
        return f(torch.cat([tensor_features.mT, step_features.expand(n, step_features.shape[-1])], -1), segments)

    def fused(tensor_features: torch.Tensor, step_features: torch.Tensor, segments: Segments) -> torch.Tensor:
        readout = (_readout_for(f, segments, tensor_features.device)
                   if isinstance(f, UNFFamily) and f.fused_readout else None)
        src = readout.source(stack.out[0].weight[0]) if readout is not None else None
        out, h, rows, sums = stack(tensor_features, step_features, segments, readout, src)
        if readout is not None:
            return out + readout(rows, sums, src)
        if isinstance(f, UNFFamily):
            out = out + f.unf_readout(h.mT)  # (h.mT of a channels-first buffer: the read-out's layout, no copy)
        return out

    # the first call compiles the kernels; a GPU or Triton build they fail on gets the unfused forward
    guarded = fallback_after_failure(fused, own, lambda err, tf, *_: f"the fused Triton layers failed on "
                                     f"{tf.device} ({summary(err)}); stepping unfused", stacklevel=3)

    def forward(tensor_features: torch.Tensor, step_features: torch.Tensor, segments: Segments) -> torch.Tensor:
        if torch.is_grad_enabled() and (tensor_features.requires_grad or any(p.requires_grad for p in
                                                                             f.parameters())):
            return own(tensor_features, step_features, segments)  # the kernels have no backward (meta-gradients)
        return guarded(tensor_features, step_features, segments)

    return forward
