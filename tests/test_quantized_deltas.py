"""A delta trained on a quantized base (--quantize nf4) is a delta of the original base: it
applies to the full-precision base and to the quantized one, comes off both bit for bit,
merges only into the full-precision one, and `delta apply --out` writes it in bf16."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli.app import main
from slimtune.delta import DeltaStore, DeltaSwitcher, apply_delta
from slimtune.errors import DeltaError
from slimtune.model.loading import fingerprint, load_model
from slimtune.model.quantize import quantization_of

from .conftest import intent_rows, train_tiny, write_jsonl

pytest.importorskip("bitsandbytes")  # a dev dependency: installed by `make test`

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 21, 4]])
METHOD_OPTIONS = {"lora": {"r": 8}, "experts": {"experts": 4, "top_k": 2, "rank": 4}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Width 64: bitsandbytes' CPU NF4 blocks are 64 wide (see test_quantize)."""
    from slimtune.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny64") / "model", hidden=64)


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """One nf4 training run per method, made on first use and shared by the tests:
    method -> (result, data file, logits the trained nf4 model computed on IDS)."""
    made: dict = {}

    def get(method: str):
        if method not in made:
            tmp = tmp_path_factory.mktemp(f"q-{method}")
            data = write_jsonl(tmp / "intents.jsonl", intent_rows())
            res = train_tiny(
                tiny_dir,
                data,
                tmp / "run",
                method=method,
                quantize="nf4",
                lr=5e-2,
                max_steps=4,
                method_options=METHOD_OPTIONS[method],
            )
            res.model.eval()
            with torch.no_grad():
                logits = res.model(input_ids=IDS).logits.float()
            made[method] = (res, data, logits)
        return made[method]

    return get


@pytest.fixture(params=["lora", "experts"])
def trained(request, runs):
    """(method, delta folder, manifest, logits the trained nf4 model computed on IDS)."""
    res, _, logits = runs(request.param)
    return request.param, res.delta_dir, res.manifest, logits


