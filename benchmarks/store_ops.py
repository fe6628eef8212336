"""Apply / remove time and store size of each method's delta on the default model.

Trains every method for a few steps (the tensors' size, not their quality, matters here),
adds each delta to a fresh store, then times on one loaded base: applying it (unmerged
where the method allows, and merged), removing it, and checks that removing restores the
base bit for bit.

    python benchmarks/store_ops.py --steps 2 --out runs/store-ops
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = {
    "lora": {"r": 8},
    "full": {},
    "sparse": {"density": 0.01, "importance": "random"},
    "rosa": {"r": 8, "density": 0.005, "importance": "random"},
    "shira": {"density": 0.01},
    "experts": {"experts": 8, "top_k": 2, "rank": 8},
}


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/store-ops")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    args = ap.parse_args()

    import torch

    from slimtune.delta import DeltaStore, apply_delta
    from slimtune.model.loading import fingerprint, load_model
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    out = Path(args.out)
    store = DeltaStore(out / "store")
    ids = {}
    for m in args.methods.split(","):
        opts = METHODS[m]
        res = train(
            TrainConfig(
                data="builtin:support_intents_train",
                method=m,
                method_options=opts,
                max_steps=args.steps,
                batch_size=4,
                output_dir=str(out / m),
                overwrite=True,
                progress=False,
                save_every=0,
                eval_fraction=0.02,
            )
        )
        ids[m] = store.add(res.delta_dir).id
    base = load_model("default")
    fp = fingerprint(base.model)
    snapshot = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    rows = []
    model = base.model
    for m, vid in ids.items():
        v = store.resolve(vid)
        # a delta that cannot merge (experts: routed per token) is only ever attached
        for merge in (False, True) if v.manifest().get("mergeable", True) else (False,):
            t_apply, t_remove = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                applied = apply_delta(model, v.path, fp, merge=merge, ref=vid)
                t_apply.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model = applied.remove()
                t_remove.append(time.perf_counter() - t0)
            exact = all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
            rows.append(
                {
                    "method": m,
                    "version": vid,
                    "merge": merge or applied.merged,
                    "bytes": v.bytes,
                    "apply_s": statistics.median(t_apply),
                    "remove_s": statistics.median(t_remove),
                    "exact": exact,
                    "trainable": v.manifest()["metrics"]["trainable_params"],
                }
            )
            if applied.merged and not merge:
                break  # full / sparse always merge: one row
    print(
        "| method | trainable params | store size (MiB) | mode | apply (s) | remove (s) "
        "| base restored bit for bit |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['bytes'] / 2**20:.2f} | "
            f"{'merged' if r['merge'] else 'attached'} | {r['apply_s']:.3f} | "
            f"{r['remove_s']:.3f} | {'yes' if r['exact'] else 'NO'} |"
        )
    (out / "store_ops.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
