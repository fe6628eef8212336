"""``slimtune train`` and ``slimtune sweep``: their options, the method flags, storing the
result and the run's report.

The method flags (``--lora-r``, ``--density``, ``--experts`` ...) are not listed here: each
is declared once, with ``option(...)`` on its method's options dataclass, and built from the
registered methods (:data:`slimtune.methods.METHODS`), so a new method's file is all it
takes for its flags, their YAML keys and its sweep grid.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..eval.tasks import TASKS
from ..options import check_types, parse_key_values, read_yaml_config
from ..salf.analysis import DEFAULT_KEEP
from ..training.config import NEGATED_FLAGS, StoreOptions
from .common import S, add_model_args

SWEEP_NOTE = "comma-separated values to sweep"


@dataclass
class MethodFlag:
    """One ``--FLAG`` setting a method option, shared by every method that declares it."""

    flag: str  # e.g. lora-r
    name: str  # the option it sets, e.g. r
    kind: Any  # the option's value type (int, float, str, bool, list[str])
    help: str
    defaults: dict[str, Any]  # method -> its default, for each method declaring the flag
    sweep: bool  # some method lets ``slimtune sweep`` take a list of values for it

    @property
    def dest(self) -> str:
        """The argparse destination, which is also the YAML key."""
        return self.flag.replace("-", "_")


def method_flags() -> dict[str, MethodFlag]:
    """The flags of every registered method's CLI options, by argparse dest. Methods that
    declare the same flag share it: ``register_method`` refused a method giving a flag
    another option name or type, or taking one of train's own, so building never fails."""
    from ..methods import METHODS

    flags: dict[str, MethodFlag] = {}
    for method, cls in METHODS.items():
        for o in cls.config_class.cli_options():
            f = flags.get(o.dest)
            if f is None:
                flags[o.dest] = MethodFlag(o.flag, o.name, o.kind, o.help, {}, o.sweep)
                f = flags[o.dest]
            # what the help says the default is (a default resolved later, in its words)
            f.defaults[method] = o.default if o.shown_default is None else o.shown_default
            f.sweep = f.sweep or o.sweep
            f.help = f.help or o.help
    return flags


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def flag_help(f: MethodFlag, grid: bool = False) -> str:
    """The flag's help, the methods that take it, and their defaults (each one's where they
    differ), e.g. ``share of each weight to train (rosa 0.005, shira 0.01, sparse 0.01)``."""
    methods = sorted(f.defaults)
    defaults = {repr(f.defaults[m]) for m in methods}
    if len(defaults) > 1:
        where = ", ".join(f"{m} {_fmt(f.defaults[m])}" for m in methods)
    elif f.defaults[methods[0]] is None or f.defaults[methods[0]] is False:
        where = ", ".join(methods)  # no default worth printing
    else:
        where = f"{', '.join(methods)}; default {_fmt(f.defaults[methods[0]])}"
    if grid and f.sweep:
        where += f"; {SWEEP_NOTE}"
    text = f"{f.help} ({where})" if f.help else where
    return text.replace("%", "%%")


def _add_method_flags(p: argparse.ArgumentParser, grid: bool) -> None:
    group = p.add_argument_group(
        "method options",
        "declared by each method's options dataclass; a flag a method does "
        "not take is an error for it. Any option: -o KEY=VALUE",
    )
    for f in method_flags().values():
        kwargs: dict[str, Any] = {"default": S, "help": flag_help(f, grid)}
        if f.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kind = str if (grid and f.sweep) or typing.get_origin(f.kind) is not None else f.kind
            kwargs["type"] = kind if kind in (int, float) else str
            if typing.get_origin(f.kind) is list:
                kwargs["metavar"] = "A,B,..."
        group.add_argument(f"--{f.flag}", **kwargs)


def _method_help() -> str:
    from ..methods import METHODS
    from ..training.config import TrainConfig

    default = next(f.default for f in fields(TrainConfig) if f.name == "method")
    return f"{', '.join(sorted(METHODS))} (default {default})"


def _lr_help() -> str:
    from ..methods import METHODS

    by_method = ", ".join(
        f"{m} "
        + (
            f"auto (around {METHODS[m].default_lr:g})"
            if METHODS[m].auto_lr
            else f"{METHODS[m].default_lr:g}"
        )
        + ("*" if METHODS[m].lr_weight_exponent else "")
        for m in sorted(METHODS)
    )
    return (
        f"peak learning rate, or auto: a short range test on the data chooses it "
        f"(default: the method's own: {by_method}; *: scaled down for a model whose "
        "weights are smaller than SmolLM2-135M's, where they were swept)"
    )


