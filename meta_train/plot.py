"""Plot a meta-training run: the meta-loss (raw and smoothed), the held-out curves when the run evaluated, and the
imitation warm start's regression loss when it had one (``imitation.csv``; an imitation-only run has only that).

    unf plot runs/demo                   # writes runs/demo/metrics.png
    unf plot runs/demo --out demo.png

or from Python: ``meta_train.plot.plot_run("runs/demo")``. Reads only the run's CSVs (``metrics.csv`` and, if
present, ``eval.csv``), so it works on a run that is still going. Needs ``matplotlib`` (the ``meta`` extra); it
draws with the Agg backend and leaves pyplot's global backend alone.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

__all__ = ["plot_run", "read_csv", "smooth"]


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing moving average over ``window`` points (default: about a 20th of the series, at least 1).

    Non-finite values are left out of the averages (a point whose whole window is non-finite stays NaN)."""
    if window is None:
        window = max(1, len(values) // 20)
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _scale(ax, values: list[float]) -> None:
    # log scale when every finite value is positive (a log_mean meta-loss can be negative)
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
        if max(finite) / min(finite) < 10:  # within a decade: plain numbers read better than 3.1x10^-1
            from matplotlib.ticker import FormatStrFormatter

            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _curve_panel(ax, steps: list[float], losses: list[float], color: str, xlabel: str, ylabel: str,
                 title: str) -> None:
    """A loss curve, raw and smoothed, on ``ax``."""
    ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8, label="raw")
    ax.plot(steps, smooth(losses), color=color, linewidth=2.0, label="smoothed")
    _scale(ax, losses)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw ``run_dir``'s meta-loss and eval curves to a PNG; returns its path (default ``run_dir/metrics.png``).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics.csv``.
        ValueError: ``metrics.csv`` has no rows yet (and there is no imitation loss to draw), or lacks the
            ``meta_step`` / ``meta_loss`` columns.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.csv"
        raise FileNotFoundError(f"{run_dir} {what}: expected a meta-training run directory (python -m meta_train "
                                f"--run-dir DIR or unf meta-train CONFIG writes one)")
    rows = read_csv(metrics_path)
    imitation_path = run_dir / "imitation.csv"
    imitation_rows = read_csv(imitation_path) if imitation_path.is_file() else []
    if not rows and not imitation_rows:
        raise ValueError(f"{metrics_path} has no rows yet (the run writes it at each checkpoint)")
    missing = {"meta_step", "meta_loss"} - set(rows[0]) if rows else set()
    if missing:
        raise ValueError(f"{metrics_path} lacks the column(s) {', '.join(sorted(missing))}")
    eval_path = run_dir / "eval.csv"
    eval_rows = read_csv(eval_path) if eval_path.is_file() else []

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = bool(imitation_rows) + bool(rows) + bool(eval_rows)
    fig = Figure(figsize=(6.0 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg without touching pyplot's global backend
    axes = list(fig.subplots(1, panels, squeeze=False)[0])

    if imitation_rows:
        _curve_panel(axes.pop(0), _floats(imitation_rows, "step"), _floats(imitation_rows, "loss"), "tab:green",
                     "regression step", "relative squared error of the update",
                     f"imitation warm start: {run_dir.name}")
    if rows:
        _curve_panel(axes.pop(0), _floats(rows, "meta_step"), _floats(rows, "meta_loss"), "tab:blue", "meta-step",
                     "meta-loss", f"meta-training: {run_dir.name}")

    if eval_rows:
        ax = axes.pop(0)
        tasks = list(dict.fromkeys(r["task"] for r in eval_rows))
        colors = matplotlib.colormaps["tab10"]
        plotted: list[float] = []
        for i, name in enumerate(tasks):
            mine = [r for r in eval_rows if r["task"] == name]
            x = _floats(mine, "meta_step")
            for key, style in (("train_loss", "-"), ("test_loss", "--")):
                y = _floats(mine, key)
                if any(math.isfinite(v) for v in y):
                    ax.plot(x, y, style, marker="o", markersize=3, color=colors(i % 10),
                            label=f"{name} {key.replace('_loss', '')}")
                    plotted += y
        _scale(ax, plotted)
        ax.set_xlabel("meta-step")
        ax.set_ylabel("loss after inner training")
        ax.set_title("held-out evaluation (solid: train, dashed: test)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")

    out_path = Path(out) if out is not None else run_dir / "metrics.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path
