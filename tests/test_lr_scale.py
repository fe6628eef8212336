"""The default rate of a method that trains base entries follows the model's weight size."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtune.methods import method_class
from slimtune.model.anatomy import decoder_layers
from slimtune.testing import tiny_llama
from slimtune.training.config import TrainConfig
from slimtune.training.lr_scale import (
    MIN_SCALE,
    REFERENCE_RMS,
    scaled_default_lr,
    weight_rms,
    weight_scale,
)

from .conftest import train_tiny
from .test_train import stop_after_checkpoint, tiny_cfg


def _with_weight_rms(model: nn.Module, rms: float) -> nn.Module:
    """Every decoder linear weight +-rms (so the RMS over all of them is exactly rms)."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.sign(torch.randn_like(m.weight)) * rms)
    return model


def test_weight_rms_reads_every_decoder_linear_and_nothing_else():
    model = _with_weight_rms(tiny_llama(64), 0.05)
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(9.0)  # not a decoder linear
    assert weight_rms(model) == pytest.approx(0.05)
    assert weight_scale(model) == pytest.approx(0.05 / REFERENCE_RMS)


def test_the_scale_is_capped_at_one_and_floored():
    assert weight_scale(_with_weight_rms(tiny_llama(64), 3 * REFERENCE_RMS)) == 1.0
    assert weight_scale(_with_weight_rms(tiny_llama(64), 0.0)) == MIN_SCALE


def test_only_methods_that_train_base_entries_are_scaled():
    for name, halved in (("sparse", 5e-4), ("rosa", 5e-4), ("full", 5e-5)):
        cls = method_class(name)
        assert scaled_default_lr(cls, 0.5) == halved
        assert scaled_default_lr(cls, 1.0) == cls.default_lr
    for name in ("lora", "experts", "shira"):
        cls = method_class(name)
        assert scaled_default_lr(cls, 0.1) == cls.default_lr


def test_rounded_to_one_digit_as_gemma_was_measured():
    # Gemma 3 270M: RMS 0.0344 -> 1e-3 x 0.178 -> 2e-4, the rate its sparse rows ran at
    assert scaled_default_lr(method_class("sparse"), 0.0344 / REFERENCE_RMS) == 2e-4


@pytest.mark.parametrize(("method", "lr", "scaled"), [
    ("sparse", None, True), ("lora", None, False), ("sparse", 3e-3, False),
])  # fmt: skip
def test_train_uses_the_scaled_default_unless_told(
    tiny_dir, intent_file, tmp_path, method, lr, scaled
):
    from slimtune.model.loading import load_model

    rms = weight_rms(load_model(str(tiny_dir)).model)
    assert rms is not None and rms < REFERENCE_RMS / 2  # a random init: small weights
    run = train_tiny(tiny_dir, intent_file, tmp_path / "r", method=method, lr=lr, max_steps=2)
    cls = method_class(method)
    want = lr if lr is not None else cls.default_lr
    if scaled:
        want = float(f"{cls.default_lr * rms / REFERENCE_RMS:.1g}")
        assert want < cls.default_lr
    assert run.summary["lr"] == pytest.approx(want)


def test_a_run_resumed_without_lr_keeps_the_rate_it_started_with(
    tiny_dir, intent_file, tmp_path, monkeypatch
):
    """A default that moved since the run started (another slimtune, another scale) does
    not change the run under way: no --lr resumes at the checkpoint's rate."""
    from slimtune.methods.sparse import SparseMethod
    from slimtune.training.trainer import Trainer

    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", method="sparse", lr=None, save_every=2)
    stop_after_checkpoint(cfg, 2)
    started = json.loads((tmp_path / "r" / "checkpoint" / "checkpoint.json").read_text())
    monkeypatch.setattr(SparseMethod, "default_lr", SparseMethod.default_lr / 4)
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed.step == 2
    assert resumed.lr == started["identity"]["lr"] != resumed.default_lr
    resumed.close()


def test_the_range_test_is_centred_on_the_scaled_rate(tiny_dir, intent_file, tmp_path):
    """Full fine-tuning's default is its range test: from the scaled rate / 100 up."""
    from slimtune.model.loading import load_model
    from slimtune.training.lr_search import SPAN

    rms = weight_rms(load_model(str(tiny_dir)).model)
    run = train_tiny(tiny_dir, intent_file, tmp_path / "r", method="full", lr=None, max_steps=1)
    centre = float(f"{method_class('full').default_lr * rms / REFERENCE_RMS:.1g}")
    assert centre < method_class("full").default_lr
    assert run.manifest["lr_search"]["lrs"][0] == pytest.approx(centre / SPAN)