def _state(model) -> dict[str, torch.Tensor]:
    """Every tensor the model holds (packed 4-bit weights included), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_manifest_fingerprints_the_unquantized_base(trained, tiny_dir):
    _, _, manifest, _ = trained
    assert manifest["training"]["quantize"] == "nf4"
    assert manifest["base"]["fingerprint"] == fingerprint(load_model(str(tiny_dir)).model)


def test_the_delta_applies_to_both_bases_and_comes_off_bit_for_bit(trained, tiny_dir):
    method, folder, manifest, want = trained
    fp = manifest["base"]["fingerprint"]
    errors, moved = {}, {}
    for kind in ("none", "nf4"):
        base = load_model(str(tiny_dir), quantize=kind).model
        assert quantization_of(base) == kind and fingerprint(base) == fp
        before = _state(base)
        with torch.no_grad():
            base_logits = base(input_ids=IDS).logits.float()
        applied = apply_delta(base, folder, fp)  # the fingerprint check passes on both
        with torch.no_grad():
            got = applied.model(input_ids=IDS).logits.float()
        errors[kind] = (got - want).abs().max().item()
        moved[kind] = (got - base_logits).abs().max().item()
        restored = applied.remove()
        assert _same(before, _state(restored)), f"{method} on {kind}: base not restored"
        assert not any("lora" in n or "expert" in n for n, _ in restored.named_modules())
        with torch.no_grad():
            assert torch.equal(restored(input_ids=IDS).logits.float(), base_logits)
    # the delta matters on both bases (lr 5e-2: it moves the logits by far more than noise)
    assert moved["none"] > 0.05 and moved["nf4"] > 0.05, moved
    # on the nf4 base it computes what training computed (the same quantized weights, up
    # to float noise); on the fp32 base it is off by the quantization error only
    assert errors["nf4"] < 1e-3, errors
    assert errors["none"] > 20 * errors["nf4"], errors
    assert errors["none"] < moved["none"], errors


def test_the_switcher_loads_a_quantized_base_for_a_delta(trained, tiny_dir):
    _, folder, _, want = trained
    sw = DeltaSwitcher.with_delta(str(folder), model=str(tiny_dir), quantize="nf4")
    assert quantization_of(sw.base) == "nf4"
    with torch.no_grad():
        got = sw.model(input_ids=IDS).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_merging_into_a_quantized_base_is_refused(trained, tiny_dir):
    _, folder, manifest, _ = trained
    base = load_model(str(tiny_dir), quantize="nf4").model
    before = _state(base)
    with pytest.raises(DeltaError) as e:
        apply_delta(base, folder, manifest["base"]["fingerprint"], merge=True, ref="v1")
    msg = str(e.value)
    assert "\n" not in msg
    # experts never merge (refused for that reason first); LoRA is refused for the base
    assert "cannot be merged into" in msg and "--delta v1" in msg
    assert _same(before, _state(base))


@pytest.fixture
def lora_nf4(runs):
    res, data, _ = runs("lora")
    return res, data


def test_merging_lora_into_a_quantized_base_names_the_quantization(lora_nf4, tiny_dir):
    res, _ = lora_nf4
    base = load_model(str(tiny_dir), quantize="nf4").model
    with pytest.raises(DeltaError, match=r"cannot be merged into a quantized base \(nf4 "):
        apply_delta(base, res.delta_dir, res.manifest["base"]["fingerprint"], merge=True)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_apply_out_writes_bf16_by_default_and_the_dtype_asked(lora_nf4, tiny_dir, tmp_path, capsys):
    res, _ = lora_nf4
    store = tmp_path / "store"
    vid = DeltaStore(store).add(res.delta_dir).id
    code, out = run(capsys, "delta", "--store", store, "show", vid)
    assert code == 0 and json.loads(out)["quantize"] == "nf4"
    # the tiny base's config records fp32: bf16 comes from the quantized training
    code, out = run(capsys, "delta", "--store", store, "apply", vid, "--out", tmp_path / "m16")
    assert code == 0 and "bf16: the delta was trained on a nf4-quantized base" in out
    m16 = load_file(tmp_path / "m16" / "model.safetensors")
    assert {t.dtype for t in m16.values()} == {torch.bfloat16}
    code, out = run(
        capsys,
        "delta",
        "--store",
        store,
        "apply",
        vid,
        "--dtype",
        "fp32",
        "--out",
        tmp_path / "m32",
    )
    assert code == 0 and "fp32: as asked" in out
    m32 = load_file(tmp_path / "m32" / "model.safetensors")
    assert {t.dtype for t in m32.values()} == {torch.float32}
    # written from the full-precision base: the fp32 folder is base + delta, exactly merged
    from transformers import AutoModelForCausalLM

    plain = load_model(str(tiny_dir)).model
    applied = apply_delta(plain, res.delta_dir, res.manifest["base"]["fingerprint"])
    with torch.no_grad():
        want = applied.model(input_ids=IDS).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m32").eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not any("4bit" in type(m).__name__ for m in applied.model.modules())


def test_eval_and_generate_run_a_delta_on_a_quantized_base(lora_nf4, tiny_dir, tmp_path, capsys):
    res, data = lora_nf4
    common = ["--data", data, "--model", tiny_dir, "--delta", res.delta_dir, "--no-latency"]
    common += ["--limit", "8", "--device", "cpu"]
    code, out = run(capsys, "eval", *common, "--quantize", "nf4", "--output", tmp_path / "q.json")
    assert code == 0 and "(nf4)" in out
    q = json.loads((tmp_path / "q.json").read_text())
    code, out = run(capsys, "eval", *common, "--output", tmp_path / "f.json")
    assert code == 0 and "(nf4)" not in out
    f = json.loads((tmp_path / "f.json").read_text())
    assert q["quantize"] == "nf4" and f["quantize"] == "none"
    assert q["loss"] != f["loss"]  # the two bases really differ
    code, out = run(
        capsys,
        "generate",
        "--model",
        tiny_dir,
        "--delta",
        res.delta_dir,
        "--quantize",
        "nf4",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        "hi",
    )
    assert code == 0 and out.startswith("[")
    d = res.delta_dir
    code, out = run(
        capsys, "ab", d, d, "--data", data, "--model", tiny_dir, "--device", "cpu", "--limit", "6",
        "--quantize", "nf4", "--output", tmp_path / "ab.json",
    )  # fmt: skip
    assert code == 0 and "nf4 base" in out
    assert json.loads((tmp_path / "ab.json").read_text())["quantize"] == "nf4"


@pytest.mark.parametrize(("method", "kind"), [("full", "int8"), ("full", "nf4"), ("dora", "int8")])
def test_a_delta_its_method_cannot_run_quantized_is_refused_before_writing(
    tiny_dir, tmp_path, method, kind
):
    """A full delta copied into int8 weights truncated them to zeros (and the logits moved:
    it 'applied'); on nf4 its packed shape gave a shape error; DoRA failed inside peft. Each
    is refused in one line naming --quantize, with the base untouched."""
    data = write_jsonl(tmp_path / "intents.jsonl", intent_rows())
    res = train_tiny(tiny_dir, data, tmp_path / "run", method=method, max_steps=1)
    base = load_model(str(tiny_dir), quantize=kind).model
    before = _state(base)
    with pytest.raises(DeltaError) as e:
        apply_delta(base, res.delta_dir, res.manifest["base"]["fingerprint"], ref="v1")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"v1 ({method}) cannot run on an {kind}-quantized base" in msg and "--quantize" in msg
    assert _same(before, _state(base))


@pytest.mark.parametrize(("loaded_as", "asked"), [("none", "nf4"), ("nf4", "none")])
def test_a_preloaded_model_must_be_stored_as_the_run_asks(tiny_dir, tmp_path, loaded_as, asked):
    """Trainer(cfg, loaded) used the preloaded model as it was while the manifest and
    checkpoints recorded cfg.quantize (a run on the bf16 base labelled nf4, or the reverse)."""
    from slimtune.errors import UserInputError
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    data = write_jsonl(tmp_path / "intents.jsonl", intent_rows())
    loaded = load_model(str(tiny_dir), quantize=loaded_as)
    cfg = TrainConfig(
        model=str(tiny_dir), data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
        device="cpu", progress=False, quantize=asked,
    )  # fmt: skip
    with pytest.raises(UserInputError, match=f"stored as '{loaded_as}'.*--quantize {asked}"):
        Trainer(cfg, loaded=loaded)
