"""The planner weighs measured quality against cost (issue 18): the typical step beside the
worst case, a prior per method from the benchmarks, and a choice it explains."""

import json

import pytest
import torch

from slimtune.data import Example
from slimtune.errors import UserInputError
from slimtune.model.anatomy import decoder_layers
from slimtune.salf import plan as P
from slimtune.salf.evidence import NEAR_TIE, prior

# relative step cost per method in the fake calibration: sparse (the weakest measured on
# the default model) is the cheapest of the measured ones, so a planner that looked at cost
# alone (as before issue 18) would pick it
COST = {"full": 1.0, "lora": 1.1, "sparse": 0.95, "rosa": 1.4, "dora": 0.9, "shira": 1.05}


@pytest.fixture
def fake_measure(monkeypatch):
    """Calibration without timing noise: a step costs ``COST[method]`` per token-layer, so
    the typical batch's step is shorter than the worst case's by their width ratio."""

    def fake(mini, method, options, n_frozen, batch, device, autocast, steps, emb=False, typ=None):
        layers = len(decoder_layers(mini))
        trained = layers - n_frozen

        def t(b):
            return COST[method] * b["input_ids"].numel() * (0.01 + 1e-4 * (trained + layers))

        return t(batch), 4096, 1000 * trained, t(typ if typ is not None else batch)

    monkeypatch.setattr(P, "_measure", fake)
    monkeypatch.setattr(P, "_resident", lambda device, model=None: 10**9)


def _examples(lengths):
    return [Example(list(range(1, n + 1)), [-100] * (n - 1) + [n]) for n in lengths]


