"""One optimizer step's arithmetic: the learning-rate schedule, gradient accumulation over
micro-batches, clipping and the finite checks.

Kept apart from the loop so the planner and the benchmarks run exactly the step that
``slimtune train`` runs, without importing the trainer.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .config import TrainConfig
from .loss import target_loss


def warmup_steps(cfg: TrainConfig) -> int:
    """``ceil(warmup_ratio * max_steps)``, at most ``max_steps - 1``: the last step is never
    a warmup step."""
    return min(math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps - 1)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to 0 at ``total``.

    Warmup step ``s`` runs at ``(s + 1) / (warmup + 1)`` of the peak, so no step ever runs
    at lr 0 (a one-step run trains); the cosine part starts at the peak.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteError(ArithmeticError):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what} is {value}")
        self.what, self.value = what, value


def accumulate_gradients(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast=contextlib.nullcontext,
    max_grad_norm: float = 1.0,
    *,
    world: int = 1,
    reduce=None,
    aux_loss=None,
) -> tuple[float, torch.Tensor, int, int]:
    """Forward and backward over the micro-batches of one optimizer step, then clip.

    The loss is normalised by the target tokens of the whole step (all micro-batches, all
    processes). ``aux_loss()``, when given, returns a method's extra loss term of the last
    forward (e.g. router load balancing); it is weighted per micro-batch by that batch's
    target tokens, so it too is a per-token average, and it is not part of the reported
    loss. Returns (summed loss, gradient norm, input tokens, this process' target
    tokens). The benchmarks time exactly this function, so what they measure is what
    ``slimtune train`` runs.
    """
    local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_target = torch.tensor(float(local_targets), device=device)
    if world > 1:
        n_target = reduce(n_target, "sum")
    loss_sum, tokens = 0.0, 0
    for b in batches:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with autocast():
            loss, n_batch = target_loss(model, b)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError("loss", value)
        extra = aux_loss() if aux_loss is not None else None
        if extra is not None:
            loss = loss + extra.float() * n_batch
        (loss * world / n_target).backward()
        loss_sum += value
        tokens += int(b["attention_mask"].sum())
    if world > 1:
        # every process must all-reduce the same tensors: one that a process did not use
        # (no examples in an epoch's short last batch, an expert no token chose) joins with
        # zeros wherever another process has its gradient; one no process used keeps None,
        # as it would in one process
        used = torch.tensor([p.grad is not None for p in params], device=device)
        used = reduce(used.to(torch.int32), "sum").tolist()
        for p, anywhere in zip(params, used):
            if anywhere:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = reduce(grad, "mean")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise NonFiniteError("gradient norm", float(grad_norm))
    return loss_sum, grad_norm, tokens, local_targets


def nonfinite_norm(params: list[nn.Parameter]) -> float | None:
    """The norm of ``params`` if it is NaN/inf (some entry is), else None: one fused
    reduction and one sync per step."""
    norm = torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm([p.detach() for p in params], 2, dtype=torch.float32))
    )
    value = float(norm)
    return None if math.isfinite(value) else value
