import json

import pytest
import torch

from slimtune.delta import load_delta, read_manifest, verify_delta
from slimtune.errors import DeltaError
from slimtune.model.loading import fingerprint, load_model
from slimtune.testing import tiny_model_dir

from .conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    from .conftest import intent_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("deltas")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return {
        m: train_tiny(tiny_dir, data, tmp / m, method=m, max_steps=4, freeze_below=1)
        for m in ("lora", "full")
    }


def _logits(model, tok):
    ids = torch.tensor([tok("Message: parcel tracking late\nIntent:")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_delta_loads_in_plain_peft_with_the_same_logits(trained, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = trained["lora"]
    ours = _logits(res.model.eval(), res.loaded.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    plain = PeftModel.from_pretrained(base, str(res.delta_dir)).eval()
    torch.testing.assert_close(_logits(plain, res.loaded.tokenizer), ours)
    cfg = json.loads((res.delta_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and 0 not in cfg["layers_to_transform"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_delta_round_trip_reproduces_the_trained_model(trained, tiny_dir, method):
    res = trained[method]
    ours = _logits(res.model.eval(), res.loaded.tokenizer)
    fresh = load_model(str(tiny_dir))
    assert not torch.allclose(_logits(fresh.model, fresh.tokenizer), ours)
    model, manifest = load_delta(res.delta_dir, fresh.model, fingerprint(fresh.model))
    torch.testing.assert_close(_logits(model.eval(), fresh.tokenizer), ours)
    assert manifest["method"] == method and manifest["layers"] == [1, 2, 3]
    for key in ("base", "dataset", "training", "metrics", "versions", "created", "files"):
        assert key in manifest
    assert manifest["dataset"]["fingerprint"].startswith("sha256:")


def test_delta_refuses_a_different_base(trained, tmp_path):
    other = load_model(str(tiny_model_dir(tmp_path / "other", seed=1)))
    with pytest.raises(DeltaError, match="refusing to apply it to a different base"):
        load_delta(trained["lora"].delta_dir, other.model, fingerprint(other.model))


def test_fingerprint_ignores_dtype_but_not_values(tiny_dir):
    a = load_model(str(tiny_dir))
    b = load_model(str(tiny_dir), dtype="bf16")
    assert fingerprint(a.model) == fingerprint(b.model)
    with torch.no_grad():
        a.model.get_input_embeddings().weight[0, 0] += 1.0
    assert fingerprint(a.model) != fingerprint(b.model)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("method", ["lora", "full"])
def test_corrupted_or_truncated_delta_is_refused(trained, tmp_path, method):
    d = _copy(trained[method].delta_dir, tmp_path / "d")
    name = next(n for n in read_manifest(d)["files"] if n.endswith(".safetensors"))
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / name).write_bytes(bytes(data))
    with pytest.raises(DeltaError, match=f"{name}: checksum mismatch"):
        verify_delta(d)
    (d / name).write_bytes(bytes(data[:100]))
    with pytest.raises(DeltaError, match=f"{name}: size 100 bytes.*truncated"):
        verify_delta(d)


def test_bad_manifests_are_refused(trained, tmp_path):
    d = _copy(trained["lora"].delta_dir, tmp_path / "d")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../escape"] = {"sha256": "0", "bytes": 1}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeltaError, match="escapes the delta folder"):
        verify_delta(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DeltaError, match="corrupted manifest"):
        verify_delta(d)
    (d / "manifest.json").unlink()
    with pytest.raises(DeltaError, match=r"missing; .* is not a slimtune delta"):
        verify_delta(d)
    with pytest.raises(DeltaError, match="no such delta folder"):
        verify_delta(tmp_path / "nope")


@pytest.fixture(scope="module")
def rosa(tiny_dir, tmp_path_factory):
    from .conftest import intent_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("rosa")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return train_tiny(
        tiny_dir, data, tmp / "rosa", method="rosa", max_steps=4, method_options={"density": 0.05}
    )


def test_plain_peft_refuses_a_rosa_delta_that_slimtune_applies_whole(rosa, tiny_dir, tmp_path):
    """peft alone would drop the sparse part and silently compute something else."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.methods.rosa import LORA_FILES

    with pytest.raises(ValueError):
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_dir), str(rosa.delta_dir)
        )
    ours = _logits(rosa.model.eval(), rosa.loaded.tokenizer)
    fresh = load_model(str(tiny_dir))
    model, _ = load_delta(rosa.delta_dir, fresh.model, fingerprint(fresh.model))
    torch.testing.assert_close(_logits(model.eval(), fresh.tokenizer), ours)

    # A rosa delta of format version 1 (LoRA part under peft's names) still loads.
    old = _copy(rosa.delta_dir, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    for peft_name, ours_name in LORA_FILES.items():
        (old / ours_name).rename(old / peft_name)
        m["files"][peft_name] = m["files"].pop(ours_name)
    m["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    fresh = load_model(str(tiny_dir))
    model, _ = load_delta(old, fresh.model, fingerprint(fresh.model))
    torch.testing.assert_close(_logits(model.eval(), fresh.tokenizer), ours)
