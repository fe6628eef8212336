"""Sensitivity analysis: train one configuration per point of a grid of method options and
put quality and cost side by side (one table, one quality-versus-cost plot).

Each point is an ordinary training run in ``OUTPUT_DIR/<point>``. A finished point is not
trained again when the sweep is re-run with the same options (so a killed sweep resumes
where it stopped); a half-finished point resumes from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..fileio import recover_dir, write_json
from ..log import info
from .summary import RunSummary, sweep_columns

POINT_FILE = "sweep_point.json"
# the run-summary keys of a sweep row: RunSummary's report metrics that keep ``sweep=True``
COLUMNS = sweep_columns(RunSummary)


def parse_list(flag: str, text: str, kind: type) -> list:
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(kind(item))
        except ValueError:
            raise UserInputError(
                f"--{flag.replace('_', '-')}: {item!r} is not "
                f"{'an integer' if kind is int else 'a number'}"
            ) from None
    if not values:
        raise UserInputError(f"--{flag.replace('_', '-')}: give at least one value")
    return values


def _sweeping(option: str) -> list[str]:
    """The registered methods whose options dataclass marks ``option`` as sweepable."""
    from ..methods import METHODS

    return [name for name, cls in METHODS.items() if option in cls.config_class.sweepable()]


def grid_flags() -> dict[str, str]:
    """The flags (argparse dests, e.g. ``lora_r``) ``slimtune sweep`` takes lists for ->
    the option each sets: every option a registered method declares with
    ``option(..., sweep=True)``. The grid follows the methods, not a list here."""
    from ..methods import METHODS

    return {
        o.dest: o.name
        for cls in METHODS.values()
        for o in cls.config_class.cli_options()
        if o.sweep
    }


def grid_points(
    method: str, lists: dict[str, str], flags: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The cartesian product of the given ``flag -> "v1,v2"`` lists, as method options
    (``flags``: flag -> option, default :func:`grid_flags`)."""
    from ..methods import method_class

    flags = grid_flags() if flags is None else flags
    swept = method_class(method).config_class.sweepable()
    axes = []
    for flag, text in lists.items():
        key = flags[flag]
        if key not in swept:
            raise UserInputError(
                f"--{flag.replace('_', '-')} does not apply to --method "
                f"{method} (it is for {', '.join(_sweeping(key))})"
            )
        axes.append([(key, v) for v in parse_list(flag, text, swept[key])])
    if not axes:
        flags_here = ", ".join(
            f"--{f.replace('_', '-')}" for f, key in flags.items() if key in swept
        )
        raise UserInputError(
            f"nothing to sweep: give comma-separated values for "
            f"{flags_here or 'an option of a method that has one'}"
        )
    return [dict(p) for p in itertools.product(*axes)]


def point_name(options: dict[str, Any]) -> str:
    return ",".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
    )


def run_sweep(
    base, points: list[dict[str, Any]], output_dir: str | Path, *, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Train ``base`` (a TrainConfig) once per point; return one result row per point."""
    from .trainer import finished_delta, train

    out = Path(output_dir)
    rows = []
    for n, options in enumerate(points, 1):
        name = point_name(options)
        folder = out / name
        # a point with no checkpoint, or a delta but no POINT_FILE, starts over (--resume
        # refuses both: nothing to resume)
        fresh = (
            overwrite
            or recover_dir(folder / "checkpoint") is None
            or finished_delta(folder) is not None
        )
        cfg = replace(
            base,
            method_options={**base.method_options, **options},
            output_dir=str(folder),
            overwrite=fresh,
            resume=not fresh,
        )
        identity = json.loads(json.dumps(cfg.identity()))
        done = folder / POINT_FILE
        if done.exists() and not overwrite:
            record = json.loads(done.read_text())
            if record["identity"] != identity:
                raise UserInputError(
                    f"{folder} holds a sweep point trained with other options; "
                    "pass --overwrite or another --output-dir"
                )
            info(f"[{n}/{len(points)}] {name}: finished earlier, reusing {folder}")
        else:
            info(f"[{n}/{len(points)}] {name}: training")
            result = train(cfg)
            record = {"identity": identity, "summary": result.summary}
            write_json(done, record)
        rows.append(
            {"point": name, "options": options, **{k: record["summary"].get(k) for k in COLUMNS}}
        )
    write_json(out / "sweep.json", {"method": base.method, "rows": rows})
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Quality against three costs (step time, trainable parameters, decode latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from ..eval.report import save_png

    accuracy = any(r.get("eval_accuracy") is not None for r in rows)
    quality = "eval_accuracy" if accuracy else "eval_loss"
    costs = [
        ("step_time_p50_s", "train step time p50 (s)"),
        ("trainable_params", "trainable parameters"),
        ("eval_latency_p50_ms", "decode latency p50 (ms)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for ax, (key, label) in zip(axes, costs):
        pts = [
            (r[key], 100 * r[quality] if accuracy else r[quality], r["point"])
            for r in rows
            if r.get(key) is not None and r.get(quality) is not None
        ]
        for x, y, name in pts:
            ax.scatter(x, y, s=25)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "trainable_params" and pts:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)" if accuracy else "eval loss")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_png(fig, path)
