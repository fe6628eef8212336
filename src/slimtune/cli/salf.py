"""``slimtune analyze`` and ``slimtune plan``: where to freeze, and what a run would cost."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserInputError
from ..salf.analysis import DEFAULT_KEEP
from .common import add_model_args, at_least_one, device_of


def analyze_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="SALF: per-layer semantic analysis and where to freeze",
        description="Decodes every layer's hidden state through the model's own "
        "final norm and head (logit lens) on a calibration sample of "
        "--data, reports per layer the target loss, KL to the final "
        "layer, the transition each layer makes and top-1 agreement, "
        "and recommends an end-of-freezing layer.",
    )
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    add_model_args(p)
    p.add_argument("--method", default="lora", help="method whose cost per frozen depth is shown")
    p.add_argument(
        "--keep",
        type=float,
        default=DEFAULT_KEEP,
        help="share of the expected gain the recommended freeze-below keeps (default %(default)s)",
    )
    p.add_argument(
        "--max-examples", type=at_least_one, default=64, help="calibration examples (64)"
    )
    p.add_argument("--batch-size", type=at_least_one, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--quantize",
        default="none",
        help="analyze the base as `train --quantize` would hold it: nf4 or int8 block "
        "linears (bitsandbytes), e.g. a model whose 16-bit weights do not fit. Default none",
    )
    p.add_argument(
        "--output-dir", default="runs/analyze", help="where analysis.json and analysis.png go"
    )


def plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate memory and step time per method and frozen depth; pick one",
        description="Calibrates each method on small copies of the model's own "
        "architecture with your batches on this machine, estimates peak memory (the "
        "longest examples) and step time (a typical batch, and the longest) for every "
        "layer choice worth considering, and picks the one of the highest expected "
        "quality (the method's measured score x the analysis' gain) under the "
        "budget, the shortest step among those the evidence cannot tell apart.",
    )
    p.add_argument("--data", required=True, help="data file or builtin:NAME")
    add_model_args(p)
    p.add_argument("--budget-memory", help="e.g. 6GiB")
    p.add_argument(
        "--budget-time",
        "--budget-step-time",
        dest="budget_time",
        help="time per optimizer step of a typical batch, e.g. 1.5s",
    )
    p.add_argument(
        "--methods",
        help="candidates, comma-separated: a method name, LoRA as lora-rN (e.g. "
        "full,lora-r8,lora-r16,sparse,rosa); default full,lora-r8,lora-r16",
    )
    p.add_argument("--batch-size", type=at_least_one, default=8, help="per device (default 8)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes of the run, one device each (torchrun / accelerate launch); memory "
        "is then per device (default 1)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with --devices > 1: the run shards weights, gradients and optimizer state "
        "(train --fsdp); only methods that can (full, lora) are costed",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=DEFAULT_KEEP,
        help="share of the expected gain the analysis' freeze-below keeps (default %(default)s)",
    )
    p.add_argument(
        "--quantize",
        default="auto",
        help="how the frozen base may be stored: auto (unquantized; with --budget-memory also "
        "nf4, chosen where needed to fit or to train more layers), none, nf4, int8, or a "
        "list such as none,int8",
    )
    p.add_argument("--output", help="write the plan as JSON to this file")


def _check_sizes(args: argparse.Namespace) -> None:
    """--max-length as train takes it, before a model loads (the counts' argparse type
    refuses 0: it crashed deep in collation)."""
    if args.max_length < 8:
        raise UserInputError(f"--max-length must be >= 8, got {args.max_length}")


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_sizes(args)
    from ..data import load_dataset
    from ..eval.cost import format_bytes
    from ..eval.report import print_table
    from ..fileio import write_json
    from ..model.loading import load_model
    from ..salf.analysis import analyze, plot_analysis
    from ..salf.plan import freeze_costs

    loaded = load_model(
        getattr(args, "model", "default"),
        device=device_of(args),
        quantize=getattr(args, "quantize", "none"),
    )
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    a = analyze(
        loaded.model, ds, keep=args.keep, max_examples=args.max_examples, batch_size=args.batch_size
    )
    a.costs = freeze_costs(
        loaded.model, args.method, ds.examples, args.batch_size, loaded.tokenizer.pad_token_id
    )
    rows = [
        [
            str(s.space),
            f"{s.loss:.2f}",
            f"{s.kl_to_final:.2f}",
            f"{s.transition:.2f}",
            f"{100 * s.top1_agreement:.0f}%",
            f"{s.cosine_deviation:.3f}",
            f"{a.gain[s.space]:.2f}",
            f"{a.costs[s.space]['trainable_params']:,}" if s.space < a.num_layers else "-",
            f"{a.costs[s.space]['backward_flops_share']:.0%}" if s.space < a.num_layers else "-",
            format_bytes(a.costs[s.space]["activation_bytes"]) if s.space < a.num_layers else "-",
        ]
        for s in a.spaces
    ]
    print_table(
        f"slimtune analyze: {loaded.name} on {Path(ds.path).name} ({a.positions} target "
        f"positions; space l = output of layer l-1; costs for --freeze-below l, "
        f"{args.method}, batch {args.batch_size})",
        [
            "space",
            "target loss",
            "KL to final",
            "transition",
            "top-1 = final",
            "cos dev",
            "gain G",
            "trainable",
            "backward FLOPs",
            "activations",
        ],
        rows,
    )
    out = Path(args.output_dir)
    from ..model.quantize import quantization_of

    # the base analyzed, as stored: a quantized one reads its hidden states a little apart
    write_json(out / "analysis.json", {**a.to_dict(), "quantize": quantization_of(loaded.model)})
    plot_analysis(a, out / "analysis.png")
    print(f"recommended freeze-below: {a.freeze_below} ({a.reason})")
    print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0


def plan_quantizations(spec: str, device: str, memory: int | None = None) -> list[str]:
    """The base quantizations ``plan --quantize`` considers. ``auto``: with a memory budget,
    the unquantized base and nf4 (or only the unquantized one, said, where bitsandbytes is
    missing or does not run on ``device``); without one only the unquantized base, since
    quantizing the base buys memory and nothing else (costing nf4 too doubles the plan)."""
    from ..log import info
    from ..model.quantize import QUANTIZATIONS, check_quantize

    if spec == "auto":
        if memory is None:
            return ["none"]
        try:
            check_quantize("nf4", device)
        except UserInputError as e:
            info(f"plan --quantize auto: only the unquantized base ({e})")
            return ["none"]
        return ["none", "nf4"]
    kinds = [q.strip() for q in spec.split(",") if q.strip()]
    if not kinds or any(q not in QUANTIZATIONS for q in kinds):
        raise UserInputError(
            f"--quantize {spec!r}: use auto, or one or more of {', '.join(QUANTIZATIONS)}"
        )
    for q in kinds:
        check_quantize(q, device)
    return list(dict.fromkeys(kinds))


def load_for_plan(spec: str, device: str, quantizations: list[str], memory: int | None):
    """The model to plan on, loaded without needing its full-precision weights on ``device``.

    Plan only needs the model's shape, its resident memory and a few analysis passes, and
    the cost model converts the resident memory between quantizations. So the model is read
    at full precision on the CPU (as ``load_model`` does anyway) in the device's dtype; it
    goes to ``device`` at full precision when its weights fit the memory budget (and the
    free device memory), else with the first quantization the plan considers, the way
    ``--quantize`` loads it. With only the unquantized base considered and weights that
    exceed the free device memory, a clear error names ``--quantize``.
    """
    from ..eval.cost import format_bytes
    from ..log import info
    from ..model.kernels import choose_attention
    from ..model.loading import load_model
    from ..model.quantize import quantize_model
    from ..salf.plan import DTYPE_NAMES, weight_bytes

    choose_attention(device)  # the calibration attends as `train` will (read on the CPU first)
    loaded = load_model(spec, device="cpu", dtype="bf16" if device.startswith("cuda") else None)
    model = loaded.model
    full = weight_bytes(model, "none")
    free = None
    if device.startswith("cuda"):
        import torch

        free = int(torch.cuda.mem_get_info(torch.device(device))[0])
    dtype = DTYPE_NAMES.get(next(model.parameters()).dtype, "full precision")
    quantized = [q for q in quantizations if q != "none"]
    rooms = [r for r in (memory, free) if r is not None]
    if quantized and rooms and full > min(rooms):
        info(
            f"{loaded.name}: its {dtype} weights ({format_bytes(full)}) exceed "
            f"{format_bytes(min(rooms))}; loading it as {quantized[0]} to plan"
        )
        quantize_model(model, quantized[0], device)
    elif free is not None and full > free:
        raise UserInputError(
            f"{loaded.name}'s weights need {format_bytes(full)} in {dtype}, more than the "
            f"{format_bytes(free)} free on {device}: plan with --quantize auto or nf4"
        )
    model.to(device).eval()
    return loaded


def plan_candidates(spec: str) -> list[tuple[str, dict]]:
    """``--methods full,lora-r16,sparse`` -> the candidates make_plan costs. LoRA r=16 is
    costed with alpha 32, as the evidence measured it; other ranks with alpha 2r."""
    from ..methods import METHODS

    out: list[tuple[str, dict]] = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        method, _, rank = name.partition("-r")
        if method not in METHODS or (rank and not rank.isdigit()):
            raise UserInputError(
                f"--methods: {name!r} is no method; use e.g. full, lora-r8, lora-r16, sparse, "
                f"rosa (known: {', '.join(sorted(METHODS))})"
            )
        options = {"r": int(rank), "alpha": 2 * int(rank)} if rank else {}
        out.append((method, options))
    if not out:
        raise UserInputError("--methods: name at least one method")
    return out


def train_command(args: argparse.Namespace, e) -> str:
    """The ``slimtune train`` line that runs the plan's choice ``e``."""
    from ..methods import method_class
    from ..salf.plan import lr_policy

    flags = {o.name: o.flag for o in method_class(e.method).config_class.cli_options()}
    parts = ["slimtune train"]
    if getattr(args, "model", "default") != "default":
        parts.append(f"--model {args.model}")
    parts += [f"--data {args.data}", f"--method {e.method}"]
    parts += [f"--{flags.get(k, k.replace('_', '-'))} {v}" for k, v in e.options.items()]
    if e.lr is not None and lr_policy(e.method) == "fixed":  # else train sets it itself
        parts.append(f"--lr {e.lr:g}")
    if e.freeze_below:
        parts.append(f"--freeze-below {e.freeze_below}")
    if e.quantize != "none":
        parts.append(f"--quantize {e.quantize}")
    parts.append(f"--batch-size {args.batch_size}")
    return " ".join(parts)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..eval.cost import format_bytes
    from ..eval.report import print_table
    from ..fileio import write_json
    from ..log import info
    from ..options import parse_duration, parse_size
    from ..salf.analysis import analyze
    from ..salf.plan import calibration_batch, make_plan, typical_batch

    _check_sizes(args)
    memory, step = parse_size(args.budget_memory), parse_duration(args.budget_time)
    if args.devices < 1:
        raise UserInputError(f"--devices must be >= 1, got {args.devices}")
    if args.fsdp:  # as train refuses --fsdp --quantize
        if args.quantize not in ("auto", "none"):
            raise UserInputError("--fsdp with --quantize: a sharded run's base is not quantized")
        args.quantize = "none"
    dev = device_of(args)
    kinds = plan_quantizations(getattr(args, "quantize", "auto"), dev, memory)
    loaded = load_for_plan(getattr(args, "model", "default"), dev, kinds, memory)
    ds = load_dataset(args.data, loaded.tokenizer, max_length=args.max_length)
    a = analyze(loaded.model, ds, keep=args.keep, progress=False)
    candidates = plan_candidates(args.methods) if getattr(args, "methods", None) else None
    batch = calibration_batch(ds.examples, args.batch_size, loaded.tokenizer.pad_token_id)
    typical = typical_batch(ds.examples, args.batch_size, loaded.tokenizer.pad_token_id)
    import torch

    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if dev.startswith("cuda")
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    p = make_plan(
        loaded.model,
        batch,
        a.gain,
        budget_memory=memory,
        budget_step_time=step,
        recommended_freeze_below=a.freeze_below,
        autocast=autocast,
        progress=info,
        quantizations=kinds,
        devices=args.devices,
        fsdp=args.fsdp,
        candidates=candidates,
        typical_batch=typical,
        model_name=getattr(args, "model", "default"),
    )
    rows = [
        [
            c.method + (f" r={c.options['r']}" if "r" in c.options else ""),
            c.quantize,
            str(c.freeze_below),
            f"{c.trainable_params:,}",
            format_bytes(c.peak_bytes),
            f"{c.step_time_s:.2f} s",
            f"{c.worst_step_time_s or c.step_time_s:.2f} s",
            f"{c.cached_step_time_s:.2f} s" if c.cached_step_time_s is not None else "-",
            f"{c.predicted_gain:.3f}",
            f"{c.prior:.3f}" if c.prior is not None else "-",
            f"{c.expected_quality:.3f}" if c.expected_quality is not None else "-",
            "yes" if c.fits else "no",
            ("<- chosen; " if c is p.choice else "") + "; ".join(c.notes),
        ]
        for c in p.candidates
    ]
    on = ""
    if args.devices > 1:
        on = f" per device, {args.devices} devices ({'FSDP2' if args.fsdp else 'DDP'})"
    print_table(
        f"slimtune plan: {loaded.name}, batch {args.batch_size}: typical "
        f"{args.batch_size} x {typical['input_ids'].shape[1]} (the median padded width), "
        f"longest {args.batch_size} x {batch['input_ids'].shape[1]} (peak memory){on}; "
        "cached step = typical once the frozen layers' output is kept (train's default for "
        "a run over its data twice or more in one process, from an example's second "
        "epoch); expected = prior (measured score / LoRA r8's) x gain G",
        [
            "method",
            "quantize",
            "freeze-below",
            "trainable",
            "peak memory",
            "typical step",
            "longest step",
            "cached step",
            "gain G",
            "prior",
            "expected",
            "fits",
            "note",
        ],
        rows,
    )
    print(("choice: " if p.choice else "no choice: ") + p.reason)
    if p.choice:
        print("run it: " + train_command(args, p.choice))
    if args.output:
        write_json(args.output, p.to_dict())
    return 0 if p.choice else UserInputError.exit_code
