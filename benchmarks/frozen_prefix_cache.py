"""What caching the frozen layers' output would buy once a run sees its data again (a probe).

With layers 0..k-1 frozen, their output at the cut is the same for an example in every
epoch (a frozen base layer has no dropout; its input is the same), so a run over its data
more than once could compute it once and start each later step at layer k. This probe
measured that before ``train --cache-frozen`` did it (salf/frozen_cache.py, which skips
the frozen layers in place rather than shortening the layer list; benchmarks/
frozen_cache_train.py and bench_methods.py's ``+cached`` rows measure it). This times one LoRA step of the default model three ways, in rounds taken in
turn: every layer trained; layers 0..k-1 frozen (what ``--freeze-below k`` runs now: they
run forward without autograd); and the same step started at the cut from its hidden states
given as ``inputs_embeds`` to the top layers alone (the cached step, a Llama-style model's
forward over a shortened layer list). The batch is random tokens of one shape; the loss is
on the last ``--targets`` positions only, as `slimtune train` computes the head on the
completion's rows alone; the step is the plain forward, backward and AdamW.

    python benchmarks/frozen_prefix_cache.py --freeze-below 10,13 --batch 8 --seq 68
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from slimtune import load_model
from slimtune.methods import get_method
from slimtune.model.anatomy import decoder_layers
from slimtune.salf.freezing import freeze_below


@contextlib.contextmanager
def top_layers_only(model: torch.nn.Module, k: int) -> Iterator[None]:
    """The model's forward runs decoder layers k.. only (its input is then the cut's state)."""
    layers = decoder_layers(model)
    full = layers._modules
    layers._modules = OrderedDict((str(i), m) for i, m in enumerate(list(full.values())[k:]))
    try:
        yield
    finally:
        layers._modules = full


def time_step(k: int, cached: bool, args, ids: torch.Tensor) -> tuple[float, float]:
    """Median seconds of ``args.steps`` steps after two, in a fresh model; and, cached, how
    far the logits started at the cut are from the whole forward's (0 for the others)."""
    torch.manual_seed(0)
    model = load_model("default").model
    n = len(decoder_layers(model))
    opts = {"r": 8, "alpha": 16, "dropout": 0.0}
    model = get_method("lora", opts).prepare(model, list(range(k, n)))
    freeze_below(model, k)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    targets = ids[:, -args.targets :].roll(1, dims=0)  # any tokens: only the time counts
    opt = torch.optim.AdamW(params, lr=1e-4)
    cut, gap = None, 0.0
    if cached:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                output_hidden_states=True,
                logits_to_keep=args.targets,
                use_cache=False,
            )
            cut = out.hidden_states[k]
            with top_layers_only(model, k):
                again = model(inputs_embeds=cut, logits_to_keep=args.targets, use_cache=False)
            gap = (again.logits - out.logits).abs().max().item()
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        if cut is None:
            logits = model(input_ids=ids, logits_to_keep=args.targets, use_cache=False).logits
        else:
            with top_layers_only(model, k):
                logits = model(
                    inputs_embeds=cut, logits_to_keep=args.targets, use_cache=False
                ).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--freeze-below", default="10,13")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=68, help="the bundled task's typical width")
    ap.add_argument("--targets", type=int, default=4, help="positions the loss is on")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ks = [k for k in (int(x) for x in args.freeze_below.split(",")) if k > 0]
    ids = torch.randint(
        0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    runs = [(0, False)] + [(k, c) for k in ks for c in (False, True)]
    seen: dict[tuple[int, bool], list[float]] = {r: [] for r in runs}
    gaps = []
    for _ in range(args.rounds):
        for k, cached in runs:
            t, gap = time_step(k, cached, args, ids)
            seen[(k, cached)].append(t)
            gaps.append(gap)
    base = statistics.median(seen[(0, False)])
    print(
        f"default model, LoRA r8, batch {args.batch} x {args.seq}, loss on the last "
        f"{args.targets} positions, {torch.get_num_threads()} threads"
    )
    print(
        "| freeze-below | bottom layers | step (s), median of the rounds | each round | vs every layer |"
    )
    print("|---|---|---|---|---|")
    for k, cached in runs:
        t = statistics.median(seen[(k, cached)])
        how = "-" if k == 0 else ("cached (not run)" if cached else "run without autograd")
        each = ", ".join(f"{x:.3f}" for x in seen[(k, cached)])
        print(f"| {k} | {how} | {t:.3f} | {each} | {t / base:.2f}x |")
    print(f"\nlogits started at the cut against the whole forward's: at most {max(gaps):.1e} apart")


if __name__ == "__main__":
    main()