def _lr(text: str) -> float | str:
    """``--lr``: a positive number or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, got {text!r}") from None


def train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model and save the result as a delta",
        description="Fine-tune a model on a data file; the result is a delta "
        "folder in OUTPUT_DIR/delta. Options can also come from a "
        "YAML file (--config); flags given here win.",
    )
    add_train_options(p, grid=False)
    p.add_argument(
        "--store",
        default=S,
        help="delta store to save the result into (default $SLIMTUNE_STORE, else "
        "$XDG_DATA_HOME/slimtune/store, else ~/.local/share/slimtune/store)",
    )
    p.add_argument(
        "--no-store",
        action="store_true",
        default=S,
        help="do not add the result to the delta store",
    )
    p.add_argument("--parent", default=S, help="store version this run continues (recorded)")
    p.add_argument("--note", default=S, help="a note kept with the stored version")


def sweep_output_dir(method: str) -> str:
    """Where a sweep's runs go unless told: one folder per method."""
    return f"runs/sweep-{method}"


def sweep_parser(sub) -> None:
    from ..training.sweep import grid_flags

    examples = ", ".join(f"--{dest.replace('_', '-')}" for dest in grid_flags())
    p = sub.add_parser(
        "sweep",
        help="sensitivity analysis: train a grid of method sizes, compare quality/cost",
        description="Trains one run per combination of the comma-separated values given "
        f"for the method's sweepable options ({examples}; e.g. --lora-r 4,8,16), "
        "every other option as in `slimtune train`, and writes one "
        "table (sweep.json, report.md) and a quality-versus-cost plot (sweep.png). "
        "Re-running the same sweep reuses the finished points. Results are not "
        "added to the delta store.",
    )
    add_train_options(p, grid=True)


def add_train_options(p: argparse.ArgumentParser, grid: bool) -> None:
    """The options of one training run; with ``grid`` the sweepable method options take
    lists."""
    p.add_argument("--config", help="YAML file of options (same names as the flags)")
    p.add_argument(
        "--data",
        default=S,
        help="training data: .jsonl, .json, .csv, .parquet, .txt or builtin:NAME",
    )
    p.add_argument("--eval-data", default=S, help="evaluation data (default: split from --data)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=S,
        help="fraction of --data held out for evaluation when --eval-data is absent (default 0.1)",
    )
    add_model_args(p)
    p.add_argument("--method", default=S, help=_method_help())
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=S,
        metavar="KEY=VALUE",
        help="a method option, e.g. -o r=16 (repeatable)",
    )
    p.add_argument(
        "--freeze-below",
        type=int,
        default=S,
        help="freeze layers 0..K-1; they run without autograd (default 0)",
    )
    p.add_argument(
        "--freeze",
        default=S,
        choices=["auto"],
        help="auto: the SALF analysis of --data chooses where to freeze (see `slimtune analyze`)",
    )
    p.add_argument(
        "--budget-memory",
        default=S,
        help="with --freeze auto: unfreeze from the top while the estimated peak "
        "memory fits, e.g. 6GiB",
    )
    p.add_argument(
        "--budget-step-time",
        default=S,
        help="with --freeze auto: unfreeze from the top while the estimated time "
        "per optimizer step fits, e.g. 1.5s",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=S,
        help=f"share of the expected gain --freeze auto keeps (default {DEFAULT_KEEP})",
    )
    p.add_argument("--max-steps", type=int, default=S, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=S, help="examples per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=_lr, default=S, help=_lr_help())
    p.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-ratio", type=float, default=S, help="warmup share of steps (0.1)")
    p.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (1.0)")
    p.add_argument("--max-length", type=int, default=S, help="tokens per example (512)")
    p.add_argument(
        "--pack", action="store_true", default=S, help="pack examples into max-length blocks"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=S,
        help="recompute activations in backward (less memory, more time)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=S,
        help="torch.compile each decoder layer for training: faster steps where the host "
        "bounds them (experts, a 4-bit base at small batches) after a one-time compile of "
        "tens of seconds; see README, '--compile'",
    )
    p.add_argument(
        "--cache-frozen",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="keep what the frozen layers hand up, per example, the first time it is "
        "computed: from an example's second epoch on, its steps skip the frozen layers. "
        "Default: on where a frozen run sees its data twice or more in one process and the "
        "states fit; see README, '--cache-frozen'",
    )
    p.add_argument("--eval-every", type=int, default=S, help="eval loss every N steps (0: at end)")
    p.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (50)")
    p.add_argument(
        "--keep-checkpoint",
        action="store_true",
        default=S,
        help="keep the last checkpoint after a successful run",
    )
    p.add_argument(
        "--output-dir",
        default=S,
        help=f"run folder (default {sweep_output_dir('METHOD') if grid else 'runs/train'})",
    )
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=S,
        help="continue from the checkpoint in --output-dir",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=S,
        help="replace an existing run in --output-dir",
    )
    p.add_argument("--precision", default=S, help="auto, bf16, fp16 or fp32 (auto: bf16 on GPU)")
    p.add_argument(
        "--quantize",
        default=S,
        help="store the frozen base's block linears in nf4 (4-bit) or int8 and train "
        "the delta beside them (needs bitsandbytes: pip install 'slimtune[quant]'); "
        "default none",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=S,
        help="with several processes (torchrun, accelerate launch): shard the weights, "
        "gradients and optimizer state across them (FSDP2), for a model whose training "
        "does not fit one device; full and lora (default: each process holds the whole "
        "model, DDP)",
    )
    p.add_argument("--task", default=S, choices=TASKS, help="default: auto (from the data)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=S, help="no progress bar"
    )
    p.add_argument(
        "--report-to",
        default=S,
        metavar="TRACKERS",
        help="also log the metrics to experiment trackers, comma-separated: "
        "tensorboard, wandb, trackio, mlflow (each its own package; logs "
        "under OUTPUT_DIR/logs)",
    )
    _add_method_flags(p, grid)


