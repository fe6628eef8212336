"""Routed expert adapters: conditional computation, gradients, balancing, delta round trip."""

import contextlib
import itertools
import json

import pytest
import torch

from slimtune.cli.app import main
from slimtune.delta import apply_delta
from slimtune.errors import UserInputError
from slimtune.methods import get_method
from slimtune.methods.experts import ExpertRouter, attached, load_balancing_loss
from slimtune.model.loading import fingerprint, load_model
from slimtune.testing import tiny_llama, tiny_tokenizer

from .conftest import count_calls, train_tiny


def _with_experts(experts=4, top_k=2, rank=4, layers=(0, 1, 2, 3), seed=0, b_scale=0.5):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=4, seed=seed)
    get_method("experts", {"experts": experts, "top_k": top_k, "rank": rank}).prepare(
        model, list(layers)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero (the adapter starts as the identity); wake it up
        for lin in attached(model).linears.values():
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=gen) * b_scale)
    return model, len(tok)


def _chosen(router: ExpertRouter, n_tokens: int) -> list[set[int]]:
    """The experts each flat token ran in the router's last pass."""
    sets = [set() for _ in range(n_tokens)]
    start = 0
    for e, c in enumerate(router.current.counts):
        for t in router.current.tokens[start : start + c].tolist():
            sets[t].add(e)
        start += c
    return sets


