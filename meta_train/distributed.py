"""Meta-training with the population split across processes (``torch.distributed``).

    torchrun --nproc_per_node 4 -m meta_train --run-dir runs/demo --task mlp-digits --particles 32
    torchrun --nproc_per_node 4 -m meta_train --config examples/configs/mlp_digits_pes.toml

Every process builds the same run from the same seed and draws the *same* full noise for all ``particles`` from the
shared seeded generator, so the random stream is the one of a single process. Each process then runs only its
contiguous slice of the particles (``particles / world_size`` of them) and the slices' weighted meta-gradient sums
and losses are all-reduced (sum): ``N`` processes give the meta-gradient of one process up to the order of float
summation, and every process applies the same Adam step. Only rank 0 evaluates, writes logs and checkpoints; the
PES state of all particles is gathered into rank 0's checkpoints, and on resume each process takes its slice, so a
run can even be resumed with a different number of processes.

The backend is gloo on CPU and NCCL when the run's ``device`` is CUDA (each process takes ``cuda:LOCAL_RANK``).
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) ``python -m meta_train`` runs in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "current", "init_from_env", "particle_slice", "all_reduce_sum", "all_gather_cat", "main",
           "run_and_exit"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its ``rank`` among ``world_size`` processes, and its ``local_rank`` on the host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def current() -> DistInfo:
    """This process's :class:`DistInfo`: from the initialised default process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    Uses NCCL when ``device`` is CUDA (and makes ``cuda:LOCAL_RANK`` this process's device), gloo otherwise. Does
    nothing without a ``WORLD_SIZE`` above 1 or when a group is already initialised. Returns whether it initialised
    one (then the caller should ``torch.distributed.destroy_process_group()`` at the end).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run in one process")
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"field 'device' is {device!r} but CUDA is not available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def particle_slice(particles: int, info: DistInfo | None = None) -> slice:
    """The contiguous slice of ``range(particles)`` this process runs; the particles must divide evenly."""
    info = current() if info is None else info
    if particles % info.world_size:
        raise ValueError(f"field 'particles' ({particles}) must be divisible by the number of processes "
                         f"({info.world_size}) so that each runs the same number of particles")
    n = particles // info.world_size
    return slice(info.rank * n, (info.rank + 1) * n)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over all processes of ``tensors`` (new tensors; one collective per dtype).

    Without a process group, returns the tensors unchanged."""
    tensors = list(tensors)
    if not current().distributed:
        return tensors
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, part in zip(idx, torch.split(flat, [tensors[i].numel() for i in idx])):
            out[i] = part.view_as(tensors[i])
    return out  # type: ignore[return-value]


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along ``dim`` in rank order (all shapes must be equal).

    Without a process group, returns ``tensor``."""
    if not current().distributed:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meta_train`` / ``torchrun ... -m meta_train``: meta-train from flags or ``--config FILE.toml``."""
    from .loop import add_config_arguments, config_from_args, meta_train

    parser = argparse.ArgumentParser(
        prog="python -m meta_train",
        description="Meta-train a learned optimizer (resumes from RUN_DIR/checkpoint.pt if present). Run it under "
                    "`torchrun --nproc_per_node N -m meta_train ...` to split the population over N processes "
                    "(gloo on CPU, NCCL with --device cuda). Flags override the fields of --config.")
    add_config_arguments(parser)
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and stop at this meta-step; rerun the same command to continue")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(parser.parse_args(argv))
    progress, stop_after = not args.pop("no_progress"), args.pop("stop_after")
    from .estimators import keep_freed_memory

    keep_freed_memory()  # a process of our own: let glibc reuse freed blocks (see there)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    owns_group = False
    try:
        owns_group = init_from_env(cfg.device)
        meta_train(cfg, progress=progress, stop_after=stop_after)
        if owns_group:
            dist.barrier()  # leave together: a process tearing gloo down while a peer still works can abort
    except ValueError as e:
        print(f"meta_train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


def run_and_exit(argv: Sequence[str] | None = None) -> NoReturn:
    """:func:`main`, then exit with its status (the ``python -m meta_train`` entry point).

    Under ``torchrun`` the interpreter's teardown is skipped (``os._exit`` after flushing): after a clean
    ``destroy_process_group`` gloo's C++ objects can still, now and then, abort a process at exit ("terminate called
    without an active exception"), which would make ``torchrun`` report a finished run as failed."""
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
