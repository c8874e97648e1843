"""The meta-training loop, top to bottom: PES (or ES / BPTT) meta-gradients, Adam with clipping, periodic held-out
evaluation, atomic checkpoints and exact resume.

    python -m meta_train --run-dir runs/demo --task mlp-digits --meta-steps 200 --eval-every 20
    python -m meta_train --config examples/configs/mlp_digits_pes.toml
    python -m meta_train --run-dir runs/fam --task-family mlp-mnist1d --family unf   # a new task every horizon
    torchrun --nproc_per_node 2 -m meta_train --config ...      # the population split over 2 processes

Every source of randomness of the run is one ``torch.Generator`` whose state is checkpointed, so a run killed at any
moment and resumed from its last checkpoint ends with exactly the meta-parameters of an uninterrupted run.
Evaluation draws only from generators of its own (seeded from ``seed``, the eval task and the eval seed), so runs
with and without it reach the same meta-parameters. Checkpoints are written to a temporary file and renamed into
place, so a kill never leaves a half-written one.

Task families: with ``task_family`` set the run trains on a registered family of tasks instead of one task: a new
task is drawn from the run's generator whenever the inner runs restart (every particle restarts together, so a
truncation's whole population shares one task); see :class:`MetaTrainConfig`.

Logs in ``run_dir``: ``metrics.csv`` (``meta_step, meta_loss, grad_norm, task``: the task the step trained on;
a ``grad_norm`` of nan/inf marks a step whose estimate was not finite: it was skipped and the inner runs restarted)
and, with ``eval_every > 0``, ``eval.csv`` (``meta_step, task, train_loss, test_loss``); both are rewritten up to
the checkpointed step on resume, so they never hold rows from a lost tail. With ``tensorboard`` installed the
same scalars also go to ``run_dir/tb/`` (the CSVs stay the source of truth). ``unf plot RUN_DIR`` draws them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import optimizers as O
from optimizers.features import MOMENTUM_DECAYS

from .build import bind_rule, build_rule, copy_rule, union_role_keys
from .distributed import DistInfo, all_gather_cat, all_reduce_sum, particle_slice
from .distributed import current as _dist_current
from .estimators import META_LOSSES, PES, FlatProblem, bptt, draw_noise, es, unroll
from .tasks import ClassificationTask, Task, TaskFamily, get_family, get_task, list_families, list_tasks

__all__ = ["MetaTrainConfig", "meta_train", "load_config", "save_checkpoint_atomic", "add_config_arguments",
           "config_from_args", "METRICS_FIELDS", "EVAL_FIELDS"]

ESTIMATORS = ("pes", "es", "bptt")
META_PARAMS = ("all", "scalars")
SCALARS = ("raw_alpha", "beta", "raw_gamma0")  # the rule's scalar meta-parameters (meta_params = "scalars")
METRICS_FIELDS = ("meta_step", "meta_loss", "grad_norm", "task")
EVAL_FIELDS = ("meta_step", "task", "train_loss", "test_loss")
DEFAULT_TASK = "mlp-digits"
#: tasks sampled (from a generator of their own, seeded by ``seed``) whose UNF role keys make a family run's table
FAMILY_KEY_TASKS = 8


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (a resumed run must have the same config).

    Attributes:
        run_dir: where checkpoints, logs and the trained rule go.
        task: registered meta-training task (``meta_train.tasks.list_tasks()``).
        task_family: registered task family (``meta_train.tasks.list_families()``, e.g. ``"mlp-mnist1d"``) to
            meta-train on instead of one task; ``""`` (default) trains on ``task``, which must then be left at
            its default. A new task is drawn from the run's generator at the start and whenever the inner runs
            restart (every ``horizon`` inner steps), so resumes stay exact; all particles share it. Per-element
            rules (``mlp``, ``deepset``) apply to every task as they are. A ``unf`` rule is spec-bound, so its UNF
            read-out holds a coefficient table over the union of the role keys of ``FAMILY_KEY_TASKS`` tasks
            sampled from the family (from a generator of their own, seeded by ``seed``, so the table is
            deterministic and the run's stream is not touched); each drawn task runs a rule on its own spec
            over that table, with the trained rule's tensors as meta-parameters. Terms whose key a later task
            brings and the table lacks contribute zero (one warning per run). The trained rule saves and loads
            with its key table (:func:`optimizers.save_rule`) and transfers to any model by role.
        family: optimizer family, ``"mlp"``, ``"deepset"`` (or ``"unf"``), see :func:`meta_train.build.build_rule`.
        hidden: hidden width of the rule's network.
        estimator: meta-gradient estimator, ``"pes"``, ``"es"`` or ``"bptt"``.
        particles: population size of PES / ES (antithetic pairs).
        sigma: standard deviation of the meta-parameter perturbations.
        truncation: inner steps per meta-step.
        horizon: inner steps before the inner runs restart from a fresh initialisation.
        meta_steps: meta-steps of the whole run.
        meta_lr: Adam's learning rate on the meta-parameters.
        clip: meta-gradient norm clipping.
        checkpoint_every: meta-steps between checkpoints (and CSV rewrites).
        seed: seeds the rule's initialisation and the run's one generator.
        meta_loss: objective of a truncation from its per-step training losses: ``"mean"``, ``"final"`` (the last
            step's) or ``"log_mean"`` (mean of log losses); see :func:`meta_train.estimators.reduce_losses`.
        eval_every: meta-steps between held-out evaluations (also at step 0 and at the end); 0 turns them off.
        eval_tasks: registered tasks to evaluate the current rule on.
        eval_steps: inner steps of each evaluation run (from a fresh initialisation).
        eval_seeds: evaluation runs per task (their losses are averaged).
        device: ``"cpu"`` or ``"cuda"`` (under ``torchrun``, each process takes ``cuda:LOCAL_RANK``).
        init_from: a saved rule (``.safetensors``) to start from instead of a fresh one, e.g. a trained DeepSet
            rule for a UNF run (see :func:`meta_train.build.warm_start`); ``""`` for a fresh rule.
        imitate_steps: regression steps of a warm start that fits the rule to a teacher optimizer before the
            first meta-step (:mod:`meta_train.imitate`; after ``init_from``); 0 (default) for none. One task
            only (not with ``task_family``). Its losses go to ``run_dir/imitation.csv``.
        imitate_runs: teacher runs the imitation's snapshots come from.
        imitate_horizon: steps of each teacher run (the rule learns the schedule up to this step).
        imitate_beta: the rule's ``beta`` when the imitation starts (it is fitted too). With ``alpha`` held at 1e-3
            and ``f`` bounded by 10, the learned part of a step is at most ``1e-2 * beta`` per element.
        imitate_tasks: more registered tasks whose teacher runs (``imitate_runs`` each) join the imitation's
            snapshots, so the rule learns the teacher's behaviour beyond the one task (a UNF rule's read-out then
            covers the role keys of all of them).
        imitate_key_dropout: for a UNF rule, the probability that each role key's read-out coefficients are left
            out at an imitation step (:func:`meta_train.imitate.imitate`'s ``key_dropout``), so the rule also
            imitates the teacher on models whose spec lacks some of its keys; 0 (default) for none.
        teacher_lr: the teacher's initial step size (per-element RMS of its update).
        teacher_tau: the teacher's step size halves after ``teacher_tau`` steps (inverse-time decay).
        teacher_snr_decay: 0 (default: off), or a momentum decay of the rule (e.g. 0.99): the teacher scales each
            tensor's step by ``max(0, cos(grad, momentum at that decay)) ** teacher_snr_power`` (self-annealing).
        teacher_snr_power: exponent of that cosine.
        teacher_softness: 0 (default: off), or ``s > 0``: the teacher's normalised direction ``d`` becomes the soft
            sign ``d (1 + s) / (|d| + s)`` (see :class:`meta_train.imitate.ScheduledNormalizedMomentum`).
        scale_floor: 0 (default: off), or ``f > 0``: *relative* steps for the rule and the teacher. The rule's
            learned term, and the teacher's step, are multiplied by each segment's ``max(std(W), f)``
            (:class:`optimizers.LearnedRule`), so ``teacher_lr`` is a fraction of the weights' spread.
        accumulate: meta-steps whose estimates are averaged before one update of the meta-optimizer (1: an update
            every meta-step). With ``horizon / truncation`` it averages a whole inner run's truncations, so the
            meta-optimizer sees one full-horizon estimate per update. A non-finite estimate is left out of the
            average (and the inner runs restart).
        meta_params: which meta-parameters the run trains: ``"all"`` (default) or ``"scalars"`` (only ``alpha``,
            ``beta`` and ``gamma0``; ``f`` stays as it starts, e.g. from ``init_from`` or the imitation). Three
            perturbed dimensions instead of thousands make ES/PES estimates far less noisy, e.g. to adapt a trained
            rule's step size to a task.
    """

    run_dir: str
    task: str = DEFAULT_TASK
    task_family: str = ""
    family: str = "deepset"
    hidden: int = 8
    estimator: str = "pes"
    particles: int = 8
    sigma: float = 0.01
    truncation: int = 10
    horizon: int = 100
    meta_steps: int = 100
    meta_lr: float = 1e-3
    clip: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    meta_loss: str = "mean"
    eval_every: int = 0
    eval_tasks: list[str] = field(default_factory=lambda: ["mlp-digits-tanh"])
    eval_steps: int = 200
    eval_seeds: int = 2
    device: str = "cpu"
    init_from: str = ""
    imitate_steps: int = 0
    imitate_runs: int = 6
    imitate_horizon: int = 10000
    imitate_beta: float = 30.0
    imitate_tasks: list[str] = field(default_factory=list)
    imitate_key_dropout: float = 0.0
    teacher_lr: float = 0.03
    teacher_tau: float = 300.0
    teacher_snr_decay: float = 0.0
    teacher_snr_power: float = 1.0
    teacher_softness: float = 0.0
    scale_floor: float = 0.0
    meta_params: str = "all"
    accumulate: int = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        _check_values(self)


