"""The planner and the budget policy on a quantized base (issue 15): resident memory from
parameter counts, mini models quantized like the run's base, and the plan's choice between
the unquantized base and nf4."""

import json

import pytest
from torch import nn

from slimtune.errors import UserInputError
from slimtune.model.anatomy import decoder_layers
from slimtune.model.loading import load_model
from slimtune.model.quantize import BYTES_PER_WEIGHT, is_quantized, quantization_of
from slimtune.salf import plan as P

pytest.importorskip("bitsandbytes")


def _block_weights(model: nn.Module) -> int:
    return sum(
        m.in_features * m.out_features
        for layer in decoder_layers(model)
        for m in layer.modules()
        if type(m) is nn.Linear
    )


@pytest.fixture
def fixed_measure(monkeypatch):
    """Calibration without timing noise: every mini-model run costs the same fixed numbers
    (the cost model around it, quantized minis included, runs as is)."""
    seen = []

    def fake(mini, method, options, n_frozen, batch, device, autocast, steps, emb=False, typ=None):
        seen.append(any(is_quantized(m) for m in mini.modules()))
        trained = len(decoder_layers(mini)) - n_frozen
        return 0.01 + 0.01 * trained, 4096, 1000 * trained, 0.01 + 0.01 * trained

    monkeypatch.setattr(P, "_measure", fake)
    monkeypatch.setattr(P, "_resident", lambda device, model=None: 10**9)  # RSS moves
    return seen


def test_resident_memory_follows_the_quantization_by_the_bytes_it_saves(tiny, tiny_dir):
    model = tiny.model  # fp32 on the CPU
    block = _block_weights(model)
    saved = int(block * 4) - int(block * BYTES_PER_WEIGHT["nf4"])
    assert P.weight_bytes(model, "none") - P.weight_bytes(model, "nf4") == saved
    assert P.resident_bytes(model, "none", 10**9) == 10**9  # as loaded: measured
    assert P.resident_bytes(model, "nf4", 10**9) == 10**9 - saved
    # loaded quantized: measured as it is, and the unquantized estimate adds the bytes back
    q = load_model(str(tiny_dir), quantize="nf4").model
    assert P.weight_bytes(q, "none") == P.weight_bytes(model, "none")  # packed, counted dense
    stored = sum(p.numel() * p.element_size() for p in q.parameters())
    assert abs(P.weight_bytes(q, "nf4") - stored) < 0.05 * stored
    assert P.resident_bytes(q, "nf4", 10**9) == 10**9
    assert P.resident_bytes(q, "none", 10**9) == 10**9 + saved


def test_calibration_measures_quantized_mini_models(tiny, monkeypatch):
    minis = []
    real = P._measure

    def spy(mini, *args, **kwargs):
        minis.append(any(is_quantized(m) for m in mini.modules()))
        return real(mini, *args, **kwargs)

    monkeypatch.setattr(P, "_measure", spy)
    batch = P.synthetic_batch(len(tiny.tokenizer), 1, 8)
    costs = P.calibrate(
        tiny.model, "lora", {"r": 4}, batch, steps=1, quantize="nf4", measured_resident=10**9
    )
    assert minis and all(minis)  # every measured mini had quantized block linears
    assert costs.quantize == "nf4" and P.estimate(costs, 0).quantize == "nf4"
    assert costs.resident_bytes == P.resident_bytes(tiny.model, "nf4", 10**9) < 10**9
    linears = [m for m in decoder_layers(tiny.model)[0].modules() if isinstance(m, nn.Linear)]
    assert costs.trainable_per_layer == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert costs.activation_bytes_per_layer > 0
    with pytest.raises(UserInputError, match="full cannot train on a quantized base"):
        P.calibrate(tiny.model, "full", {}, batch, steps=1, quantize="nf4")


