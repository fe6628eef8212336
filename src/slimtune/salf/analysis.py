"""SALF: where in the network fine-tuning pays off.

An L-layer model has L+1 latent spaces (the embeddings and each layer's output). On a
calibration sample of the user's own data, each space's hidden state at the positions that
predict a target token is decoded through the model's own final norm and output head
(the logit lens), giving per space ``l``:

* ``loss``: cross-entropy of the target tokens read at ``l`` (the *deviation* from the
  ground truth's semantics, in nats);
* ``kl_to_final``: KL(p_final || p_l), how far ``l``'s vocabulary distribution is from the
  model's output (0 at the last space);
* ``transition``: KL(p_l || p_{l-1}), how far layer ``l`` moves the distribution;
* ``top1_agreement``: how often ``l``'s top token is the model's final top token;
* ``cosine_deviation``: 1 - cos(normed hidden state, output-embedding row of the target).

The gain model (slimtune's reading of SALF's scaling-law step, stated so it can be checked).
Through the logit lens, intermediate spaces of a small model are often *further* from the
target than the embeddings' next layer (the trace rises, then falls steeply near the top),
so the deviation still to be removed above space ``l`` is taken as the envelope
``R_l = max_{j >= l} D_j`` over spaces 1..L (space 0, the token embedding itself, is left
out). ``R`` is fitted over depth by a logistic descent
``R(l) = R_end + (R_start - R_end) / (1 + exp((l - c) / w))``, bounded to the data (``R_start``
and ``R_end`` inside the measured range, ``c`` inside 1..L): the *semantic transition* is
centred at layer ``c`` with width ``w``. Training the layers above an end-of-freezing layer
``k`` can reshape the part of the transition that happens above ``k``, so the expected
quality gain of freezing below ``k``, relative to training every layer, is
``G(k) = (R(k) - R(L)) / (R(1) - R(L))`` on the fitted curve (``G(0) = 1``). The recommended
``freeze_below`` is the deepest ``k`` whose ``G(k)`` keeps at least ``keep`` of the gain: the
onset of the transition (``keep`` 0.999 is about ``c - 7 w``). ``DEFAULT_KEEP`` was set from a
measurement, not derived: on the default model and the bundled task, three seeds on a GPU
(BENCHMARKS.md, SALF validation) put freeze-below 10 within a point of training every layer
and 13 and deeper beyond it. A fit that locates no transition (:func:`degenerate_fit`) gives
no recommendation: every layer is trained, and the reason says why.

Only forward passes under ``torch.no_grad()`` run; hidden states are reduced to the target
positions inside forward hooks, so the model is never copied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, Dataset, collate
from ..errors import UserInputError
from ..model.anatomy import base_model, decoder_layers, final_norm

DEFAULT_KEEP = 0.999


@dataclass
class LayerStats:
    space: int  # 0 = embeddings, l = output of decoder layer l-1
    loss: float
    kl_to_final: float
    transition: float
    top1_agreement: float
    cosine_deviation: float


@dataclass
class Analysis:
    num_layers: int
    positions: int
    spaces: list[LayerStats]
    fit: dict  # D_start, D_end, center, width, rmse
    gain: list[float]  # G(k) for k = 0..L (k = freeze-below value)
    freeze_below: int  # the recommended end-of-freezing layer: layers 0..k-1 are frozen
    keep: float
    reason: str
    costs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _target_positions(batch: dict[str, torch.Tensor], limit: int) -> torch.Tensor:
    """Boolean mask [B, T] of positions whose next token is a target."""
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    if int(mask.sum()) > limit:  # keep the first ``limit`` in reading order
        keep = mask.flatten().nonzero().squeeze(1)[:limit]
        mask = torch.zeros_like(mask).flatten()
        mask[keep] = True
        mask = mask.view_as(batch["labels"])
    return mask


@torch.no_grad()
def collect_hidden(
    model: nn.Module,
    dataset: Dataset,
    *,
    max_examples: int = 64,
    max_positions: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states of every latent space at target positions: (L+1 x [n, d], targets [n])."""
    model.eval()
    layers = decoder_layers(model)
    emb = base_model(model).get_input_embeddings()
    dev = next(model.parameters()).device
    pad = 0
    examples = dataset.examples[:max_examples]
    per_space: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    targets: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}

    def grab(space: int):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            per_space[space].append(h[current["mask"]].float().cpu())

        return hook

    hooks = [emb.register_forward_hook(grab(0))]
    hooks += [layer.register_forward_hook(grab(i + 1)) for i, layer in enumerate(layers)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="analyze", unit="ex", dynamic_ncols=True)
    try:
        taken = 0
        for s in range(0, len(examples), batch_size):
            if taken >= max_positions:
                break
            batch = collate(examples[s : s + batch_size], pad)
            mask = _target_positions(batch, max_positions - taken)
            taken += int(mask.sum())
            current["mask"] = mask.to(dev)
            nxt = torch.zeros_like(batch["labels"])
            nxt[:, :-1] = batch["labels"][:, 1:]
            targets.append(nxt[mask])
            base_model(model).model(
                input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["attention_mask"].to(dev),
                use_cache=False,
            )
            if bar:
                bar.update(len(examples[s : s + batch_size]))
    finally:
        for h in hooks:
            h.remove()
        if bar:
            bar.close()
    if not targets or sum(len(t) for t in targets) == 0:
        raise UserInputError(f"{dataset.path}: no target tokens to analyze")
    return [torch.cat(p) for p in per_space], torch.cat(targets)


