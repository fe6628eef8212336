"""The fused inference kernel of routed expert adapters: its tile plan (plain torch) and,
under Triton's CPU interpreter, its output against the gathered path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.methods.experts.cuda_kernel import BLOCK_M, SMALL_BATCH, plan_tiles


def _routing(n: int, experts: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(n)])
    gates = torch.rand(n, k, generator=gen)
    return chosen, gates / gates.sum(1, keepdim=True)


def test_tiles_cover_every_routed_token_once_and_share_their_experts():
    chosen, gates = _routing(700, experts=8, k=2)
    kept = (
        torch.arange(1000)[torch.randperm(1000, generator=torch.Generator().manual_seed(1)) < 700]
        .sort()
        .values
    )  # 700 routed rows of 1000 (padding left out)
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
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
    }
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "kernel_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in results:  # an old Triton next to a new NumPy; CI installs a recent Triton
        pytest.skip(results["skip"])
    # prefill (tiles by expert set, padding not routed), decode (a token per tile),
    # k=3 with a rank that is no power of two, k=1, fp16
    assert set(results) == {"prefill", "decode", "k3_rank5", "k1", "fp16"}
    for name, r in results.items():
        assert r["kernel_calls"] == 7 * r["layers"], name  # every adapted linear ran it
        assert r["adapter_effect"] > 0.1, name  # the experts change the logits...
        # ...as the gathered path does (fp32 to rounding; fp16 to its precision)
        assert r["max_diff"] < (1e-4 if name != "fp16" else 1e-2 * r["scale"]), (name, r)


def test_a_kernel_that_fails_to_compile_falls_back_to_the_gathered_path(monkeypatch):
    from slimtune.methods.experts import cuda_kernel as expert_kernel
    from slimtune.methods.experts import layer as X

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(X, "FUSED_KERNEL", False)
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # the grouped path

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new for this driver")

    monkeypatch.setattr(X, "FUSED_KERNEL", True)
    monkeypatch.setattr(expert_kernel, "supports", lambda *a: True)  # the CUDA kernel's turn
    monkeypatch.setattr(expert_kernel, "add_routed_lowrank", broken)
    with pytest.warns(UserWarning, match="PTX too new"), torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert X.FUSED_KERNEL is False  # warned once, then off for the process


def _count_calls(monkeypatch, module) -> list:
    calls = []
    kernel = module.add_routed_lowrank

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, "add_routed_lowrank", counted)
    return calls


def test_every_cpu_path_gives_the_same_logits(monkeypatch):
    """The fused C kernel (CPU inference), the grouped GEMM by expert set (what CUDA training
    runs) and by expert, the per-expert in-place loop, and the autograd loop (CPU training)
    all compute the same adapter."""
    from slimtune.methods.experts import attached
    from slimtune.methods.experts import cpu_kernel as expert_cpu
    from slimtune.methods.experts import layer as X

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (4, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding: not routed
    routers = attached(model).routers.values()
    calls = _count_calls(monkeypatch, expert_cpu)
    outs = {}
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:  # the kernel splits rows over OpenMP threads (make test's workers run one each)
            torch.set_num_threads(2)
            outs["c kernel"] = model(input_ids=ids, attention_mask=mask).logits
            torch.set_num_threads(1)
            outs["c kernel, one thread"] = model(input_ids=ids, attention_mask=mask).logits
        finally:
            torch.set_num_threads(threads)
        assert len(calls) == 2 * 4 * 7 and expert_cpu.library() is not None
        monkeypatch.setattr(X, "FUSED_KERNEL", False)
        monkeypatch.setattr(X, "EXPERT_SET_DEVICES", {"cpu"})  # the CUDA training path's math
        outs["by set"] = model(input_ids=ids, attention_mask=mask).logits
        assert all(r.current.expert_sets(4) is not None for r in routers)  # 6 sets, 223 rows
        monkeypatch.setattr(X, "EXPERT_SET_DEVICES", set())
        outs["by expert"] = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(X, "GROUPED_MM", False)
        outs["loop"] = model(input_ids=ids, attention_mask=mask).logits
    outs["autograd"] = model(input_ids=ids, attention_mask=mask).logits.detach()
    assert len(calls) == 2 * 4 * 7  # only the first two passes ran the kernel
    base = _with_experts(experts=4, top_k=2)[0]
    attached(base).remove()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (outs["c kernel"] - plain)[keep].abs().max() > 0.1  # the experts do something
    for name, other in outs.items():
        assert torch.allclose(outs["c kernel"][keep], other[keep], atol=1e-5), name


def test_c_kernel_decodes_like_a_full_forward(monkeypatch):
    """One token at a time with a KV cache (rows of one: no expert-set sorting) gives the
    full forward's last logits."""
    from slimtune.methods.experts import cpu_kernel as expert_cpu

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(2))
    calls = _count_calls(monkeypatch, expert_cpu)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(
            input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True
        ).logits
    assert len(calls) == 3 * 4 * 7
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5)


def test_without_a_compiler_the_cpu_kernel_warns_and_the_grouped_path_runs(monkeypatch, tmp_path):
    from slimtune.methods.experts import cpu_kernel as expert_cpu
    from slimtune.methods.experts import layer as X

    from .test_experts import _with_experts

    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(X, "FUSED_KERNEL", False)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    monkeypatch.setattr(X, "FUSED_KERNEL", True)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    expert_cpu.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"), torch.no_grad():
            got = model(input_ids=ids).logits
        assert torch.equal(got, expected)
        assert not (tmp_path / "cache" / "kernels").exists() or not any(
            (tmp_path / "cache" / "kernels").iterdir()
        )  # nothing half-written left behind
    finally:
        expert_cpu.library.cache_clear()
