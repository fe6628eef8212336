"""Does a packaged model compute the same on this machine's GPU as on its CPU, and as on
another machine? Prints, per device: a digest of the loaded weights, the base model's loss
on the first training batches and on the task's test split, all in fp32. Run it on two
machines and compare the lines (issue 18: Gemma 3 trained with sparse scored ~5 points lower
on a GPU than on the CPU, in fp32 as in bf16). With ``--train METHOD`` it also trains
``--steps`` steps in fp32 on each device and compares the step losses and the deltas' tensors
with the first device's: where they part is where a device's path computes differently.

    python benchmarks/device_parity.py --model gemma3-270m --devices cpu,cuda
    python benchmarks/device_parity.py --devices cpu,cuda --train sparse --lr 2e-4 --steps 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import TASKS  # benchmarks/, the script's folder


def weight_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter's fp32 bytes (the same weights give the same hash
    on any machine)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--train", help="methods to train on each device and compare: sparse,lora")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="runs/device_parity")
    args = ap.parse_args()

    from slimtune.data import collate, load_dataset
    from slimtune.eval.evaluate import eval_loss
    from slimtune.model.loading import load_model
    from slimtune.training.loss import target_loss

    data, eval_data, _ = TASKS[args.task]
    trained: dict[str, dict[str, dict]] = {}  # method -> device -> delta tensors
    methods = args.train.split(",") if args.train else []
    for device in args.devices.split(","):
        loaded = load_model(args.model, device=device, dtype="fp32")
        tok, model = loaded.tokenizer, loaded.model
        train = load_dataset(data, tok).examples
        test = load_dataset(eval_data, tok).examples
        losses = []
        with torch.no_grad():
            for b in range(args.batches):
                batch = {
                    k: v.to(device)
                    for k, v in collate(train[8 * b : 8 * b + 8], tok.pad_token_id).items()
                }
                loss, n = target_loss(model, batch)
                losses.append(round(float(loss) / n, 5))
        row = {
            "device": device,
            "torch": torch.__version__,
            "weights": weight_digest(model),
            "attn": getattr(model.config, "_attn_implementation", None),
            "train_batch_loss": losses,
            "test_loss": round(eval_loss(model, test, tok.pad_token_id)["loss"], 5),
        }
        print(json.dumps(row), flush=True)
        for i, method in enumerate(methods):
            if i:  # a method trains the base it is given: the next one needs a fresh one
                loaded = load_model(args.model, device=device, dtype="fp32")
            runs = trained.setdefault(method, {})
            key = device if device not in runs else f"{device}#{len(runs) + 1}"
            runs[key] = train_on(loaded, device, method, args)
        del model, loaded
    for method, runs in trained.items():
        compare(method, runs)


def train_on(loaded, device: str, method: str, args) -> dict:
    """``args.steps`` fp32 steps of ``method`` on ``device``: the step losses and the
    delta's tensors (on the CPU)."""
    from safetensors.torch import load_file

    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    data, _, _ = TASKS[args.task]
    cfg = TrainConfig(
        model=args.model, data=data, method=method, lr=args.lr, max_steps=args.steps,
        device=device, precision="fp32", eval_fraction=0.0, seed=0, progress=False,
        save_every=0, overwrite=True, output_dir=str(Path(args.out) / f"{method}-{device}"),
    )  # fmt: skip
    result = train(cfg, loaded)
    tensors = {}
    for f in sorted(result.delta_dir.glob("*.safetensors")):
        tensors.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    losses = [round(h["loss"], 5) for h in result.history if "loss" in h]
    print(json.dumps({"device": device, "method": method, "step_loss": losses}), flush=True)
    return tensors


def compare(method: str, trained: dict[str, dict]) -> None:
    """Each device's delta against the first's: tensors that differ in shape or content
    (integers exactly; floats by their largest difference relative to the tensor's size)."""
    if len(trained) < 2:
        return
    (ref_dev, ref), *others = trained.items()
    for device, tensors in others:
        rows = []
        for name, a in ref.items():
            b = tensors.get(name)
            if b is None or b.shape != a.shape:
                rows.append((float("inf"), name))
            elif not a.is_floating_point():
                rows.append((float(not torch.equal(a, b)), name))
            else:
                a32, b32 = a.float(), b.float()
                rel = float((a32 - b32).abs().max() / a32.abs().max().clamp(min=1e-12))
                rows.append((rel, name))
        rows.sort(reverse=True)
        print(json.dumps({"method": method, "against": ref_dev, "device": device, "tensors": len(rows),
                          "largest_rel_diff": [(n, round(r, 6)) for r, n in rows[:8]]}))  # fmt: skip


if __name__ == "__main__":
    main()
