"""Step time and peak memory of slimtune's methods beside plain HF / PEFT, in one run.

Each configuration runs in its own subprocess (a clean peak-memory reading), on the same
random batch shape, for ``--warmup`` untimed then ``--steps`` timed optimizer steps; the
table reports the median step time, tokens/s and peak memory (CUDA: allocated bytes; CPU:
peak RSS), plus ratios against the baseline configuration of the same run.

    python benchmarks/bench_methods.py --device cpu --model default --batch 4 --seq 256
    python benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048

``llama-1.2b`` is Llama-3.2-1B-shaped (16 layers, hidden 2048, vocab 128256, tied
embeddings) with random weights, built from its config: no download. QLoRA rows (``*-nf4``,
``peft-qlora*``) run on a base whose block linears are quantized (see _build_quantized):

    python benchmarks/bench_methods.py --device cuda --model llama-8b --batch 1 --seq 2048 \
        --configs peft-qlora-liger,lora-nf4,lora-nf4-ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _cfg(
    impl: str,
    method: str,
    freeze: float = 0.0,
    bf16_adapters: bool = False,
    liger: str | None = None,
    options: dict | None = None,
    fast: bool = True,
    quantize: str = "none",
    checkpointing: bool = False,
) -> dict:
    """impl: "hf" (plain transformers / peft loop) or "slimtune" (what ``slimtune train``
    runs: its fused kernels where installed, the method's compute context under autocast,
    accumulate_gradients); freeze: share of the bottom layers frozen; liger (peers only):
    None or "all" (its patched model incl. fused linear cross-entropy); fast=False: slimtune
    as v0.1 ran it (no fused kernels, peft's fp32 copies of each adapter input);
    quantize: "none", "nf4" or "int8", the base's block linears (see build_model); an "hf"
    row on a quantized base runs the usual QLoRA recipe (peft's
    prepare_model_for_kbit_training); checkpointing: gradient checkpointing (a quantized
    "hf" row: prepare_model_for_kbit_training's; slimtune: as ``train
    --gradient-checkpointing`` enables it)."""
    return {
        "impl": impl,
        "method": method,
        "freeze": freeze,
        "bf16_adapters": bf16_adapters,
        "liger": liger,
        "options": options or {},
        "fast": fast,
        "quantize": quantize,
        "checkpointing": checkpointing,
    }


SPARSE = {"density": 0.01, "importance": "random"}  # the step does not depend on the scorer
EXPERTS = {"experts": 8, "top_k": 2, "rank": 8, "alpha": 16}  # active params = LoRA r16

CONFIGS = {
    "hf-full": _cfg("hf", "full"),
    "peft-lora": _cfg("hf", "lora"),
    "peft-lora-bf16": _cfg("hf", "lora", bf16_adapters=True),
    "peft-lora-bf16-liger": _cfg("hf", "lora", bf16_adapters=True, liger="all"),
    "peft-lora-bf16-liger-top-half": _cfg("hf", "lora", 0.5, True, liger="all"),
    "full": _cfg("slimtune", "full"),
    "full-freeze-half": _cfg("slimtune", "full", 0.5),
    # the default: fp32 adapters computing on bf16 input, Liger kernels where installed
    "lora": _cfg("slimtune", "lora"),
    "lora-freeze-half": _cfg("slimtune", "lora", 0.5),
    "lora-bf16": _cfg("slimtune", "lora", bf16_adapters=True),
    "lora-bf16-freeze-half": _cfg("slimtune", "lora", 0.5, True),
    "lora-v0.1": _cfg("slimtune", "lora", fast=False),
    # the default path without the fused LoRA function (only peft's fp32 input copies off)
    "lora-unfused": _cfg("slimtune", "lora", options={"fused": False}),
    # LoRA's default dropout 0.05 (the table's LoRA rows, peers included, use 0)
    "lora-dropout0.05": _cfg("slimtune", "lora", options={"dropout": 0.05}),
    "sparse": _cfg("slimtune", "sparse", options=SPARSE),
    "sparse-freeze-half": _cfg("slimtune", "sparse", 0.5, options=SPARSE),
    # whole input columns: the backward and saved activations shrink with the density
    "sparse-columns": _cfg("slimtune", "sparse", options={**SPARSE, "structure": "columns"}),
    "sparse-columns-freeze-half": _cfg(
        "slimtune", "sparse", 0.5, options={**SPARSE, "structure": "columns"}
    ),
    "rosa": _cfg(
        "slimtune",
        "rosa",
        options={"r": 8, "alpha": 16, "dropout": 0.0, "density": 0.005, "importance": "random"},
    ),
    "shira": _cfg("slimtune", "shira", options={"density": 0.01}),
    "experts": _cfg("slimtune", "experts", options=EXPERTS),
    "experts-freeze-half": _cfg("slimtune", "experts", 0.5, options=EXPERTS),
    # routed training (the default before the dense path), tokens grouped by expert set ...
    "experts-routed": _cfg("slimtune", "experts", options={**EXPERTS, "dispatch": "routed"}),
    # ... or by single expert (CUDA)
    "experts-by-expert": _cfg("slimtune", "experts", options={**EXPERTS, "dispatch": "routed"}),
    # QLoRA (issue 15): the base's block linears in 4-bit NF4, LoRA r16 beside them. The peer
    # is the usual recipe: prepare_model_for_kbit_training (norms, embeddings and head cast
    # to fp32, checkpointing on), LoRA on every block linear, Liger's kernels
    "peft-qlora-liger": _cfg("hf", "lora", liger="all", quantize="nf4", checkpointing=True),
    "peft-qlora-liger-nockpt": _cfg("hf", "lora", liger="all", quantize="nf4"),
    # the same recipe without Liger (runs on the CPU too: Liger does not)
    "peft-qlora": _cfg("hf", "lora", quantize="nf4", checkpointing=True),
    # what `slimtune train --quantize nf4` runs (no checkpointing unless asked) ...
    "lora-nf4": _cfg("slimtune", "lora", quantize="nf4"),
    # ... and with --gradient-checkpointing
    "lora-nf4-ckpt": _cfg("slimtune", "lora", quantize="nf4", checkpointing=True),
    "lora-int8": _cfg("slimtune", "lora", quantize="int8"),
    "sparse-nf4": _cfg("slimtune", "sparse", options=SPARSE, quantize="nf4"),
    "experts-nf4": _cfg("slimtune", "experts", options=EXPERTS, quantize="nf4"),
}


def config(name: str) -> dict:
    """A row's configuration: a name of CONFIGS, optionally with ``+compile`` (the decoder
    layers compiled, as ``train --compile`` runs them: inductor instead of Liger's RMSNorm /
    SwiGLU / RoPE), ``+compile+liger`` (compiled over Liger's kernels) or ``+graphs`` (compiled,
    each layer replayed as a CUDA graph: ``compiled_layers(cuda_graphs=True)``) or, for
    experts, ``+router`` (a probe: eager layers, each router's math as plain ops compiled
    alone, see _compile_routers); and on slimtune's frozen rows ``+cached`` (``train
    --cache-frozen`` once every example is kept: the warm-up fills the cache, the timed
    steps skip the frozen layers; kept where train keeps them, or with ``+cached+host`` in
    host memory)."""
    base, *mods = name.split("+")
    if (
        base not in CONFIGS
        or not set(mods) <= {"compile", "liger", "graphs", "router", "cached", "host"}
        or ("host" in mods and "cached" not in mods)
        or (
            "cached" in mods
            and not (CONFIGS[base]["impl"] == "slimtune" and CONFIGS[base]["freeze"])
        )
        # kept to the rows it was measured on (compiled layers and routed dispatch run no
        # router function, so there the probe would change nothing)
        or ("router" in mods and (base not in ("experts", "experts-freeze-half") or len(mods) > 1))
        or ("liger" in mods and not {"compile", "graphs"} & set(mods))
    ):
        raise SystemExit(f"unknown configuration {name!r}")
    return {
        **CONFIGS[base],
        "compile": "compile" in mods or "graphs" in mods,
        "cuda_graphs": "graphs" in mods,
        "liger_elementwise": "liger" in mods,
        "router_compile": "router" in mods,
        "cached": "cached" in mods,
        "cache_on_host": "host" in mods,
    }


def _compile_routers() -> None:
    """A probe: ``experts/fused.py``'s router function (forward and backward written out,
    some 45 small kernels a layer) replaced by the same math as plain ops under
    ``torch.compile``, which fuses them into a few kernels and derives the backward. One
    difference, as measured: the projection is rounded to the compute dtype before the
    division by the RMS, where the function keeps it in fp32 on CUDA
    (``router_probe_check.py`` compares the two on the CPU, where they round alike)."""
    import torch.nn.functional as F

    from slimtune.methods.experts import fused
    from slimtune.methods.experts.routing import expert_counts

    def route(flat, weight, center, kept, rows, top_k, rank, scaling, dtype):
        experts = weight.shape[0]
        rms = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32) / flat.shape[1] ** 0.5
        proj = F.linear(flat.to(dtype), weight.to(dtype)).float()
        logits = proj / (rms.unsqueeze(1) + 1e-6) - torch.mv(weight, center)
        top_logits, top_i = logits.topk(top_k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        counts = expert_counts(top_i, experts)
        probs = torch.softmax(logits, dim=-1)
        aux = (counts.float() * probs.mean(0)).sum() * (experts / top_i.numel())
        g = torch.zeros_like(logits).scatter(1, top_i, gates * scaling)
        if kept is not None:
            g = g.new_zeros(rows, experts).index_put((kept,), g)
        dense = g.to(dtype).repeat_interleave(rank, dim=1)
        return dense, aux, top_i, gates, counts

    compiled = torch.compile(route, dynamic=True)

    class CompiledRoute:
        apply = staticmethod(compiled)

    fused.DenseRouteFunction = CompiledRoute  # type: ignore[misc, assignment]


def build_model(name: str, device: str, quantize: str = "none"):
    """The named model on ``device``; ``quantize`` ("nf4", "int8"): its block linears
    quantized, the rest in the device's dtype (see _build_quantized)."""
    from slimtune.model.loading import load_model

    if name == "default":
        return load_model("default", device=device, quantize=quantize).model
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        # Llama-3-8B-shaped: 32 layers, hidden 4096, MLP 14336, untied embeddings
        "llama-8b": dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
        "llama-1.2b": dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
        # SmolLM2-135M's shape (the default model's), random weights: no model to stage
        "smollm2-135m": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rope_theta=100000.0,
        ),
        "llama-tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            tie_word_embeddings=True,
            max_position_embeddings=1024,
        ),
    }
    cfg = LlamaConfig(**shapes[name])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    if quantize != "none":
        return _build_quantized(cfg, dtype, device, quantize)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)
    return model


