"""The meta-training loop: it learns, checkpoints atomically, and resumes exactly after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import optimizers as O
from meta_train.loop import MetaTrainConfig, meta_train

ARGS = ["--meta-steps", "14", "--truncation", "4", "--particles", "4", "--horizon", "8", "--checkpoint-every", "1",
        "--no-progress"]


def run(run_dir: Path, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "meta_train.loop", "--run-dir", str(run_dir), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-2000:]
    return proc


def checkpoint_step(path: Path) -> int:
    if not path.exists():
        return 0
    return torch.load(path, weights_only=False)["meta_step"]  # never half-written: always loads


def test_kill_and_resume_gives_the_same_meta_parameters(tmp_path):
    run(tmp_path / "straight")
    reference = O.load_rule(tmp_path / "straight" / "rule.safetensors")

    killed = tmp_path / "killed"
    proc = run(killed, wait=False)
    deadline = time.time() + 240
    while checkpoint_step(killed / "checkpoint.pt") < 5:
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(killed / "checkpoint.pt")
    assert 5 <= step < 14
    run(killed)  # resumes from the checkpoint
    resumed = O.load_rule(killed / "rule.safetensors")
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (killed / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 15 and rows[-1].startswith("14,")


@pytest.mark.parametrize("estimator", ["pes", "es", "bptt"])
def test_each_estimator_runs_and_moves_the_meta_parameters(tmp_path, estimator):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), estimator=estimator, meta_steps=3, truncation=3, particles=4,
                          horizon=6, checkpoint_every=2, meta_lr=1e-2)
    rule = meta_train(cfg, progress=False)
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    fresh = O.make_rule("deepset", hidden=8)
    assert any(not torch.equal(a, b) for a, b in zip(rule.state_dict().values(), fresh.state_dict().values()))
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "rule.safetensors").exists()


def test_resume_refuses_a_different_config(tmp_path):
    meta_train(MetaTrainConfig(run_dir=str(tmp_path), meta_steps=2, truncation=2, particles=2), progress=False)
    with pytest.raises(ValueError, match="different config"):
        meta_train(MetaTrainConfig(run_dir=str(tmp_path), meta_steps=2, truncation=3, particles=2), progress=False)


def test_cli_meta_train_with_toml_config(tmp_path, capsys):
    from unf.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nmeta_steps = 2\ntruncation = 2\nparticles = 2\n')
    assert main(["meta-train", str(config), "--no-progress"]) == 0
    assert (tmp_path / "run" / "rule.safetensors").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('run_dir = "x"\nparticels = 2\n')
    assert main(["meta-train", str(bad)]) == 2
    assert "unknown field 'particels'" in capsys.readouterr().err
    bad.write_text('run_dir = "x"\nparticles = "many"\n')
    assert main(["meta-train", str(bad)]) == 2
    assert "field 'particles' must be int" in capsys.readouterr().err


def test_shipped_example_config_is_valid():
    from meta_train.loop import load_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "configs" / "mlp_digits_pes.toml")
    assert cfg.estimator == "pes" and cfg.meta_steps == 200
