"""Reports: a terminal table, JSON, markdown and a PNG loss curve, from one list of rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_path, write_json, write_text
from ..training.summary import RunSummary, report_metrics
from .cost import format_bytes

# metric key -> (label, format kind), in the order of the report's rows: read off the fields
# of RunSummary that carry ``shown(...)`` metadata, so a new summary metric is declared once.
METRICS: list[tuple[str, str, str]] = report_metrics(RunSummary)


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "f3":
        return f"{value:.3f}"
    if kind == "f2":
        return f"{value:.2f}"
    if kind == "f0":
        return f"{value:,.0f}"
    if kind == "sec":
        return f"{value:.2f} s"
    if kind == "ms":
        return f"{value:.1f} ms"
    if kind == "bytes":
        return format_bytes(value)
    if kind == "int":
        return f"{int(value):,}"
    return str(value)


def comparison_rows(
    columns: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str, str]] | None = None
) -> list[list[str]]:
    """One row per metric (default :data:`METRICS`) that at least one column has, formatted."""
    rows = []
    for key, label, kind in METRICS if metrics is None else metrics:
        if any(c.get(key) is not None for c in columns):
            rows.append([label, *[fmt(c.get(key), kind) for c in columns]])
    return rows


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # a pipe or a log file gets the whole table, not one squeezed to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"[bold]{title}[/bold]", soft_wrap=True)
    table = Table()
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def plot_loss(history: Sequence[dict], path: str | Path, title: str = "loss") -> Path | None:
    """Training loss (and eval loss where measured) against step, as a PNG."""
    steps = [h["step"] for h in history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train", lw=1.2)
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_lr_search(search: dict, path: str | Path) -> Path | None:
    """``--lr auto``'s range test: the probe loss after each rate, and the rate chosen."""
    lrs, losses = search.get("lrs") or [], search.get("losses") or []
    points = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*points), "o-", ms=3, lw=1.2, label="probe loss after the step")
    ax.axhline(search["start_loss"], color="grey", lw=0.8, ls=":", label="before")
    ax.axvline(
        search["chosen"], color="C3", lw=1.2, ls="--", label=f"chosen {search['chosen']:.2g}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("--lr auto: range test")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(
    folder: str | Path,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    data: dict[str, Any],
    notes: Sequence[str] = (),
) -> None:
    """``report.json`` (raw numbers) and ``report.md`` (the table and notes) in ``folder``."""
    folder = Path(folder)
    write_json(folder / "report.json", data)
    md = f"# {title}\n\n" + markdown_table(headers, rows)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text(folder / "report.md", md)


def expert_usage_rows(usage: dict[Any, Sequence[float]]) -> tuple[list[str], list[list[str]]]:
    """Per layer, each expert's share of the routing slots (training tokens x top-k)."""
    experts = len(next(iter(usage.values())))
    headers = ["layer", *[f"e{e}" for e in range(experts)], "max/mean"]
    rows = []
    for layer, counts in sorted(usage.items(), key=lambda kv: int(kv[0])):
        total = sum(counts) or 1.0
        shares = [c / total for c in counts]
        rows.append(
            [str(layer), *[f"{100 * s:.0f}%" for s in shares], f"{max(shares) * experts:.2f}"]
        )
    return headers, rows


def plot_expert_usage(
    usage: dict[Any, Sequence[float]], path: str | Path, title: str = "expert usage"
) -> Path:
    """Heat map: layers down, experts across, colour = share of the layer's routing slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(usage, key=int)
    grid = np.array([usage[k] for k in layers], dtype=float)
    grid = grid / np.maximum(grid.sum(1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * grid.shape[1], 1.2 + 0.22 * len(layers)), dpi=120)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), [str(k) for k in layers], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routing slots")
    return save_png(fig, path)
