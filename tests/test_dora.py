"""DoRA, added as one method file: it trains, its delta is peft's own format, it hot-swaps
with the trained logits and comes off bit for bit, and a peft import of it stays dora."""

import json

import pytest
import torch

from slimtune.delta import DeltaStore, DeltaSwitcher, apply_delta
from slimtune.model.loading import fingerprint, load_model

from .conftest import intent_rows, train_tiny, write_jsonl


def _logits(model, tok):
    ids = torch.tensor([tok("Message: parcel tracking late\nIntent:")["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return train_tiny(
        tiny_dir,
        data,
        tmp / "run",
        method="dora",
        max_steps=6,
        freeze_below=1,
        method_options={"r": 4},
    )


def test_dora_trains_its_magnitudes(trained, tiny_dir):
    res = trained
    assert res.manifest["method"] == "dora"
    cfg = json.loads((res.delta_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    # the magnitudes start at the base weights' row norms; training moves them
    base = dict(load_model(str(tiny_dir)).model.named_parameters())
    moved = 0
    for name, p in res.model.named_parameters():
        if "lora_magnitude_vector" in name:
            weight = name.split(".lora_magnitude_vector")[0].replace("base_model.model.", "", 1)
            norm = base[weight + ".weight"].detach().float().norm(dim=1)
            moved += not torch.allclose(p.detach().float(), norm)
    assert moved > 0


def test_dora_delta_hot_swaps_and_comes_off_bit_for_bit(trained, tiny_dir, tmp_path):
    res = trained
    trained_logits = _logits(res.model, res.loaded.tokenizer)
    store = DeltaStore(tmp_path / "store")
    version = store.add(res.delta_dir)
    loaded = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    assert not torch.allclose(_logits(loaded.model, loaded.tokenizer), trained_logits)

    sw = DeltaSwitcher(loaded, store)
    sw.switch(version.id)
    torch.testing.assert_close(_logits(sw.model, loaded.tokenizer), trained_logits, rtol=0, atol=0)
    sw.switch(None)
    after = dict(sw.base.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before)

    merged = apply_delta(sw.base, version.path, fingerprint(sw.base), merge=True)
    assert merged.merged
    torch.testing.assert_close(_logits(merged.model, loaded.tokenizer), trained_logits)
    base = merged.remove()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_dora_folder_loads_in_plain_peft_with_the_same_logits(trained, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = trained
    ours = _logits(res.model, res.loaded.tokenizer)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), str(res.delta_dir)
    )
    torch.testing.assert_close(_logits(plain, res.loaded.tokenizer), ours)


def test_a_peft_dora_adapter_imports_as_dora(trained, tiny_dir, tmp_path):
    """peft writes DoRA as peft_type LORA + use_dora: the import picks dora (the subclass's
    claim wins), while a plain LoRA adapter stays lora."""
    from slimtune.delta.peft_io import export_peft, import_peft, importer

    store = DeltaStore(tmp_path / "store")
    exported = export_peft(store.add(trained.delta_dir), tmp_path / "peft")
    imported = import_peft(store, exported, model=str(tiny_dir))
    assert imported.version.method == "dora"
    assert importer({"peft_type": "LORA"}).name == "lora"
