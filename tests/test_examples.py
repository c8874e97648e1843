"""The example scripts run (with few steps) and do what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replace_adam_trains_with_both():
    results = load("replace_adam").main(steps=60)
    assert set(results) == {"Adam", "DeepSet (initial weights)"}
    assert all(0 < v < 1.4 for v in results.values())  # below chance level (ln 4 = 1.39)


def test_lr_scheduler_changes_the_multiplier():
    lrs = load("lr_scheduler").main(steps=20)
    assert lrs[0] < lrs[2] and lrs[-1] < max(lrs)


@pytest.mark.filterwarnings("ignore")
def test_hf_trainer_accepts_the_learned_optimizer():
    for weights in ("unf-mnist1d-rel", "fresh"):
        loss = load("hf_trainer").main(steps=8, weights=weights)
        assert loss < 5.6  # below the uniform byte-level loss ln(256) = 5.55 plus noise


def test_spec_example_runs(capsys):
    load("spec_of_any_model").main()
    assert "spec check OK" in capsys.readouterr().out