def test_a_token_only_depends_on_its_top_k_experts():
    model, vocab = _with_experts(experts=4, top_k=2)
    model.eval()
    # 12 one-token sequences: no attention between tokens, so a token's logits can only
    # change through the experts it ran itself, in some layer
    ids = torch.randint(0, vocab, (12, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits[:, -1]
    routers = attached(model).routers
    records = {}  # layer -> the experts each token ran there

    def recorder(i):
        def hook(module, args, kwargs, output):
            records[i] = _chosen(routers[i], 12)

        return hook

    handles = [
        model.model.layers[i].register_forward_hook(recorder(i), with_kwargs=True) for i in routers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    chosen = {
        t: {(layer, e) for layer, sets in records.items() for e in sets[t]} for t in range(12)
    }
    layer, expert = (
        3,
        next(
            e
            for e in range(4)
            if any((3, e) not in chosen[t] for t in range(12))
            and any((3, e) in chosen[t] for t in range(12))
        ),
    )
    with torch.no_grad():
        for key, lin in attached(model).linears.items():
            if key.startswith(f"{layer}."):
                lin.lora_A[expert] += 1.0
                lin.lora_B[expert] += 1.0
        after = model(input_ids=ids).logits[:, -1]
    for t in range(12):
        same = torch.allclose(before[t], after[t], atol=1e-6, rtol=0)
        assert same == ((layer, expert) not in chosen[t]), t


def test_gradients_reach_only_the_chosen_experts_and_the_router():
    model, vocab = _with_experts(experts=8, top_k=2, layers=(2,))
    ids = torch.randint(0, vocab, (1, 2), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids).logits
    router = attached(model).routers[2]
    ran = {e for e, c in enumerate(router.current.counts) if c}
    assert len(ran) <= 4  # 2 tokens x top-2
    assert ran == set(router.current.chosen.flatten().tolist())
    # the first token's query meets one key, whose softmax weight is 1 whatever the query:
    # q_proj's experts get gradient only through the second token
    ran_second = set(router.current.chosen[1].tolist())
    out.pow(2).mean().backward()
    for key, lin in attached(model).linears.items():
        expect = ran_second if key.endswith("q_proj") else ran
        for e in range(8):
            for grad in (lin.lora_A.grad[e], lin.lora_B.grad[e]):
                # "none" up to the attention backward's last-bit residue
                assert bool(grad.abs().sum() > 1e-9) == (e in expect), (key, e)
        assert lin.base_layer.weight.grad is None
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.2." not in n)


def _set_dispatch(model, dispatch: str) -> None:
    for lin in attached(model).linears.values():
        lin.dispatch = dispatch


def test_dense_training_gives_the_routed_outputs_and_gradients():
    """The dense path runs every expert and gates the unchosen ones to zero: the same sum, the
    same gradients (zero for experts no token chose), padding rows untouched."""
    results = {}
    for dispatch in ("routed", "dense"):
        model, vocab = _with_experts(experts=8, top_k=2, rank=4, layers=(1, 3))
        _set_dispatch(model, dispatch)
        ids = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[0, :1] = 0  # left padding: that row is not routed
        out = model(input_ids=ids, attention_mask=mask).logits
        out.pow(2).mean().backward()
        att = attached(model)
        results[dispatch] = (
            out.detach(),
            {k: (lin.lora_A.grad, lin.lora_B.grad) for k, lin in att.linears.items()},
            {i: r.weight.grad for i, r in att.routers.items()},
        )
    (out_r, lin_r, rt_r), (out_d, lin_d, rt_d) = results["routed"], results["dense"]
    torch.testing.assert_close(out_d, out_r, rtol=1e-5, atol=1e-5)
    unchosen = 0
    for key, (ga, gb) in lin_r.items():
        torch.testing.assert_close(lin_d[key][0], ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lin_d[key][1], gb, rtol=1e-4, atol=1e-6)
        unchosen += int((ga.flatten(1).abs().sum(1) == 0).sum())
    assert unchosen > 0  # some expert got no token, and no gradient from the dense path either
    for i, g in rt_r.items():
        torch.testing.assert_close(rt_d[i], g, rtol=1e-4, atol=1e-6)


def _dense_step(model, vocab, autocast: bool):
    """One forward and backward of a padded batch: the output and every trainable gradient."""
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask).logits
    loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()
    aux = [r.last_aux for r in attached(model).routers.values()]
    (loss + 10 * torch.stack(aux).sum()).backward()  # the balancing loss' gradient too
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach().float(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fused_model():
    """Experts on layers 1 and 3 on the dense path, of a trained size (B ~ 0.05: bf16's
    rounding stays a rounding), routers centred as on calibration data."""
    model, vocab = _with_experts(experts=8, top_k=2, rank=4, layers=(1, 3), b_scale=0.05)
    _set_dispatch(model, "dense")
    gen = torch.Generator().manual_seed(4)
    for router in attached(model).routers.values():
        router.center.copy_(torch.randn(router.center.shape, generator=gen) * 0.3)
    return model, vocab, get_method("experts", {"experts": 8, "top_k": 2, "rank": 4})


def _assert_same_step(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_dense_path_gives_the_plain_dense_paths_outputs_and_gradients(monkeypatch):
    """Under the method's compute context each adapted linear runs one autograd function on
    copies of the experts and each router one for its gates and balancing loss (``fused.py``):
    the same sum and the same gradients for the experts, the routers and the layers below
    (through the routers' input; fp32: to rounding). Under bf16 autocast it is as
    close to the fp32 result as the plain path under autocast is, and the master weights and
    their gradients stay fp32."""
    from slimtune.methods.experts import fused

    calls = count_calls(monkeypatch, fused.DenseExpertsFunction, fused.DenseRouteFunction)
    model, vocab, method = _fused_model()
    plain, plain_bf16 = _dense_step(model, vocab, False), _dense_step(model, vocab, True)
    assert not calls
    with method.compute_context(model):
        fused_run, fused_bf16 = _dense_step(model, vocab, False), _dense_step(model, vocab, True)
    att = attached(model)
    assert calls.count("DenseExpertsFunction") == 2 * len(att.linears)
    assert calls.count("DenseRouteFunction") == 2 * len(att.routers)
    assert all(
        fused.FUSED not in m.__dict__ for m in [*att.linears.values(), *att.routers.values()]
    )
    _assert_same_step(fused_run, plain)
    assert fused_bf16[1].keys() == plain[1].keys()
    assert any(".expert_router." in n for n in plain[1])
    assert _relative(fused_bf16[0], plain[0]) < 1.5 * _relative(plain_bf16[0], plain[0]) + 1e-3
    for name, g in plain[1].items():
        assert fused_bf16[1][name].dtype == torch.float32
        bf16_error = _relative(fused_bf16[1][name], g)
        assert bf16_error < 1.5 * _relative(plain_bf16[1][name], g) + 5e-3, name
        assert bf16_error < 0.05, name


def test_the_fused_path_under_gradient_checkpointing_gives_the_plain_gradients():
    """With checkpointing the layer's forward runs again in backward without its hooks, so
    without the router: the recomputed linears must still reach the router's gradient."""
    model, vocab, method = _fused_model()
    want = _dense_step(model, vocab, False)
    model.gradient_checkpointing_enable()
    model.train()
    with method.compute_context(model):
        got = _dense_step(model, vocab, False)
    _assert_same_step(got, want)


def test_a_routed_linear_behind_a_fused_router_still_trains_the_router():
    """The fused router's gates (``Routing.weights``) carry gradient too: a linear that
    reads them (the routed path) gives the router the plain path's gradient."""
    model, vocab, method = _fused_model()
    with method.compute_context(model):
        # switched after the context chose the routers for the dense path
        next(iter(attached(model).linears.values())).dispatch = "routed"
        got = _dense_step(model, vocab, False)
    want = _dense_step(model, vocab, False)  # the same dispatch, the plain path
    _assert_same_step(got, want)
    assert any(".expert_router." in n and bool(g.abs().sum() > 0) for n, g in got[1].items())


def test_the_fused_path_follows_experts_given_new_storage():
    """``lora_B.data = ...`` inside the block gives the parameter new storage at the same
    version: the copies must be made again from it, as the plain path reads it."""
    model, vocab, method = _fused_model()
    with method.compute_context(model):
        _dense_step(model, vocab, False)  # the copies exist
        gen = torch.Generator().manual_seed(9)
        for lin in attached(model).linears.values():
            lin.lora_B.data = torch.randn(lin.lora_B.shape, generator=gen) * 0.05
        got = _dense_step(model, vocab, False)
    _assert_same_step(got, _dense_step(model, vocab, False))


@pytest.mark.parametrize("fused_adamw", [False, True])
def test_the_fused_dense_path_follows_every_optimizer_step(fused_adamw, monkeypatch):
    """The copies are made ahead, once per step: after each AdamW step (fused AdamW writes
    without bumping the parameters' versions) and after an in-place write, the fused path
    computes with the new weights, as the plain path does."""
    from slimtune.methods.experts.fused import DenseExpertsFunction

    def train(fused: bool):
        model, vocab = _with_experts(experts=4, top_k=2, rank=4, layers=(0, 2))
        _set_dispatch(model, "dense")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.05, fused=fused_adamw)
        ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(2))
        context = get_method("experts", {"experts": 4, "rank": 4}).compute_context(model)
        losses = []
        with context if fused else contextlib.nullcontext():
            for _ in range(3):
                loss = model(input_ids=ids).logits.square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            with torch.no_grad():  # an in-place write outside the optimizer
                next(iter(attached(model).linears.values())).lora_B.mul_(-1.0)
            loss = model(input_ids=ids).logits.square().mean()
            loss.backward()  # a step with gradients: the fused path
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    ref_losses, ref_weights = train(False)
    calls = count_calls(monkeypatch, DenseExpertsFunction)
    losses, weights = train(True)
    assert len(calls) == 4 * 14  # four steps, 2 layers x 7 linears: the fused path ran
    # each step and the write change the loss by far more than the paths' rounding
    assert all(abs(b - a) > 1e-3 * abs(a) for a, b in itertools.pairwise(ref_losses)), ref_losses
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, w in ref_weights.items():
        # Adam divides by the gradients' size: rounding moves tiny ones' updates
        torch.testing.assert_close(weights[name], w, rtol=1e-3, atol=1e-4)


def test_the_training_loss_routes_the_tokens_of_its_own_batch():
    """The loss runs the decoder stack without the model's forward: the routers must still
    see this batch's padding, not the mask of the batch before (here: one with a padded
    row of the same shape, which would leave a real token unrouted)."""
    from slimtune.training.loss import target_loss

    model, vocab = _with_experts(experts=4, top_k=2)
    router = attached(model).routers[0]
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[0, :2] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=padded)  # an earlier batch: 10 real tokens
    full = torch.ones_like(ids)
    target_loss(model, {"input_ids": ids, "attention_mask": full, "labels": ids})
    assert int(router.current.counts_t.sum()) == 12 * 2  # every token, top 2 each
    padded_batch = {"input_ids": ids, "attention_mask": padded, "labels": ids}
    target_loss(model, padded_batch)
    assert int(router.current.counts_t.sum()) == 10 * 2


def test_dense_dispatch_is_chosen_on_cuda_for_narrow_experts_only():
    model, _ = _with_experts(experts=8, top_k=2, rank=4, layers=(0,))
    lin = next(iter(attached(model).linears.values()))
    x = torch.zeros(2, 4)
    assert not lin.trains_densely(x)  # auto: routed off CUDA
    lin.dispatch = "dense"
    assert lin.trains_densely(x)
    lin.dispatch = "routed"
    assert not lin.trains_densely(x)
    with pytest.raises(UserInputError, match="dispatch"):
        get_method("experts", {"dispatch": "dense-ish"})


def test_balancing_loss_is_lowest_for_uniform_routing():
    e, k, n = 8, 2, 4096
    gen = torch.Generator().manual_seed(0)

    def loss_at(bias: float) -> float:
        logits = torch.randn(n, e, generator=gen)
        logits[:, 0] += bias  # expert 0 is favoured more and more
        probs = torch.softmax(logits, -1)
        return float(load_balancing_loss(probs, probs.topk(k, -1).indices, e))

    uniform = torch.full((n, e), 1.0 / e)
    round_robin = torch.arange(n * k).reshape(n, k) % e
    assert float(load_balancing_loss(uniform, round_robin, e)) == pytest.approx(1.0)
    losses = [loss_at(b) for b in (0.0, 1.0, 2.0, 4.0, 8.0)]
    assert losses[0] > 1.0 - 1e-6
    assert all(a < b for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] > 3.0  # nearly every token sends a slot to expert 0
    # its gradient pushes the favoured expert's probability down
    logits = torch.randn(n, e, generator=gen)
    logits[:, 0] += 2.0
    logits.requires_grad_(True)
    probs = torch.softmax(logits, -1)
    load_balancing_loss(probs, probs.topk(k, -1).indices, e).backward()
    assert logits.grad[:, 0].sum() > 0


def test_training_experts_lowers_the_loss_and_reports_usage(tiny_dir, intent_file, tmp_path):
    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "run",
        method="experts",
        max_steps=12,
        freeze_below=2,
        method_options={"experts": 4, "top_k": 2, "rank": 4},
    )
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25
    # E * sum f_e P_e: 1 for uniform routing, at most E (4); top-k routing makes it about
    # 1 or more (the chosen experts are the likelier ones), though one batch may dip below
    assert all("balance_loss" in h and 0.95 <= h["balance_loss"] <= 4 for h in res.history)
    s = res.summary
    # experts only above the freeze point, and usage counted per routing slot
    assert sorted(s["expert_usage"]) == ["2", "3"]
    assert res.manifest["layers"] == [2, 3] and res.manifest["mergeable"] is False
    slots = [sum(v) for v in s["expert_usage"].values()]
    assert slots[0] == slots[1] > 0
    assert s["active_params_per_token"] < s["adapter_params"] == s["trainable_params"]
    names = [n for n, _ in res.model.named_parameters() if "lora_" in n or "router" in n]
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)


