"""Which existing weights to train: importance scores from calibration batches, and top-k.

Scorers (``--importance``):

* ``grad``: accumulated |dL/dW| over the calibration batches;
* ``fisher``: accumulated (dL/dW)^2, the diagonal empirical Fisher;
* ``activation``: |W| x ||x_j||, the weight times the norm of its input feature over the
  calibration tokens (Wanda-style; forward passes only);
* ``random``: uniform random, the control.

On a quantized base the weights take no gradient: the gradient ``g^T x`` of each such layer
is formed from its input and output gradient (hooks), and ``activation`` reads the
dequantized weight.

Selection is per tensor (each tensor gets the same density) or global (one threshold over
all candidate tensors, so some get more than others). The structure is ``entries`` (any
entry of a weight) or ``columns`` (whole input columns: every row of a few columns ``j``,
ranked by the column's summed score, for the cheaper backward of :mod:`.sparse`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import UserInputError
from ..model.quantize import dense_weight, is_quantized, weight_shape
from ..training.loss import target_loss

SCORERS = ("grad", "fisher", "activation", "random")
SELECTIONS = ("per_tensor", "global")
STRUCTURES = ("entries", "columns")


def importance_scores(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    kind: str,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None,
    *,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Scores shaped like each module's weight (fp32, on the weight's device)."""
    if kind not in SCORERS:
        raise UserInputError(f"unknown importance scorer {kind!r}; use one of {', '.join(SCORERS)}")
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return {
            n: torch.rand(weight_shape(m), generator=g).to(m.weight.device)
            for n, m in modules.items()
        }
    if batches is None:
        raise UserInputError(f"importance scorer {kind!r} needs calibration batches")
    scores = {
        n: torch.zeros(weight_shape(m), dtype=torch.float32, device=m.weight.device)
        for n, m in modules.items()
    }
    data = list(batches())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc=f"importance ({kind})", unit="batch", dynamic_ncols=True)
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        if kind == "activation":
            sq = {
                n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
                for n, m in modules.items()
            }

            def hook(name):
                def fn(_m, inputs, _out):
                    x = inputs[0].detach().float()
                    sq[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0)

                return fn

            handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
            try:
                with torch.no_grad():
                    for b in data:
                        target_loss(model, b)
                        if bar:
                            bar.update(1)
            finally:
                for h in handles:
                    h.remove()
            return {
                n: dense_weight(m).detach().float().abs() * sq[n].sqrt()[None, :]
                for n, m in modules.items()
            }
        plain = {n: m for n, m in modules.items() if not is_quantized(m)}
        flags = {n: m.weight.requires_grad for n, m in plain.items()}
        for m in plain.values():
            m.weight.requires_grad_(True)

        def add(name: str, grad: torch.Tensor) -> None:
            scores[name] += grad.float().abs() if kind == "grad" else grad.float().pow(2)

        handles = [
            m.register_forward_hook(_weight_gradient_hook(functools.partial(add, n)))
            for n, m in modules.items()
            if n not in plain
        ]
        try:
            for b in data:
                loss, n_tok = target_loss(model, b)
                (loss / max(n_tok, 1)).backward()
                for n, m in plain.items():
                    grad = m.weight.grad
                    if grad is not None:
                        add(n, grad)
                        m.weight.grad = None
                if bar:
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()
            for n, m in plain.items():
                m.weight.requires_grad_(flags[n])
                m.weight.grad = None
        return scores
    finally:
        model.train(was_training)
        if bar:
            bar.close()


