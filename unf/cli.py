"""The ``unf`` command line: ``unf demo``, ``unf spec MODULE:FACTORY``, ``unf meta-train CONFIG``,
``unf plot RUN_DIR``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as ``unf: error: ...`` with exit status 2."""


def _load_factory(target: str) -> Callable[[], Any]:
    if ":" not in target:
        raise CLIError(f"expected MODULE:FACTORY (e.g. unf.models:transformer_example), got {target!r}")
    module_name, attr = target.split(":", 1)
    sys.path.insert(0, os.getcwd())  # let users point at a file in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(f"cannot import module {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CLIError(f"module {module_name!r} has no callable {attr!r}")
    return factory


def _call_factory(target: str) -> tuple[Any, Any]:
    import torch

    result = _load_factory(target)()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise CLIError(f"{target} must return (model, example_inputs) with model an nn.Module, "
                       f"got {type(result).__name__}")
    return result


def _to_float64(model: Any, inputs: Any) -> tuple[Any, Any]:
    import torch

    model = model.double()
    if isinstance(inputs, torch.Tensor):
        return model, inputs.double() if inputs.is_floating_point() else inputs
    return model, tuple(x.double() if x.is_floating_point() else x for x in inputs)


def cmd_spec(args: argparse.Namespace) -> int:
    import unf

    model, inputs = _call_factory(args.factory)
    if args.float64:
        model, inputs = _to_float64(model, inputs)
    start = time.perf_counter()
    spec = unf.derive_spec(model, inputs)
    elapsed = time.perf_counter() - start
    if args.json:
        print(spec.to_json(indent=2))
    else:
        print(spec)
        print(f"derived in {elapsed:.2f} s")
    if args.check:
        report = unf.check_spec(model, spec, inputs, trials=args.check)
        print(report, file=sys.stderr if args.json else sys.stdout)
        return 0 if report.ok else 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import unf
    from unf import models

    torch.manual_seed(args.seed)
    ok = True
    for title, factory in (("a small pre-LN transformer LM", models.transformer_example),
                           ("a CNN with BatchNorm", models.cnn_example)):
        model, inputs = factory()
        model, inputs = _to_float64(model, inputs)
        unf.randomize_(model, torch.Generator().manual_seed(args.seed))
        start = time.perf_counter()
        spec = unf.derive_spec(model, inputs)
        elapsed = time.perf_counter() - start
        print(f"== {title}: {type(model).__name__}, derived in {elapsed:.2f} s ==")
        print(spec)
        report = unf.check_spec(model, spec, inputs, trials=args.trials,
                                generator=torch.Generator().manual_seed(args.seed))
        print(report)
        print()
        ok &= report.ok
    print("All specs preserve the function." if ok else "A spec check FAILED.")
    if args.steps > 0:
        ok &= _demo_optimizer(args)
    return 0 if ok else 1


def _demo_optimizer(args: argparse.Namespace) -> bool:
    """The shipped UNF optimizer vs Adam tuned over the 7-point grid on the embedded MLP task (mnist1d)."""
    from pathlib import Path

    import torch

    import optimizers
    from meta_train.compare import compare, plot_curves
    from meta_train.tasks import get_task

    name = "unf-mnist1d-imitation"
    if name not in optimizers.available():
        print(f"\n(no shipped {name!r} weights in this install; skipping the optimizer demo)")
        return True
    print(f"\n== the shipped UNF learned optimizer {name!r} vs LR-tuned Adam: MLP 40-32-10 on mnist1d, "
          f"{args.steps} steps, {args.seeds} seeds ==")
    start = time.perf_counter()
    task = get_task("mlp-mnist1d")
    # drop-in use: an ordinary torch.optim-style loop on the task's model
    torch.manual_seed(args.seed)
    model = task.model.train().requires_grad_(True)
    model.load_state_dict(task.init(torch.Generator().manual_seed(args.seed)), strict=False)
    opt = optimizers.load(name, model, example_inputs=task.example_inputs)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(100):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(f"drop-in: {type(opt).__name__} on {type(model).__name__}, 100 steps: loss {losses[0]:.3f} -> "
          f"{sum(losses[-10:]) / 10:.3f}")
    result = compare(task, {f"UNF ({name})": name}, steps=(args.steps,), seeds=range(args.seeds),
                     baselines=("adam",), progress=True)
    print(result.table())
    out = Path(args.out)
    png = plot_curves(result, out / "demo-optimizers.png")
    ours = next(r for r in result.rows if r["optimizer"].startswith("UNF"))["mean"]
    adam = next(r for r in result.rows if r["optimizer"] == "adam")["mean"]
    print(f"UNF / tuned Adam final training loss: {ours / adam:.2f}x  (plot: {png}; "
          f"{time.perf_counter() - start:.0f} s)")
    return True


