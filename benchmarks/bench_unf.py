"""Benchmark of the :mod:`unf.nn` UNF layers (issue: "UNF layers ...", acceptance item 5).

3-layer UNF (channels 1->16->16->1, ReLU), batch of 8 weight spaces, forward+backward, on
(a) the MLP 64->32->10 spec (W1, b1, W2, b2, every axis permutable) and
(b) the 2-block pre-LN transformer spec of 37 tensors (d=32, 4 heads x 8, MLP 64, vocab 50 and 16 positions
    fixed, one residual group; q and k share the head-dim group);
the fast path vs the per-term reference of ``tests/test_nn_reference.py`` in the same run; and a
1-output-channel UNFLinear on a hand-written GPT-2-small spec (12 layers, d=768, 12 heads x 64, MLP 3072,
vocab 50257 and 1024
positions fixed).

    .venv/bin/python benchmarks/bench_unf.py [--threads 1] [--repeats 50] [--compile] [--gpt2-small] [--ab]

``--ab`` also times the fused path (one autograd node, hand-written backward; the default) against the plain
autograd path (``UNFLinear.fused = False``, every op recorded) on the same model, in alternating blocks of
steps (robust to a machine whose load drifts), and prints the ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unf.nn import UNF, UNFLinear, WeightFeatures  # noqa: E402
from unf.spec import WeightSpaceSpec  # noqa: E402


def mlp_spec() -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({"W1": [("h", 32), ("in", 64)], "b1": [("h", 32)],
                                      "W2": [("out", 10), ("h", 32)], "b2": [("out", 10)]})


def transformer_spec(d: int = 32, heads: int = 4, hd: int = 8, mlp: int = 64, vocab: int = 50, ctx: int = 16,
                     blocks: int = 2, head: bool = True) -> WeightSpaceSpec:
    """Pre-LN transformer LM: one residual group ``d``; per block its own heads, q/k head-dim, v/o head-dim
    and MLP groups; vocabulary and positions fixed. ``blocks=2`` gives the issue's 37 tensors; ``head=False``
    leaves out the output head (tied to the token embedding, as in GPT-2)."""
    ax: dict[str, list] = {"tok": [(None, vocab), ("d", d)], "pos": [(None, ctx), ("d", d)]}
    for b in range(blocks):
        H, qk, vo, m = f"H{b}", f"qk{b}", f"vo{b}", f"m{b}"
        ax.update({
            f"{b}.ln1.g": [("d", d)], f"{b}.ln1.b": [("d", d)],
            f"{b}.q": [("d", d), (H, heads), (qk, hd)], f"{b}.k": [("d", d), (H, heads), (qk, hd)],
            f"{b}.v": [("d", d), (H, heads), (vo, hd)],
            f"{b}.bq": [(H, heads), (qk, hd)], f"{b}.bk": [(H, heads), (qk, hd)],
            f"{b}.bv": [(H, heads), (vo, hd)],
            f"{b}.o": [(H, heads), (vo, hd), ("d", d)], f"{b}.bo": [("d", d)],
            f"{b}.ln2.g": [("d", d)], f"{b}.ln2.b": [("d", d)],
            f"{b}.w1": [("d", d), (m, mlp)], f"{b}.b1": [(m, mlp)], f"{b}.w2": [(m, mlp), ("d", d)],
            f"{b}.b2": [("d", d)]})
    ax.update({"lnf.g": [("d", d)], "lnf.b": [("d", d)]})
    if head:
        ax["head"] = [("d", d), (None, vocab)]
    return WeightSpaceSpec.from_axes(ax)


def gpt2_small_spec() -> WeightSpaceSpec:
    """GPT-2 small by hand (head tied to wte): q/k/v/proj as head views, heads per layer, q/k share head
    dims."""
    return transformer_spec(d=768, heads=12, hd=64, mlp=3072, vocab=50257, ctx=1024, blocks=12, head=False)


def tune_malloc() -> bool:
    """Keep freed activations in glibc's heap instead of returning them to the OS.

    By default glibc serves allocations over ~128 KiB with fresh ``mmap`` pages and unmaps them on free, so
    every step page-faults and zeroes its activations again (this doubled the MLP timings here). Same effect
    as ``MALLOC_MMAP_THRESHOLD_=1G MALLOC_TRIM_THRESHOLD_=1G`` in the environment; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_top_pad, 256 << 20) == 1
    return bool(ok)


