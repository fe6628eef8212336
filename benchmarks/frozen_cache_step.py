"""`train --cache-frozen`'s step against the uncached one, in one process, in turn.

Whole `train` runs (frozen_cache_train.py) compare processes, and on a shared CPU two
processes' steps drift apart by more than the cache saves at a shallow cut. Here one model
(LoRA above ``--freeze-below``, layers below it frozen) runs the forward and backward of
`train`'s step (``StepLoss``: the backbone, the head on target rows) on the bundled task's
real batches, each batch uncached then served from the cache, alternately, after a pass
that fills the cache. No optimizer step: it is the same for both.

    python benchmarks/frozen_cache_step.py --freeze-below 10 --batches 12 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import TASKS  # benchmarks/, the script's folder

from slimtune import load_model
from slimtune.data import collate, load_dataset
from slimtune.methods import get_method
from slimtune.model.anatomy import decoder_layers
from slimtune.salf.freezing import freeze_below
from slimtune.salf.frozen_cache import FrozenOutputCache
from slimtune.training.parallel import StepLoss


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--freeze-below", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    data = load_dataset(TASKS[args.task][0], loaded.tokenizer, max_length=512)
    k, n = args.freeze_below, len(decoder_layers(loaded.model))
    model = get_method("lora", {"r": 8, "dropout": 0.0}).prepare(loaded.model, list(range(k, n)))
    freeze_below(model, k)
    model.train()
    cache = FrozenOutputCache(model, k)
    cached, uncached = StepLoss(model, frozen_cache=cache), StepLoss(model)
    pad = loaded.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.examples), generator=g).tolist()
    batches = [order[i * args.batch : (i + 1) * args.batch] for i in range(args.batches)]

    def step(run: StepLoss, idx: list[int], named: bool) -> float:
        batch = collate([data.examples[i] for i in idx], pad)
        if named:
            batch["example_ids"] = idx
        t0 = time.perf_counter()
        loss, _ = run(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    fill = [step(cached, idx, True) for idx in batches]
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.rounds):
        for idx in batches:
            times["uncached"].append(step(uncached, idx, False))
            times["cached"].append(step(cached, idx, True))
    assert cache.served == args.rounds * args.batches, cache.summary()
    a, b = statistics.median(times["uncached"]), statistics.median(times["cached"])
    print(
        f"{args.model}, {args.task}, LoRA r8 above freeze-below {k} of {n}, batch "
        f"{args.batch}, {args.batches} batches x {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| frozen layers | forward + backward (s), median | vs run |")
    print("|---|---|---|")
    print(f"| run, filling the cache (first pass) | {statistics.median(fill):.3f} | - |")
    print(f"| run | {a:.3f} | 1.00x |")
    print(f"| skipped, served from the cache | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
