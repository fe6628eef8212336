"""One optimizer step's arithmetic: the learning-rate schedule, gradient accumulation over
micro-batches, clipping and the finite checks.

Kept apart from the loop so the planner and the benchmarks run exactly the step that
``slimtune train`` runs, without importing the trainer.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import TrainConfig
from .parallel import Parallel, StepLoss, whole


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


# CPython 3.12 starts with a few hundred objects frozen (375 in 3.12.1; 3.11 and 3.13 with
# none). A freeze beyond that was someone else's, and steady_gc leaves it to them.
_INTERPRETER_FROZEN = gc.get_freeze_count() if sys.version_info[:2] == (3, 12) else 0
if _INTERPRETER_FROZEN > 5000:  # more than the interpreter's own: a user froze before import
    _INTERPRETER_FROZEN = 0
_steady_lock = threading.Lock()
_steady_depth = 0


@contextlib.contextmanager
def steady_gc() -> Iterator[None]:
    """Keep Python's full collections off what exists now (the model, the libraries):
    one collection, then ``gc.freeze``, thawed when the outermost use ends, unless the
    heap was frozen by someone else before it.

    A full collection walks every tracked object, about half a million with torch,
    transformers and peft loaded: 0.3 s on a sandbox core. In a small model's GPU step,
    which is host work, that made the longest step of a run 1.8-3.6x its median
    (BENCHMARKS.md, "Python's collector"); in plan's calibration, which collects after
    every mini model, it cost 30 s per calibration on two cores. What the steps create is
    still collected."""
    global _steady_depth
    with _steady_lock:
        thaw = _steady_depth == 0 and gc.get_freeze_count() <= _INTERPRETER_FROZEN
        _steady_depth += 1
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        with _steady_lock:
            _steady_depth -= 1
        if thaw:
            gc.unfreeze()


def adamw(params: Iterable[nn.Parameter] | Iterable[dict], lr: float) -> torch.optim.AdamW:
    """AdamW as ``train`` steps it (the planner's calibration and the range test too).

    Where every trained tensor is a plain CUDA tensor, torch's fused kernel (the
    transformers Trainer's default from torch 2.8): one launch per device and dtype with
    the step counts on the device, where the multi-tensor path computes each parameter's
    bias correction in Python from a CPU step count (about 840 ``.item()`` calls a step
    for LoRA on the default model) and launches a kernel per operation and chunk of
    tensors. A sharded (FSDP2) or CPU run keeps the default. The groups are copied:
    torch writes its defaults into them."""
    groups = [{**g, "params": _as_list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw_fits(tensors) or None)


def _as_list(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def fused_adamw_fits(tensors: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these: floating CUDA tensors, none sharded."""
    sharded = ()
    if torch.distributed.is_available():
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch 2.4
            from torch.distributed._tensor import DTensor

        sharded = (DTensor,)
    return bool(tensors) and all(
        t.is_cuda and t.is_floating_point() and not isinstance(t, sharded) for t in tensors
    )


class NonFiniteError(ArithmeticError):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what} is {value}")
        self.what, self.value = what, value


def accumulate_gradients(
    model: nn.Module | Parallel,
    params: list[nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast=contextlib.nullcontext,
    max_grad_norm: float = 1.0,
    *,
    aux_loss=None,
    targets: int | None = None,
) -> tuple[float, torch.Tensor, int, int]:
    """Forward and backward over the micro-batches of one optimizer step, then clip.

    ``model`` is the model, or with several processes its :class:`Parallel` wrapping
    (DDP or FSDP2; ``aux_loss`` is then part of it). The loss is normalised by the target
    tokens of the whole step (all micro-batches, all processes): ``targets`` when the
    caller knows it (the trainer counts it from the global batch), else summed across the
    processes here. ``aux_loss()``, when given, returns a method's extra loss term of the
    last forward (e.g. router load balancing); it is weighted per micro-batch by that
    batch's target tokens, so it too is a per-token average, and it is not part of the
    reported loss. A batch with ``"ghost": True`` (a process' share of an epoch's short
    last batch, when it has none) runs with no targets and in eval mode: every process
    must run as many forwards and backwards as the others, and this one must change
    nothing. Entries that are not tensors (``example_ids``) stay on the host. Returns
    (summed loss, gradient norm, input tokens, target tokens), all
    processes together, after one wait for the device (every host sync in a step is a
    barrier of all processes). The benchmarks time exactly this function, so what they
    measure is what ``slimtune train`` runs.
    """
    par = model if isinstance(model, Parallel) else Parallel("none", StepLoss(model, aux_loss))
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]  # on the host
    if targets is None:
        n_target = par.sum(torch.tensor(float(sum(counts)), device=device))
    else:
        n_target = torch.tensor(float(targets), device=device)
    scale = par.world / n_target.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    tokens = 0
    for i, (b, n_batch) in enumerate(zip(batches, counts)):
        ghost = bool(b.get("ghost", False))
        if not ghost:
            tokens += int(b["attention_mask"].sum())
        b = {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in b.items()
            if k != "ghost"
        }
        if ghost:  # in eval mode: no dropout draws, no statistics (e.g. expert usage)
            par.module.train(False)
        with autocast():
            loss, extra = par.loss(b, sync=i == len(batches) - 1)
        if ghost:
            par.module.train(True)
        reported = loss.detach().float()  # the target loss: without the auxiliary term
        if extra is not None:
            loss = loss + extra.float() * n_batch
        if ghost:  # the graph of a real batch, gradients of zero
            loss, reported = loss * 0.0, reported * 0.0
        (loss * scale).backward()
        loss_sum += reported
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    totals = par.sum(torch.stack([loss_sum, loss_sum.new_tensor(float(tokens))]))
    # the step's one host read: a NaN on any process ends every one, not only its own
    loss_value, all_tokens, norm = torch.cat([totals, grad_norm.reshape(1).float()]).tolist()
    if not math.isfinite(loss_value):
        raise NonFiniteError("loss", loss_value)
    if not math.isfinite(norm):
        raise NonFiniteError("gradient norm", norm)
    return loss_value, grad_norm, int(all_tokens), int(n_target)
