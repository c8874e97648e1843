"""Whole-step evaluation of a learned rule for small models on the CPU (below one :data:`fast.CHUNK`).

On a small model a step is bound by the number of kernels, not by arithmetic: the reference path
(:meth:`LearnedRule.update`) runs about 150 small ops on the UNF family, each costing microseconds of dispatch
for a few thousand floats. Here a step runs about 50, by compiling what never changes:

- *once per layout* (:class:`SmallPlan`): segment means (feature normalisation, DeepSet pooling) become one
  product with a sparse ``(T, N)`` matrix, broadcasts one ``index_select``; the UNF family's read-out becomes
  index maps and two sparse matrices (below);
- *once per version of the rule's weights* (:class:`_Weights`): transposed layer weights; layer 0's bias with
  the 11 step channels folded in, tabulated for a block of steps; the read-out's coefficients laid out along
  those index maps; the output divided by the bound (the update divides by it before its tanh); the scalars;
- *per step*: the layers run channels-last ``(N, C)`` (whose matmuls use both cores) in buffers kept across
  steps, and the common case (every gradient finite) skips the masking kernels.

The UNF read-out (the DeepSet output layer plus the UNF layer with one output channel, which read the same
hidden activations ``h`` (N, C)) is linear in ``h`` with fixed coefficients, evaluated as

1. identity terms (each entry onto itself): one row-wise dot product ``<h[n], c_id[entry of n]>``;
2. every other term reads one *reduction* of its input entry (means over its input-only axes, on its input
   diagonals): ``Z = R @ h`` with one sparse ``R`` for all distinct reductions;
3. each term's rows of ``Z`` dotted with its coefficient, summed into its output *pattern* (entry, which axes
   it broadcasts along, which diagonal it writes): one gather, one row-wise dot product, one ``index_add``;
4. every element adds the patterns of its entry that cover it: one sparse ``(N, patterns)`` matrix-vector
   product (0/1).

The DeepSet output layer is folded in: its element weight is an identity term, its pooled context a
"mean of the whole entry" term, its bias a constant pattern. Results equal the reference to float rounding
(``tests/test_small_path.py`` compares them on many layouts).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from unf.nn.basis import canonical_labels

from .families import DeepSet, PerParamMLP
from .features import _EPS, N_TENSOR_FEATURES, Segments, step_encoding
from .rule import LearnedRule, RuleState, scale_from_moments

__all__ = ["supports_small_path", "small_update", "SmallPlan"]

#: up to this many contiguous entry runs, the read-out's identity terms run as one matrix-vector product per run
MAX_IDENTITY_RUNS = 8
#: layer 0's step-dependent bias is looked up in tables of this many steps (computed as step_encoding would)
STEP_TABLE = 4096


def _is_unf_family(f) -> bool:
    from .unf_family import UNFFamily  # (imports the optimizer, which imports this module: import late)

    return type(f) is UNFFamily


def readout_supported(f) -> bool:
    """Whether a UNF family's read-out compiles here: the plain or role-tied layer, one output channel, every
    axis permuted or relaxed (no folded exact axes), no positional encodings, bound to a layout."""
    from unf.nn import RoleUNFLinear, UNFLinear

    head = f.head
    return (type(head) in (UNFLinear, RoleUNFLinear) and head.out_channels == 1 and not len(head.pos_enc)
            and len(f.deepset.layers) > 0
            and all(e.perm_axes == tuple(range(len(e.shape))) for e in head.plan.entries)
            and f._gather is not None)


def supports_small_path(rule: LearnedRule, n: int, device: torch.device | str = "cpu") -> bool:
    """Small models on a CPU with a built-in family (exact types: a subclass may compute something else).
    GPUs keep the whole-buffer path (this path's index and sparse kernels are not tuned for them)."""
    from .fast import CHUNK

    if torch.device(device).type != "cpu" or n >= CHUNK or n == 0:
        return False
    f = rule.f
    if any(p.dtype != torch.float32 for p in rule.parameters()):  # (the optimizer's state is fp32)
        return False
    return type(f) in (PerParamMLP, DeepSet) or (_is_unf_family(f) and readout_supported(f))


# ---------------------------------------------------------------------------------------------- layout
def _coords(shape: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of every element of ``shape``: one (numel,) int64 tensor per axis."""
    numel = math.prod(shape)
    flat = torch.arange(numel)
    out, stride = [], numel
    for size in shape:
        stride //= size
        out.append(flat // stride % size)
    return out


def _on_diagonal(coords: list[torch.Tensor], labels: Sequence[int]) -> torch.Tensor:
    """Elements whose axes with equal labels have equal coordinates (all of them when no label repeats)."""
    n = coords[0].numel() if coords else 1
    ok = torch.ones(n, dtype=torch.bool)
    first: dict[int, int] = {}
    for ax, b in enumerate(labels):
        if b in first:
            ok &= coords[ax] == coords[first[b]]
        else:
            first[b] = ax
    return ok


def _ravel(coords: list[torch.Tensor], labels: Sequence[int], blocks: Sequence[int],
           sizes: dict[int, int] | Sequence[int]) -> torch.Tensor:
    """Row-major index over ``blocks`` (in that order) of every element; a block's coordinate is that of the
    first axis carrying its label, its size ``sizes[block]``."""
    n = coords[0].numel() if coords else 1
    idx = torch.zeros(n, dtype=torch.int64)
    for b in blocks:
        idx = idx * sizes[b] + coords[labels.index(b)]
    return idx


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from COO triplets (duplicates summed), without torch's beta-state warnings. Its indices are
    int32: with int64 ones, every product on the CPU first converts them (a copy per call: 4-5 us of a 12 us
    product on the MLP's read-out)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        csr = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size).coalesce().to_sparse_csr()
        if csr.values().numel() >= 2**31 - 1:
            return csr
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), size)


class _SegmentMatrices:
    """``ids`` (N,): each element's segment (``table.index_select(0, ids)`` broadcasts a per-segment table);
    ``mean`` (T, N) CSR: ``mean @ x`` is every segment's mean of ``x`` (cost linear in N whatever T)."""

    def __init__(self, seg: Segments, n: int):
        self.ids = seg.ids.cpu()
        counts = seg.counts.cpu().clamp_min(1)  # an empty segment pools nothing (and must not make NaNs)
        self.mean = _csr(self.ids, torch.arange(n), 1.0 / counts[self.ids], (seg.n, n))


class _Readout:
    """The UNF family's read-out compiled for one layout (module docstring): index maps and ``R``; the
    coefficients come per weight version (:meth:`coefficients`)."""

    def __init__(self, f, n: int):
        head = f.head
        plan = head.plan
        entries = plan.entries
        self.n_entries = len(entries)
        pos = [f._index[e.name].reshape(-1).cpu() for e in entries]  # flat position of each entry element
        coords = [_coords(e.shape) for e in entries]
        self.entry_of = torch.empty(n, dtype=torch.int64)  # entry of each flat element
        for k, p in enumerate(pos):
            self.entry_of[p] = k
        # entries as contiguous runs of the flat vector (a plain parameter layout): (start, stop) and entry each
        starts = [0] + (torch.nonzero(self.entry_of[1:] != self.entry_of[:-1]).flatten() + 1).tolist()
        self.runs = None
        if len(starts) <= MAX_IDENTITY_RUNS:
            self.runs = list(zip(starts, starts[1:] + [n]))
            self.run_entries = [int(self.entry_of[a]) for a in starts]
        self._views: dict[int, tuple] = {}
        red_rows: dict[tuple, int] = {}  # reduction key -> first row of its block in Z
        r_rows, r_cols, r_vals = [], [], []
        n_z = 0

        def reduction(i: int, labels: tuple[int, ...], kept: tuple[int, ...]) -> tuple[int, dict[int, int]]:
            """Z block of entry i's mean over its blocks not in ``kept`` (labels canonical); returns its first
            row and the row stride of each kept block."""
            nonlocal n_z
            sizes = {b: entries[i].shape[labels.index(b)] for b in labels}
            strides, s = {}, 1
            for b in reversed(kept):
                strides[b] = s
                s *= sizes[b]
            key = (i, labels, kept)
            if key not in red_rows:
                red_rows[key] = n_z
                ok = _on_diagonal(coords[i], labels)
                row = _ravel(coords[i], labels, kept, sizes)[ok]
                denom = math.prod(sizes[b] for b in sizes if b not in kept)
                r_rows.append(n_z + row)
                r_cols.append(pos[i][ok])
                r_vals.append(torch.full((row.numel(),), 1.0 / denom, dtype=torch.float64))
                n_z += math.prod(sizes[b] for b in kept)
            return red_rows[key], strides

        patterns: dict[tuple, int] = {}  # (entry, canonical labels, kept blocks) -> first slot in u
        pattern_list: list[tuple[int, tuple[int, ...], tuple[int, ...], int]] = []
        n_u = 0

        def pattern(o: int, labels: tuple[int, ...], kept: tuple[int, ...]) -> int:
            nonlocal n_u
            key = (o, labels, kept)
            if key not in patterns:
                patterns[key] = n_u
                pattern_list.append((o, labels, kept, n_u))
                n_u += math.prod(entries[o].shape[labels.index(b)] for b in kept)
            return patterns[key]

        # pairs (reduction rows -> pattern slots) with the terms (or DeepSet pooling, -1 - entry) they sum
        pairs: dict[tuple, list[int]] = {}
        pair_rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.identity: list[tuple[int, int]] = []  # (term, entry)

        def add_pair(source: int, i: int, in_labels, o: int, out_labels, kept_blocks, block_sizes) -> None:
            """A term reading entry i (``in_labels``) into entry o (``out_labels``), carrying ``kept_blocks``
            (in output first-appearance order)."""
            r_labels, in_map = canonical_labels(in_labels)
            u_labels, out_map = canonical_labels(out_labels)
            r_kept = tuple(sorted(in_map[b] for b in kept_blocks))
            z0, z_strides = reduction(i, r_labels, r_kept)
            u_kept = tuple(out_map[b] for b in kept_blocks)
            u0 = pattern(o, u_labels, u_kept)
            key = (z0, u0, tuple(in_map[b] for b in kept_blocks))  # (z0 names the reduction)
            if key not in pairs:
                kc = _coords([block_sizes[b] for b in kept_blocks])  # every kept index, in u's order
                z = torch.full((kc[0].numel() if kc else 1,), z0, dtype=torch.int64)
                for c, b in zip(kc, kept_blocks):
                    z += c * z_strides[in_map[b]]
                pairs[key] = []
                pair_rows[key] = (z, u0 + _ravel(kc, kept_blocks, kept_blocks, block_sizes))
            pairs[key].append(source)

        for t in plan.terms:
            if t.inp == t.out and t.in_labels == t.out_labels and len(set(t.in_labels)) == len(t.in_labels):
                self.identity.append((t.index, t.out))
                continue
            add_pair(t.index, t.inp, t.in_labels, t.out, t.out_labels, t.kept, t.block_sizes)
        for k, e in enumerate(entries):  # the DeepSet output layer's pooled context: a whole-entry mean
            labels = tuple(range(len(e.shape)))
            add_pair(-1 - k, k, labels, k, labels, (), {})
        self.bias_slots = []  # the UNF layer's constants: (slot in u, index of the constant in bias_terms())
        for j, (name, labels, _) in enumerate(head.bias_terms()):
            o = head.names.index(name)
            self.bias_slots.append((pattern(o, canonical_labels(labels)[0], ()), j))
        self.entry_slot = [patterns[(k, tuple(range(len(e.shape))), ())] for k, e in enumerate(entries)]

        dtype = next(f.parameters()).dtype
        self.R = _csr(torch.cat(r_rows), torch.cat(r_cols), torch.cat(r_vals).to(dtype), (n_z, n))
        keys = list(pairs)
        self.pair_sources = [pairs[k] for k in keys]
        self.sel = torch.cat([pair_rows[k][0] for k in keys])  # Z row of every (pair, kept index)
        self.slot = torch.cat([pair_rows[k][1] for k in keys])  # its pattern slot in u
        self.pair_of_row = torch.repeat_interleave(torch.arange(len(keys)),
                                                   torch.tensor([pair_rows[k][0].numel() for k in keys]))
        self.n_u = n_u
        # every element's pattern slots, as a 0/1 (N, patterns) matrix
        e_rows, e_cols = [], []
        for o, labels, kept, u0 in pattern_list:
            sizes = {b: entries[o].shape[labels.index(b)] for b in labels}
            ok = _on_diagonal(coords[o], labels)
            e_rows.append(pos[o][ok])
            e_cols.append(u0 + _ravel(coords[o], labels, kept, sizes)[ok])
        rows = torch.cat(e_rows)
        self.expand = _csr(rows, torch.cat(e_cols), torch.ones(rows.numel(), dtype=dtype), (n, n_u))

    @torch.no_grad()
    def coefficients(self, f, scale: float = 1.0) -> tuple[list[torch.Tensor] | torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        """``(identity coefficients per entry or per run (E, C), per-row pair coefficients (M, C), constant
        pattern values u0 (n_u,))`` for
        the current weights of ``f`` (its DeepSet output layer folded in), all times ``scale``."""
        head, out = f.head, f.deepset.out
        coefs = [c[0] for c in head.term_coefficients()]  # (C,) each: one output channel
        elem, pool = out.elem.weight[0], out.pool.weight[0]
        c_id = elem.expand(self.n_entries, -1).clone()
        for t, k in self.identity:
            c_id[k] += coefs[t]
        pair = torch.stack([sum((coefs[s] if s >= 0 else pool for s in sources), torch.zeros_like(elem))
                            for sources in self.pair_sources])
        u0 = elem.new_zeros(self.n_u)
        bias = head.bias_terms()
        for slot, j in self.bias_slots:
            u0[slot] += bias[j][2][0]
        if out.elem.bias is not None:
            u0[torch.tensor(self.entry_slot)] += out.elem.bias[0]
        c_id, pair, u0 = c_id * scale, pair * scale, u0 * scale
        if self.runs is not None:
            c_id = [c_id[k] for k in self.run_entries]
        return c_id, pair[self.pair_of_row].contiguous(), u0

    def __call__(self, h: torch.Tensor, c_id: list[torch.Tensor] | torch.Tensor, c_pair: torch.Tensor,
                 u0: torch.Tensor, plan: SmallPlan | None = None) -> torch.Tensor:
        """(N,) read-out of hidden activations ``h`` (N, C); ``plan`` lends buffers (the output, an (N, C)
        product) and keeps the per-run views of ``h`` and of the output (``h`` is then its layer buffer)."""
        out = h.new_empty(h.shape[0]) if plan is None else plan.buffer("readout_out", h.shape[0])
        if self.runs is not None:  # entries are a few contiguous runs: one matrix-vector product each
            views = self._views.get(id(h)) if plan is not None else None
            if views is None or views[0] is not h or views[1] is not out:
                views = (h, out, [(h[a:b], out[a:b]) for a, b in self.runs])
                if plan is not None:
                    self._views[id(h)] = views
            for (h_run, out_run), c in zip(views[2], c_id):
                torch.mv(h_run, c, out=out_run)
        else:
            product = None if plan is None else plan.buffer("readout", *h.shape)
            torch.sum(torch.mul(h, c_id.index_select(0, self.entry_of), out=product), 1, out=out)
        z = (self.R @ h).index_select(0, self.sel)
        u = torch.index_add(u0, 0, self.slot, torch.linalg.vecdot(z, c_pair))
        return torch.addmv(out, self.expand, u, out=out)


class SmallPlan:
    """Everything about one layout (a rule's family, the segments, N) that a small step needs, built once,
    and the step's activation buffers (fresh (N, 32) tensors would be page-faulted in on every step)."""

    def __init__(self, rule: LearnedRule, seg: Segments, n: int):
        self.n = n
        self.mats = _SegmentMatrices(seg, n)
        self.readout = _Readout(rule.f, n) if _is_unf_family(rule.f) else None
        self.params = list(rule.parameters())  # (for the weight-version check: parameters() walks modules)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._features: tuple[torch.Tensor, ...] | None = None

    def buffer(self, name: str, *shape: int) -> torch.Tensor:
        buf = self._buffers.get((name, shape))
        if buf is None:
            buf = self._buffers[(name, shape)] = torch.empty(shape)
        return buf

    def feature_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(stats input (N, 16), its raw half (N, 8), its squared half (N, 8), features (N, 8))``."""
        if self._features is None:
            k = N_TENSOR_FEATURES
            stats_in = torch.empty(self.n, 2 * k)
            self._features = (stats_in, stats_in[:, :k], stats_in[:, k:], torch.empty(self.n, k))
        return self._features

    def version(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.params]


class _Weights:
    """The rule's weights as the small path reads them, refreshed when any meta-parameter changes. The output
    layer (or read-out) is pre-divided by the bound, which the update divides by before its tanh."""

    def __init__(self, rule: LearnedRule, plan: SmallPlan):
        f = rule.f
        k = N_TENSOR_FEATURES
        inv_bound = 1.0 / rule.bound
        with torch.no_grad():
            self.neg_alpha = -rule.alpha
            self.decays = rule.decays()[:, None]
            self.beta_bound = rule.bound * rule.beta
            if type(f) is PerParamMLP:
                lins = [m for m in f.net if isinstance(m, torch.nn.Linear)]
                layers = [(m.weight, None, m.bias) for m in lins]
                step_weight = lins[0].weight[:, k:]
            else:
                ds = f if type(f) is DeepSet else f.deepset
                mods = [*ds.layers, ds.out]
                layers = [(m.elem.weight, m.pool.weight, m.elem.bias) for m in mods]
                # a constant channel's segment mean is itself: its element and pooled weights act together
                step_weight = (mods[0].elem.weight + mods[0].pool.weight)[:, k:]
            if plan.readout is not None:
                layers = layers[:-1]  # the DeepSet output layer is part of the read-out
            else:
                w, p, b = layers[-1]
                layers[-1] = (w * inv_bound, None if p is None else p * inv_bound,
                              None if b is None else b * inv_bound)
                if len(layers) == 1:
                    step_weight = step_weight * inv_bound
            w, p, b = layers[0]
            layers[0] = (w[:, :k], None if p is None else p[:, :k], torch.zeros(w.shape[0]) if b is None else b)
            #: (weight^T (in, out), pool^T (in, out) or None, bias (out,) or None), channels-last operands
            self.layers = [(w.T.contiguous(), None if p is None else p.T.contiguous(), b) for w, p, b in layers]
            self.step_weight = step_weight.T.contiguous()  # (11, out): the step channels' share of layer 0
            self.readout = None if plan.readout is None else plan.readout.coefficients(f, inv_bound)
        self._first_bias: tuple[int, torch.Tensor | None] = (-1, None)

    def first_bias(self, plan: SmallPlan, step: torch.Tensor) -> torch.Tensor:
        """Layer 0's bias with the 11 step channels (the same for every element) folded in, from a table per
        block of integer steps (a step that is not a small non-negative integer is computed on its own)."""
        bias = self.layers[0][2]
        t = float(step)
        if t != int(t) or t < 0:
            return torch.addmv(bias, self.step_weight.T, step_encoding(step))
        block = int(t) // STEP_TABLE
        if self._first_bias[0] != block:
            steps = torch.arange(block * STEP_TABLE, (block + 1) * STEP_TABLE, dtype=step.dtype)
            self._first_bias = (block, torch.addmm(bias, step_encoding(steps), self.step_weight))
        return self._first_bias[1][int(t) - block * STEP_TABLE]


@torch.no_grad()
def small_update(rule: LearnedRule, param: torch.Tensor, grad: torch.Tensor, state: RuleState,
                 segments: Segments, lr: float = 1.0, active: torch.Tensor | None = None,
                 workspace: dict | None = None) -> tuple[torch.Tensor, RuleState, torch.Tensor | None]:
    """Same result as :meth:`LearnedRule.update` (to rounding) for :func:`supports_small_path` rules.

    Like :func:`optimizers.fast.fast_update`, ``state.momenta`` is updated in place, and so is ``state.step``
    (the returned state shares both). ``skipped`` is None when no element was skipped (the common case: the
    caller then has nothing to count). ``workspace`` keeps the compiled layout and weights between steps (the
    caller owns it; pass the same dict every step); the returned parameters are a buffer of it
    (``workspace["small_out"]``), overwritten by the next step."""
    workspace = {} if workspace is None else workspace
    n = param.shape[0]
    plan = workspace.get("small_plan")
    key = workspace.get("small_key")  # the objects themselves (not ids, which a new object may reuse)
    if plan is None or key[0] is not rule.f or key[1] is not segments or key[2] != n:
        plan = workspace["small_plan"] = SmallPlan(rule, segments, n)
        workspace["small_key"] = (rule.f, segments, n)
        workspace.pop("small_weights", None)
    version = plan.version()
    weights = workspace.get("small_weights")
    if weights is None or workspace.get("small_version") != version:
        weights = workspace["small_weights"] = _Weights(rule, plan)
        workspace["small_version"] = version

    # momenta (in place) on finite, active elements; multiply then add, as torch.optim.SGD. A finite sum means
    # every element is finite (NaN and inf propagate; an overflowing sum merely takes the elementwise path)
    momenta = state.momenta
    everything = active is None and math.isfinite(float(grad.sum()))
    if everything:
        g = grad
        momenta.mul_(weights.decays).add_(g)
    else:
        finite = grad.abs() < math.inf
        ok = finite if active is None else finite & active
        g = torch.where(ok, grad, 0.0)
        momenta.copy_(torch.where(ok, torch.mul(momenta, weights.decays).add_(g), momenta))

    # features, channels-last: each tensor channel over its segment's root mean square. One sparse product
    # gives every segment's mean and mean square of the raw channels (the first layer's pooling needs both).
    mats, k = plan.mats, N_TENSOR_FEATURES
    stats_in, raw, square, x = plan.feature_buffers()
    raw.copy_(torch.cat([param[None], g[None], momenta[1:]]).T)
    torch.mul(raw, raw, out=square)
    stats = mats.mean @ stats_in  # (T, 16): means, then mean squares
    means, rms = stats[:, :k], stats[:, k:]
    scale = None if rule.scale_floor is None else scale_from_moments(means[:, 0], rms[:, 0], rule.scale_floor)
    rms.add_(_EPS).rsqrt_()
    torch.mul(raw, torch.index_select(rms, 0, mats.ids, out=x), out=x)
    bias0 = weights.first_bias(plan, state.step)

    layers = weights.layers
    pooled = type(rule.f) is not PerParamMLP
    last = len(layers) - 1 if plan.readout is None else len(layers)
    for depth, (w, p, b) in enumerate(layers):
        y = plan.buffer(f"layer{depth % 2}", n, w.shape[1])  # two buffers in turn: less cache for the step
        if depth == 0:
            b = bias0
            if pooled:
                means.mul_(rms)  # the features' segment means
        elif pooled:
            means = mats.mean @ x
        if pooled:
            context = torch.addmm(b, means, p) if b is not None else means @ p  # (T, out)
            torch.index_select(context, 0, mats.ids, out=y).addmm_(x, w)
        else:
            torch.addmm(b, x, w, out=y) if b is not None else torch.mm(x, w, out=y)
        x = y if depth == last else y.relu_()
    # f / bound (the weights carry the 1 / bound), bounded by tanh, in place in a buffer of ours
    out = (x[:, 0] if plan.readout is None else plan.readout(x, *weights.readout, plan)).tanh_()
    if scale is not None:  # relative steps: times the segment's parameter scale
        out.mul_(torch.index_select(scale, 0, mats.ids))

    direction = torch.addcmul(momenta[0], out, weights.beta_bound)
    new_param = torch.addcmul(param, direction, weights.neg_alpha * lr, out=plan.buffer("new_param", n))
    if not everything or not math.isfinite(float(new_param.sum())):
        keep = new_param.abs() < math.inf
        if not everything:
            keep &= ok
        torch.where(keep, new_param, param, out=new_param)
    workspace["small_out"] = new_param
    skipped = None if everything or bool(finite.all()) else (~finite if active is None else active & ~finite)
    return new_param, RuleState(momenta, state.step.add_(1)), skipped
