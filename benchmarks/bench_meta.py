"""Benchmark: meta-training throughput.

    python benchmarks/bench_meta.py [--quick] [--threads 1 2] [--repeats 5] [--default-allocator]

(a) One PES meta-step with the population vectorised (``meta_train.estimators.PES.step``: the + and - runs of all
    particles as one population, the rule on batched tensors, the inner gradients from a vmapped loss) against the
    same math as a Python loop over particles (one ``unroll`` per particle and sign): 16 particles, truncation 10,
    ``mlp-digits``, deepset family (hidden 8); the median of ``--repeats`` timed steps after one warm-up, per
    thread count. PES keeps glibc from returning its freed temporaries to the OS after every inner step
    (``meta_train.estimators.keep_freed_memory``); ``--default-allocator`` times it without that (the loop
    allocates small blocks and is unaffected either way).
(b) Meta-steps per second of the loop's PES step (batches, noise, vectorised PES, clipping, Adam) on each of the
    paper's default tasks with the deepset family, 8 particles, truncation 10.

Prints markdown tables. ``--quick`` times fewer steps (for a smoke test, not for numbers to record).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import meta_train.estimators as estimators
import optimizers as O
from meta_train.build import build_rule
from meta_train.estimators import PES, _weighted, draw_noise, unroll
from meta_train.tasks import get_task

DEFAULT_TASKS = ("mlp-digits", "cnn-digits", "rnn-shakespeare", "transformer-shakespeare")


def setup(task_name: str, particles: int, hidden: int = 8, seed: int = 0):
    """The loop's pieces for one task: rule, flat problem, a PES reset to a fresh inner run, Adam, a generator."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    task = get_task(task_name)
    params = task.init(gen)
    rule, problem = build_rule("deepset", task, params, hidden=hidden)
    w = torch.cat([p.reshape(-1) for p in params.values()])
    m = torch.zeros(O.rule.N_MOMENTA, w.numel())
    pes = PES(rule, problem, particles=particles, sigma=0.01)
    pes.reset(w, m, {k: v.detach() for k, v in rule.named_parameters()})
    return task, rule, problem, pes, gen


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_pes_step(pes: PES, theta: dict, batches: list, noise: dict) -> tuple[dict, torch.Tensor]:
    """The same truncation as ``PES.step(theta, batches, noise=noise)``, one particle and sign at a time."""
    ws, ms, ss, losses = [], [], [], []
    for sign_index, sign in enumerate((1.0, -1.0)):
        row = [unroll(pes.rule, {k: theta[k] + sign * noise[k][i] for k in theta}, pes.problem,
                      pes.w[sign_index, i], pes.momenta[sign_index, i], pes.step_count[sign_index, i], batches)
               for i in range(pes.particles)]
        ws.append(torch.stack([r[0] for r in row]))
        ms.append(torch.stack([r[1] for r in row]))
        ss.append(torch.stack([r[2] for r in row]))
        losses.append(torch.stack([r[3].mean() for r in row]))
    pes.w, pes.momenta, pes.step_count = torch.stack(ws).detach(), torch.stack(ms).detach(), torch.stack(ss).detach()
    pes.xi = {k: pes.xi[k] + noise[k] for k in theta}
    return _weighted(pes.xi, losses[0] - losses[1], pes.sigma), ((losses[0] + losses[1]) / 2).mean().detach()


def bench_vmap_vs_loop(threads: int, repeats: int, particles: int = 16, truncation: int = 10) -> dict:
    torch.set_num_threads(threads)
    task, rule, _, pes, gen = setup("mlp-digits", particles)
    theta = {k: v.detach() for k, v in rule.named_parameters()}
    batches = [task.sample_batch(gen) for _ in range(truncation)]
    noise = draw_noise(theta, particles, pes.sigma, gen)

    # the two paths compute the same estimate from the same state (checked once, before timing)
    state = (pes.w, pes.momenta, pes.step_count, dict(pes.xi))
    g_vmap, _ = pes.step(theta, batches, noise=noise)
    pes.w, pes.momenta, pes.step_count, pes.xi = state[0], state[1], state[2], dict(state[3])
    g_loop, _ = loop_pes_step(pes, theta, batches, noise)
    for k in theta:
        torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=1e-3, atol=1e-5)

    t_vmap = median_time(lambda: pes.step(theta, batches, noise=noise), repeats)
    t_loop = median_time(lambda: loop_pes_step(pes, theta, batches, noise), repeats)
    return {"threads": threads, "vmap": t_vmap, "loop": t_loop, "ratio": t_loop / t_vmap}


def bench_meta_steps(task_name: str, threads: int, repeats: int, particles: int = 8, truncation: int = 10) -> dict:
    torch.set_num_threads(threads)
    task, rule, _, pes, gen = setup(task_name, particles)
    meta_opt = torch.optim.Adam(rule.parameters(), lr=1e-3)

    def meta_step() -> None:
        batches = [task.sample_batch(gen) for _ in range(truncation)]
        theta = {k: v.detach() for k, v in rule.named_parameters()}
        grads, _ = pes.step(theta, batches, noise=draw_noise(theta, particles, pes.sigma, gen))
        for k, p in rule.named_parameters():
            p.grad = grads[k].to(p.dtype).clone()
        torch.nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        meta_opt.step()
        meta_opt.zero_grad(set_to_none=True)

    seconds = median_time(meta_step, repeats)
    return {"task": task_name, "params": task.num_params, "threads": threads, "seconds": seconds,
            "per_second": 1.0 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 timed step each (smoke test)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median; default 5)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="tasks for (b)")
    parser.add_argument("--parts", nargs="+", choices=["a", "b"], default=["a", "b"], help="which benchmarks to run")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc settings alone (see meta_train.estimators.keep_freed_memory)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if not args.default_allocator:
        estimators.keep_freed_memory()  # as the command-line entry points do

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}, median of {repeats} step(s) after 1 warm-up, load average {load}, "
          f"{'default' if args.default_allocator else 'tuned'} allocator\n")
    if "a" in args.parts:
        print("(a) one PES meta-step, 16 particles, truncation 10, mlp-digits, deepset: vectorised population vs a "
              "Python loop\n")
        print("| threads | vectorised (s) | loop (s) | loop / vectorised |")
        print("|---:|---:|---:|---:|")
        for threads in args.threads:
            r = bench_vmap_vs_loop(threads, repeats)
            print(f"| {r['threads']} | {r['vmap']:.3f} | {r['loop']:.3f} | {r['ratio']:.1f}x |", flush=True)
        print()
    if "b" not in args.parts:
        return
    print("(b) meta-steps per second, deepset, 8 particles, truncation 10 (PES, vectorised)\n")
    print("| task | inner params | threads | s / meta-step | meta-steps / s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks:
        for threads in args.threads:
            r = bench_meta_steps(name, threads, repeats)
            print(f"| {r['task']} | {r['params']} | {r['threads']} | {r['seconds']:.3f} | {r['per_second']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
