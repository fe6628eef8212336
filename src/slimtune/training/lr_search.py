"""``--lr auto``: a short learning-rate range test on the user's own data and model.

Why: the best peak learning rate moves with the method, the model and the data. The
swept defaults (BENCHMARKS.md, "Default learning rates") are within a point of the best
for most method-task pairs on the default model, but full fine-tuning's best rate moves
with the model by an order of magnitude (3e-4 on the 135M default model; multi-billion
models are fully fine-tuned near 1e-5), so it runs this test by default. A range test
(Smith, "Cyclical Learning Rates", 2017) reads the rate off a few steps of the run
itself.

How: starting from the prepared model (method attached, layers frozen), the run's first
``steps`` batches are trained with a learning rate that grows geometrically from
``lo`` to ``hi``; after each step the loss of a fixed *probe* (a few training examples,
in eval mode, two batches' worth, so it does not move with batch difficulty or dropout) is measured. The
test stops once the probe loss is well past its best (the rate diverges). The chosen
peak rate is the rate at the probe's best loss divided by ``divisor``: the best probe
loss marks the largest rate that still trains after a short ramp; a schedule that holds
its peak for many steps needs a margin below it.

Then the trainable tensors (and a method's extra state) are put back bit for bit and
the RNG states restored, so the run that follows is the run ``--lr <chosen>`` would
have been (tested).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX
from .step import NonFiniteError, accumulate_gradients

# Defaults: measured against the learning-rate sweep (BENCHMARKS.md, "--lr auto").
SEARCH_STEPS = 30
SPAN = 100.0  # the test runs from default_lr / SPAN to default_lr * SPAN
DIVISOR = 3.0  # chosen = rate at the probe's best loss / DIVISOR
PROBE_BATCHES = 2  # batches of training examples whose loss is measured after every step
DIVERGED = 1.5  # stop when the probe loss exceeds DIVERGED x its best (and the start)


@dataclass
class LRSearch:
    """A range test's record: every rate tried and the probe loss after its step."""

    lrs: list[float]
    losses: list[float]  # probe loss after the step at lrs[i] (inf: diverged)
    start_loss: float  # the probe loss before the first step
    chosen: float
    reason: str
    steps: int = 0
    seconds: float = 0.0
    settings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRSearch:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def rates(lo: float, hi: float, steps: int) -> list[float]:
    """``steps`` rates from ``lo`` to ``hi``, evenly spaced in log scale."""
    if steps == 1:
        return [lo]
    return [lo * (hi / lo) ** (i / (steps - 1)) for i in range(steps)]


def choose(
    lrs: Sequence[float],
    losses: Sequence[float],
    start_loss: float,
    *,
    divisor: float = DIVISOR,
) -> tuple[float, str]:
    """The peak rate for training, and why, from a range test's curve."""
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        return lrs[0] / divisor, (
            f"the loss was not finite even at {lrs[0]:.2g}: chose {lrs[0] / divisor:.2g}"
        )
    best, i = min(finite)
    lr = lrs[i] / divisor
    if best >= start_loss:
        return lrs[0], (
            f"no rate from {lrs[0]:.2g} to {lrs[-1]:.2g} lowered the probe loss "
            f"({start_loss:.3g}): chose the lowest, {lrs[0]:.2g}"
        )
    edge = " (the largest rate tried: the best may lie above it)" if i == len(lrs) - 1 else ""
    return lr, (
        f"the probe loss fell from {start_loss:.3g} to its best, {best:.3g}, at lr "
        f"{lrs[i]:.2g}{edge}; peak lr = {lrs[i]:.2g} / {divisor:g} = {lr:.2g}"
    )


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` kept off the accelerator (full fine-tuning's copy would add the
    model's size to the peak); a sharded (DTensor) one stays where it is, 1/N of it."""
    t = t.detach()
    return t.clone() if hasattr(t, "to_local") else t.to("cpu", copy=True)


@contextlib.contextmanager
def restored(tensors: dict[str, torch.Tensor], devices: list[torch.device]) -> Iterator[None]:
    """Run the block, then put ``tensors`` (the trainable state) and the RNG states back."""
    saved = {name: _keep(t) for name, t in tensors.items()}
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(saved[name])


@torch.no_grad()
def probe_loss(parallel, batches: Sequence[dict[str, torch.Tensor]], autocast) -> float:
    """Mean target loss of ``batches`` in eval mode, through ``parallel.module`` (the run's
    :class:`~.parallel.StepLoss` as its processes wrap it: under FSDP2 its forward gathers
    the shards). Summed over the processes, which all probe the same batches: every
    process reads the same number, so all stop and choose together (none can leave the
    test a step before the others and wait alone in a collective)."""
    step = parallel.module
    was = step.training
    step.train(False)
    total, count = None, 0
    try:
        for b in batches:
            with autocast():
                loss, _ = step(b)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        step.train(was)
    assert total is not None, "an empty probe"
    return float(parallel.sum(total)) / (max(count, 1) * parallel.world)


def search_lr(
    *,
    parallel,
    params: list[nn.Parameter],
    make_optimizer: Callable[[float], torch.optim.Optimizer],
    step_data: Callable[[int], tuple[list[dict[str, torch.Tensor]], int]],
    probe: Sequence[dict[str, torch.Tensor]],
    state: dict[str, torch.Tensor],
    device: torch.device,
    autocast=contextlib.nullcontext,
    max_grad_norm: float = 1.0,
    default_lr: float,
    steps: int = SEARCH_STEPS,
    span: float = SPAN,
    divisor: float = DIVISOR,
    progress: bool = False,
    after_step: Callable[[], object] | None = None,
) -> LRSearch:
    """Run the range test; the model's ``state`` tensors are restored afterwards.

    ``step_data(i)`` gives this process' micro-batches of training step ``i`` and the
    step's target tokens over all processes (as the trainer's
    loop has them); ``probe`` holds the same few examples on every process, so every
    process measures the same losses and chooses the same rate. ``after_step`` runs
    after each step (the trainer drains the method's per-step metrics there).
    """
    t0 = time.perf_counter()
    lrs = rates(default_lr / span, default_lr * span, steps)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="lr range test", unit="step", dynamic_ncols=True)
    with restored(state, [device]):
        start = probe_loss(parallel, probe, autocast)
        best = start
        optimizer = make_optimizer(lrs[0])
        for i, lr in enumerate(lrs):
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches, targets = step_data(i)
            try:
                accumulate_gradients(
                    parallel,
                    params,
                    batches,
                    device,
                    autocast,
                    max_grad_norm,
                    targets=targets,
                )
                optimizer.step()
                loss = probe_loss(parallel, probe, autocast)
            except NonFiniteError:
                loss = math.inf
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(loss if math.isfinite(loss) else math.inf)
            if bar:
                bar.set_postfix({"lr": f"{lr:.2g}", "probe": f"{loss:.3f}"}, refresh=False)
                bar.update(1)
            best = min(best, loss)
            if not math.isfinite(loss) or (loss > DIVERGED * best and loss > start):
                break
        del optimizer
    if bar:
        bar.close()
    lrs = lrs[: len(losses)]
    chosen, reason = choose(lrs, losses, start, divisor=divisor)
    return LRSearch(
        lrs=lrs,
        losses=losses,
        start_loss=start,
        chosen=chosen,
        reason=reason,
        steps=len(losses),
        seconds=round(time.perf_counter() - t0, 2),
        settings={"span": span, "divisor": divisor, "max_steps": steps},
    )
