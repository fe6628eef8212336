"""The fused inference kernel of routed expert adapters: its tile plan (plain torch) and,
under Triton's CPU interpreter, its output against the gathered path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.methods.expert_kernel import BLOCK_M, SMALL_BATCH, plan_tiles


def _routing(n: int, experts: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(n)])
    gates = torch.rand(n, k, generator=gen)
    return chosen, gates / gates.sum(1, keepdim=True)


def test_tiles_cover_every_routed_token_once_and_share_their_experts():
    chosen, gates = _routing(700, experts=8, k=2)
    kept = torch.arange(1000)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))
                              < 700].sort().values  # 700 routed rows of 1000 (padding left out)
    plan = plan_tiles(chosen, gates, kept, experts=8)
    n = len(kept)
    assert sorted(plan.tokens.tolist()) == kept.tolist()  # each routed row once
    # a row's experts and gates travel with it (sorted by expert id)
    row_of = {int(t): i for i, t in enumerate(kept)}
    for pos in range(0, n, 37):
        i = row_of[int(plan.tokens[pos])]
        ids, order = chosen[i].sort()
        assert plan.experts[pos].tolist() == ids.tolist()
        assert torch.allclose(plan.gates[pos], gates[i][order])
    # the rows a tile runs: from its start, at most BLOCK_M, while the expert set holds
    covered = []
    starts = [s for s in plan.tiles.tolist() if s < n]
    for s in starts:
        rows = [p for p in range(s, min(s + BLOCK_M, n)) if plan.keys[p] == plan.keys[s]]
        assert all(plan.experts[p].tolist() == plan.experts[s].tolist() for p in rows)
        covered += rows
    assert sorted(covered) == list(range(n))
    assert len(set(plan.keys.tolist())) <= 28  # C(8, 2) expert sets


def test_small_batches_get_one_token_per_tile():
    chosen, gates = _routing(SMALL_BATCH, experts=4, k=2)
    plan = plan_tiles(chosen, gates, None, experts=4)
    assert plan.tiles.tolist() == list(range(SMALL_BATCH))
    assert len(set(plan.keys.tolist())) == SMALL_BATCH


def test_fused_kernel_gives_the_gathered_paths_logits_under_the_interpreter():
    pytest.importorskip("triton")  # a dev dependency wherever Triton has wheels (CI: Linux)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.run([sys.executable, str(root / "tests" / "kernel_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # prefill (tiles by expert set, padding not routed), decode (a token per tile),
    # k=3 with a rank that is no power of two, k=1, fp16
    assert set(results) == {"prefill", "decode", "k3_rank5", "k1", "fp16"}
    for name, r in results.items():
        assert r["kernel_calls"] == 7 * r["layers"], name  # every adapted linear ran it
        assert r["adapter_effect"] > 0.1, name  # the experts change the logits...
        # ...as the gathered path does (fp32 to rounding; fp16 to its precision)
        assert r["max_diff"] < (1e-4 if name != "fp16" else 1e-2 * r["scale"]), (name, r)


def test_a_kernel_that_fails_to_compile_falls_back_to_the_gathered_path(monkeypatch):
    from slimtune.methods import expert_kernel
    from slimtune.methods import experts as X

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new for this driver")

    monkeypatch.setattr(X, "FUSED_KERNEL", True)
    monkeypatch.setattr(expert_kernel, "supports", lambda *a: True)
    monkeypatch.setattr(expert_kernel, "add_routed_lowrank", broken)
    with pytest.warns(UserWarning, match="PTX too new"), torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert X.FUSED_KERNEL is False  # warned once, then off for the process


def test_every_cpu_path_gives_the_same_logits(monkeypatch):
    """Grouped by expert set (what CUDA training runs), grouped by expert, per-expert
    in-place loop, and the autograd loop (CPU training) all compute the same adapter."""
    from slimtune.methods import experts as X

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (4, 40), generator=torch.Generator().manual_seed(0))
    routers = X.attached(model).routers.values()
    monkeypatch.setattr(X, "EXPERT_SET_DEVICES", {"cpu"})  # the CUDA training path's math
    with torch.no_grad():
        by_set = model(input_ids=ids).logits
        assert all(r.current.expert_sets(4) is not None for r in routers)  # 6 sets, 160 rows
        monkeypatch.setattr(X, "EXPERT_SET_DEVICES", set())
        by_expert = model(input_ids=ids).logits
        monkeypatch.setattr(X, "GROUPED_MM", False)
        looped = model(input_ids=ids).logits
    autograd = model(input_ids=ids).logits  # the experts require grad: the training path
    assert autograd.requires_grad
    base = _with_experts(experts=4, top_k=2)[0]
    X.attached(base).remove()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert (by_set - plain).abs().max() > 0.1  # the experts do something
    for other in (by_expert, looped, autograd.detach()):
        assert torch.allclose(by_set, other, atol=1e-5)
