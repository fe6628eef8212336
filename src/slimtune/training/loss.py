"""The training loss, computed where it is needed and nowhere else.

The output head runs only on positions that have a target token (a classification
completion is 2 tokens of ~60). On many targets, head and cross-entropy run fused, chunk
by chunk: each chunk's logits are turned into the loss *and* its gradients (w.r.t. the
hidden states and, if it trains, the head) at once, then freed. Peak memory holds one
chunk of ``chunk x vocab`` logits instead of ``batch x length x vocab`` fp32 logits, and
nothing is recomputed in backward, which only scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE_INDEX
from ..model.anatomy import backbone_and_head
from ..model.kernels import compute_dtype, fused_linear_cross_entropy_sum

CHUNK_ROWS = 1024


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T, targets_i)``, gradients computed in the forward pass.

    d(sum CE)/d(logits) = softmax(logits) - onehot(target), so per chunk:
    grad_hidden = (softmax - onehot) @ weight and grad_weight += (softmax - onehot).T @ hidden.
    Matmuls run in the autocast dtype when autocast is on (as ``nn.Linear`` would);
    softmax and the loss in fp32.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        dev = hidden.device.type
        dtype = compute_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            grad_h = (
                torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
            )
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if need_w
                else None
            )
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk]
                # one fused pass from the matmul's output to fp32 log-probabilities
                logp = torch.log_softmax(h @ w.t(), dim=-1, dtype=torch.float32)
                total -= logp.gather(1, t[:, None]).sum()
                if need_h or need_w:
                    probs = logp.exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    g = probs.to(dtype)
                    del logp, probs
                    if need_h:
                        grad_h[s : s + chunk] = g @ w
                    if need_w:
                        grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    parts = backbone_and_head(model)
    if parts is None:  # architectures with logit post-processing: the model's own head path
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), n
    backbone, head = parts
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state[:, :-1]
    h, t = hidden[mask], targets[mask]
    if h.shape[0] <= CHUNK_ROWS:
        return _ce_sum(head, h, t), n
    if head.bias is None:
        fused = fused_linear_cross_entropy_sum(h, head.weight, t)  # Liger's, on CUDA
        if fused is not None:
            return fused, n
        return ChunkedLinearCrossEntropy.apply(h, head.weight, t, CHUNK_ROWS), n
    total = h.new_zeros((), dtype=torch.float32)  # rare: a head with a bias
    for s in range(0, h.shape[0], CHUNK_ROWS):
        hs, ts = h[s : s + CHUNK_ROWS], t[s : s + CHUNK_ROWS]
        total = total + checkpoint(_ce_sum, head, hs, ts, use_reentrant=False)
    return total, n
