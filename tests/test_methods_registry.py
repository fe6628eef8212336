"""A method is one file plus one registry line: a toy method, defined and registered here
and nowhere else, trains, saves, goes into the store, hot-swaps and comes off exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.delta import DeltaStore, DeltaSwitcher, apply_delta
from slimtune.errors import DeltaError
from slimtune.methods import METHODS, Attachment, Method, register_method, unregister_method
from slimtune.model.loading import fingerprint, load_model
from slimtune.training.config import TrainConfig

from .conftest import intent_rows, train_tiny, write_jsonl

NORM_FILE = "norm.safetensors"


def _norm(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model).norm


class NormOnlyMethod(Method):
    """Trains only the final norm's weight; its delta is that weight's new values."""

    name = "test_norm_only"
    default_lr = 3e-3
    delta_files = (NORM_FILE,)

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        model.requires_grad_(False)
        _norm(model).weight.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        save_file({"weight": _norm(model).weight.detach().contiguous()}, str(folder / NORM_FILE))

    @classmethod
    def attach(cls, model: nn.Module, folder: Path, manifest: dict, *, merge: bool) -> Attachment:
        weight = _norm(model).weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(load_file(str(folder / NORM_FILE))["weight"])

        def undo() -> None:
            with torch.no_grad():
                weight.copy_(original)

        return Attachment(model, True, undo)


def _logits(model, tok):
    ids = torch.tensor([tok("Message: parcel tracking late\nIntent:")["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_method_registered_here_trains_stores_applies_and_comes_off(tiny_dir, tmp_path):
    register_method(NormOnlyMethod)
    try:
        assert TrainConfig(method="test_norm_only").learning_rate == 3e-3
        data = write_jsonl(tmp_path / "d.jsonl", intent_rows())
        res = train_tiny(tiny_dir, data, tmp_path / "run", method="test_norm_only",
                         max_steps=3)
        assert res.manifest["method"] == "test_norm_only" and NORM_FILE in res.manifest["files"]
        trained = _logits(res.model, res.loaded.tokenizer)

        store = DeltaStore(tmp_path / "store")
        version = store.add(res.delta_dir)
        loaded = load_model(str(tiny_dir))
        before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        base_logits = _logits(loaded.model, loaded.tokenizer)
        assert not torch.allclose(base_logits, trained)

        sw = DeltaSwitcher(loaded, store)
        sw.switch(version.id)
        torch.testing.assert_close(_logits(sw.model, loaded.tokenizer), trained, rtol=0, atol=0)
        sw.switch(None)
        after = dict(sw.base.named_parameters())
        assert all(torch.equal(after[n], before[n]) for n in before)

        applied = apply_delta(loaded.model, version.path, fingerprint(loaded.model), merge=True)
        assert applied.merged
        torch.testing.assert_close(_logits(applied.model, loaded.tokenizer), trained,
                                   rtol=0, atol=0)
        base = applied.remove()
        assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    finally:
        unregister_method(NormOnlyMethod.name)
    assert "test_norm_only" not in METHODS
    with pytest.raises(DeltaError, match=f"{res.delta_dir}: unknown method 'test_norm_only'"):
        apply_delta(loaded.model, res.delta_dir, fingerprint(loaded.model))


def test_a_taken_name_is_refused():
    class Impostor(NormOnlyMethod):
        name = "lora"

    with pytest.raises(ValueError, match="taken"):
        register_method(Impostor)
    assert METHODS["lora"].__name__ == "LoraMethod"
