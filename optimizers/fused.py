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
>= 16), or None. The UNF family's equivariant read-out runs as before on the last hidden activations. Results equal
the unfused forward to float rounding (sums in another order); ``tests/test_fused.py`` checks this on a CPU with
Triton's interpreter, ``tests/test_cuda.py`` on a GPU.
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
                store: bool = True, project: torch.Tensor | None = None, sums: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``y = relu(weight @ x + table[:, segment])`` for channels-first ``x`` (C_in, N), ``weight`` (C_out, C_in),
    ``table`` (C_out, T). Returns ``(y or None, segment sums of y (T, C_out) or None, project @ y (N,) or None)``.

    ``store=False`` skips writing ``y`` (only its sums and projection are needed); ``project`` (C_out,) adds the
    1-channel read-out ``project @ y``; ``sums=False`` skips the segment sums (a layer without pooling next)."""
    c_in, n = x.shape
    c_out = weight.shape[0]
    device = x.device
    seg_of, start, stop, tree = _blocks(segments, device)
    n_blocks = seg_of.numel()
    y = torch.empty(c_out, n, device=device, dtype=torch.float32) if store else x  # (x: an unused pointer)
    part = torch.empty(max(n_blocks, 1), c_out, device=device, dtype=torch.float32)
    out = torch.empty(n, device=device, dtype=torch.float32) if project is not None else x
    proj = project.contiguous() if project is not None else weight
    if n_blocks:
        _kernels().layer_kernel[(n_blocks,)](
            x.contiguous(), weight.contiguous(), table.contiguous(), y, part, proj, out, seg_of, start, stop,
            n, table.shape[1], c_in, K_PAD=max(16, _next_power_of_2(c_in)), C_OUT=c_out, BLOCK_N=BLOCK,
            STORE_Y=store, PROJECT=project is not None, PRECISION=_precision(device), num_warps=NUM_WARPS)
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

    def __call__(self, tensor_features: torch.Tensor, step_features: torch.Tensor, segments: Segments
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) read-out and, if ``keep_hidden``, the last hidden activations (hidden, N)."""
        x, shared = tensor_features, step_features
        mean = _means(segment_sums(x, segments), segments) if self.hidden[0][1] is not None else None  # (C, T)
        h = None
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
            y, sums, proj = fused_layer(x, weight, table, segments, store=not last or self.keep_hidden,
                                        project=self.out[0].weight[0] if last else None, sums=pools_next)
            mean = _means(sums, segments) if pools_next else None
            x = h = y
        out_elem, out_pool = self.out
        const = out_elem.bias.reshape(1, 1).expand(1, segments.n) if out_elem.bias is not None else None
        if out_pool is not None:
            pooled_out = out_pool.weight @ mean  # (1, T)
            const = pooled_out if const is None else const + pooled_out
        result = proj if const is None else proj + const[0].index_select(0, segments.ids.to(proj.device))
        return result, h


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
        out, h = stack(tensor_features, step_features, segments)
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