def _as_list(key: str, value: Any, where: str) -> list[str]:
    """A list option from a comma-separated string (flag or YAML) or a YAML list."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise UserInputError(
            f"{where}: {key} must be a comma-separated string or a list, got {value!r}"
        )
    return [str(t).strip() for t in value if str(t).strip()]


def _split_options(
    source: dict[str, Any],
    where: str,
    values: dict[str, Any],
    method_options: dict[str, Any],
    store: dict[str, Any],
) -> None:
    """Sort one source's options (YAML or flags, by flag name) into TrainConfig fields,
    method options and store options; later sources override earlier ones."""
    source = dict(source)
    given = source.pop("method_options", None) or {}
    if not isinstance(given, dict):
        raise UserInputError(f"{where}: field 'method_options' must be a mapping, got {given!r}")
    method_options.update(given)
    for name in [k for k in source if k in NEGATED_FLAGS]:
        flag = source.pop(name)
        if not isinstance(flag, bool):
            raise UserInputError(f"{where}: field {name!r} must be true or false, got {flag!r}")
        source[NEGATED_FLAGS[name]] = not flag
    for dest, f in method_flags().items():  # a method flag's YAML key is its name too
        if dest in source:
            value = source.pop(dest)
            if typing.get_origin(f.kind) is list:
                value = _as_list(dest, value, where)
            method_options[f.name] = value
    if "option" in source:
        option = source.pop("option")
        if isinstance(option, dict):
            method_options.update({str(k).replace("-", "_"): v for k, v in option.items()})
        elif isinstance(option, list) and all(isinstance(o, str) for o in option):
            method_options.update(parse_key_values(option))
        else:
            raise UserInputError(
                f"{where}: option must be a mapping or a list of KEY=VALUE, got {option!r}"
            )
    for name in [f.name for f in fields(StoreOptions) if f.name in source]:
        store[name] = source.pop(name)
    values.update(source)


def train_options_from_args(
    args: argparse.Namespace,
    exclude: tuple[str, ...] = (),
    *,
    output_dir: Callable[[str], str] | None = None,
) -> tuple[Any, StoreOptions]:
    """Defaults < YAML file < flags given on the command line; YAML keys are the flags'
    names (dashes or underscores). ``output_dir`` maps the method to the run folder used
    where neither source names one (``sweep``'s). Returns the TrainConfig and the store
    options."""
    from ..training.config import TrainConfig

    values: dict[str, Any] = {}
    method_options: dict[str, Any] = {}
    store: dict[str, Any] = {}
    where = "command line"
    if getattr(args, "config", None):
        _split_options(read_yaml_config(args.config), args.config, values, method_options, store)
        where = args.config
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", *exclude)}
    _split_options(given, where, values, method_options, store)
    if method_options:
        values["method_options"] = method_options
    if output_dir is not None and "output_dir" not in values:
        values["output_dir"] = output_dir(str(values.get("method", TrainConfig.method)))
    cfg = TrainConfig.from_dict(values, where=where)
    return cfg, StoreOptions(**check_types(StoreOptions, store, where))


def train_config_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> Any:
    """The TrainConfig of ``train`` (see :func:`train_options_from_args`)."""
    return train_options_from_args(args, exclude)[0]


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.trainer import finished_delta, train

    cfg, store = train_options_from_args(args)
    # under torchrun / accelerate launch only rank 0 (the main process) touches the store
    main = not int(os.environ.get("RANK", "0"))
    if not store.no_store and main:  # a bad or read-only --store fails now, not after training
        from ..delta import DeltaStore

        DeltaStore(store.store).require_writable("train (to store its result)")
    delta_dir = finished_delta(cfg.output_dir) if cfg.resume else None
    if delta_dir is not None:  # e.g. killed during the store add below: finish only that
        if not main:
            return 0
        print(f"{cfg.output_dir} holds a finished run: nothing to train")
    else:
        result = train(cfg)
        if not result.main_process:  # one of several processes: the main one reports, stores
            return 0
        report_train(cfg, result)
        delta_dir = result.delta_dir
    print(f"delta: {delta_dir}")
    if not store.no_store:
        _store_delta(delta_dir, store)
    return 0


def _store_delta(delta_dir: Path, opts: StoreOptions) -> None:
    from ..delta import DeltaStore

    store = DeltaStore(opts.store)
    v, added = store.add_once(delta_dir, parent=opts.parent, note=opts.note)
    print(f"{'stored' if added else 'already stored'} as {v.id} in {store.root}")


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def report_train(cfg: Any, result: Any) -> None:
    """The run's table, plots and report.md."""
    from ..eval.report import (
        comparison_rows,
        expert_usage_rows,
        plot_expert_usage,
        plot_loss,
        plot_lr_search,
        print_table,
        write_report,
    )

    s = result.summary
    rows = comparison_rows([s])
    print_table(
        f"slimtune train: {cfg.method} on {Path(str(cfg.data)).name}", ["metric", cfg.method], rows
    )
    plot_loss(result.history, result.output_dir / "loss.png", title=f"{cfg.method} training loss")
    notes = []
    if result.manifest.get("auto_freeze"):
        notes.append(
            f"freeze auto: freeze-below {s['freeze_below']} "
            f"({result.manifest['auto_freeze']['reason']})"
        )
        print(notes[-1])
    search = result.manifest.get("lr_search")
    if search:
        png = plot_lr_search(search, result.output_dir / "lr_search.png")
        notes.append(f"lr auto: {search['chosen']:.3g} ({search['reason']})")
        print(notes[-1] + (f"; curve: {png}" if png else ""))
    if s.get("expert_usage"):
        headers, usage_rows = expert_usage_rows(s["expert_usage"])
        print_table(
            "expert usage: share of routing slots per layer (max/mean 1.00 = even)",
            headers,
            usage_rows,
        )
        png = plot_expert_usage(
            s["expert_usage"],
            result.output_dir / "expert_usage.png",
            title=f"expert usage, {cfg.data}",
        )
        notes.append(
            f"active adapter params per token {s['active_params_per_token']:,} of "
            f"{s['adapter_params']:,}; expert usage heat map: {png.name}"
        )
    details = result.eval_details or {}
    if details.get("references"):  # generated answers: a few beside what was expected
        notes.append("samples of the eval set (generated | reference):")
        for out, ref in list(zip(details["predictions"], details["references"]))[:5]:
            notes.append(f"  {_one_line(out)!r} | {_one_line(ref)!r}")
    write_report(
        result.output_dir,
        f"Training run: {cfg.method}",
        ["metric", cfg.method],
        rows,
        {"summary": s, "config": result.manifest["training"]},
        notes,
    )


def sweep_config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """A sweep's shared TrainConfig (its run folder ``runs/sweep-METHOD`` unless the flags
    or the YAML file name one) and the grid's value lists, by flag name."""
    from ..training.sweep import grid_flags

    grid = grid_flags()
    lists = {k: v for k, v in vars(args).items() if k in grid}
    return train_options_from_args(args, tuple(grid), output_dir=sweep_output_dir)[0], lists


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..eval.report import comparison_rows, print_table, write_report
    from ..training.sweep import grid_flags, grid_points, plot_sweep, run_sweep

    grid = grid_flags()
    cfg, lists = sweep_config_from_args(args)
    points = grid_points(cfg.method, lists, grid)
    rows = run_sweep(cfg, points, cfg.output_dir, overwrite=cfg.overwrite)
    table = comparison_rows(rows)
    headers = ["metric", *[r["point"] for r in rows]]
    title = f"slimtune sweep: {cfg.method} on {Path(str(cfg.data)).name}, {cfg.max_steps} steps"
    print_table(title, headers, table)
    out = Path(cfg.output_dir)
    png = plot_sweep(rows, out / "sweep.png", title)
    write_report(out, title, headers, table, {"rows": rows}, [f"plot: {png.name}"])
    print(f"wrote {out / 'sweep.json'}, {out / 'report.md'} and {png}")
    return 0