@torch.no_grad()
def layer_statistics(
    model: nn.Module, hidden: list[torch.Tensor], targets: torch.Tensor, chunk: int = 256
) -> list[LayerStats]:
    """Logit-lens statistics of each latent space (see the module docstring)."""
    norm = final_norm(base_model(model))
    if norm is None:
        raise UserInputError(
            f"{type(base_model(model)).__name__}: no final norm found; the "
            "logit-lens analysis needs one"
        )
    head = base_model(model).get_output_embeddings()
    dev = head.weight.device
    wdtype = head.weight.dtype
    out_emb = head.weight.float()
    L = len(hidden) - 1
    n = len(targets)

    def logp_of(space: int, s: int) -> torch.Tensor:
        h = hidden[space][s : s + chunk].to(dev, wdtype)
        return torch.log_softmax(head(norm(h)).float(), -1)

    sums = np.zeros((L + 1, 5))  # loss, kl_final, transition, top1, cosine
    for s in range(0, n, chunk):
        t = targets[s : s + chunk].to(dev)
        final = logp_of(L, s)
        final_top = final.argmax(-1)
        prev = None
        for space in range(L + 1):
            lp = final if space == L else logp_of(space, s)
            sums[space, 0] += float(-lp.gather(1, t[:, None]).sum())
            sums[space, 1] += float((final.exp() * (final - lp)).sum())
            if prev is not None:
                sums[space, 2] += float((lp.exp() * (lp - prev)).sum())
            sums[space, 3] += float((lp.argmax(-1) == final_top).sum())
            hn = norm(hidden[space][s : s + chunk].to(dev, wdtype)).float()
            sums[space, 4] += float((1 - F.cosine_similarity(hn, out_emb[t], dim=-1)).sum())
            prev = lp
    avg = sums / n
    return [LayerStats(i, *map(float, avg[i])) for i in range(L + 1)]


def remaining_deviation(deviation: list[float]) -> list[float]:
    """Envelope ``R_l = max_{j >= l} D_j`` (space 0 copies space 1's value)."""
    d = list(deviation)
    out = d[:]
    for i in range(len(d) - 2, 0, -1):
        out[i] = max(d[i], out[i + 1])
    if len(d) > 1:
        out[0] = out[1]
    return out


