"""Where does a task's target become readable? A linear probe per latent space, beside
SALF's logit lens (issue 18: "consider a tuned-lens or linear-probe signal").

The logit lens reads a space through the model's own final norm and head; on Gemma 3 270M
it finds no transition (the fit is degenerate, so ``--freeze auto`` trains every layer).
The probe asks the question directly: a softmax regression from each space's hidden state
(standardised) to the target token, among the targets of the calibration sample, fitted
by L-BFGS on the first half of the target positions and scored (cross-entropy, accuracy)
on the second half. Positions whose target never occurs in the first half are left out.

    python benchmarks/salf_probe.py --model gemma3-270m

Prints, per bundled task: both curves over spaces 0..L (0 = embeddings, l = after layer
l-1), the bounded logistic of ``slimtune.salf.analysis`` fitted to each, and the largest
one-space drop of the probe's loss.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import TASKS  # benchmarks/, the script's folder


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression ``x @ w + b -> y`` with an L2 penalty, by L-BFGS."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_curve(
    hidden: list[torch.Tensor], targets: torch.Tensor, weight_decay: float, iters: int
) -> tuple[list[float], list[float]]:
    """Held-out cross-entropy and accuracy of a linear probe on each space."""
    half = len(targets) // 2
    _, y = torch.unique(targets, return_inverse=True)
    seen = torch.zeros(int(y.max()) + 1, dtype=torch.bool)
    seen[y[:half]] = True
    held = seen[y[half:]]
    losses, accuracies = [], []
    for h in hidden:
        x = h.float()
        x = (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)
        w, b = fit_probe(x[:half], y[:half], len(seen), weight_decay, iters)
        logits = x[half:][held] @ w + b
        losses.append(float(F.cross_entropy(logits, y[half:][held])))
        accuracies.append(float((logits.argmax(-1) == y[half:][held]).float().mean()))
    return losses, accuracies


def describe(name: str, curve: list[float]) -> str:
    from slimtune.salf.analysis import choose_freeze_below, expected_gain, fit_transition

    fit = fit_transition(curve)
    gain = expected_gain(fit, len(curve) - 1)
    return (
        f"  {name} fit: centre {fit['center']:.1f}, width {fit['width']:.2f}, "
        f"degenerate: {fit['degenerate'] or 'no'}; recommended k {choose_freeze_below(gain, 0.999)}"
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()

    from slimtune.data import load_dataset
    from slimtune.model.loading import load_model
    from slimtune.salf.analysis import collect_hidden, layer_statistics

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model.float()
    for task, (data, _, _) in TASKS.items():
        t0 = time.perf_counter()
        dataset = load_dataset(data, loaded.tokenizer)
        hidden, targets = collect_hidden(
            model, dataset, max_examples=args.examples, max_positions=args.positions, progress=False
        )
        lens = [s.loss for s in layer_statistics(model, hidden, targets)]
        probe, accuracy = probe_curve(hidden, targets, args.weight_decay, args.iters)
        drops = [probe[i - 1] - probe[i] for i in range(1, len(probe))]
        steep = max(range(len(drops)), key=drops.__getitem__) + 1
        print(
            f"{args.model}, {task}: {len(targets)} target positions, "
            f"{len(torch.unique(targets))} distinct targets ({time.perf_counter() - t0:.0f} s)"
        )
        print("  logit lens, loss (nats):", " ".join(f"{v:.2f}" for v in lens))
        print("  probe, held-out loss:   ", " ".join(f"{v:.2f}" for v in probe))
        print("  probe, held-out acc.:   ", " ".join(f"{v:.2f}" for v in accuracy))
        print(describe("logit lens", lens))
        print(describe("probe", probe))
        print(f"  probe's steepest drop: into space {steep} ({drops[steep - 1]:.2f} nats)")


if __name__ == "__main__":
    main()
