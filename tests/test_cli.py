"""The ``unf`` command line: demo, spec, and clear errors instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unf.cli import main


def test_spec_prints_table_and_checks(capsys):
    assert main(["spec", "unf.models:mlp_example", "--check", "3", "--float64"]) == 0
    out = capsys.readouterr().out
    assert "net.0.weight" in out and "(g0, -)" in out and "spec check OK" in out


def test_spec_json_is_loadable(capsys):
    from unf import WeightSpaceSpec

    assert main(["spec", "unf.models:cnn_example", "--json"]) == 0
    spec = WeightSpaceSpec.from_json(capsys.readouterr().out)
    assert spec["features.0.weight"].axes[0] == "g0"
    json.loads(spec.to_json())


@pytest.mark.parametrize("target, message", [
    ("no_colon", "expected MODULE:FACTORY"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("unf.models:nothing_here", "has no callable 'nothing_here'"),
    ("unf.models:MLP", "must return (model, example_inputs)"),
])
def test_spec_errors_are_one_line(capsys, target, message):
    assert main(["spec", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unf: error:") and message in err and "Traceback" not in err


def test_factory_with_wrong_inputs_reports_spec_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "badfactory.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Linear(3, 2), torch.randn(2, 5)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["spec", "badfactory:make"]) == 2
    err = capsys.readouterr().err
    assert "example inputs do not fit Linear" in err and "Traceback" not in err


def test_demo_runs_and_validates(capsys, tmp_path):
    import optimizers

    assert main(["demo", "--trials", "3", "--steps", "60", "--seeds", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TransformerLM" in out and "SmallCNN" in out and "All specs preserve the function." in out
    if "unf-mnist1d-imitation" in optimizers.available():
        assert "drop-in: UNFOptimizer" in out and "| adam |" in out and "UNF / tuned Adam" in out
        assert (tmp_path / "demo-optimizers.png").stat().st_size > 1000


def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "unf", "spec", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unf: error:" in proc.stderr and "Traceback" not in proc.stderr