def _box_lstsq(A: np.ndarray, y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Least squares for two coefficients, each held in ``[lo, hi]``: the problem is
    convex, so the optimum is the unconstrained one when that lies in the box, else it
    lies on an edge (one coefficient at a bound, the other solved and clipped)."""
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    if np.all((coef >= lo) & (coef <= hi)):
        return coef
    best, best_err = None, math.inf
    for i in range(2):
        j = 1 - i
        for bound in (lo, hi):
            c = np.empty(2)
            c[i] = bound
            den = float(A[:, j] @ A[:, j])
            c[j] = np.clip((A[:, j] @ (y - A[:, i] * bound)) / den if den > 0 else lo, lo, hi)
            err = float(np.sum((A @ c - y) ** 2))
            if err < best_err:
                best, best_err = c, err
    return best


def fit_transition(deviation: list[float]) -> dict:
    """Least-squares logistic descent of the remaining deviation over spaces 1..L, bounded
    to the data: start and end values inside the measured range, centre inside 1..L (an
    unbounded fit put its end below zero nats and its centre past the last layer)."""
    r = np.asarray(remaining_deviation(deviation), dtype=float)
    L = len(r) - 1
    x = np.arange(1, L + 1, dtype=float)
    y = r[1:]
    lo, hi = float(y.min()), float(y.max())
    best = None
    # grid over centre and width; R_end/R_start by bounded linear least squares for each
    for c in np.linspace(1.0, float(L), 4 * (L - 1) + 1 if L > 1 else 1):
        for w in np.geomspace(0.25, max(L / 2, 1.0), 40):
            sig = 1.0 / (1.0 + np.exp(np.clip((x - c) / w, -50, 50)))
            A = np.stack([1.0 - sig, sig], 1)  # columns: R_end, R_start
            coef = _box_lstsq(A, y, lo, hi)
            rmse = float(np.sqrt(np.mean((A @ coef - y) ** 2)))
            if best is None or rmse < best[0] - 1e-12:
                best = (rmse, float(c), float(w), float(coef[0]), float(coef[1]))
    rmse, c, w, r_end, r_start = best
    fit = {
        "R_start": r_start,
        "R_end": r_end,
        "center": c,
        "width": w,
        "rmse": rmse,
        "fitted_to": "envelope of the logit-lens target loss over latent spaces 1..L",
    }
    fit["degenerate"] = degenerate_fit(fit, lo, hi, L)
    return fit


def degenerate_fit(fit: dict, lo: float, hi: float, L: int) -> str | None:
    """Why the fit locates no transition worth trusting, or None. Each case was seen on a
    real model or is the limit of one: a flat trace, a transition at an end of the network
    (where the logit lens reads the first layers poorly), one spread over all of it, or a
    curve that does not follow the data."""
    span = hi - lo
    c, w = fit["center"], fit["width"]
    if L < 3:
        return f"{L} layers are too few to locate a transition in"
    if span <= 0.05 * max(abs(hi), 1e-9):
        return f"the target loss hardly changes over depth ({hi:.2f} to {lo:.2f} nats)"
    if c - 1 < max(w, 1.0):
        return f"the fitted transition sits at the first layers (centre {c:.1f}, width {w:.1f})"
    if L - c < max(w, 1.0):
        return f"the fitted transition sits at the last layers (centre {c:.1f} of {L})"
    if 4.4 * w > L / 2:  # the central 80% of the descent covers over half the layers
        return f"the fitted transition spreads over the whole network (width {w:.1f} of {L})"
    if fit["rmse"] > 0.25 * span:
        return (
            f"the logistic follows the trace poorly (rmse {fit['rmse']:.2f} nats on a span of "
            f"{span:.2f})"
        )
    return None


def fitted_curve(fit: dict, L: int) -> np.ndarray:
    x = np.arange(L + 1, dtype=float)
    s = 1.0 / (1.0 + np.exp(np.clip((x - fit["center"]) / fit["width"], -50, 50)))
    return fit["R_end"] + (fit["R_start"] - fit["R_end"]) * s


def expected_gain(fit: dict, L: int) -> list[float]:
    """G(k) for k = 0..L: share of the fitted transition that happens above layer k; with
    no trustworthy transition, every layer equally useful."""
    curve = fitted_curve(fit, L)
    span = curve[min(1, L)] - curve[L]
    if fit.get("degenerate") or not math.isfinite(span) or span <= 1e-9:
        return [1.0 - k / L for k in range(L + 1)]
    gain = [float(np.clip((curve[k] - curve[L]) / span, 0.0, 1.0)) for k in range(L + 1)]
    gain[0] = 1.0
    return gain


def choose_freeze_below(gain: list[float], keep: float) -> int:
    """Deepest k (< L) whose expected gain is still >= keep."""
    L = len(gain) - 1
    ok = [k for k in range(L) if gain[k] >= keep]
    return max(ok) if ok else 0


def recommend(fit: dict, gain: list[float], keep: float) -> tuple[int, str]:
    """The end-of-freezing layer and why; no freezing where the fit is degenerate."""
    L = len(gain) - 1
    k = choose_freeze_below(gain, keep)
    if fit["degenerate"]:
        k = 0
        reason = (
            f"train every layer: the gain model found no transition to cut below "
            f"({fit['degenerate']}); the logit lens reads this model and data poorly"
        )
    elif k > 0:
        reason = (
            f"freeze layers 0-{k - 1} and train {k}-{L - 1}: the fitted semantic "
            f"transition is centred at layer {fit['center']:.1f} (width {fit['width']:.1f}), so "
            f"{100 * gain[k]:.1f}% of the expected gain lies above layer {k}, the deepest "
            f"cut that keeps at least {100 * keep:.1f}%"
        )
    else:
        reason = (
            f"train every layer: less than {100 * keep:.1f}% of the fitted semantic transition "
            f"would remain above any cut"
        )
    return k, reason


def analyze(
    model: nn.Module,
    dataset: Dataset,
    *,
    keep: float = DEFAULT_KEEP,
    max_examples: int = 64,
    max_positions: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> Analysis:
    """Run the SALF analysis on ``dataset`` and recommend an end-of-freezing layer."""
    if not 0.0 < keep <= 1.0:
        raise UserInputError(f"keep must be in (0, 1], got {keep}")
    hidden, targets = collect_hidden(
        model,
        dataset,
        max_examples=max_examples,
        max_positions=max_positions,
        batch_size=batch_size,
        progress=progress,
    )
    spaces = layer_statistics(model, hidden, targets)
    L = len(spaces) - 1
    fit = fit_transition([s.loss for s in spaces])
    gain = expected_gain(fit, L)
    k, reason = recommend(fit, gain, keep)
    return Analysis(L, len(targets), spaces, fit, gain, k, keep, reason)


def plot_analysis(analysis: Analysis, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval.report import save_png

    x = [s.space for s in analysis.spaces]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True)
    ax1.plot(x, [s.loss for s in analysis.spaces], "o-", ms=3, label="target loss (logit lens)")
    ax1.plot(
        x, remaining_deviation([s.loss for s in analysis.spaces]), ":", label="remaining (envelope)"
    )
    ax1.plot(x, fitted_curve(analysis.fit, analysis.num_layers), "--", label="fitted transition")
    ax1.plot(x, [s.kl_to_final for s in analysis.spaces], "s-", ms=3, label="KL to final")
    ax1.axvline(analysis.freeze_below, color="k", lw=0.8, ls=":")
    ax1.set_ylabel("nats")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(x, analysis.gain, "o-", ms=3, color="C3", label="expected gain G(k)")
    ax2.plot(
        x,
        [s.top1_agreement for s in analysis.spaces],
        "^-",
        ms=3,
        color="C2",
        label="top-1 agreement with final",
    )
    ax2.axhline(analysis.keep, color="C3", lw=0.8, ls=":")
    ax2.axvline(
        analysis.freeze_below,
        color="k",
        lw=0.8,
        ls=":",
        label=f"freeze below {analysis.freeze_below}",
    )
    ax2.set_xlabel("latent space (0 = embeddings, l = after layer l-1) / freeze-below k")
    ax2.set_ylim(-0.05, 1.05)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return save_png(fig, path)