def test_the_logged_loss_leaves_out_the_balancing_term(tiny_dir, intent_file, tmp_path):
    """The router's balancing loss trains the router but is not part of the reported
    loss: the first step (before any update) logs the same loss whatever its weight."""
    first = []
    for aux in (0.0, 10.0):
        res = train_tiny(
            tiny_dir,
            intent_file,
            tmp_path / f"aux{aux}",
            method="experts",
            max_steps=1,
            method_options={"experts": 4, "top_k": 2, "rank": 4, "aux_weight": aux},
        )
        first.append(res.history[0]["loss"])
    assert first[0] == pytest.approx(first[1], rel=1e-6)


def test_experts_delta_round_trips_and_comes_off_bit_for_bit(tiny_dir, intent_file, tmp_path):
    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "run",
        method="experts",
        max_steps=4,
        method_options={"experts": 4, "top_k": 2, "rank": 4},
    )
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    res.model.eval()
    with torch.no_grad():
        trained = res.model(input_ids=ids).logits
    fresh = load_model(str(tiny_dir))
    original = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    applied = apply_delta(fresh.model, res.delta_dir, fingerprint(fresh.model))
    assert applied.merged is False
    applied.model.eval()
    with torch.no_grad():
        assert torch.equal(applied.model(input_ids=ids).logits, trained)
    usage = attached(applied.model).routers[0].usage.tolist()
    assert usage == res.summary["expert_usage"]["0"]
    base = applied.remove()
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(base.model.layers[0], "expert_router")
    state = base.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


