"""Experiment: how much of the small-model UNF step is Python overhead?

    pip install ninja            # torch.utils.cpp_extension needs it (and a C++ compiler)
    python benchmarks/bench_native_step.py [--steps 1000] [--rounds 10] [--seed 0]

``benchmarks/native_step/step.cpp`` is :func:`optimizers.small.small_update`'s UNF step for the common case (every
gradient finite, entries in contiguous runs) as the very same ATen calls, made from C++;
``native_step/torchscript_step.py`` is the same as a TorchScript function. Neither is library code: the script
compiles both (about 20 s), checks one step of each against the Python step from the same state and rule, then
times full training steps on the MLP 64 -> 32 -> 10 (batch 128) with Adam, the UNF optimizer (Python small path)
and the UNF optimizer stepping through each variant, in interleaved rounds as ``bench_optimizers.py`` does.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import optimizers as O


def load_variants() -> dict:
    """``name -> object with .unf_step``: the C++ extension and the TorchScript function."""
    import importlib.util
    import types

    from torch.utils.cpp_extension import load

    here = Path(__file__).with_name("native_step")
    build = here / "build"
    build.mkdir(exist_ok=True)
    cxx = load("unf_native_step", [str(here / "step.cpp")], extra_cflags=["-O2"], build_directory=str(build))
    spec = importlib.util.spec_from_file_location("torchscript_step", here / "torchscript_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripted = types.SimpleNamespace(unf_step=torch.jit.script(module.unf_step))
    return {"C++": cxx, "TorchScript": scripted}


class NativeUNF:
    """A UNFOptimizer whose steps (after the first, which compiles the small path's plan) run the C++ function."""

    def __init__(self, native, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule: O.LearnedRule):
        self.native = native
        self.opt = O.UNFOptimizer(model, x, rule=rule)
        nn.functional.cross_entropy(model(x), y).backward()
        self.opt.step()  # the Python small path builds the plan, the weights and the write-back views
        self.flat = self.opt._flat[0]
        if self.flat.workspace["path"][1] != "small" or self.flat.workspace["small_plan"].readout.runs is None:
            raise RuntimeError("the experiment covers the small path with entries in contiguous runs only")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        flat, ws = self.flat, self.flat.workspace
        plan, w = ws["small_plan"], ws["small_weights"]
        ro, n = plan.readout, plan.n
        params = flat.params
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        param = torch.cat([p.reshape(-1) for p in params])
        stats_in, _, _, feats = plan.feature_buffers()
        width = w.layers[0][0].shape[1]
        ok = self.native.unf_step(
            grad, param, flat.momenta, w.decays, stats_in, feats, plan.buffer("layer0", n, width),
            plan.buffer("layer1", n, width), plan.buffer("readout_out", n), plan.buffer("new_param", n),
            plan.mats.mean, plan.mats.ids, w.first_bias(plan, flat.step), [l[0] for l in w.layers],
            [l[1] for l in w.layers], [l[2] for l in w.layers], [a for a, _ in ro.runs] + [n], w.readout[0], ro.R,
            ro.sel, w.readout[1], ro.slot, w.readout[2], ro.expand, w.beta_bound, w.neg_alpha * 1.0)
        if not ok:
            raise RuntimeError("non-finite values: the experiment has no masking path")
        flat.step.add_(1)
        torch._foreach_copy_(params, ws["small_out_views"][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = load_variants()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    torch.manual_seed(args.seed)
    model0 = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    rule = O.UNFOptimizer(copy.deepcopy(model0), x).rule  # one set of (fresh) weights for every UNF run

    for name, native in variants.items():  # one step from the same state against the Python small path
        a, b = copy.deepcopy(model0), copy.deepcopy(model0)
        native_opt = NativeUNF(native, a, x, y, copy.deepcopy(rule))
        python_opt = O.UNFOptimizer(b, x, rule=copy.deepcopy(rule))
        nn.functional.cross_entropy(b(x), y).backward()
        python_opt.step()
        for model, opt in ((a, native_opt), (b, python_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
        print(f"{name}: one step from the same state, max |variant - python| = {diff:.2e}")

    makers = {"Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
              "UNF (Python small path)": lambda m: O.UNFOptimizer(m, x, rule=copy.deepcopy(rule))}
    for name, native in variants.items():
        makers[f"UNF ({name})"] = lambda m, native=native: NativeUNF(native, m, x, y, copy.deepcopy(rule))
    runs = {}
    for name, make in makers.items():
        model = copy.deepcopy(model0)
        runs[name] = (model, make(model))
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in runs}
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            for i in range(3 + args.steps // args.rounds):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                if i >= 3:
                    times[name][0].append(t2 - t0)
                    times[name][1].append(t2 - t1)
    base = statistics.median(times["Adam"][0])
    for name, (full, step) in times.items():
        print(f"  {name:24s} step {statistics.median(full) * 1e3:6.3f} ms ({statistics.median(full) / base:4.2f}x Adam)"
              f"   optimizer.step alone {statistics.median(step) * 1e3:6.3f} ms")


if __name__ == "__main__":
    main()
