"""Benchmark: derive_spec on GPT-2-small (124M, default GPT2Config) vs torch.export alone, in one run.

    python benchmarks/bench_spec.py [--repeats 3] [--seq 8]

Prints the time of the first call (cold), the median of the warm calls, and the same for torch.export on
its own (the floor our compiler builds on), plus the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    import unf
    from unf.compiler.trace import export_model

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config())
    x = torch.randint(0, 50257, (1, args.seq))
    n_params = sum(p.numel() for p in model.parameters())

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    cold_derive, spec = timed(lambda: unf.derive_spec(model, x))
    derive = [timed(lambda: unf.derive_spec(model, x))[0] for _ in range(args.repeats)]
    export = [timed(lambda: export_model(model, (x,)))[0] for _ in range(args.repeats)]
    d, e = statistics.median(derive), statistics.median(export)
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"GPT-2-small ({n_params / 1e6:.1f}M parameters): {len(spec.entries)} entries, "
          f"{len(spec.groups)} groups")
    print(f"derive_spec: cold {cold_derive:.2f} s, warm median {d:.2f} s over {args.repeats}")
    print(f"torch.export alone (baseline, same run): warm median {e:.2f} s")
    print(f"ratio derive_spec / export: {d / e:.2f}x (our rules + entry building: {d - e:.2f} s)")


if __name__ == "__main__":
    main()
