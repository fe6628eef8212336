"""Where a ``slimtune train`` step's time goes: the command itself, with torch.profiler
around a few of its optimizer steps (issue 14: "a profile that shows where a step's time
goes"; issue 18: LoRA's small-model GPU step).

Runs ``slimtune train`` in this process with the arguments after ``--``; a global optimizer
step hook starts the profiler after ``--skip`` steps and stops it after ``--active`` more,
so the profiled steps are the trainer's own (real data, its batch widths, its kernels). It
prints, per profiled step: wall time, the time the GPU spent in kernels (its busy share:
far under 1 means the host, not the GPU, sets the pace), host syncs (``cudaStreamSynchronize``,
device-to-host copies, ``.item()``) and kernel launches; then the operators by host time and
by device time.

    python benchmarks/step_profile.py --skip 6 --active 3 -- \\
        --model default --data builtin:support_extract_train --method lora \\
        --max-steps 12 --device cuda --no-store

On the CPU the device columns are empty and host time is the whole step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


class StepWindow:
    """Starts ``prof`` when the optimizer has taken ``skip`` steps, stops it ``active`` steps
    later; counts steps of every optimizer (the trainer has one; ``--lr auto``'s range test
    steps count too, so leave it off here)."""

    def __init__(self, prof: profile, skip: int, active: int, cuda: bool) -> None:
        self.prof, self.skip, self.active, self.cuda = prof, skip, active, cuda
        self.steps = 0
        self.walls: list[float] = []
        self._t = 0.0
        self.done = False

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.steps == self.skip:
            self.prof.start()
        elif self.skip < self.steps <= self.skip + self.active:
            self.walls.append(now - self._t)
            if self.steps == self.skip + self.active:
                self.prof.stop()
                self.done = True
        self._t = time.perf_counter()


def _device_us(event) -> float:
    return float(getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0))


def summarize(prof: profile, walls: list[float], cuda: bool) -> str:
    n = max(len(walls), 1)
    events = prof.events()
    kernel_us = sum(_device_us(e) for e in events if e.device_type.name == "CUDA") if cuda else 0.0
    syncs = sum(1 for e in events if e.name in SYNC_EVENTS)
    d2h = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    launches = sum(1 for e in events if e.name in LAUNCH_EVENTS)
    wall = sum(walls) / n
    lines = [
        f"profiled steps: {len(walls)}; wall per step {wall * 1e3:.1f} ms "
        f"(each: {', '.join(f'{w * 1e3:.1f}' for w in walls)})",
    ]
    if cuda:
        busy = kernel_us / n / 1e6
        lines.append(
            f"GPU kernel time per step {busy * 1e3:.1f} ms = {busy / wall:.0%} of the wall; "
            f"kernel launches per step {launches / n:.0f}; host syncs per step {syncs / n:.1f}; "
            f"scalar reads (.item() etc.) per step {d2h / n:.1f}"
        )
    table = prof.key_averages()
    lines.append("\n-- by host time (self) --")
    lines.append(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if cuda:
        lines.append("\n-- by device time (self) --")
        try:
            by_device = table.table(
                sort_by="self_device_time_total", row_limit=25, max_name_column_width=60
            )
        except (AttributeError, KeyError):  # torch before device_time's names
            by_device = table.table(
                sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60
            )
        lines.append(by_device)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", type=int, default=6, help="optimizer steps before profiling")
    ap.add_argument("--active", type=int, default=3, help="optimizer steps profiled")
    ap.add_argument("--trace", help="also write a Chrome trace here")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then slimtune train's")
    args = ap.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if "--lr" in train_args and train_args[train_args.index("--lr") + 1] == "auto":
        raise SystemExit("--lr auto's range test steps would count: give a rate")
    cuda = "cuda" in " ".join(train_args) or (
        "--device" not in train_args and torch.cuda.is_available()
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    window = StepWindow(prof, args.skip, args.active, cuda)
    hook = register_optimizer_step_post_hook(window)
    from slimtune.cli.app import main as slimtune_main

    try:
        code = slimtune_main(["train", *train_args])
    finally:
        hook.remove()
    if not window.done:
        raise SystemExit(
            f"the run took {window.steps} optimizer steps; --skip {args.skip} --active "
            f"{args.active} needs --max-steps >= {args.skip + args.active}"
        )
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(summarize(prof, window.walls, cuda), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
