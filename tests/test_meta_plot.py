"""``meta_train.plot.plot_run`` and ``unf plot``: a PNG from a run's CSVs, clear errors without them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from meta_train.plot import plot_run, smooth
from unf.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, with_eval: bool = True, negative: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["meta_step,meta_loss,grad_norm"]
    for i in range(1, 41):
        loss = math.log(0.1 + 2 * math.exp(-i / 10)) if negative else 0.1 + 2 * math.exp(-i / 10) + 0.05 * (i % 3)
        lines.append(f"{i},{loss},{1 + i % 4}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    if with_eval:
        rows = ["meta_step,task,train_loss,test_loss"]
        for step in (0, 20, 40):
            rows.append(f"{step},mlp-digits-tanh,{1 / (1 + step)},{1.2 / (1 + step)}")
            rows.append(f"{step},rnn-shakespeare,{3 / (1 + step)},")  # a missing value is skipped
        (run_dir / "eval.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.mark.parametrize("with_eval, negative", [(True, False), (False, True)])
def test_plot_run_writes_a_png(tmp_path, with_eval, negative):
    run = fake_run(tmp_path / "run", with_eval, negative)
    out = plot_run(run)
    assert out == run / "metrics.png"
    assert_png(out)
    custom = plot_run(run, tmp_path / "figs" / "x.png")
    assert custom == tmp_path / "figs" / "x.png"
    assert_png(custom)


def test_plot_of_a_real_run(tmp_path):
    from meta_train.loop import MetaTrainConfig, meta_train

    meta_train(MetaTrainConfig(run_dir=str(tmp_path), meta_steps=2, truncation=2, particles=2, hidden=4,
                               eval_every=1, eval_steps=5, eval_seeds=1), progress=False)
    assert_png(plot_run(tmp_path))


def test_cli_plot(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert str(tmp_path / "p.png") in capsys.readouterr().out
    assert_png(tmp_path / "p.png")
    assert main(["plot", str(run)]) == 0
    assert_png(run / "metrics.png")


def test_missing_run_dir_or_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "has no metrics.csv" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="has no metrics.csv"):
        plot_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.csv").write_text("meta_step,meta_loss,grad_norm\n")
    with pytest.raises(ValueError, match="no rows yet"):
        plot_run(tmp_path / "empty")


def test_smooth():
    assert smooth([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    out = smooth([math.nan, 2.0, math.inf], window=1)
    assert math.isnan(out[0]) and out[1] == 2.0 and math.isnan(out[2])


def test_plot_draws_the_imitation_loss(tmp_path):
    """An imitation-only run (metrics.csv without rows) plots its regression loss; a run with both gets both."""
    def imitation_csv(run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = ["step,loss"] + [f"{i},{math.exp(-i / 30) + 0.002}" for i in range(200)]
        (run_dir / "imitation.csv").write_text("\n".join(rows) + "\n")

    only = tmp_path / "only"
    imitation_csv(only)
    (only / "metrics.csv").write_text("meta_step,meta_loss,grad_norm,task\n")
    assert_png(plot_run(only))
    both = fake_run(tmp_path / "both")
    imitation_csv(both)
    small = fake_run(tmp_path / "plain")
    # one panel more than the same run without imitation: a wider figure
    assert plot_run(both).stat().st_size > 0 and _width(both / "metrics.png") > _width(plot_run(small))


def _width(png: Path) -> int:
    return int.from_bytes(png.read_bytes()[16:20], "big")  # the IHDR chunk's width