def _build_quantized(cfg, dtype: torch.dtype, device: str, kind: str):
    """A random Llama of ``cfg`` with its block linears quantized on ``device``, which never
    holds them in ``dtype``: built on the CPU in ``dtype`` (bf16 for a GPU), then the
    library's quantize_model moves them to ``device`` quantized one by one, and the rest
    (embeddings, norms, head) follows in ``dtype``. Peer and slimtune rows get this one
    base: for nf4, bitsandbytes Linear4bit layers, NF4 with double quantization computing in
    bf16, the layers transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16) builds (int8: Linear8bitLt, threshold 6, as
    load_in_8bit=True)."""
    from transformers import LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    from slimtune.model.quantize import quantize_model

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B model never exists in fp32 (32 GB) either
    try:
        with no_init_weights():  # torch's inits take minutes for 8B on a CPU ...
            model = LlamaForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()  # skipped with the inits (llama-1.2b and llama-tiny tie the head)
    _normal_init(model)  # ... this about 45 core-seconds, spread over the cores
    quantize_model(model, kind, device)
    return model.to(device)


def _normal_init(model: torch.nn.Module, std: float = 0.02) -> None:
    """Every weight matrix (linears, embeddings) ~ N(0, std); norms keep their ones. CPU
    normal_ runs on one core, so chunks fill in threads, each chunk with its own seeded
    generator (reproducible, no shared generator lock)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [c for p in model.parameters() if p.dim() >= 2 for c in p.data.view(-1).split(1 << 24)]

    def fill(i: int) -> None:
        chunks[i].normal_(0.0, std, generator=torch.Generator().manual_seed(i))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # p.data: no autograd
        list(pool.map(fill, range(len(chunks))))


def timed_steps(
    step, device: torch.device, warmup: int, steps: int, warmup_times: list | None = None
) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones (the
    device drained before and after each); the untimed ones' go to ``warmup_times``."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        elif warmup_times is not None:
            warmup_times.append(time.perf_counter() - t0)
    return times


def run_one(args) -> dict:
    from slimtune.eval.cost import PeakMemory
    from slimtune.methods import get_method
    from slimtune.model.anatomy import base_model, count_parameters, decoder_layers
    from slimtune.model.compile import compiled_layers
    from slimtune.model.kernels import apply_fused_kernels
    from slimtune.salf.freezing import freeze_below
    from slimtune.training.step import accumulate_gradients, adamw

    c = config(args.run_one)
    if c["cuda_graphs"] and args.device != "cuda":  # inductor would skip them: +compile
        raise SystemExit(f"{args.run_one}: CUDA graphs need --device cuda")
    impl, method, freeze, bf16_adapters = c["impl"], c["method"], c["freeze"], c["bf16_adapters"]
    if c["router_compile"]:
        _compile_routers()
    if args.run_one.split("+")[0] == "experts-by-expert":
        from slimtune.methods.experts import layer as experts

        experts.EXPERT_SET_DEVICES = set()
    if c["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True
        )
    if not c["fast"]:
        os.environ["SLIMTUNE_KERNELS"] = "off"
    if impl == "hf":  # the peers attend as torch chooses (cuDNN's attention on Hopper)
        os.environ["SLIMTUNE_ATTENTION"] = "torch"
    else:  # as slimtune's load_model does (SLIMTUNE_ATTENTION=torch keeps torch's choice)
        from slimtune.model.kernels import choose_attention

        choose_attention(args.device)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(args.model, args.device, c["quantize"])
    build_s = time.perf_counter() - t0
    n_layers = len(decoder_layers(model))
    k = round(freeze * n_layers) if args.freeze_below is None else args.freeze_below
    lora_opts = {
        "r": args.lora_r,
        "alpha": 2 * args.lora_r,
        "dropout": 0.0,
        "adapter_dtype_follows_base": bf16_adapters,
        **{k: v for k, v in c["options"].items() if k != "fused"},
    }
    kernels: list[str] = []
    compute = contextlib.nullcontext  # a factory: a generator context enters only once
    if impl == "slimtune":  # what the trainer does, in its order
        kernels = apply_fused_kernels(
            model, device, elementwise=not c["compile"] or c["liger_elementwise"]
        )
        m = get_method(method, lora_opts if method == "lora" else c["options"])
        model = m.prepare(model, list(range(k, n_layers)))
        if c["checkpointing"]:
            base_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        freeze_below(model, k)
        if device.type == "cuda" and c["fast"]:
            compute = lambda: m.compute_context(model)  # noqa: E731
            if c["options"].get("fused") is False:
                from peft.helpers import disable_input_dtype_casting

                compute = lambda: disable_input_dtype_casting(model)  # noqa: E731
    else:  # the peers
        if c["quantize"] != "none":  # the usual QLoRA recipe: base frozen, non-quantized
            from peft import prepare_model_for_kbit_training  # weights in fp32, checkpointing

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=c["checkpointing"]
            )
        elif c["checkpointing"]:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            from slimtune.model.anatomy import linear_module_names

            top = None if k == 0 else list(range(k, n_layers))
            model = get_peft_model(
                model,
                LoraConfig(
                    r=args.lora_r,
                    lora_alpha=2 * args.lora_r,
                    lora_dropout=0.0,
                    target_modules=linear_module_names(model),
                    layers_to_transform=top,
                    task_type="CAUSAL_LM",
                ),
                autocast_adapter_dtype=not bf16_adapters,
            )
    if c["compile"]:
        inner = compute
        graphs = c["cuda_graphs"]
        compute = lambda: _both(inner(), compiled_layers(model, cuda_graphs=graphs))  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = count_parameters(model)
    opt = adamw(params, 1e-5)  # every row, peers too: fused on CUDA, as HF Trainer's default
    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dev_batch = {key: v.to(device) for key, v in batch.items()}
    stepped = model  # what accumulate_gradients runs: the model, or with +cached its cache too
    if c["cached"]:
        if args.warmup < 1:
            raise SystemExit("+cached needs --warmup >= 1: the first step fills the cache")
        from slimtune.salf.frozen_cache import FrozenOutputCache, expected_bytes, store_for
        from slimtune.training.parallel import Parallel, StepLoss

        # kept where train would keep it
        store = store_for(expected_bytes(model, [args.seq] * args.batch), device)
        store = torch.device("cpu") if c["cache_on_host"] else store
        cache = FrozenOutputCache(model, k, store)
        stepped = Parallel("none", StepLoss(model, lambda: m.auxiliary_loss(model), cache))
        batch["example_ids"] = list(range(args.batch))
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def step():
        if impl == "slimtune":
            accumulate_gradients(
                stepped,
                params,
                [batch],
                device,
                autocast,
                1.0,
                aux_loss=lambda: m.auxiliary_loss(model),
            )
        else:
            with autocast():
                loss = model(**dev_batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem, compute():
        warm: list[float] = []
        times = timed_steps(step, device, args.warmup, args.steps, warm)
    first_step_s = warm[0] if warm else None  # with +compile: the compile
    if args.profile:  # three more steps under the profiler: wall, GPU busy, syncs, top ops
        from step_profile import summarize
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        walls = []
        if cuda:
            torch.cuda.synchronize()
        with compute(), profile(activities=acts) as prof:
            for _ in range(3):
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()  # one per step: summarize leaves it out
                walls.append(time.perf_counter() - t0)
        text = summarize(prof, walls, cuda)
        head, _, tables = text.partition("\n-- by host")
        print(f"-- by host{tables}\n{head}", file=sys.stderr)  # the totals last: not cut off
    med = statistics.median(times)
    return {
        "config": args.run_one,
        "impl": impl,
        "method": method,
        "frozen_layers": k,
        "layers": n_layers,
        "step_s": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_times": times,  # in order: a drift within the process shows here
        "tokens_per_s": args.batch * args.seq / med,
        "peak_bytes": mem.peak_bytes,
        "peak_kind": mem.kind,
        "trainable": trainable,
        "total": total,
        "fused_kernels": kernels,
        "quantize": c["quantize"],
        "checkpointing": c["checkpointing"],
        "build_s": build_s,
        "compile": c["compile"],
        "cuda_graphs": c["cuda_graphs"],
        "first_step_s": first_step_s,
        "frozen_cache": cache.summary() if c["cached"] else None,
    }


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import platform

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def measure(name: str, args, freeze_below: int | None = None) -> tuple[dict | None, str]:
    """Run configuration ``name`` in its own process (a clean peak-memory reading) with the
    shape in ``args``; its result (None if it failed) and its stderr."""
    cmd = [sys.executable, __file__, "--run-one", name, "--device", args.device]
    cmd += ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r)]
    cmd += ["--profile"] if getattr(args, "profile", False) else []
    cmd += ["--freeze-below", str(freeze_below)] if freeze_below is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    ok = proc.returncode == 0 and line
    return (json.loads(line[0][7:]) if ok else None), proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--model",
        default="default",
        help="default, smollm2-135m (its shape, random weights), llama-1.2b, llama-8b or "
        "llama-tiny",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--configs", default="hf-full,full,peft-lora,lora,lora-freeze-half")
    ap.add_argument(
        "--baseline", default=None, help="config the ratios divide by (default: the first)"
    )
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print a torch.profiler table of one step per configuration",
    )
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--freeze-below", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    names = args.configs.split(",")
    results = []
    for name in names:
        result, stderr = measure(name, args)
        if result is None:
            print(f"{name}: failed\n{stderr[-3000:]}", file=sys.stderr)
            results.append({"config": name, "error": stderr[-500:]})
            continue
        results.append(result)
        if args.profile:
            print(f"--- profile of {name} ---\n{stderr[-12000:]}", file=sys.stderr)
        r = results[-1]
        print(
            f"{name}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, "
            f"{r['peak_bytes'] / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    base = next(
        (r for r in results if r["config"] == (args.baseline or names[0]) and "step_s" in r), None
    )
    print(
        f"\nmachine: {machine(args.device)}; model {args.model}; batch {args.batch} x "
        f"{args.seq}; median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print(
        "| config | trainable params | step time (s) | tokens/s | peak memory (GiB) "
        f"| time vs {base['config'] if base else '-'} | memory vs {base['config'] if base else '-'} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "step_s" not in r:
            print(f"| {r['config']} | failed | | | | | |")
            continue
        ratio_t = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        ratio_m = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "-"
        print(
            f"| {r['config']} | {r['trainable']:,} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_bytes'] / 2**30:.2f} | {ratio_t} | {ratio_m} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"machine": machine(args.device), "args": vars(args), "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
