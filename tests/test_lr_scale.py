"""A method's default rate follows the model's weight size (training/lr_scale.py)."""

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


def test_each_method_follows_the_weights_by_its_own_exponent():
    for name, exponent in (("sparse", 1.0), ("full", 1.0), ("rosa", 0.7), ("shira", 1.3),
                           ("experts", 0.5), ("lora", 0.0), ("dora", 0.0)):  # fmt: skip
        cls = method_class(name)
        assert cls.lr_weight_exponent == exponent, name
        want = float(f"{cls.default_lr * 0.01**exponent:.1g}")
        assert scaled_default_lr(cls, 0.01) == pytest.approx(want), name
        assert scaled_default_lr(cls, 1.0) == cls.default_lr
    assert scaled_default_lr(method_class("sparse"), 0.01) == pytest.approx(1e-5)
    assert scaled_default_lr(method_class("experts"), 0.01) == pytest.approx(1e-4)
    assert scaled_default_lr(method_class("lora"), 0.01) == method_class("lora").default_lr


def test_rounded_to_one_digit_as_gemma_was_measured():
    # Gemma 3 270M: RMS 0.0344 -> scale 0.178: the rates its default rows ran at
    scale = 0.0344 / REFERENCE_RMS
    want = {"sparse": 2e-4, "rosa": 3e-4, "shira": 1e-3, "experts": 4e-4, "lora": 1e-3}
    for name, lr in want.items():
        assert scaled_default_lr(method_class(name), scale) == lr, name


@pytest.mark.parametrize(("method", "lr", "exponent"), [
    ("sparse", None, 1.0), ("experts", None, 0.5), ("lora", None, None),
    ("sparse", 3e-3, None),
])  # fmt: skip
def test_train_uses_the_scaled_default_unless_told(
    tiny_dir, intent_file, tmp_path, method, lr, exponent
):
    from slimtune.model.loading import load_model

    rms = weight_rms(load_model(str(tiny_dir)).model)
    assert rms is not None and rms < REFERENCE_RMS / 2  # a random init: small weights
    run = train_tiny(tiny_dir, intent_file, tmp_path / "r", method=method, lr=lr, max_steps=2)
    cls = method_class(method)
    want = lr if lr is not None else cls.default_lr
    if exponent is not None:
        want = float(f"{cls.default_lr * (rms / REFERENCE_RMS) ** exponent:.1g}")
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