def _weight_gradient_hook(add: Callable[[torch.Tensor], None]):
    """A forward hook handing ``add`` the gradient a layer's weight would get, ``g^T x``,
    once backward reaches its output: for weights that take no gradient (quantized)."""

    def hook(_m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        x = inputs[0].detach()
        if not out.requires_grad:  # nothing below trains: make the output a leaf that does
            out = out.detach().requires_grad_(True)

        def on_grad(g: torch.Tensor) -> None:
            g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            add(g2.t() @ x2)

        out.register_hook(on_grad)
        return out

    return hook


def column_indices(cols: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The flat indices of every entry of the (sorted) input columns ``cols`` of a weight
    of ``shape`` (out, in), row-major: row 0's columns, then row 1's, ... (ascending).
    The order :mod:`.sparse`'s column fast path relies on."""
    rows = torch.arange(shape[0], device=cols.device)
    return (rows[:, None] * shape[1] + cols[None, :]).reshape(-1)


def select_top(
    scores: dict[str, torch.Tensor], density: float, selection: str, structure: str = "entries"
) -> dict[str, torch.Tensor]:
    """Flat indices (int64, sorted) of the selected entries of each tensor."""
    if not 0.0 < density < 1.0:
        raise UserInputError(f"density must be in (0, 1), got {density}")
    if selection not in SELECTIONS:
        raise UserInputError(f"unknown selection {selection!r}; use per_tensor or global")
    if structure not in STRUCTURES:
        raise UserInputError(f"unknown structure {structure!r}; use entries or columns")
    if structure == "columns":
        return _select_columns(scores, density, selection)
    out = {}
    if selection == "per_tensor":
        for n, s in scores.items():
            k = max(1, round(density * s.numel()))
            out[n] = torch.topk(s.flatten(), k, sorted=False).indices.sort().values
        return out
    total = sum(s.numel() for s in scores.values())
    k = max(1, round(density * total))
    flat = torch.cat([s.flatten().to("cpu") for s in scores.values()])
    threshold = torch.topk(flat, k, sorted=False).values.min()
    del flat
    budget = k
    for n, s in scores.items():
        idx = (s.flatten() > threshold).nonzero().squeeze(1)
        out[n] = idx
        budget -= idx.numel()
    for n, s in scores.items():  # ties at the threshold fill the remaining budget in order
        if budget <= 0:
            break
        ties = (s.flatten() == threshold).nonzero().squeeze(1)[:budget]
        out[n] = torch.cat([out[n], ties]).sort().values
        budget -= ties.numel()
    return {n: i.sort().values for n, i in out.items() if i.numel() > 0}


def _select_columns(
    scores: dict[str, torch.Tensor], density: float, selection: str
) -> dict[str, torch.Tensor]:
    """Whole input columns (see :func:`column_indices`). Per tensor: the
    ``round(density * in_features)`` (at least 1) columns with the largest summed score.
    Global: all columns of all tensors ranked by their mean score (the score per trained
    entry; columns of different tensors differ in height), taken in that order while the
    entries taken are fewer than ``round(density * total)``, so the last column may pass
    the budget by less than its height; a tensor with no column taken is left out."""
    if selection == "per_tensor":
        out = {}
        for n, s in scores.items():
            k = max(1, round(density * s.shape[1]))
            cols = torch.topk(s.sum(0), k, sorted=False).indices.sort().values
            out[n] = column_indices(cols, s.shape)
        return out
    budget = max(1, round(density * sum(s.numel() for s in scores.values())))
    means = torch.cat([s.float().mean(0).to("cpu") for s in scores.values()])
    owner = torch.cat([torch.full((s.shape[1],), i) for i, s in enumerate(scores.values())])
    col = torch.cat([torch.arange(s.shape[1]) for s in scores.values()])
    height = torch.tensor([s.shape[0] for s in scores.values()])[owner]
    order = torch.sort(means, descending=True, stable=True).indices  # ties: first tensor first
    before = torch.cumsum(height[order], 0) - height[order]  # entries taken before each column
    taken = order[before < budget]  # a prefix, never empty
    out = {}
    for i, (n, s) in enumerate(scores.items()):
        cols = col[taken[owner[taken] == i]].sort().values
        if cols.numel():
            out[n] = column_indices(cols.to(s.device), s.shape)
    return out