def test_plan_keeps_the_unquantized_base_unless_nf4_is_needed(tiny, fixed_measure):
    batch = P.synthetic_batch(len(tiny.tokenizer), 2, 16)
    gain = [1.0, 0.8, 0.5, 0.2, 0.0]
    kinds = ["none", "nf4"]

    def plan(memory, candidates=(("lora", {"r": 4}),)):
        return P.make_plan(
            tiny.model,
            batch,
            gain,
            candidates=list(candidates),
            budget_memory=memory,
            quantizations=kinds,
        )

    free = plan(None, [("full", {}), ("lora", {"r": 4})])
    assert any(fixed_measure) and not all(fixed_measure)  # both bases were calibrated
    assert not any(c.method == "full" and c.quantize == "nf4" for c in free.candidates)
    assert {c.quantize for c in free.candidates if c.method == "lora"} == {"none", "nf4"}
    assert free.choice.quantize == "none"  # same gain: the unquantized base stays
    assert "stays in fp32" in free.reason and "nf4 would bring the weights" in free.reason

    def row(p, q, k):
        return next(
            c
            for c in p.candidates
            if c.method == "lora" and c.quantize == q and c.freeze_below == k
        )

    none0, nf40 = row(free, "none", 0), row(free, "nf4", 0)
    saved = P.weight_bytes(tiny.model, "none") - P.weight_bytes(tiny.model, "nf4")
    assert none0.peak_bytes - nf40.peak_bytes == saved

    # a budget that fits the unquantized base at every layer keeps it
    assert plan(none0.peak_bytes).choice.quantize == "none"
    # one between the two: nf4 trains every layer, the unquantized base fewer or none
    tight = plan((none0.peak_bytes + nf40.peak_bytes) // 2)
    assert tight.choice.quantize == "nf4" and tight.choice.freeze_below == 0
    assert tight.choice.peak_bytes <= tight.budget_memory
    assert "in fp32 needs ~" in tight.reason and "nf4 brings the weights to" in tight.reason
    fits_plain = [c for c in tight.candidates if c.quantize == "none" and c.fits]
    assert ("more layers trained" in tight.reason) == bool(fits_plain)
    assert ("nothing on the unquantized base fits" in tight.reason) == (not fits_plain)
    d = tight.to_dict()
    assert d["choice"]["quantize"] == "nf4" and d["quantizations"] == kinds
    assert all("quantize" in c for c in d["candidates"])


def test_plan_loads_quantized_only_when_the_weights_exceed_the_budget(tiny_dir):
    from slimtune.cli.salf import load_for_plan, plan_quantizations

    assert plan_quantizations("auto", "cpu", memory=2**30) == ["none", "nf4"]
    assert plan_quantizations("auto", "cpu") == ["none"]  # no memory budget: nothing to buy
    assert plan_quantizations("none,int8", "cpu") == ["none", "int8"]
    with pytest.raises(UserInputError, match="--quantize 'int4'"):
        plan_quantizations("int4", "cpu")
    small = 1000  # bytes: less than the tiny model's weights
    assert quantization_of(load_for_plan(str(tiny_dir), "cpu", ["none", "nf4"], small).model) == (
        "nf4"
    )
    assert quantization_of(load_for_plan(str(tiny_dir), "cpu", ["none", "nf4"], None).model) == (
        "none"
    )
    assert quantization_of(load_for_plan(str(tiny_dir), "cpu", ["none"], small).model) == "none"


def test_cli_plan_quantize_nf4_prints_and_records_it(
    tiny_dir, intent_file, tmp_path, capsys, fixed_measure
):
    from slimtune.cli.app import main

    out = tmp_path / "plan.json"
    code = main(
        f"plan --data {intent_file} --model {tiny_dir} --device cpu --quantize nf4 "
        f"--batch-size 2 --max-length 32 --output {out}".split()
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "quantize" in text and "nf4" in text
    assert "choice: " in text and "nf4 brings the weights to" in text
    d = json.loads(out.read_text())
    assert d["quantizations"] == ["nf4"] and d["choice"]["quantize"] == "nf4"
    assert {c["quantize"] for c in d["candidates"]} == {"nf4"}
    assert all(c["method"] != "full" for c in d["candidates"])  # full refuses a quantized base


def test_train_budget_policy_calibrates_on_the_runs_quantization(
    tiny_dir, intent_file, tmp_path, fixed_measure
):
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    cfg = TrainConfig(
        model=str(tiny_dir),
        data=str(intent_file),
        output_dir=str(tmp_path / "r"),
        batch_size=4,
        device="cpu",
        progress=False,
        quantize="nf4",
        freeze="auto",
        budget_memory="100GiB",
    )
    trainer = Trainer(cfg)  # the setup runs the budget policy (training is not needed)
    try:
        est = trainer.auto_freeze["estimate"]
    finally:
        trainer.close()
    assert est["quantize"] == "nf4" and est["freeze_below"] == 0
    assert fixed_measure and all(fixed_measure)  # every calibration mini was quantized