def test_typical_batch_has_the_median_width_of_the_trainers_batches():
    # a long tail: most messages ~20 tokens, one in twenty 300
    lengths = [300 if i % 20 == 0 else 15 + i % 10 for i in range(400)]
    examples = _examples(lengths)
    typical = P.typical_batch(examples, 8, pad_id=0)
    worst = P.calibration_batch(examples, 8, pad_id=0)
    widths = sorted(max(lengths[i] for i in b) for b in P.sampled_batches(400, 8))
    assert typical["input_ids"].shape == (8, widths[(len(widths) - 1) // 2])
    assert worst["input_ids"].shape == (8, 300)
    assert typical["input_ids"].shape[1] < 300  # most batches hold no long message
    # the batches are the trainer's own (seed 0): every example of an epoch once
    first_epoch = P.sampled_batches(400, 8, draws=1)
    assert sorted(i for b in first_epoch for i in b) == list(range(400))


def test_typical_estimate_is_below_the_worst_case_on_a_long_tail(tiny):
    """Real timing on the tiny model: a batch 32x narrower costs clearly less."""
    V = len(tiny.tokenizer)
    worst, typical = P.synthetic_batch(V, 4, 256), P.synthetic_batch(V, 4, 8)
    costs = P.calibrate(tiny.model, "lora", {"r": 4}, worst, steps=1, typical_batch=typical)
    e = P.estimate(costs, 0)
    assert e.step_time_s < e.worst_step_time_s
    assert costs.times("worst").trained == costs.t_trained
    # without a typical batch both are the worst case
    alone = P.calibrate(tiny.model, "lora", {"r": 4}, worst, steps=1)
    assert P.estimate(alone, 0).step_time_s == P.estimate(alone, 0).worst_step_time_s


def test_time_budget_uses_the_typical_step_and_memory_the_worst_case(tiny, fake_measure):
    V = len(tiny.tokenizer)
    worst, typical = P.synthetic_batch(V, 2, 64), P.synthetic_batch(V, 2, 16)
    costs = P.calibrate(tiny.model, "lora", {"r": 4}, worst, steps=1, typical_batch=typical)
    e = P.estimate(costs, 0)
    assert e.step_time_s == pytest.approx(e.worst_step_time_s / 4)  # 16 vs 64 tokens wide
    between = (e.step_time_s + e.worst_step_time_s) / 2
    assert P.budget_freeze_below(costs, step_time=between) == 0
    costs.scale_times(2.0)  # two micro-batches per step: both models double
    assert P.estimate(costs, 0).step_time_s == pytest.approx(2 * e.step_time_s)
    assert P.estimate(costs, 0).worst_step_time_s == pytest.approx(2 * e.worst_step_time_s)


def test_the_cached_step_leaves_out_the_frozen_layers_forward(tiny, fake_measure):
    """What train's default --cache-frozen serves from an example's second epoch: the
    typical step less k frozen layers' forward; nothing frozen or sharded, nothing cached."""
    V = len(tiny.tokenizer)
    worst, typical = P.synthetic_batch(V, 2, 64), P.synthetic_batch(V, 2, 16)
    costs = P.calibrate(tiny.model, "lora", {"r": 4}, worst, steps=1, typical_batch=typical)
    k = 1
    e = P.estimate(costs, k)
    # the fake costs COST x tokens x 1e-4 per frozen layer (twice that per trained one)
    frozen = COST["lora"] * typical["input_ids"].numel() * 1e-4
    assert e.cached_step_time_s == pytest.approx(e.step_time_s - k * frozen, rel=1e-3)
    assert "once the frozen layers' output is cached" in P.describe(e)
    assert P.estimate(costs, 0).cached_step_time_s is None
    assert P.estimate(costs, k, devices=2).cached_step_time_s is None  # train: not by default
    assert P.estimate(costs, k, devices=2, fsdp=True).cached_step_time_s is None


def test_priors_come_from_the_measurements_and_cite_them():
    r8, r16, full, rosa = (
        prior("lora", {"r": 8}, "default"),
        prior("lora", {"r": 16}, "default"),
        prior("full", None, "default"),
        prior("rosa", None, "default"),
    )
    assert r8.relative == 1.0  # the reference
    assert r8.relative < r16.relative
    # full at the rate its default range test lands near (3e-4) is level with LoRA r8
    assert abs(full.relative - r8.relative) < NEAR_TIE
    assert abs(rosa.relative - r8.relative) < NEAR_TIE
    measured = ("sparse", "rosa", "shira", "experts", "full")
    weakest = min(measured, key=lambda m: prior(m, None, "default").relative)
    assert weakest == "sparse" and prior("sparse", None, "default").relative < 1 - NEAR_TIE
    assert prior("lora", {"r": 4}, "default").rows == r8.rows  # an unmeasured rank: nearest
    assert prior("dora") is None
    assert "default support-intents 96.7% vs 96.5% (3 seeds, lr 0.0003)" in full.cite()
    assert "default support-extract 82.1% vs 82.2%" in full.cite()
    # Gemma 3 has rows of its own, at the rates train gives it there (sparse: scaled)
    experts, sparse = prior("experts", None, "gemma3-270m"), prior("sparse", None, "gemma3-270m")
    assert (
        not experts.other_models and experts.relative < prior("experts", None, "default").relative
    )
    assert sparse.lr == 2e-4 and all(r.model == "gemma3-270m" for r in sparse.rows)
    # a model (or a method on a model) measured nowhere gets every model's rows, and says so
    for other in (prior("full", None, "my/model"), prior("full", None, "gemma3-270m")):
        assert other.other_models and "(measured on other models)" in other.cite()
        assert (other.low, other.high, other.relative) == (full.low, full.high, full.relative)


def _plan(tiny, candidates, gain=None, model_name="default", **kw):
    V = len(tiny.tokenizer)
    return P.make_plan(
        tiny.model,
        P.synthetic_batch(V, 2, 64),
        gain or [1.0, 0.8, 0.5, 0.2, 0.0],
        candidates=candidates,
        typical_batch=P.synthetic_batch(V, 2, 16),
        model_name=model_name,
        **kw,
    )


def test_choice_is_not_the_cheapest_method_when_a_better_one_fits(tiny, fake_measure):
    """Issue 18: every candidate trains every layer (G = 1), sparse is the cheapest and the
    lowest in the evidence; the plan picks the best measured method instead."""
    plan = _plan(tiny, [("sparse", {}), ("lora", {"r": 8}), ("lora", {"r": 16, "alpha": 32})])
    choice = plan.choice
    assert (choice.method, choice.options["r"], choice.freeze_below) == ("lora", 16, 0)
    cheapest = min(plan.candidates, key=lambda c: c.step_time_s)
    assert cheapest.method == "sparse" and cheapest is not choice
    lowest = min(plan.candidates, key=lambda c: c.expected_quality)
    assert lowest.method == "sparse" and lowest is not choice
    assert choice.expected_quality == pytest.approx(choice.prior * choice.predicted_gain)
    assert choice.lr == 1e-3
    # the reason weighs quality against cost, names the evidence and says what it is
    assert "quality: expected 1.027 x LoRA r8's score" in plan.reason
    assert "the highest of the candidates that fit" in plan.reason
    assert "the fastest that fits, sparse, every layer trained" in plan.reason
    low = prior("sparse", None, "default").relative
    assert f"the lowest expected: sparse, every layer trained, {low:.3f}" in plan.reason
    assert "evidence for lora r16: default support-intents (CPU) 96.7% vs 94.2%" in plan.reason
    assert "the priors are scores measured on the bundled tasks" in plan.reason
    assert "other models" not in plan.reason
    assert "--lr 0.001" in plan.reason
    # a model with no rows of its own: the same weighing, from the measured model's rows
    other = _plan(tiny, [("sparse", {}), ("lora", {"r": 8})], model_name="my/model")
    assert "other models" in other.reason
    tied = prior("lora", {"r": 8}, "my/model").relative - prior("sparse", None, "my/model").relative
    assert other.choice.method == ("sparse" if tied <= NEAR_TIE else "lora")
    # Gemma 3's own rows: there sparse at its scaled rate is within the evidence's noise of
    # LoRA, so the cheaper of the two is chosen, and the reason says why
    gemma = _plan(tiny, [("sparse", {}), ("lora", {"r": 8})], model_name="gemma3-270m")
    assert "other models" not in gemma.reason
    sparse = next(c for c in gemma.candidates if c.method == "sparse")
    lora = next(c for c in gemma.candidates if c.method == "lora")
    assert lora.prior - NEAR_TIE <= sparse.prior < lora.prior
    assert sparse.step_time_s < lora.step_time_s
    assert gemma.choice is sparse and "(the evidence's noise) of the highest" in gemma.reason
    from slimtune.salf.evidence import EVIDENCE, GEMMA_SWEEP, INTENTS

    own = {r.method: r.score for r in EVIDENCE if (r.source, r.task) == (GEMMA_SWEEP, INTENTS)}
    cited = f"gemma3-270m support-intents {own['sparse']:.1f}% vs {own['lora']:.1f}%"
    assert cited in sparse.evidence


def test_near_ties_go_to_the_shorter_step(tiny, fake_measure):
    """Within the evidence's noise the faster candidate wins: the analysis' freeze-below
    keeps 99.9% of the gain, and RoSA is within a point of LoRA r8 at a longer step."""
    gain = [1.0, 0.999, 0.9, 0.5, 0.0]
    plan = _plan(tiny, [("lora", {"r": 16, "alpha": 32})], gain, recommended_freeze_below=1)
    assert plan.choice.freeze_below == 1  # 0.999 of the gain at a shorter step
    assert "within 1% (the evidence's noise) of the highest, lora r16, every layer" in plan.reason
    both = _plan(tiny, [("rosa", {}), ("lora", {"r": 8})])
    rosa = next(c for c in both.candidates if c.method == "rosa")
    assert rosa.expected_quality > both.choice.expected_quality  # higher, but within noise
    assert both.choice.method == "lora" and both.choice.step_time_s < rosa.step_time_s
    # a memory budget that only frozen candidates fit: the best of those, within it
    lora0 = next(c for c in plan.candidates if c.freeze_below == 0)
    tight = _plan(
        tiny,
        [("full", {}), ("lora", {"r": 16, "alpha": 32})],
        gain,
        recommended_freeze_below=1,
        budget_memory=lora0.peak_bytes - 1,
    )
    assert tight.choice.fits and tight.choice.peak_bytes <= tight.budget_memory


def test_a_method_without_evidence_is_ranked_as_the_weakest(tiny, fake_measure):
    plan = _plan(tiny, [("dora", {"r": 8}), ("lora", {"r": 8})])
    dora = next(c for c in plan.candidates if c.method == "dora" and c.freeze_below == 0)
    assert dora.prior == prior("lora", {"r": 8}, "default").relative
    assert "no evidence" in " ".join(dora.notes)
    assert dora.step_time_s < plan.choice.step_time_s  # cheaper, and tied on quality, but
    assert plan.choice.method == "lora"  # a tie goes to the measured method first


def test_plan_candidates_and_train_command():
    from argparse import Namespace

    from slimtune.cli.salf import plan_candidates, train_command

    assert plan_candidates("full,lora-r16,sparse") == [
        ("full", {}),
        ("lora", {"r": 16, "alpha": 32}),
        ("sparse", {}),
    ]
    for bad in ("lora-rx", "fancy", ","):
        with pytest.raises(UserInputError, match="--methods"):
            plan_candidates(bad)
    e = P.Estimate("lora", {"r": 16, "alpha": 32}, 13, 1, 1.0, 1, 0.0, lr=1e-3)
    args = Namespace(data="builtin:support_intents_train", model="default", batch_size=8)
    assert train_command(args, e) == (
        "slimtune train --data builtin:support_intents_train --method lora --lora-r 16 "
        "--lora-alpha 32 --lr 0.001 --freeze-below 13 --batch-size 8"
    )
    # full fine-tuning: no --lr, its default range test chooses
    full = P.Estimate("full", {}, 0, 1, 1.0, 1, 0.0, lr=3e-4)
    assert train_command(args, full) == (
        "slimtune train --data builtin:support_intents_train --method full --batch-size 8"
    )


def test_cli_plan_shows_typical_and_longest_steps_and_the_evidence(
    tiny_dir, intent_file, tmp_path, capsys, fake_measure
):
    from slimtune.cli.app import main

    out = tmp_path / "plan.json"
    code = main(
        f"plan --data {intent_file} --model {tiny_dir} --device cpu --batch-size 4 "
        f"--max-length 32 --methods lora-r8,lora-r16 --output {out}".split()
    )
    assert code == 0
    text = capsys.readouterr().out
    for column in ("typical step", "longest step", "cached step", "prior", "expected"):
        assert column in text
    assert "the median padded width" in text
    assert (
        "run it: slimtune train" in text
        and "--data" in text
        and "--method lora --lora-r 16" in text
    )
    d = json.loads(out.read_text())
    assert d["choice"]["method"] == "lora" and d["choice"]["lr"] == 1e-3
    assert d["shapes"]["typical"][0] == d["shapes"]["worst"][0] == 4
    assert d["shapes"]["typical"][1] <= d["shapes"]["worst"][1]
    assert all(c["worst_step_time_s"] >= c["step_time_s"] for c in d["candidates"])
    assert d["near_tie"] == NEAR_TIE and "sweep" in d["evidence_sources"]


def test_mixes_slowed_by_other_work_are_timed_again(tiny, monkeypatch):
    def linear(f, t):
        return 0.2 + 0.03 * f + 0.08 * t

    clean = {(f, t): linear(f, t) for f, t in [(1, 1), (1, 4), (4, 1), (2, 2)]}
    assert not P.disturbed(clean)
    assert not P.disturbed({**clean, (2, 2): 1.03 * linear(2, 2)})  # a quiet machine's jitter
    assert P.disturbed({**clean, (1, 4): 1.4 * linear(1, 4)})
    assert P.disturbed({**clean, (2, 2): 1.4 * linear(2, 2)})
    # a burst through the first mix tilts the fit to no cost per trained layer
    assert P.disturbed({**clean, (1, 1): 4 * linear(1, 1)})

    # calibrate times every mix again and keeps each one's faster reading
    calls, bursts = [], [5.0]

    def burst(mini, method, options, n_frozen, batch, device, autocast, steps, emb=False, typ=None):
        trained = len(decoder_layers(mini)) - n_frozen
        calls.append((n_frozen, trained))
        slow = bursts.pop() if bursts and (n_frozen, trained) == (1, 1) else 1.0
        t = slow * linear(n_frozen, trained)
        return t, 4096, 1000 * trained, t

    monkeypatch.setattr(P, "_measure", burst)
    costs = P.calibrate(tiny.model, "lora", {"r": 4}, P.synthetic_batch(8, 1, 4), steps=1)
    assert calls == [(1, 1), (1, 4), (4, 1), (2, 2)] * 2
    assert costs.t_trained == pytest.approx(0.08) and costs.t_frozen == pytest.approx(0.03)
    calls.clear()
    P.calibrate(tiny.model, "lora", {"r": 4}, P.synthetic_batch(8, 1, 4), steps=1)
    assert len(calls) == 4  # undisturbed: timed once


def test_full_fine_tuning_is_left_to_its_range_test(tiny, fake_measure):
    """Full's default rate is the range test: the plan cites the evidence's rate but does
    not pin it (a 3e-4 measured on the 135M default model would be wrong for an 8B one)."""
    plan = _plan(tiny, [("full", {})])
    assert plan.choice.method == "full" and plan.choice.lr == 3e-4
    assert "train it at --lr" not in plan.reason
    assert "range test (--lr auto) chooses the rate" in plan.reason


def test_sparse_rate_is_left_to_train_which_scales_it(tiny, fake_measure):
    """Sparse's default follows the model's weight size (lr_scale.py): the evidence's 1e-3
    is SmolLM2's, so the plan neither pins it nor puts it in the train line."""
    plan = _plan(tiny, [("sparse", {})], model_name="gemma3-270m")
    assert plan.choice.method == "sparse" and plan.choice.lr == 2e-4
    assert "train it at --lr" not in plan.reason
    assert "train scales sparse's default rate to this model's weight size" in plan.reason
    from argparse import Namespace

    from slimtune.cli.salf import train_command

    args = Namespace(data="d.jsonl", model="gemma3-270m", batch_size=8)
    assert "--lr" not in train_command(args, plan.choice)


def test_a_gpu_step_is_costed_at_its_median_a_cpu_step_at_its_fastest():
    """A host-bound GPU step varies from step to step on a quiet machine, so its median is
    what a run sees; on a CPU only other work slows a step, so the fastest is the clean one."""
    times = [0.070, 0.095, 0.101, 0.094, 0.075]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert P._step_time(times, cpu) == 0.070
    assert P._step_time(times, gpu) == 0.094
    # enough steps for a median on a GPU; a disturbed mix timed again keeps the faster
    # reading on a CPU, on a GPU not the smaller median (that would bias it down again)
    assert P.timed_steps(cpu) == 3 and P.timed_steps(gpu) >= 7
    assert P._again(cpu)(0.08, 0.10, 1) == 0.08
    assert P._again(gpu)(0.08, 0.10, 1) == pytest.approx(0.09)
    assert P._again(gpu)(0.09, 0.06, 2) == pytest.approx(0.08)  # the mean of 3 readings


def test_calibration_times_the_steps_it_is_asked_for(tiny, monkeypatch):
    """An explicit ``steps`` is honoured; by default the device's own count is timed."""
    seen = []
    real = P._measure

    def spy(*args):
        seen.append(args[7])  # steps
        return real(*args)

    monkeypatch.setattr(P, "_measure", spy)
    worst = P.synthetic_batch(tiny.model.config.vocab_size, 2, 8)
    P.calibrate(tiny.model, "lora", {"r": 4}, worst, steps=1)
    assert set(seen) == {1}
    seen.clear()
    P.calibrate(tiny.model, "lora", {"r": 4}, worst)
    assert set(seen) == {P.timed_steps(torch.device("cpu"))}


def test_a_gpu_times_mixes_as_wide_as_its_memory_holds():
    """The widest mix (s, 4s) has at most the model's layers, and its weights and peak
    take at most half of the free memory."""
    mib = 2**20

    def peak(f, t):  # per trained layer 20 MiB, per frozen layer 30 (more: both mixes count)
        return 100 * mib + 20 * mib * t + 30 * mib * f

    # the default model's 30 layers on a large GPU: mixes up to (6, 24), the whole model
    assert P.gpu_mix_scale(30, peak, 10 * mib, 80 * 2**30) == 6
    # (4s, s) is the larger: s = 4 needs 200 MiB of weights and 100 + 80 + 480 of peak,
    # 860 MiB, under half of 2 GiB; s = 5 needs 250 + 100 + 100 + 600 = 1050 MiB, over it
    assert P.gpu_mix_scale(30, peak, 10 * mib, 2 * 2**30) == 4
    assert P.gpu_mix_scale(30, peak, 10 * mib, 400 * mib) == 1  # not even s = 2 fits
    assert P.gpu_mix_scale(9, peak, 10 * mib, 80 * 2**30) == 1  # (2, 8) is wider than 9


def test_the_wide_mixes_are_sized_from_the_narrow_mixes_peaks(tiny, monkeypatch):
    """On a GPU the narrow mixes' measured peaks, extrapolated, size the wide mixes (a full
    fine-tune's embedding state counted in each); a CPU or a quantized base keeps them narrow."""
    gib = 2**30
    free = [80 * gib]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * gib))
    cuda = torch.device("cuda")
    points = {(1, 1, False): (0, gib, 0, 0), (1, 4, False): (0, 4 * gib, 0, 0)}
    points[(4, 1, False)] = (0, gib, 0, 0)  # a trained layer 1 GiB, a frozen one nothing
    assert P._auto_timing_scale(tiny.model, cuda, "none", 30, points) == 6  # (6, 24): 24 GiB
    assert P._auto_timing_scale(tiny.model, torch.device("cpu"), "none", 30, points) == 1
    assert P._auto_timing_scale(tiny.model, cuda, "nf4", 30, points) == 1
    free[0] = 26 * gib  # half of it holds (3, 12) with 12 GiB of peak, not (4, 16)
    assert P._auto_timing_scale(tiny.model, cuda, "none", 30, points) == 3
    # the embeddings' gradients and AdamW state, 4 GiB over two trained layers' peak, in
    # every mix: (2, 8) with 12 GiB, not (3, 12) with 16
    with_embeddings = {**points, (0, 2, True): (0, 6 * gib, 0, 0)}
    assert P._auto_timing_scale(tiny.model, cuda, "none", 30, with_embeddings) == 2


