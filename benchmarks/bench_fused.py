"""Benchmark: one fused DeepSet layer (:func:`optimizers.fused.fused_layer`) against the same layer op by op, on a GPU.

    python benchmarks/bench_fused.py [--model cnn|mlp] [--repeats 50] [--best FILE]

The layer is ``y = relu(W x + c[segment])`` plus the segment sums of ``y``, hidden width 32, over the flat
parameters of the benchmark CNN (963k elements, its 10 spec entries as segments). Times each (block size, warps,
``tl.dot`` precision) setting of the kernel and the unfused ops (a matmul, an add by segment with the ReLU, a
segment mean) with CUDA events, medians of ``--repeats``, and the largest difference from the unfused result;
``--best FILE`` writes the fastest ``BLOCK NUM_WARPS PRECISION`` there, among the settings whose difference is
within 4x of the fp32 ("ieee") kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_optimizers as B  # noqa: E402

import optimizers as O  # noqa: E402
from optimizers import fused  # noqa: E402
from optimizers.features import segment_add_, segment_mean  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(B.TASKS), default="cnn")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--best", type=Path, default=None, help="write the fastest 'BLOCK NUM_WARPS' here")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, x, _ = B.TASKS[args.model]()
    opt = O.UNFOptimizer(model, x)
    params = [dict(model.named_parameters())[n] for n in opt.spec.sources]
    segments = opt.rule.f.bind(params).to(device)
    n = segments.ids.numel()
    h = torch.randn(32, n, device=device)
    w = torch.randn(32, 32, device=device) / 6
    pool = torch.randn(32, 32, device=device) / 6
    bias = torch.randn(32, device=device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}: {n:,} elements, "
          f"{segments.n} segments; one 32 -> 32 layer plus its segment sums, median of {args.repeats}")

    def unfused():
        context = pool @ segment_mean(h, segments, dim=-1) + bias.unsqueeze(-1)
        y = segment_add_(w @ h, context, segments, dim=-1).relu_()
        return segment_mean(y, segments, dim=-1)

    table = pool @ segment_mean(h, segments, dim=-1) + bias.unsqueeze(-1)
    base = timed(unfused, args.repeats)
    print(f"  unfused ops                     {base:7.3f} ms")
    want = torch.relu(w @ h + table[:, segments.ids])
    results, errors = {}, {}
    default = (fused.BLOCK, fused.NUM_WARPS, fused.PRECISION)
    for precision in ("ieee", "tf32x3"):
        for block in (256, 512, 1024):
            for warps in (4, 8):
                fused.BLOCK, fused.NUM_WARPS, fused.PRECISION = block, warps, precision
                try:
                    ms = timed(lambda: fused.fused_layer(h, w, table, segments), args.repeats)
                except Exception as failure:  # (e.g. out of shared memory or registers at this size)
                    print(f"  fused {precision:6s} BLOCK {block:4d} warps {warps}: failed ({type(failure).__name__})")
                    continue
                y, _, _ = fused.fused_layer(h, w, table, segments)
                results[(block, warps, precision)] = ms
                errors[(block, warps, precision)] = err = float((y - want).abs().max())
                print(f"  fused {precision:6s} BLOCK {block:4d} warps {warps}   {ms:7.3f} ms  "
                      f"({base / ms:4.1f}x faster)   max |fused - unfused| {err:.2e}")
    fused.BLOCK, fused.NUM_WARPS, fused.PRECISION = default
    exact = min(v for k, v in errors.items() if k[2] == "ieee")
    eligible = {k: v for k, v in results.items() if errors[k] <= 4 * exact}
    best = min(eligible, key=eligible.get)
    print(f"  fastest within 4x of the fp32 kernel's error: BLOCK {best[0]}, warps {best[1]}, {best[2]}")
    if args.best is not None:
        args.best.write_text(f"{best[0]} {best[1]} {best[2]}\n")


if __name__ == "__main__":
    main()