def cmd_meta_train(args: argparse.Namespace) -> int:
    from meta_train.loop import load_config, meta_train

    cfg = load_config(args.config, run_dir=args.run_dir)
    meta_train(cfg, progress=not args.no_progress)
    print(f"meta-trained rule written to {cfg.run_dir}/rule.safetensors (metrics: {cfg.run_dir}/metrics.csv)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from meta_train.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
    print(f"plot written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unf", description="universal-neural-functionals command line")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="derive and validate the specs of built-in models, then race the shipped UNF "
                                       "optimizer against tuned Adam")
    demo.add_argument("--trials", type=int, default=20, help="random permutations per check (default 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=1000,
                      help="training steps of the optimizer comparison (0 skips it; default 1000)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds of the optimizer comparison (default 3)")
    demo.add_argument("--out", default="unf-demo", help="folder for the comparison plot (default ./unf-demo)")
    demo.set_defaults(func=cmd_demo)

    spec = sub.add_parser("spec", help="derive and print the weight-space spec of a model")
    spec.add_argument("factory", help="MODULE:FACTORY returning (model, example_inputs)")
    spec.add_argument("--json", action="store_true", help="print the spec as JSON")
    spec.add_argument("--check", type=int, default=0, metavar="N",
                      help="also verify the spec with N random permutations (exit 1 if it fails)")
    spec.add_argument("--float64", action="store_true", help="convert model and inputs to float64 first")
    spec.set_defaults(func=cmd_spec)

    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer from a TOML config (resumes if stopped)")
    mt.add_argument("config", help="TOML file with MetaTrainConfig fields (run_dir, task, family, estimator, ...)")
    mt.add_argument("--run-dir", default=None, help="override the config's run_dir")
    mt.add_argument("--no-progress", action="store_true")
    mt.set_defaults(func=cmd_meta_train)

    plot = sub.add_parser("plot", help="plot a meta-training run's metrics.csv (and eval.csv) to a PNG")
    plot.add_argument("run_dir", help="the run's directory (holds metrics.csv)")
    plot.add_argument("--out", default=None, metavar="FILE.png", help="where to write (default RUN_DIR/metrics.png)")
    plot.set_defaults(func=cmd_plot)

    from meta_train import compare as _compare

    cmp = sub.add_parser("compare", help="learned optimizers vs LR-tuned Adam and SGDM: several seeds, table + plot")
    _compare.add_arguments(cmp)
    cmp.set_defaults(func=_compare.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from meta_train.estimators import keep_freed_memory

    keep_freed_memory()  # a process of our own: let glibc reuse freed blocks (see there; a no-op elsewhere)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return args.func(args)
    except KeyboardInterrupt:
        print("unf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from unf.compiler import SpecError

        expected = (CLIError, SpecError, ValueError)
        kind = "" if isinstance(e, expected) else f"{type(e).__name__}: "
        print(f"unf: error: {kind}{e}", file=sys.stderr)
        if not isinstance(e, expected):
            print("unf: run with --debug for the full traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