def test_step_times_come_from_the_wide_mixes_and_memory_from_the_narrow(tiny, monkeypatch):
    """With ``timing_scale`` the slopes are fitted on mixes of s times the layers, whose
    times the narrow mixes would misjudge (here a host-bound GPU that only shows a trained
    layer's full cost once a model is wider than 5 layers); memory stays from the narrow
    mixes. On a CPU the default times the narrow mixes alone."""
    built = []

    def fake(mini, method, options, n_frozen, batch, device, autocast, steps, emb=False, typ=None):
        layers = len(decoder_layers(mini))
        trained = layers - n_frozen
        built.append((n_frozen, trained))
        per_trained = 0.08 if layers > 5 else 0.05
        t = 0.2 + 0.03 * n_frozen + per_trained * trained + (0.05 if emb else 0.0)
        return t, 4096 + 1000 * layers, 1000 * trained, t

    monkeypatch.setattr(P, "_measure", fake)
    batch = P.synthetic_batch(8, 1, 4)
    narrow = P.calibrate(tiny.model, "lora", {"r": 4}, batch, steps=1)
    assert built == [(1, 1), (1, 4), (4, 1), (2, 2)]
    assert narrow.t_trained == pytest.approx(0.05)
    built.clear()
    wide = P.calibrate(tiny.model, "lora", {"r": 4}, batch, steps=1, timing_scale=3)
    assert built == [(1, 1), (1, 4), (4, 1), (2, 2), (3, 3), (3, 12), (12, 3), (6, 6)]
    assert wide.t_trained == pytest.approx(0.08) and wide.t_frozen == pytest.approx(0.03)
    assert wide.t_fixed == pytest.approx(0.2) and wide.timing_scale == 3
    assert wide.activation_bytes_per_layer == narrow.activation_bytes_per_layer
    assert wide.transient_bytes == narrow.transient_bytes
    # a full fine-tune's embeddings: the wide mix (0, 6) less six trained layers
    full = P.calibrate(tiny.model, "full", {}, batch, steps=1, timing_scale=3)
    assert full.t_embeddings == pytest.approx(0.05)
    with pytest.raises(ValueError, match="at least 1"):
        P.calibrate(tiny.model, "lora", {"r": 4}, batch, steps=1, timing_scale=0)


def test_a_disturbed_wide_mix_is_timed_again(tiny, monkeypatch):
    calls, bursts = [], [5.0]

    def burst(mini, method, options, n_frozen, batch, device, autocast, steps, emb=False, typ=None):
        trained = len(decoder_layers(mini)) - n_frozen
        calls.append((n_frozen, trained))
        slow = bursts.pop() if bursts and (n_frozen, trained) == (4, 4) else 1.0  # wide only
        t = slow * (0.2 + 0.03 * n_frozen + 0.08 * trained)
        return t, 4096, 1000 * trained, t

    monkeypatch.setattr(P, "_measure", burst)
    costs = P.calibrate(
        tiny.model, "lora", {"r": 4}, P.synthetic_batch(8, 1, 4), steps=1, timing_scale=2
    )
    wide = [(2, 2), (2, 8), (8, 2), (4, 4)]
    assert calls == [(1, 1), (1, 4), (4, 1), (2, 2)] + wide * 2  # the narrow ones once
    assert costs.t_trained == pytest.approx(0.08) and costs.t_frozen == pytest.approx(0.03)
