"""SALF analysis, the cost model and the budget policy."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from slimtune.data import load_dataset
from slimtune.errors import UserInputError
from slimtune.options import parse_duration, parse_size
from slimtune.salf.analysis import (
    analyze,
    choose_freeze_below,
    expected_gain,
    fit_transition,
    recommend,
    remaining_deviation,
)
from slimtune.salf.plan import (
    Estimate,
    LayerCosts,
    budget_freeze_below,
    calibrate,
    estimate,
    make_plan,
    synthetic_batch,
)

from .conftest import train_tiny


def test_analysis_shapes_and_final_layer_identities(tiny, intent_file):
    ds = load_dataset(intent_file, tiny.tokenizer)
    a = analyze(tiny.model, ds, progress=False, max_examples=16)
    L = tiny.num_layers
    assert len(a.spaces) == L + 1 and len(a.gain) == L + 1
    assert [s.space for s in a.spaces] == list(range(L + 1))
    last = a.spaces[-1]
    assert last.kl_to_final == pytest.approx(0.0, abs=1e-5)
    assert last.top1_agreement == 1.0
    assert a.spaces[0].transition == 0.0
    assert all(s.kl_to_final >= -1e-6 and s.transition >= -1e-6 for s in a.spaces)
    assert a.positions == sum(e.num_target_tokens for e in ds.examples[:16])
    assert a.gain[0] == 1.0 and a.gain[-1] == 0.0
    assert all(x >= y - 1e-9 for x, y in zip(a.gain, a.gain[1:]))
    assert 0 <= a.freeze_below < L and a.reason
    json.dumps(a.to_dict())


def test_final_space_loss_is_the_models_own_loss(tiny, intent_file):
    from slimtune.eval.evaluate import eval_loss

    ds = load_dataset(intent_file, tiny.tokenizer)
    a = analyze(tiny.model, ds, progress=False, max_examples=8)
    direct = eval_loss(tiny.model, ds.examples[:8], tiny.tokenizer.pad_token_id)
    assert a.spaces[-1].loss == pytest.approx(direct["loss"], rel=1e-4)


def test_fit_recovers_a_logistic_transition():
    L = 30
    x = np.arange(L + 1)
    trace = 5 + 40 / (1 + np.exp((x - 24) / 2.0))
    fit = fit_transition(list(trace))
    assert fit["center"] == pytest.approx(24, abs=0.5)
    assert fit["width"] == pytest.approx(2.0, rel=0.2)
    gain = expected_gain(fit, L)
    k = choose_freeze_below(gain, 0.9)
    assert gain[k] >= 0.9 > gain[k + 1]
    assert 15 <= k < 24


# the default model's logit-lens trace on the bundled task (`slimtune analyze`): flat, rising
# through the middle, then a steep fall in the top layers with the steepest at the last one
DEFAULT_MODEL_TRACE = [102.9, 28.8, 36.7, 34.8, 34.0, 33.0, 33.8, 33.9, 36.8, 44.4, 45.0, 46.8,
                       45.8, 41.9, 41.6, 44.1, 48.2, 45.4, 45.8, 45.5, 41.6, 43.0, 44.8, 43.6,
                       39.6, 31.2, 28.8, 27.6, 24.2, 22.0, 8.7]  # fmt: skip


def test_fit_stays_inside_the_data_and_recommends_the_transitions_onset():
    envelope = remaining_deviation(DEFAULT_MODEL_TRACE)[1:]
    fit = fit_transition(DEFAULT_MODEL_TRACE)
    L = len(DEFAULT_MODEL_TRACE) - 1
    # unbounded, this trace gave a centre past layer 29 and an end value of -19 nats
    assert min(envelope) - 1e-6 <= fit["R_end"] <= fit["R_start"] <= max(envelope) + 1e-6
    assert 1 <= fit["center"] <= L - 1 and fit["degenerate"] is None
    k, reason = recommend(fit, expected_gain(fit, L), 0.999)
    assert 0 < k < fit["center"] - 3 * fit["width"] and f"train {k}-{L - 1}" in reason


def test_recommendation_moves_with_the_transition():
    L = 30
    x = np.arange(L + 1)
    ks = []
    for centre in (12, 18, 24):
        fit = fit_transition(list(4 + 40 / (1 + np.exp((x - centre) / 1.5))))
        assert fit["center"] == pytest.approx(centre, abs=0.5) and fit["degenerate"] is None
        ks.append(recommend(fit, expected_gain(fit, L), 0.999)[0])
    assert ks[0] < ks[1] < ks[2] and ks[2] - ks[0] == pytest.approx(12, abs=2)


@pytest.mark.parametrize(
    ("trace", "why"),
    [
        ([50.0] + [20.0 + 0.01 * (i % 2) for i in range(18)], "hardly changes"),
        # another architecture's trace (18 layers): the fall is all in the first layer
        ([300, 134, 32, 28, 25, 22, 20, 19, 18, 16, 15, 14, 13, 12, 11, 10, 9, 8.5, 8], "first"),
        (list(40 - 1.5 * np.arange(25)), "whole network"),
        # all of the fall in the last layer: a cut below it would freeze almost everything
        ([60.0] + [40.0] * 23 + [5.0], "last layers"),
    ],
)
def test_a_degenerate_fit_trains_every_layer_and_says_why(trace, why):
    fit = fit_transition(trace)
    assert why in fit["degenerate"]
    L = len(trace) - 1
    gain = expected_gain(fit, L)
    assert gain == pytest.approx([1 - k / L for k in range(L + 1)])
    k, reason = recommend(fit, gain, 0.9)  # a low keep would otherwise pick a cut
    assert k == 0 and "train every layer" in reason and why in reason


def test_remaining_deviation_is_a_non_increasing_envelope():
    r = remaining_deviation([100.0, 30, 40, 35, 20, 25, 5])
    assert r == [40, 40, 40, 35, 25, 25, 5]


def _costs(**kw) -> LayerCosts:
    base = dict(
        method="lora",
        options={},
        num_layers=10,
        t_fixed=0.5,
        t_frozen=0.1,
        t_trained=0.3,
        t_embeddings=0.0,
        state_bytes_per_layer=100,
        grad_bytes_per_layer=50,
        activation_bytes_per_layer=1000,
        embedding_train_bytes=0,
        transient_bytes=500,
        resident_bytes=10_000,
        trainable_per_layer=25,
        trainable_embeddings=0,
        flops_forward_per_layer=1e9,
        flops_backward_per_trained_layer=1e9,
    )
    base.update(kw)
    return LayerCosts(**base)


@pytest.mark.parametrize("seed", range(20))
def test_budget_policy_never_exceeds_its_budget(seed):
    rng = np.random.default_rng(seed)
    costs = _costs(
        t_trained=float(rng.uniform(0.05, 1)), activation_bytes_per_layer=int(rng.integers(1, 5000))
    )
    memory = int(rng.integers(10_000, 70_000))
    step = float(rng.uniform(0.5, 5))
    k = budget_freeze_below(costs, memory=memory, step_time=step)
    if k is None:
        top = estimate(costs, costs.num_layers - 1)
        assert top.peak_bytes > memory or top.step_time_s > step
        return
    e = estimate(costs, k)
    assert e.peak_bytes <= memory and e.step_time_s <= step
    if k > 0:  # one more layer would not fit: the budget is spent, deepest-first
        more = estimate(costs, k - 1)
        assert more.peak_bytes > memory or more.step_time_s > step


def test_plan_choice_fits_and_estimates_are_monotone(tiny):
    batch = synthetic_batch(len(tiny.tokenizer), 2, 32)
    costs = calibrate(tiny.model, "lora", {"r": 4}, batch, steps=1)
    ests = [estimate(costs, k) for k in range(tiny.num_layers)]
    assert all(a.peak_bytes >= b.peak_bytes for a, b in itertools.pairwise(ests))
    assert all(a.trainable_params > b.trainable_params for a, b in itertools.pairwise(ests))
    from torch import nn

    from slimtune.model.anatomy import decoder_layers

    linears = [m for m in decoder_layers(tiny.model)[0].modules() if isinstance(m, nn.Linear)]
    assert costs.trainable_per_layer == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert costs.activation_bytes_per_layer > 0
    gain = [1.0, 0.8, 0.5, 0.2, 0.0]
    budget = int(ests[0].peak_bytes * 1.2)
    plan = make_plan(
        tiny.model,
        batch,
        gain,
        candidates=[("lora", {"r": 4})],
        budget_memory=budget,
        recommended_freeze_below=2,
    )
    assert isinstance(plan.choice, Estimate) and plan.choice.peak_bytes <= budget
    assert all(c.fits == (c.peak_bytes <= budget) for c in plan.candidates)
    assert plan.choice.freeze_below == 0  # everything fits: the highest gain wins
    none = make_plan(tiny.model, batch, gain, candidates=[("lora", {"r": 4})], budget_memory=1)
    assert none.choice is None and "nothing fits the budget" in none.reason


def test_plan_per_device_memory_under_ddp_and_fsdp(tiny):
    """DDP: each device holds what one process does. FSDP2: the weights, gradients and
    AdamW state shrink with the devices, down to what is gathered whole (two layers and
    the embeddings/head); only shardable methods are costed."""
    batch = synthetic_batch(len(tiny.tokenizer), 2, 32)
    costs = calibrate(tiny.model, "full", {}, batch, steps=1)
    one = estimate(costs, 0)
    assert estimate(costs, 0, devices=4).peak_bytes == one.peak_bytes
    two, four = (estimate(costs, 0, devices=n, fsdp=True) for n in (2, 4))
    assert one.peak_bytes > two.peak_bytes > four.peak_bytes
    assert (two.devices, two.fsdp, one.fsdp) == (2, True, False)
    weights = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    assert costs.weight_bytes == weights
    # sharding 4 ways instead of 2 saves a quarter of the weights and AdamW states, and
    # of the gradients where they, not the activations, set the peak; no more
    states = costs.num_layers * costs.state_bytes_per_layer + 2 * costs.embedding_train_bytes // 3
    grads = costs.num_layers * costs.grad_bytes_per_layer + costs.embedding_train_bytes // 3
    saved = two.peak_bytes - four.peak_bytes
    assert (weights + states) / 4 - 4 <= saved <= (weights + states + 2 * grads) / 4 + 4
    plan = make_plan(
        tiny.model,
        batch,
        [1.0, 0.8, 0.5, 0.2, 0.0],
        candidates=[("lora", {"r": 4}), ("sparse", {"density": 0.05}), ("full", {})],
        devices=2,
        fsdp=True,
    )
    assert {c.method for c in plan.candidates} == {"lora", "full"}  # sparse cannot shard
    assert all(c.devices == 2 and c.fsdp for c in plan.candidates)
    assert "per device of 2 (FSDP2)" in plan.reason


def test_train_freeze_auto_uses_the_analysis(tiny_dir, intent_file, tmp_path):
    res = train_tiny(tiny_dir, intent_file, tmp_path / "r", freeze="auto", max_steps=2)
    auto = res.manifest["auto_freeze"]
    assert res.summary["freeze_below"] == auto["analysis_freeze_below"] == auto["freeze_below"]
    assert res.manifest["layers"] == list(range(auto["freeze_below"], 4))


def test_train_freeze_auto_with_a_budget_stays_within_it(tiny_dir, intent_file, tmp_path):
    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "r",
        freeze="auto",
        max_steps=2,
        budget_step_time="100s",
        budget_memory="100GiB",
    )
    auto = res.manifest["auto_freeze"]
    assert auto["freeze_below"] == 0  # an ample budget unfreezes every layer
    assert auto["estimate"]["step_time_s"] <= 100
    with pytest.raises(UserInputError, match="budget is too small"):
        train_tiny(
            tiny_dir, intent_file, tmp_path / "r2", freeze="auto", max_steps=2, budget_memory="1KiB"
        )
    with pytest.raises(UserInputError, match="need --freeze auto"):
        train_tiny(tiny_dir, intent_file, tmp_path / "r3", budget_memory="1GiB")


def test_sizes_and_durations():
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("512MB") == 512 * 10**6
    assert parse_size("2.5G") == 2_500_000_000
    assert parse_duration("800ms") == pytest.approx(0.8) and parse_duration("2m") == 120
    assert parse_size(6_000_000_000) == 6_000_000_000 and parse_size(None) is None
    # 0 and half a byte meant "no budget", nan and inf crashed, a negative number said
    # "too small" after the model loaded
    for bad in ("lots", "-1GiB", "6 parsecs", "0", 0, 0.5, "nan", "inf", float("nan"), -3, True):
        with pytest.raises(UserInputError, match="cannot read memory size"):
            parse_size(bad)
    for bad in ("soon", 0, "0s", -1.0, "nan", "infs", float("inf"), False):
        with pytest.raises(UserInputError, match="cannot read duration"):
            parse_duration(bad)
    assert math.isclose(parse_duration(1.5), 1.5) and parse_duration(3) == 3.0
    # a train config checks them when it is validated, before anything loads
    from slimtune.training.config import TrainConfig

    for field, value in (("budget_memory", 0), ("budget_step_time", "nan")):
        cfg = TrainConfig(data="a.jsonl", freeze="auto", **{field: value})
        with pytest.raises(UserInputError, match=r"x\.yaml: cannot read"):
            cfg.validated("x.yaml")


def test_default_keep_is_one_value_everywhere():
    from slimtune.cli.app import build_parser
    from slimtune.salf.analysis import DEFAULT_KEEP
    from slimtune.training.config import TrainConfig

    assert TrainConfig().keep == DEFAULT_KEEP
    for cmd in (["analyze", "--data", "x"], ["plan", "--data", "x"]):
        assert build_parser().parse_args(cmd).keep == DEFAULT_KEEP


@pytest.mark.parametrize("method", ["sparse", "rosa"])
def test_plan_costs_importance_scored_methods(tiny, method):
    batch = synthetic_batch(len(tiny.tokenizer), 2, 16)
    costs = calibrate(tiny.model, method, {"density": 0.05, "importance": "fisher"}, batch, steps=1)
    e = estimate(costs, 0)
    assert e.trainable_params >= costs.trainable_per_layer * tiny.num_layers > 0


def test_freeze_auto_keeps_the_seed_in_force_and_records_the_cost_of_each_cut(
    tiny_dir, intent_file, tmp_path
):
    """The cost of each cut is measured on mini models that seed their own RNG; the run's
    own initialisation must still follow --seed."""
    from safetensors.torch import load_file

    runs = [
        train_tiny(tiny_dir, intent_file, tmp_path / f"r{i}", freeze="auto", max_steps=1, seed=s)
        for i, s in enumerate((1, 2, 1))
    ]
    weights = [load_file(str(r.delta_dir / "adapter_model.safetensors")) for r in runs]
    a_keys = [k for k in weights[0] if "lora_A" in k]
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in a_keys)  # same seed
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in a_keys)  # another
    analysis = runs[0].manifest["auto_freeze"]["analysis"]
    assert [c["freeze_below"] for c in analysis["costs"]] == list(range(analysis["num_layers"]))


def test_the_fused_optimizer_step_holds_no_copy_of_the_gradients():
    # gradients outweigh activations here, so the peak is in the optimizer step: the
    # multi-tensor AdamW adds a temporary of their size, the fused one (CUDA) updates in place
    kw = dict(
        grad_bytes_per_layer=5000, state_bytes_per_layer=10_000, activation_bytes_per_layer=10
    )
    multi, fused = _costs(**kw), _costs(**kw, fused_optimizer=True)
    n = 10 - 3
    assert estimate(multi, 3).peak_bytes - estimate(fused, 3).peak_bytes == n * 5000
    # sharded (FSDP2) parameters take the multi-tensor path whatever the calibration ran
    assert estimate(fused, 3, devices=2, fsdp=True).peak_bytes == (
        estimate(multi, 3, devices=2, fsdp=True).peak_bytes
    )
