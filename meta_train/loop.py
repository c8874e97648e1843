"""The meta-training loop, top to bottom: PES (or ES / BPTT) meta-gradients, Adam with clipping, atomic
checkpoints and exact resume.

    python -m meta_train.loop --run-dir runs/demo --task mlp-digits --meta-steps 200

Every source of randomness is one ``torch.Generator`` whose state is checkpointed, so a run killed at any moment
and resumed from its last checkpoint ends with exactly the meta-parameters of an uninterrupted run. Checkpoints are
written to a temporary file and renamed into place, so a kill never leaves a half-written one. ``metrics.csv`` is
rewritten up to the checkpointed step on resume, so it never holds rows from the lost tail.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import optimizers as O

from .build import build_rule
from .estimators import PES, bptt, es
from .tasks import get_task

__all__ = ["MetaTrainConfig", "meta_train", "load_config", "save_checkpoint_atomic"]


@dataclass
class MetaTrainConfig:
    run_dir: str
    task: str = "mlp-digits"
    family: str = "deepset"  # "mlp" or "deepset"
    hidden: int = 8
    estimator: str = "pes"  # "pes", "es" or "bptt"
    particles: int = 8
    sigma: float = 0.01
    truncation: int = 10  # inner steps per meta-step
    horizon: int = 100  # inner steps before the inner runs restart
    meta_steps: int = 100
    meta_lr: float = 1e-3
    clip: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    init_from: str = ""  # a saved rule (.safetensors) to start from, e.g. a trained DeepSet rule for a UNF run


def load_config(path: str | os.PathLike, **overrides: Any) -> MetaTrainConfig:
    """Read a TOML config (a flat table of :class:`MetaTrainConfig` fields); errors name the offending field."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"no config file at {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e
    data.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(MetaTrainConfig)}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{path}: unknown field {key!r}; valid fields: {', '.join(fields)}")
        default = fields[key].default
        expected = type(default) if default is not dataclasses.MISSING else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[key] = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{path}: field {key!r} must be {expected.__name__}, got {type(value).__name__} "
                             f"{value!r}")
    if "run_dir" not in data:
        raise ValueError(f"{path}: missing required field 'run_dir'")
    return MetaTrainConfig(**data)


def save_checkpoint_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["meta_step", "meta_loss", "grad_norm"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def meta_train(cfg: MetaTrainConfig, progress: bool = True) -> O.LearnedRule:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    if cfg.estimator not in ("pes", "es", "bptt"):
        raise ValueError(f"estimator must be pes, es or bptt, got {cfg.estimator!r}")

    # ---- everything that defines the run
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    task = get_task(cfg.task)
    w0_params = task.init(gen)
    rule, problem = build_rule(cfg.family, task, w0_params, hidden=cfg.hidden, init_from=cfg.init_from)
    meta_opt = torch.optim.Adam(rule.parameters(), lr=cfg.meta_lr)
    names = list(w0_params)

    def fresh_inner() -> tuple[torch.Tensor, torch.Tensor]:
        params = task.init(gen)
        w = torch.cat([params[n].reshape(-1) for n in names])
        return w, torch.zeros(O.rule.N_MOMENTA, w.numel())

    def theta() -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in rule.named_parameters()}

    pes = PES(rule, problem, particles=cfg.particles, sigma=cfg.sigma)
    w, m = fresh_inner()
    s = torch.zeros(())
    pes.reset(w, m, theta())
    start, rows = 0, []

    # ---- resume
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{ckpt_path} was written with a different config; use a new --run-dir")
        rule.load_state_dict(ck["rule"])
        meta_opt.load_state_dict(ck["meta_opt"])
        gen.set_state(ck["generator"])
        pes.w, pes.momenta, pes.step_count, pes.xi = ck["pes"]
        w, m, s = ck["inner"]
        start, rows = ck["meta_step"], ck["metrics"]
    _write_metrics(run_dir / "metrics.csv", rows)

    bar = tqdm(range(start, cfg.meta_steps), initial=start, total=cfg.meta_steps, disable=not progress,
               desc=f"meta-train {cfg.task}")
    for step in bar:
        batches = [task.sample_batch(gen) for _ in range(cfg.truncation)]
        th = theta()
        if cfg.estimator == "pes":
            grads, loss = pes.step(th, batches, gen)
            if int(pes.step_count[0, 0]) >= cfg.horizon:  # all particles restart together
                w, m = fresh_inner()
                pes.reset(w, m, th)
        elif cfg.estimator == "es":
            grads, loss = es(rule, th, problem, w, m, s, batches, cfg.particles, cfg.sigma, gen)
            w, m, s = _advance(rule, th, problem, w, m, s, batches)
        else:
            grads, loss, (w, m, s) = bptt(rule, th, problem, w, m, s, batches)
        if cfg.estimator != "pes" and int(s) >= cfg.horizon:
            (w, m), s = fresh_inner(), torch.zeros(())
        for k, p in rule.named_parameters():
            p.grad = grads[k].to(p.dtype).clone()
        norm = torch.nn.utils.clip_grad_norm_(rule.parameters(), cfg.clip)
        meta_opt.step()
        meta_opt.zero_grad(set_to_none=True)
        rows.append({"meta_step": step + 1, "meta_loss": float(loss), "grad_norm": float(norm)})
        bar.set_postfix(meta_loss=f"{float(loss):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.meta_steps:
            save_checkpoint_atomic({"config": dataclasses.asdict(cfg), "meta_step": step + 1,
                                    "rule": rule.state_dict(), "meta_opt": meta_opt.state_dict(),
                                    "generator": gen.get_state(), "pes": (pes.w, pes.momenta, pes.step_count, pes.xi),
                                    "inner": (w, m, s), "metrics": rows}, ckpt_path)
            _write_metrics(run_dir / "metrics.csv", rows)
    O.save_rule(rule, run_dir / "rule.safetensors", task=cfg.task, estimator=cfg.estimator,
                meta_steps=cfg.meta_steps)
    return rule


@torch.no_grad()
def _advance(rule, th, problem, w, m, s, batches):
    from .estimators import unroll

    w, m, s, _ = unroll(rule, th, problem, w, m, s, batches)
    return w, m, s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="meta-train a learned optimizer")
    for f in dataclasses.fields(MetaTrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            parser.add_argument(name, required=True, type=str)
        else:
            parser.add_argument(name, type=type(f.default), default=f.default)
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    progress = not args.pop("no_progress")
    meta_train(MetaTrainConfig(**args), progress=progress)


if __name__ == "__main__":
    main()