_POSITIVE = ("hidden", "particles", "truncation", "horizon", "checkpoint_every", "accumulate", "eval_steps",
             "eval_seeds", "sigma", "meta_lr", "clip", "imitate_runs", "imitate_horizon", "imitate_beta", "teacher_lr",
             "teacher_tau", "teacher_snr_power")


def _type_name(hint: Any) -> str:
    return "list of str" if typing.get_origin(hint) is list else hint.__name__


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` as field ``name`` of type ``hint`` takes it (ints become floats for float fields), else ValueError."""
    bad = ValueError(f"field {name!r} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if typing.get_origin(hint) is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if isinstance(value, bool) and hint is not bool:
        raise bad
    if hint is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, hint):
        raise bad
    return value


def _check_values(cfg: MetaTrainConfig) -> None:
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"field {name!r} {why}; got {getattr(cfg, name)!r}")

    for name in _POSITIVE:
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise bad(name, "must be positive")
    if cfg.eval_every < 0:
        raise bad("eval_every", "must be >= 0 (0 turns evaluation off)")
    if cfg.imitate_steps < 0:
        raise bad("imitate_steps", "must be >= 0 (0 turns the imitation warm start off)")
    if cfg.meta_steps < 0 or (cfg.meta_steps == 0 and not cfg.imitate_steps):
        raise bad("meta_steps", "must be positive (0 only with imitate_steps > 0: an imitation-only run)")
    if cfg.imitate_steps and cfg.task_family:
        raise bad("imitate_steps", "must be 0 with 'task_family' set (imitation fits the rule on one task)")
    if cfg.teacher_snr_decay and cfg.teacher_snr_decay not in MOMENTUM_DECAYS:
        raise bad("teacher_snr_decay", f"must be 0 (off) or one of the rule's momentum decays {MOMENTUM_DECAYS}")
    if cfg.teacher_softness < 0 or not math.isfinite(cfg.teacher_softness):
        raise bad("teacher_softness", "must be 0 (off) or positive")
    if cfg.scale_floor < 0 or not math.isfinite(cfg.scale_floor):
        raise bad("scale_floor", "must be 0 (off: absolute steps) or positive")
    if cfg.estimator not in ESTIMATORS:
        raise bad("estimator", f"must be one of {', '.join(ESTIMATORS)}")
    if cfg.meta_params not in META_PARAMS:
        raise bad("meta_params", f"must be one of {', '.join(META_PARAMS)}")
    if cfg.meta_loss not in META_LOSSES:
        raise bad("meta_loss", f"must be one of {', '.join(META_LOSSES)}")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise bad("device", "must be 'cpu' or 'cuda' (or 'cuda:N')")
    known = list_tasks()
    if cfg.task not in known:
        raise bad("task", f"must be a registered task ({', '.join(known)})")
    if cfg.task_family:
        families = list_families()
        if cfg.task_family not in families:
            raise bad("task_family", f"must be a registered task family ({', '.join(families)}) or '' to train "
                                     "on field 'task'")
        if cfg.task != DEFAULT_TASK:
            raise ValueError(f"fields 'task' and 'task_family' are exclusive (a run trains on one task or on a "
                             f"family): leave 'task' at its default {DEFAULT_TASK!r} when 'task_family' is set; "
                             f"got task={cfg.task!r}, task_family={cfg.task_family!r}")
    for which in ("eval_tasks", "imitate_tasks"):
        for name in getattr(cfg, which):
            if name not in known:
                raise ValueError(f"field {which!r}: unknown task {name!r}; registered: {', '.join(known)}")
    if cfg.imitate_tasks and not cfg.imitate_steps:
        raise bad("imitate_tasks", "needs imitate_steps > 0 (they are imitation tasks)")
    if not 0.0 <= cfg.imitate_key_dropout < 1.0:
        raise bad("imitate_key_dropout", "must be in [0, 1)")
    if cfg.imitate_key_dropout and not cfg.imitate_steps:
        raise bad("imitate_key_dropout", "needs imitate_steps > 0 (it acts on the imitation)")
    if cfg.imitate_key_dropout and cfg.family != "unf":
        raise bad("imitate_key_dropout", "applies to family 'unf' only (its read-out is shared by role key)")
    if cfg.eval_every and not cfg.eval_tasks:
        raise bad("eval_tasks", "must name at least one task when eval_every > 0")


def load_config(path: str | os.PathLike, **overrides: Any) -> MetaTrainConfig:
    """Read a TOML config (a flat table of :class:`MetaTrainConfig` fields); errors name the offending field.

    ``overrides`` (field name -> value, ``None`` meaning "not given") take precedence over the file."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"no config file at {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e
    data.update({k: v for k, v in overrides.items() if v is not None})
    fields = [f.name for f in dataclasses.fields(MetaTrainConfig)]
    for key in data:
        if key not in fields:
            raise ValueError(f"{path}: unknown field {key!r}; valid fields: {', '.join(fields)}")
    if "run_dir" not in data:
        raise ValueError(f"{path}: missing required field 'run_dir'")
    try:
        return MetaTrainConfig(**data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE.toml`` and one ``--field-name`` flag per :class:`MetaTrainConfig` field to ``parser``.

    Flags default to ``None`` ("not given"), so :func:`config_from_args` can tell them from the file's values."""
    parser.add_argument("--config", metavar="FILE.toml", default=None,
                        help="TOML file of config fields (flags given as well override it)")
    hints = typing.get_type_hints(MetaTrainConfig)
    for f in dataclasses.fields(MetaTrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        helptext = "required unless --config gives it" if default is dataclasses.MISSING else f"default {default!r}"
        if typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="+", default=None, metavar="NAME", help=helptext)
        else:
            parser.add_argument(flag, type=hint, default=None, help=helptext)
    return parser


def config_from_args(args: dict[str, Any]) -> MetaTrainConfig:
    """The config from parsed :func:`add_config_arguments` flags (a ``vars(namespace)``; other keys are ignored)."""
    names = [f.name for f in dataclasses.fields(MetaTrainConfig)]
    given = {k: args.get(k) for k in names if args.get(k) is not None}
    if args.get("config"):
        return load_config(args["config"], **given)
    if "run_dir" not in given:
        raise ValueError("--run-dir is required (or --config FILE.toml with a run_dir)")
    return MetaTrainConfig(**given)


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


def _write_csv(path: Path, rows: list[dict], fieldnames: typing.Sequence[str]) -> None:
    """Rewrite ``path`` with ``rows`` atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TB_NOTICE_SHOWN = False


def _open_tensorboard(run_dir: Path, purge_step: int | None) -> Any:
    """A ``SummaryWriter`` on ``run_dir/tb`` (dropping events from ``purge_step`` on), or None without tensorboard."""
    global _TB_NOTICE_SHOWN
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_NOTICE_SHOWN:
            print("meta_train: tensorboard is not installed; logging to CSV only", file=sys.stderr)
            _TB_NOTICE_SHOWN = True
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)


def _derived_seed(kind: str, *parts: Any) -> int:
    """A 63-bit seed for a generator of its own (``kind``: what it draws), independent of the run's stream."""
    digest = hashlib.sha256(f"meta_train.{kind}:{':'.join(map(str, parts))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _eval_seed(seed: int, task: str, index: int) -> int:
    return _derived_seed("eval", seed, task, index)


def _flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


class _Evaluator:
    """Runs the current rule (no noise) from fresh initialisations on held-out tasks; draws from its own generators.

    The initialisations and batches of each (task, eval seed) are drawn once, so every evaluation of a run sees the
    same problems and successive rows compare rules, not luck."""

    HELD_OUT_BATCHES = 8  # for tasks without a whole test split (language models)

    def __init__(self, cfg: MetaTrainConfig, rule: O.LearnedRule, device: torch.device) -> None:
        self.rule, self.entries = rule, []
        with torch.random.fork_rng(devices=[]):  # building rules must not move the run's global RNG
            for name in cfg.eval_tasks:
                task = _get_task(name, device)
                eval_rule, problem = build_rule(cfg.family, task, task.init(torch.Generator().manual_seed(0)),
                                                hidden=cfg.hidden)
                eval_rule = eval_rule.to(device)
                try:
                    copy_rule(eval_rule, rule)
                except (RuntimeError, ValueError) as e:
                    warnings.warn(f"eval task {name!r} skipped: the {cfg.family!r} rule trained on "
                                  f"{_trained_on(cfg)} does not fit it ({str(e).splitlines()[0]})", stacklevel=3)
                    continue
                runs = []
                for index in range(cfg.eval_seeds):
                    g = torch.Generator().manual_seed(_eval_seed(cfg.seed, name, index))
                    w0 = _flatten(task.init(g))
                    batches = [task.sample_batch(g) for _ in range(cfg.eval_steps)]
                    held_out = ([task.data.arrays("test")] if isinstance(task, ClassificationTask)
                                else [task.sample_batch(g, split="valid") for _ in range(self.HELD_OUT_BATCHES)])
                    runs.append((w0, batches, held_out))
                self.entries.append((name, eval_rule, problem, runs))

    @torch.no_grad()
    def __call__(self, meta_step: int) -> list[dict]:
        rows = []
        for name, eval_rule, problem, runs in self.entries:
            copy_rule(eval_rule, self.rule)  # a UNF rule is transferred to the eval task's spec by role
            theta = {k: v.detach() for k, v in eval_rule.named_parameters()}
            train, test = [], []
            for w0, batches, held_out in runs:
                momenta = torch.zeros(O.rule.N_MOMENTA, w0.numel(), dtype=w0.dtype, device=w0.device)
                w, _, _, losses = unroll(eval_rule, theta, problem, w0, momenta,
                                         torch.zeros((), dtype=w0.dtype, device=w0.device), batches)
                tail = max(1, len(batches) // 10)
                train.append(float(losses[-tail:].mean()))
                test.append(sum(float(problem.loss(w, b)) for b in held_out) / len(held_out))
            rows.append({"meta_step": meta_step, "task": name, "train_loss": sum(train) / len(train),
                         "test_loss": sum(test) / len(test)})
        return rows


def _get_task(name: str, device: torch.device) -> Task:
    return get_task(name) if device.type == "cpu" else get_task(name, device=device)


def _get_family(name: str, device: torch.device) -> TaskFamily:
    return get_family(name) if device.type == "cpu" else get_family(name, device=str(device))


def _trained_on(cfg: MetaTrainConfig) -> str:
    return f"family {cfg.task_family!r}" if cfg.task_family else repr(cfg.task)


def _sample_task(family: TaskFamily, generator: torch.Generator) -> Task:
    """A task of ``family`` drawn from ``generator`` only (building its model must not move the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        return family.sample(generator)


def _family_role_keys(family: TaskFamily, seed: int) -> list[str]:
    """The shared UNF key table of a family run: :func:`union_role_keys` of ``FAMILY_KEY_TASKS`` sampled tasks."""
    g = torch.Generator().manual_seed(_derived_seed("family-keys", seed))
    with torch.random.fork_rng(devices=[]):
        return union_role_keys(_sample_task(family, g) for _ in range(FAMILY_KEY_TASKS))


@dataclass
class _Inner:
    """The task the inner runs are on now and the rule that runs the meta-parameters on it (the master itself,
    or for a UNF family run a rule on the task's spec over the master's key table, see
    :func:`meta_train.build.bind_rule`)."""

    task: Task
    rule: O.LearnedRule
    problem: FlatProblem
    drawn_from: torch.Tensor | None = None  # family runs: the generator state the task was drawn at (resume
    # draws it again from there)

    @property
    def names(self) -> list[str]:
        return list(self.task.param_shapes)


def _resolve_device(device: str, info: DistInfo) -> torch.device:
    if device == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


def _check_resumable(saved: dict, cfg: MetaTrainConfig, path: Path) -> None:
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(MetaTrainConfig)}
    saved = {**defaults, **saved}  # checkpoints from before a field existed hold its default
    now = dataclasses.asdict(cfg)
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path} was written with a different config ({'; '.join(diff)}); use a new --run-dir")


def _teacher(cfg: MetaTrainConfig):
    """The config's imitation teacher (0 turns a refinement off)."""
    from .imitate import ScheduledNormalizedMomentum

    return ScheduledNormalizedMomentum(lr=cfg.teacher_lr, tau=cfg.teacher_tau, snr_decay=cfg.teacher_snr_decay or None,
                                       snr_power=cfg.teacher_snr_power, softness=cfg.teacher_softness or None,
                                       scale_floor=cfg.scale_floor or None)


def _imitation_warm_start(cfg: MetaTrainConfig, rule: O.LearnedRule, task: Task, problem: FlatProblem,
                          run_dir: Path, progress: bool, write: bool) -> None:
    """Fit ``rule`` to the teacher (:mod:`meta_train.imitate`) from a generator of its own (every process of a
    distributed run computes the same rule); ``write``: log the losses to ``imitation.csv``."""
    from .imitate import ImitationSource, imitate, teacher_snapshots

    gen = torch.Generator().manual_seed(_derived_seed("imitate", cfg.seed))
    teacher = _teacher(cfg)
    snaps = teacher_snapshots(task, problem, teacher, cfg.imitate_runs, cfg.imitate_horizon, gen, progress)
    more = []
    for name in cfg.imitate_tasks:
        extra = _get_task(name, task.device)
        bound, extra_problem = bind_rule(rule, cfg.family, extra, extra.init(gen))
        more.append(ImitationSource(bound, extra_problem, teacher_snapshots(
            extra, extra_problem, teacher, cfg.imitate_runs, cfg.imitate_horizon, gen, progress)))
    losses = imitate(rule, problem, snaps, teacher, cfg.imitate_steps, gen, beta=cfg.imitate_beta, progress=progress,
                     more=more, key_dropout=cfg.imitate_key_dropout)
    if write:
        _write_csv(run_dir / "imitation.csv", [{"step": i, "loss": x} for i, x in enumerate(losses)],
                   ("step", "loss"))


def meta_train(cfg: MetaTrainConfig, progress: bool = True, stop_after: int | None = None) -> O.LearnedRule:
    """Meta-train a learned rule as ``cfg`` says, resuming from ``cfg.run_dir/checkpoint.pt`` if there is one.

    Under an initialised ``torch.distributed`` process group the population is split across the processes (see
    :mod:`meta_train.distributed`); only rank 0 writes files.

    Args:
        cfg: the run.
        progress: show a progress bar (rank 0 only).
        stop_after: checkpoint and return at this meta-step (resume later with the same config); the rule is saved
            to ``rule.safetensors`` only when the run reaches ``cfg.meta_steps``.

    Returns:
        The trained rule (on ``cfg.device``).
    """
    info = _dist_current()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    if cfg.estimator == "bptt" and info.distributed:
        raise ValueError("field 'estimator': bptt has no population to split across processes; run it in one "
                         "process or use pes / es")
    mine = particle_slice(cfg.particles, info)
    population = cfg.particles if info.distributed else None
    device = _resolve_device(cfg.device, info)
    stop = cfg.meta_steps if stop_after is None else max(0, min(cfg.meta_steps, stop_after))

    # ---- everything that defines the run
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    family = _get_family(cfg.task_family, device) if cfg.task_family else None
    role_keys = _family_role_keys(family, cfg.seed) if family is not None and cfg.family == "unf" else None
    drawn_from = gen.get_state() if family is not None else None
    task = _sample_task(family, gen) if family is not None else _get_task(cfg.task, device)
    w0_params = task.init(gen)
    if cfg.imitate_steps and cfg.imitate_tasks and cfg.family == "unf":  # one read-out for every imitation task
        role_keys = union_role_keys([task, *(_get_task(name, device) for name in cfg.imitate_tasks)])
    try:
        rule, problem = build_rule(cfg.family, task, w0_params, hidden=cfg.hidden, init_from=cfg.init_from or None,
                                   role_keys=role_keys)
    except KeyError as e:
        raise ValueError(f"field 'family': {e.args[0]}") from e
    if cfg.scale_floor:
        rule.scale_floor = cfg.scale_floor
    rule = rule.to(device)  # the master: the meta-parameters, whatever task the inner runs are on
    trained = {k: p for k, p in rule.named_parameters() if cfg.meta_params == "all" or k in SCALARS}
    meta_opt = torch.optim.Adam(trained.values(), lr=cfg.meta_lr)
    evaluate = _Evaluator(cfg, rule, device) if cfg.eval_every and info.is_main else None
    warned_keys = False

    def bound(new: Task, params: dict[str, torch.Tensor], state: torch.Tensor) -> _Inner:
        """The family's task ``new`` with the master bound to it; warns (once per run) if its UNF terms have keys
        the shared table lacks (a fresh bound rule's coverage is the table's)."""
        nonlocal warned_keys
        inner = _Inner(new, *bind_rule(rule, cfg.family, new, params), drawn_from=state)
        coverage = inner.rule.f.head.coverage if role_keys is not None else 1.0
        if coverage < 1.0 and not warned_keys:
            warnings.warn(f"task {new.name!r} of family {cfg.task_family!r}: {1 - coverage:.0%} of its UNF terms "
                          f"have role keys outside the shared table (the union over {FAMILY_KEY_TASKS} tasks "
                          "sampled at the start); they contribute zero (warned once per run)", stacklevel=4)
            warned_keys = True
        return inner

    def draw_task(generator: torch.Generator) -> _Inner:
        """Sample the family's next task from ``generator`` and bind the master to it."""
        state = generator.get_state()
        new = _sample_task(family, generator)
        return bound(new, {k: torch.empty(s, device="meta") for k, s in new.param_shapes.items()}, state)  # layout

    inner = _Inner(task, rule, problem) if family is None else bound(task, w0_params, drawn_from)

    def fresh_inner() -> tuple[torch.Tensor, torch.Tensor]:
        params = inner.task.init(gen)
        w = torch.cat([params[n].reshape(-1) for n in inner.names])
        return w, torch.zeros(O.rule.N_MOMENTA, w.numel(), device=w.device)

    def theta() -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in rule.named_parameters()}

    def held(noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The perturbations with those of meta-parameters the run does not train set to zero (drawn all the same,
        so the random stream does not depend on ``meta_params``)."""
        return {k: v if k in trained else torch.zeros_like(v) for k, v in noise.items()}

    def new_pes() -> PES:
        return PES(inner.rule, inner.problem, particles=mine.stop - mine.start, sigma=cfg.sigma,
                   meta_loss=cfg.meta_loss)

    def restart(th: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner runs restart (a family run draws its next task first); returns the fresh ``(w, momenta)``,
        which every PES particle restarts from too (ES / BPTT runs checkpoint that unused PES state as well)."""
        nonlocal inner, pes
        if family is not None:
            inner = draw_task(gen)
            pes = new_pes()
        w, m = fresh_inner()
        pes.reset(w, m, th)
        return w, m

    if cfg.imitate_steps and not ckpt_path.exists():  # (a resumed run has the imitated rule in its checkpoint)
        _imitation_warm_start(cfg, rule, task, problem, run_dir, progress and info.is_main, info.is_main)
    pes = new_pes()
    w, m = fresh_inner()
    s = torch.zeros((), device=device)
    pes.reset(w, m, theta())
    start, rows, eval_rows = 0, [], []
    accum: dict = {"sum": {}, "count": 0}  # estimates of the current accumulation window (accumulate > 1)

    # ---- resume
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        _check_resumable(ck["config"], cfg, ckpt_path)
        rule.load_state_dict(ck["rule"])
        if family is not None:  # re-draw the task the inner runs were on from where it was drawn
            inner = draw_task(torch.Generator().set_state(ck["task_drawn_from"].cpu()))
            pes = new_pes()
        meta_opt.load_state_dict(ck["meta_opt"])
        gen.set_state(ck["generator"].cpu())
        pw, pm, ps, pxi = ck["pes"]  # every particle's state: take this process's slice
        pes.w, pes.momenta, pes.step_count = (t[:, mine].clone() for t in (pw, pm, ps))
        pes.xi = {k: v[mine].clone() for k, v in pxi.items()}
        w, m, s = ck["inner"]
        accum = ck.get("accumulated", accum)
        start, rows, eval_rows = ck["meta_step"], ck["metrics"], ck.get("eval", [])

    tb = None
    if info.is_main:
        _write_csv(run_dir / "metrics.csv", rows, METRICS_FIELDS)
        if cfg.eval_every:
            _write_csv(run_dir / "eval.csv", eval_rows, EVAL_FIELDS)
        tb = _open_tensorboard(run_dir, purge_step=start if start else None)

    def log_eval(meta_step: int) -> None:
        new = evaluate(meta_step)
        eval_rows.extend(new)
        _write_csv(run_dir / "eval.csv", eval_rows, EVAL_FIELDS)
        if tb is not None:
            for r in new:
                tb.add_scalar(f"eval/{r['task']}/train_loss", r["train_loss"], meta_step)
                tb.add_scalar(f"eval/{r['task']}/test_loss", r["test_loss"], meta_step)

    try:
        if evaluate is not None and start == 0 and stop > 0:
            log_eval(0)
        bar = tqdm(range(start, stop), initial=start, total=cfg.meta_steps,
                   disable=not (progress and info.is_main), desc=f"meta-train {cfg.task_family or cfg.task}")
        for step in bar:
            task_name = inner.task.name
            batches = [inner.task.sample_batch(gen) for _ in range(cfg.truncation)]
            th = theta()
            if cfg.estimator == "pes":
                eps = held(draw_noise(th, cfg.particles, cfg.sigma, gen))  # the whole population's, every process
                grads, loss = pes.step(th, batches, noise={k: v[mine] for k, v in eps.items()},
                                       population=population)
                if int(pes.step_count[0, 0]) >= cfg.horizon:  # all particles restart together
                    w, m = restart(th)
            elif cfg.estimator == "es":
                eps = held(draw_noise(th, cfg.particles, cfg.sigma, gen))
                grads, loss = es(inner.rule, th, inner.problem, w, m, s, batches,
                                 noise={k: v[mine] for k, v in eps.items()}, population=population,
                                 meta_loss=cfg.meta_loss)
                w, m, s = _advance(inner.rule, th, inner.problem, w, m, s, batches)
            else:
                grads, loss, (w, m, s) = bptt(inner.rule, th, inner.problem, w, m, s, batches,
                                              meta_loss=cfg.meta_loss)
            if cfg.estimator != "pes" and int(s) >= cfg.horizon:
                (w, m), s = restart(th), torch.zeros((), device=device)
            if info.distributed:  # each process holds its slice's share: sum them
                keys = list(grads)
                *summed, loss = all_reduce_sum([grads[k] for k in keys] + [loss])
                grads = dict(zip(keys, summed))
            if cfg.accumulate == 1:
                for k, p in trained.items():
                    p.grad = grads[k].to(p.dtype).clone()
                norm = torch.nn.utils.clip_grad_norm_(trained.values(), cfg.clip)
                finite = bool(torch.isfinite(norm))
                if finite:
                    meta_opt.step()
                meta_opt.zero_grad(set_to_none=True)
            else:  # average the window's finite estimates, then one clipped update
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[k]) for k in trained]))
                finite = bool(torch.isfinite(norm))
                if finite:
                    accum["sum"] = {k: accum["sum"].get(k, 0) + grads[k] for k in trained}
                    accum["count"] += 1
                if (step + 1) % cfg.accumulate == 0 and accum["count"]:
                    for k, p in trained.items():
                        p.grad = (accum["sum"][k] / accum["count"]).to(p.dtype)
                    torch.nn.utils.clip_grad_norm_(trained.values(), cfg.clip)
                    meta_opt.step()
                    meta_opt.zero_grad(set_to_none=True)
                    accum.update(sum={}, count=0)
            if not finite:
                # an inner run diverged (a loss of inf or NaN makes the whole estimate NaN): no meta-update from
                # it, or one bad truncation would turn every meta-parameter (and so every later run) into NaN;
                # the inner runs restart so that the next estimate starts from finite states
                (w, m), s = restart(th), torch.zeros((), device=device)
            rows.append({"meta_step": step + 1, "meta_loss": float(loss), "grad_norm": float(norm),
                         "task": task_name})
            bar.set_postfix(meta_loss=f"{float(loss):.4f}")
            if tb is not None:
                tb.add_scalar("meta/loss", float(loss), step + 1)
                tb.add_scalar("meta/grad_norm", float(norm), step + 1)
            if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.meta_steps):
                log_eval(step + 1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.meta_steps, stop):
                # a collective: every process takes part; only rank 0 writes
                pes_state = (all_gather_cat(pes.w, 1), all_gather_cat(pes.momenta, 1),
                             all_gather_cat(pes.step_count, 1), {k: all_gather_cat(v, 0) for k, v in pes.xi.items()})
                if info.is_main:
                    save_checkpoint_atomic({"config": dataclasses.asdict(cfg), "meta_step": step + 1,
                                            "rule": rule.state_dict(), "meta_opt": meta_opt.state_dict(),
                                            "generator": gen.get_state(), "pes": pes_state, "inner": (w, m, s),
                                            "task_drawn_from": inner.drawn_from, "accumulated": accum,
                                            "metrics": rows, "eval": eval_rows}, ckpt_path)
                    _write_csv(run_dir / "metrics.csv", rows, METRICS_FIELDS)
    finally:
        if tb is not None:
            tb.close()
    if info.is_main and stop == cfg.meta_steps:
        trained_on = ({"task": f"family:{cfg.task_family}", "task_family": cfg.task_family} if cfg.task_family
                      else {"task": cfg.task})
        where = f" of each of {', '.join([cfg.task, *cfg.imitate_tasks])}" if cfg.imitate_tasks else ""
        if cfg.imitate_key_dropout:
            where += f", role keys left out with probability {cfg.imitate_key_dropout:g}"
        imitation = ({"imitation": f"{cfg.imitate_steps} steps fitting {_teacher(cfg).describe()} on "
                                   f"{cfg.imitate_runs} runs of {cfg.imitate_horizon} steps{where}"}
                     if cfg.imitate_steps else {})
        O.save_rule(rule, run_dir / "rule.safetensors", **trained_on, estimator=cfg.estimator,
                    meta_steps=cfg.meta_steps, **imitation)
    return rule


@torch.no_grad()
def _advance(rule, th, problem, w, m, s, batches):
    w, m, s, _ = unroll(rule, th, problem, w, m, s, batches)
    return w, m, s


def main(argv: list[str] | None = None) -> int:
    """``python -m meta_train.loop``: the same command line as ``python -m meta_train``."""
    from .distributed import main as _main

    return _main(argv)


if __name__ == "__main__":
    from meta_train.distributed import run_and_exit

    run_and_exit()
