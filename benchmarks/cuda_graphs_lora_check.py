"""Which part of LoRA's compiled layer crashes under CUDA graphs? One process per variant.

``bench_methods.py``'s ``lora+graphs`` row died with a segmentation fault (BENCHMARKS.md,
"CUDA graphs over the compiled layers") where ``full+graphs`` and ``experts+graphs`` ran.
Each variant patches one suspect away in its own process and runs the ``lora+graphs`` row
(SmolLM2-135M shape, 8 x 128), under faulthandler: LoRA's autograd function
(``LoraLinearFunction``), the fp32-output GEMM of its backward (``torch.mm(...,
out_dtype=)``), slimtune's fused LoRA altogether (peft's own forward), cudagraph trees:

    python benchmarks/cuda_graphs_lora_check.py [VARIANT ...]   # a CUDA GPU; ~1.5 min each

Prints per variant: exit code, the row's result (median step) and the Python stack of a
crash. Result on torch 2.11 (BENCHMARKS.md): every variant crashes in the compiled
backward, peft's own forward too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROW = ["--device", "cuda", "--model", "smollm2-135m", "--batch", "8", "--seq", "128"]
ROW += ["--steps", "10", "--warmup", "4", "--lora-r", "8"]

PATCHES = {
    # the row as it is: reference for the crash
    "as-is": "",
    # the GEMM with an fp32 output replaced by a matmul and a cast
    "no-out-dtype": """
import slimtune.methods.compute_copies as cc, slimtune.methods.lora_fused as lf
plain = lambda m1, m2, dtype: (m1 @ m2).to(dtype)
cc.mm_to = lf.mm_to = plain
""",
    # no autograd function in the compiled layer: the forward's plain ops, autograd's
    # backward (dynamo traces an autograd.Function's own forward/backward whatever its
    # ``apply`` says, so the module's name is rebound to a plain object)
    "plain-ops": """
import types, slimtune.methods.lora_fused as lf
def apply(x, x_dropped, weight, bias, a, b, a_scaled, b_c, scaling, quant_state=None):
    a_s, b_s = lf.cast_now(a, b, scaling, a_scaled.dtype)  # differentiable, unlike the copies
    return lf._forward(x, x_dropped, weight, bias, a_s, b_s, quant_state)[0]
lf.LoraLinearFunction = types.SimpleNamespace(apply=apply)
""",
    # peft's own LoRA forward: nothing of lora_fused in the layer
    "peft-forward": """
import contextlib, slimtune.methods.lora as lm
lm.fused_lora = lambda model: contextlib.nullcontext(0)
""",
    # the graphs without cudagraph trees (one graph per compiled function, no shared pool)
    "no-trees": """
import torch._inductor.config as ic
ic.triton.cudagraph_trees = False
""",
}


def run(name: str, patch: str, config: str) -> None:
    code = (
        f"import sys; sys.path[:0] = [{str(HERE)!r}]\n{patch}\n"
        "import bench_methods\nbench_methods.main()\n"
    )
    argv = ["--run-one", config, *ROW]
    cmd = [sys.executable, "-X", "faulthandler", "-c", code, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        print(f"{name} ({config}): timed out after 300 s")
        return
    result = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    print(
        f"{name} ({config}): exit {proc.returncode}; {result[0][:160] if result else 'no result'}"
    )
    lines = [x for x in proc.stderr.splitlines() if "cudagraph_utils" not in x]
    crash = [i for i, x in enumerate(lines) if "Fatal Python error" in x or "Traceback" in x]
    if crash:
        print("\n".join(lines[crash[0] : crash[0] + 25]))


def main() -> None:
    only = sys.argv[1:]  # variant names; default all, and the compiled row
    if not only:
        run("compiled, no graphs", "", "lora+compile")
    for name, patch in PATCHES.items():
        if only and name not in only:
            continue
        run(name, patch, "lora+graphs")


if __name__ == "__main__":
    main()
