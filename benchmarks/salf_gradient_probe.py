"""Does a per-layer gradient signal tell a task that tolerates freezing from one that
does not? (A probe beside SALF's logit lens, issue 18.)

For each bundled task: the loss gradient of every decoder layer's weight matrices, summed
over the first 64 training examples (batches of 8, fp32, the pretrained model), and per
freeze-below k the share of the gradient's squared norm in the layers below k, the first
order share of a gradient step's loss decrease that freezing them gives up.

    python benchmarks/salf_gradient_probe.py --model default
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import TASKS  # benchmarks/, the script's folder


def squared_grad_norms(model, tokenizer, data: str, examples: int, batch: int) -> list[float]:
    from slimtune.data import collate, load_dataset
    from slimtune.model.anatomy import decoder_layers

    model.zero_grad(set_to_none=True)
    chosen = list(load_dataset(data, tokenizer).examples)[:examples]
    for i in range(0, len(chosen), batch):
        b = collate(chosen[i : i + batch], tokenizer.pad_token_id or 0)
        model(**b).loss.backward()
    return [
        sum(float(p.grad.pow(2).sum()) for p in layer.parameters() if p.grad is not None)
        for layer in decoder_layers(model)
    ]


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--every", type=int, default=3, help="print every N-th freeze-below")
    args = ap.parse_args()

    from slimtune.model.anatomy import decoder_layers
    from slimtune.model.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model.float()
    for p in model.parameters():  # the decoder layers' matrices only, as LoRA would adapt
        p.requires_grad_(False)
    for layer in decoder_layers(model):
        for p in layer.parameters():
            p.requires_grad_(p.dim() == 2)
    print(f"{args.model}: share of the squared gradient norm below freeze-below k")
    for task, (data, _, _) in TASKS.items():
        g2 = squared_grad_norms(model, loaded.tokenizer, data, args.examples, 8)
        total = sum(g2)
        below = [sum(g2[:k]) / total for k in range(0, len(g2), args.every)]
        cells = ", ".join(f"{k * args.every}: {100 * b:.0f}%" for k, b in enumerate(below))
        print(f"  {task}: {cells}")


if __name__ == "__main__":
    main()