@pytest.mark.parametrize("damage", ["shape", "missing", "no-layers"])
def test_experts_delta_with_wrong_tensors_is_refused_and_leaves_the_model(
    tiny_dir, intent_file, tmp_path, damage
):
    from safetensors.torch import load_file, save_file

    from slimtune.delta.format import MANIFEST
    from slimtune.errors import DeltaError
    from slimtune.fileio import sha256_file

    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "run",
        method="experts",
        max_steps=2,
        method_options={"experts": 4, "top_k": 2, "rank": 4},
    )
    path = res.delta_dir / "experts.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_A"))
    if damage == "shape":
        tensors[key] = tensors[key][:3]
        expected = key.replace(".", r"\.") + ".*shape"
    elif damage == "no-layers":  # null reads as "not recorded": refused, not a TypeError
        expected = "records no 'layers'"
    else:
        del tensors[key]
        expected = "do not match the manifest.*missing.*" + key.replace(".", r"\.")
    save_file(tensors, str(path))
    manifest = json.loads((res.delta_dir / MANIFEST).read_text())
    if damage == "no-layers":
        manifest["layers"] = None
    manifest["files"]["experts.safetensors"] = {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    (res.delta_dir / MANIFEST).write_text(json.dumps(manifest))
    fresh = load_model(str(tiny_dir))
    with pytest.raises(DeltaError, match=expected):
        apply_delta(fresh.model, res.delta_dir, fingerprint(fresh.model))
    assert type(fresh.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "_slimtune_experts" not in fresh.model.__dict__


@pytest.mark.parametrize(
    "options",
    [
        {"experts": 4, "top_k": 5},
        {"experts": 0},
        {"rank": 0},
        {"aux_weight": -1.0},
        {"routers": 2},
        {"calibration_batches": -1},
        {"dispatch": "sometimes"},
    ],
)
def test_bad_expert_options_are_refused(options):
    with pytest.raises(UserInputError):
        get_method("experts", options)


def test_cli_train_experts_writes_the_usage_heat_map_and_refuses_merging(
    tiny_dir, intent_file, tmp_path, capsys
):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--method",
            "experts",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--expert-rank",
            "2",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--output-dir",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "expert usage" in text and "active adapter params/token" in text
    assert (out / "expert_usage.png").stat().st_size > 1000
    version = text.split("stored as ")[1].split()[0]
    rc = main(
        ["delta", "apply", version, "--model", str(tiny_dir), "--out", str(tmp_path / "merged")]
    )
    assert rc == 5 and "routed per token" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    rc = main(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--method",
            "experts",
            "--experts",
            "2",
            "--top-k",
            "3",
            "--output-dir",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "top_k" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resumed_experts_run_matches_the_uninterrupted_one(tiny_dir, intent_file, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    opts = dict(
        method="experts",
        max_steps=6,
        save_every=3,
        keep_checkpoint=True,
        method_options={"experts": 4, "top_k": 2, "rank": 4},
    )
    whole = train_tiny(tiny_dir, intent_file, tmp_path / "run", **opts)
    a = load_file(str(whole.delta_dir / "experts.safetensors"))
    # as if killed after the step-3 checkpoint: drop what came later, resume
    shutil.rmtree(whole.delta_dir)
    capsys.readouterr()
    resumed = train_tiny(tiny_dir, intent_file, tmp_path / "run", resume=True, **opts)
    assert "at step 3" in capsys.readouterr().err
    assert resumed.history[0]["step"] == 1 and len(resumed.history) == 6
    b = load_file(str(resumed.delta_dir / "experts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("usage") and a[k].sum() > 0 for k in a)


def test_routers_are_centered_on_the_mean_normalised_input_of_the_data():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=4)
    ids = torch.randint(0, len(tok), (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # padding is not part of the mean
    seen = []
    hook = model.model.layers[2].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    h = seen[0][mask.bool()]
    expected = (h / h.pow(2).mean(-1, keepdim=True).sqrt()).mean(0)
    get_method("experts", {"experts": 4, "calibration_batches": 1}).prepare(
        model, [2, 3], batches=lambda n: [{"input_ids": ids, "attention_mask": mask}][:n]
    )
    router = attached(model).routers[2]
    assert torch.allclose(router.center, expected, rtol=1e-3, atol=1e-5)  # rms has an eps
    assert router.usage.sum() == 0  # calibration is not training
    # without data there is nothing to center on
    model2 = tiny_llama(len(tok), layers=4)
    get_method("experts", {"experts": 4}).prepare(model2, [2])
    assert torch.count_nonzero(attached(model2).routers[2].center) == 0
