"""Distributed meta-training: 2 gloo processes reach the meta-parameters of 1, and resume across process counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimizers as O
from meta_train.distributed import DistInfo, particle_slice
from meta_train.loop import MetaTrainConfig, meta_train

CFG = dict(meta_steps=4, truncation=2, particles=4, horizon=3, checkpoint_every=2, meta_lr=1e-2, hidden=4,
           eval_every=2, eval_steps=5, eval_seeds=1)
ROOT = Path(__file__).resolve().parent.parent


def flags(run_dir: Path) -> list[str]:
    out = ["--run-dir", str(run_dir), "--no-progress"]
    for k, v in CFG.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def torchrun(run_dir: Path, *extra: str, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "meta_train", *flags(run_dir), *extra]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]


def read(path: Path) -> torch.Tensor:
    """The numeric columns of a run's CSV as a (rows, columns) float64 tensor."""
    lines = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return torch.tensor([[float(v) for v in row if not v.startswith("mlp")] for row in lines], dtype=torch.float64)


def assert_close_rules(a: O.LearnedRule, b: O.LearnedRule) -> None:
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, O.LearnedRule]:
    run_dir = tmp_path_factory.mktemp("one-process")
    return run_dir, meta_train(MetaTrainConfig(run_dir=str(run_dir), **CFG), progress=False)


def test_two_processes_match_one(tmp_path, reference):
    ref_dir, ref_rule = reference
    torchrun(tmp_path)
    assert_close_rules(ref_rule, O.load_rule(tmp_path / "rule.safetensors"))
    # only rank 0 logs; its rows are those of the single process up to float summation order (Adam and clipping
    # hide a wrongly scaled meta-gradient from the parameters, but not from the logged loss and gradient norm)
    for name in ("metrics.csv", "eval.csv"):
        two, one = (read(d / name) for d in (tmp_path, ref_dir))
        assert two.shape == one.shape and len(one) >= 3, name
        torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_across_process_counts(tmp_path, reference):
    _, ref_rule = reference
    cfg = MetaTrainConfig(run_dir=str(tmp_path), **CFG)
    meta_train(cfg, progress=False, stop_after=1)  # 1 process: all 4 particles' PES state in the checkpoint
    torchrun(tmp_path, "--stop-after", "3")  # 2 processes take their slices, gather them back at step 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["meta_step"] == 3
    assert not (tmp_path / "rule.safetensors").exists()
    assert_close_rules(ref_rule, meta_train(cfg, progress=False))  # and 1 process finishes


def test_particles_must_divide_evenly():
    assert particle_slice(8, DistInfo(rank=1, world_size=4)) == slice(2, 4)
    with pytest.raises(ValueError, match=r"field 'particles' \(6\) must be divisible by the number of processes \(4\)"):
        particle_slice(6, DistInfo(rank=0, world_size=4))