def timeit(fn, repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median and min wall time and median CPU time of this process, in ms.

    The machine is shared: wall time includes waiting for the CPU; with one thread, process CPU time is the
    work itself (with several threads it sums over threads)."""
    for _ in range(warmup):
        fn()
    ts, cs = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
        cs.append((time.process_time() - c) * 1e3)
    return statistics.median(ts), min(ts), statistics.median(cs)


def fwd_bwd(model, x):
    def step():
        out = model(x)
        loss = sum(t.sum() for t in out.values())
        loss.backward()
    return step


def bench_spec(label: str, spec: WeightSpaceSpec, repeats: int, compile_: bool, reference: bool) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = UNF(spec, [1, 16, 16, 1])
    x = WeightFeatures.randn(spec, 8, 1).as_dict()
    build = time.perf_counter() - t0
    t1 = time.perf_counter()
    fwd_bwd(model, x)()
    first = time.perf_counter() - t1
    terms = model.layers[2].num_terms
    params = sum(p.numel() for p in model.parameters())
    med, best, cpu = timeit(fwd_bwd(model, x), repeats)
    print(f"[{label}] {len(spec.entries)} tensors, {terms} terms/layer, {params} params; construction "
          f"{build * 1e3:.0f} ms, first fwd+bwd {first * 1e3:.0f} ms")
    print(f"[{label}] eager fwd+bwd: median {med:.2f} ms, min {best:.2f} ms (wall); median {cpu:.2f} ms CPU")
    with torch.no_grad():
        fmed, fbest, fcpu = timeit(lambda: model(x), repeats)
    print(f"[{label}] eager fwd only: median {fmed:.2f} ms, min {fbest:.2f} ms (wall); "
          f"median {fcpu:.2f} ms CPU")
    if reference:
        from tests.test_nn_reference import reference_unf_linear

        def ref_step():
            y = x
            for layer in model.layers:
                y = reference_unf_linear(layer, y) if isinstance(layer, UNFLinear) else layer(y)
            sum(t.sum() for t in y.values()).backward()

        rmed, _, _ = timeit(ref_step, max(3, repeats // 10), warmup=1)
        print(f"[{label}] per-term reference fwd+bwd: median {rmed:.2f} ms -> fast path is {rmed / med:.1f}x "
              "faster")
    if compile_:
        t2 = time.perf_counter()
        cmodel = torch.compile(model)
        fwd_bwd(cmodel, x)()
        ctime = time.perf_counter() - t2
        cmed, cbest, ccpu = timeit(fwd_bwd(cmodel, x), repeats)
        print(f"[{label}] torch.compile (inductor): compile+first call {ctime:.1f} s; fwd+bwd median "
              f"{cmed:.2f} ms, min {cbest:.2f} ms (wall); median {ccpu:.2f} ms CPU")


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, UNFLinear):
            m.fused = fused


def ab_spec(label: str, spec: WeightSpaceSpec, repeats: int, block: int = 10) -> None:
    """Fused vs plain autograd path, alternating blocks of ``block`` steps; per-step median CPU time."""
    torch.manual_seed(0)
    model = UNF(spec, [1, 16, 16, 1])
    x = WeightFeatures.randn(spec, 8, 1).as_dict()
    step = fwd_bwd(model, x)
    times: dict[bool, list[float]] = {True: [], False: []}
    for fused in (True, False):
        set_fused(model, fused)
        for _ in range(3):
            step()
    while len(times[True]) < repeats:
        for fused in (True, False):
            set_fused(model, fused)
            step()  # first step after the switch: warm the allocator for this path
            for _ in range(block):
                c = time.process_time()
                step()
                times[fused].append((time.process_time() - c) * 1e3)
    set_fused(model, True)
    new, old = statistics.median(times[True]), statistics.median(times[False])
    print(f"[{label}] A/B fwd+bwd (median CPU ms over {len(times[True])} steps each, blocks of {block}): fused "
          f"{new:.2f}, plain autograd {old:.2f} -> ratio {new / old:.3f}")


def bench_gpt2_small(backward: bool) -> None:
    spec = gpt2_small_spec()
    n_weights = sum(int(torch.tensor(e.shape).prod()) for e in spec.entries)
    t0 = time.perf_counter()
    layer = UNFLinear(spec, 1, 1)
    build = time.perf_counter() - t0
    print(f"[gpt2-small] {len(spec.entries)} tensors, {n_weights / 1e6:.1f}M weights, "
          f"{layer.num_terms} terms, "
          f"{len(layer.plan.reductions)} reductions, {len(layer.plan.mixes)} matmuls; "
          f"construction {build:.1f} s")
    x = WeightFeatures.randn(spec, 1, 1).as_dict()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with torch.no_grad():
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            layer(x)
            ts.append(time.perf_counter() - t)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[gpt2-small] UNFLinear(1->1) forward, batch 1: {min(ts):.2f} s (best of 3); peak RSS "
          f"{rss1:.1f} GiB (features alone {n_weights * 4 / 2**30:.2f} GiB, {rss0:.1f} GiB before)")
    if backward:
        xg = {k: v.requires_grad_() for k, v in x.items()}
        t = time.perf_counter()
        sum(v.sum() for v in layer(xg).values()).backward()
        rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"[gpt2-small] forward+backward: {time.perf_counter() - t:.2f} s; peak RSS {rss2:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--gpt2-small", action="store_true", help="also run the GPT-2-small UNFLinear check")
    ap.add_argument("--gpt2-backward", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not tune glibc malloc (see tune_malloc)")
    ap.add_argument("--ab", action="store_true",
                    help="also time the fused path against the plain autograd path (UNFLinear.fused=False)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.default_malloc else tune_malloc()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, malloc tuned: {tuned}")
    bench_spec("mlp 64-32-10", mlp_spec(), args.repeats, args.compile, not args.no_reference)
    bench_spec("transformer 2 blocks", transformer_spec(), max(5, args.repeats // 5), args.compile,
               not args.no_reference)
    if args.ab:
        ab_spec("mlp 64-32-10", mlp_spec(), 2 * args.repeats)
        ab_spec("transformer 2 blocks", transformer_spec(), max(20, args.repeats // 2))
    if args.gpt2_small:
        bench_gpt2_small(args.gpt2_backward)


if __name__ == "__main__":
    main()
