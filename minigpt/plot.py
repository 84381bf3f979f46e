"""Loss curves from a run's metrics.jsonl: out/loss.png, train and val loss with the learning rate.

Needs matplotlib (`pip install -e ".[plot]"`). Training redraws the picture at each evaluation when it
is installed; `minigpt plot out` (or `python -m minigpt plot out`) draws it on demand. Matplotlib is
used through its object API (no pyplot), so plotting changes no global state of the process.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from minigpt.data import atomic_write
from minigpt.errors import UserError

PLOT_FILE = "loss.png"
METRICS_FILE = "metrics.jsonl"
INSTALL_HINT = 'pip install -e ".[plot]" (matplotlib)'
EVAL_CURVES = (  # (metric, colour, legend)
    ("train_loss", "tab:blue", "train loss (evaluation)"),
    ("val_loss", "tab:orange", "val loss (evaluation)"),
)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training-step records, evaluation records) of a metrics.jsonl; a line cut short by a kill is skipped."""
    steps, evals = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"no {METRICS_FILE} at {path}; train first (minigpt train) or pass the run's out-dir") from None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "metrics" in rec:
            evals.append(rec)
        elif isinstance(rec, dict) and "loss" in rec:
            steps.append(rec)
    return steps, evals


def _tokens_per_step(records: list[dict[str, Any]]) -> float | None:
    for rec in records:
        if rec.get("tokens") and rec.get("step"):
            return rec["tokens"] / rec["step"]
    return None


def plot_run(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw `out_dir`/metrics.jsonl into `path` (default `out_dir`/loss.png) and return where it went.

    Loss against steps (tokens seen on the top axis when the records count them); the learning rate on
    the right axis. Raises UserError without matplotlib or without records.
    """
    if not have_matplotlib():
        raise UserError(f"plotting needs matplotlib: {INSTALL_HINT}")
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FuncFormatter

    out_dir = Path(out_dir)
    steps, evals = read_metrics(out_dir / METRICS_FILE)
    if not steps and not evals:
        raise UserError(f"{out_dir / METRICS_FILE} holds no records yet; plot again after the first logged step")

    fig = Figure(figsize=(9, 5.2), dpi=110)
    # fixed margins (room for the title, the top and right axes): a layout engine would draw the
    # figure twice, and this is redrawn at every evaluation of a training run
    fig.subplots_adjust(left=0.08, right=0.89, bottom=0.1, top=0.83)
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", alpha=0.35, lw=1,
                label="train loss (each logged step)")  # fmt: skip
    for key, color, name in EVAL_CURVES:
        points = [(r["step"], r["metrics"][key]) for r in evals if key in r["metrics"]]
        if points:
            ax.plot(*zip(*points), color=color, marker="o", ms=4, lw=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    best = min((r["metrics"]["val_loss"] for r in evals if "val_loss" in r["metrics"]), default=None)
    title = f"{out_dir.resolve().name}: step {max(r['step'] for r in steps + evals)}"
    ax.set_title(title + (f", best val loss {best:.4f}" if best is not None else ""))

    lr = [(r["step"], r["lr"]) for r in steps if r.get("lr") is not None]
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        (line,) = ax_lr.plot(*zip(*lr), color="tab:gray", ls="--", lw=1.2, label="learning rate (right axis)")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(0, max(v for _, v in lr) * 1.1)
        ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
        handles, labels = handles + [line], labels + [line.get_label()]
    ax.legend(handles, labels, loc="upper right", framealpha=0.9)

    per_step = _tokens_per_step(steps + evals)
    if per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
        top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 50k, 1.2M

    target = Path(path) if path is not None else out_dir / PLOT_FILE
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(target) as f:  # a reader never sees half a picture
        f.write(buffer.getvalue())
    return target
