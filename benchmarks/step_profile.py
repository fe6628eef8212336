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
    """Starts ``prof`` when the trainer's optimizer has taken ``skip`` steps, stops it
    ``active`` steps later. A range test's steps (``--lr auto``, full fine-tuning's default)
    are not counted: :func:`main` pauses the window while it runs."""

    def __init__(self, prof: profile, skip: int, active: int, cuda: bool) -> None:
        self.prof, self.skip, self.active, self.cuda = prof, skip, active, cuda
        self.steps = 0
        self.walls: list[float] = []
        self._t = 0.0
        self.paused = False

    @property
    def done(self) -> bool:
        return len(self.walls) == self.active

    def __call__(self, optimizer, args, kwargs) -> None:
        if self.paused:
            return
        self.steps += 1
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.steps == self.skip:
            self.prof.start()
        elif self.skip < self.steps <= self.skip + self.active:
            self.walls.append(now - self._t)
            if self.done:
                self.prof.stop()
        self._t = time.perf_counter()


def _device_us(event) -> float:
    return float(getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0))


def summarize(prof: profile, walls: list[float], cuda: bool) -> str:
    n = max(len(walls), 1)
    events = prof.events()
    kernel_us = sum(_device_us(e) for e in events if e.device_type.name == "CUDA") if cuda else 0.0
    # less the window's own synchronize at the end of each profiled step
    syncs = sum(1 for e in events if e.name in SYNC_EVENTS) - (n if cuda else 0)
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
    if args.skip < 1 or args.active < 1:
        raise SystemExit("--skip and --active must be at least 1")
    device_arg = argparse.ArgumentParser(add_help=False)
    device_arg.add_argument("--device", default="auto")
    from slimtune.model.loading import resolve_device
    from slimtune.training import trainer

    device = resolve_device(device_arg.parse_known_args(train_args)[0].device)
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    window = StepWindow(prof, args.skip, args.active, cuda)
    search_lr = trainer.Trainer._search_lr

    def paused_search(self) -> None:  # the range test's steps are not the trainer's
        window.paused = True
        try:
            search_lr(self)
        finally:
            window.paused = False

    trainer.Trainer._search_lr = paused_search
    hook = register_optimizer_step_post_hook(window)
    from slimtune.cli.app import main as slimtune_main

    try:
        code = slimtune_main(["train", *train_args])
    finally:
        hook.remove()
        trainer.Trainer._search_lr = search_lr
    if code != 0:
        return code
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
