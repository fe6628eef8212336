"""Several GPUs: scaling of DDP and per-GPU memory of FSDP2, slimtune beside the peer.

Each configuration runs under torchrun with 1, 2, ... processes (one GPU each), on random
batches (a different one per process), for ``--warmup`` untimed and ``--steps`` timed
optimizer steps. Reported per run: the median step time, the global tokens/s (processes x
batch x sequence / step), the largest peak memory of any process, and the scaling (tokens/s
over the same configuration's on one GPU).

    python benchmarks/bench_distributed.py --model llama-1.2b --batch 4 --seq 2048 \
        --gpus 1,2,4 --configs lora,sparse,peft-lora-liger --out ddp.json
    python benchmarks/bench_distributed.py --model llama-8b --batch 1 --seq 2048 \
        --gpus 1,2,4 --configs full-fsdp,lora-fsdp --checkpointing --out fsdp.json

slimtune rows run what ``slimtune train`` runs with several processes: its fused kernels
where installed, the method's compute context, :class:`Parallel` (DDP through accelerate,
or FSDP2 with ``-fsdp``) and ``accumulate_gradients``. The peer ``peft-lora-liger`` is
peft LoRA r16 (bf16 adapters) with Liger's kernels, wrapped in DDP by accelerate's
``prepare``: the usual recipe. A run that does not fit reports "out of memory".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SPARSE = {"density": 0.01, "importance": "random"}
# config -> (implementation, method, options, FSDP2)
CONFIGS: dict[str, tuple[str, str, dict, bool]] = {
    "lora": ("slimtune", "lora", {}, False),
    "sparse": ("slimtune", "sparse", SPARSE, False),
    "full": ("slimtune", "full", {}, False),
    "lora-fsdp": ("slimtune", "lora", {}, True),
    "full-fsdp": ("slimtune", "full", {}, True),
    "peft-lora-liger": ("peft", "lora", {}, False),
}
# DDP variants of a config, measured beside it: "sparse+static" builds DDP with
# static_graph=True (its per-step search of the autograd graph done once), "sparse+bucket100"
# with 100 MB buckets (fewer all-reduce launches)
DDP_VARIANTS = {"static": {"static_graph": True}, "bucket100": {"bucket_cap_mb": 100}}


def run_one(args) -> dict | None:
    from slimtune.eval.cost import PeakMemory
    from slimtune.methods import get_method
    from slimtune.model.anatomy import base_model, count_parameters, decoder_layers
    from slimtune.model.kernels import apply_fused_kernels
    from slimtune.training.config import TrainConfig
    from slimtune.training.parallel import Parallel
    from slimtune.training.step import accumulate_gradients
    from slimtune.training.trainer import _accelerator

    name, *variants = args.run_one.split("+")
    impl, method, options, fsdp = CONFIGS[name]
    acc = _accelerator(TrainConfig(data="-", method=method, device="cuda"))  # the trainer's
    compile_ = "compile" in variants  # the decoder layers compiled, as train --compile
    for v in variants:
        if v not in DDP_VARIANTS and v != "compile":
            raise SystemExit(f"unknown variant {v!r}: {', '.join(DDP_VARIANTS)} or compile")
        for key, value in DDP_VARIANTS.get(v, {}).items():
            setattr(acc.ddp_handler, key, value)
    device = acc.device
    from bench_methods import build_model, timed_steps

    if impl == "peft":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True
        )
    t0 = time.perf_counter()
    model = build_model(args.model, "cuda")
    build_s = time.perf_counter() - t0
    lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0}
    n_layers = len(decoder_layers(model))
    if impl == "slimtune":
        apply_fused_kernels(model, device, elementwise=not compile_)
        m = get_method(method, lora if method == "lora" else options)
        model = m.prepare(model, list(range(n_layers)))
        if args.checkpointing:
            base_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        trainable, total = count_parameters(model)
        par = Parallel.build(
            model,
            decoder_layers(model),
            acc,
            fsdp=fsdp,
            aux_loss=lambda: m.auxiliary_loss(model),
        )
        compute = lambda: m.compute_context(model)  # noqa: E731  (a generator: once per with)
        if compile_:
            from bench_methods import _both

            from slimtune.model.compile import compiled_layers

            inner = compute
            compute = lambda: _both(inner(), compiled_layers(model))  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model

        from slimtune.model.anatomy import linear_module_names

        if args.checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules=linear_module_names(model),
                task_type="CAUSAL_LM",
            ),
            autocast_adapter_dtype=False,  # bf16 adapters, the fastest peft setting
        )
        trainable, total = count_parameters(model)
        ddp = acc.prepare_model(model, device_placement=False)
        from contextlib import nullcontext

        compute = nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(acc.process_index)  # each process its own batch
    vocab = base_model(model).get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dev_batch = {k: v.to(device) for k, v in batch.items()}

    # every label a target: the step's total is known, as the trainer knows it
    targets = acc.num_processes * args.batch * (args.seq - 1)

    def step() -> None:
        if impl == "slimtune":
            accumulate_gradients(par, params, [batch], device, acc.autocast, 1.0, targets=targets)
        else:
            with acc.autocast():
                loss = ddp(**dev_batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem, compute():
        times = timed_steps(step, device, args.warmup, args.steps)
    # the profile: rank 0 on the most GPUs, or with --trace on every count (to compare them)
    profiled = args.profile and (args.trace or acc.num_processes == max(args.gpu_list))

    def two_steps() -> None:  # the second is read: the first may still warm the host
        for _ in range(2):
            step()
        torch.cuda.synchronize()

    if profiled and acc.is_main_process:
        from torch.profiler import ProfilerActivity, profile

        with compute(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            two_steps()
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70
        )
        print(f"profile of {args.run_one} x{acc.num_processes}, rank 0:\n{table}", file=sys.stderr)
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            name = args.run_one.replace("+", "_")  # a name the device copies back
            prof.export_chrome_trace(f"{args.trace}/{name}-x{acc.num_processes}.json")
    elif profiled:
        with compute():  # the others run the same steps: their collectives need them
            two_steps()
    peak = acc.reduce(torch.tensor(float(mem.peak_bytes), device=device), "max")
    med = statistics.median(times)
    world = acc.num_processes
    return {
        "config": args.run_one,
        "gpus": world,
        "step_s": med,
        "tokens_per_s": world * args.batch * args.seq / med,
        "peak_bytes_max": float(peak),
        "trainable": trainable,
        "total": total,
        "build_s": build_s,
    }


def launch(config: str, gpus: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    cmd += ["--numa-binding", args.numa_binding] if args.numa_binding else []
    cmd += ["--master_port", str(args.port + gpus), __file__, "--run-one", config]
    for key in ("model", "batch", "seq", "steps", "warmup", "lora_r"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--checkpointing"] if args.checkpointing else []
    cmd += ["--profile", "--gpus", args.gpus] if args.profile else []
    cmd += ["--trace", args.trace] if args.trace else []
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "4"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if "profile of" in proc.stderr:
        sys.stderr.write(proc.stderr[proc.stderr.index("profile of") :])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    oom = "out of memory" in proc.stderr.lower() or "outofmemory" in proc.stderr.lower()
    sys.stderr.write(f"--- {config} x{gpus}: rc {proc.returncode}\n{proc.stderr[-3000:]}\n")
    return {"config": config, "gpus": gpus, "error": "out of memory" if oom else "failed"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama-1.2b")
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--configs", default="lora,sparse,peft-lora-liger")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print a profile of one step of rank 0 on the most GPUs (stderr)",
    )
    ap.add_argument(
        "--trace",
        help="with --profile: a folder for chrome traces of rank 0's profiled steps, "
        "on every GPU count",
    )
    ap.add_argument(
        "--numa-binding",
        help="torchrun's --numa-binding (node, socket, ...): each process on the CPUs near its GPU",
    )
    ap.add_argument("--port", type=int, default=29600, help="torchrun's port is this + GPUs")
    ap.add_argument("--out")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.gpu_list = [int(x) for x in args.gpus.split(",")]
    if args.run_one:
        result = run_one(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for config in args.configs.split(","):
        for n in args.gpu_list:
            rows.append(launch(config, n, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    one = {r["config"]: r for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
    print(f"{args.model}, {args.batch} x {args.seq} per GPU, {torch.cuda.get_device_name(0)}")
    print("| config | GPUs | tokens/s | scaling vs 1 GPU | step s | peak GiB (max per GPU) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['config']} | {r['gpus']} | {r['error']} | | | |")
            continue
        base = one.get(r["config"])
        scale = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(
            f"| {r['config']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {scale} | "
            f"{r['step_s']:.3f} | {r['peak_bytes_max'] / 2**30:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
