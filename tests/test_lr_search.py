"""--lr auto: the range test's choice, and a run after it equal to the run at that rate."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from slimtune.errors import UserInputError
from slimtune.training.config import TrainConfig
from slimtune.training.lr_search import choose, rates
from slimtune.training.trainer import Trainer

from .conftest import train_tiny
from .test_train import stop_after_checkpoint, tiny_cfg


def test_rates_span_the_range_geometrically():
    r = rates(1e-5, 1e-1, 5)
    assert r[0] == pytest.approx(1e-5) and r[-1] == pytest.approx(1e-1)
    assert all(b / a == pytest.approx(10.0) for a, b in itertools.pairwise(r))


def test_choose_divides_the_rate_of_the_best_probe_loss():
    lrs = rates(1e-5, 1e-1, 9)
    losses = [3.0, 2.9, 2.5, 1.8, 1.2, 1.0, 1.6, 4.0, math.inf]
    lr, why = choose(lrs, losses, 3.1, divisor=4.0)
    assert lr == pytest.approx(lrs[5] / 4.0)
    assert "1e-02" not in why and f"{lrs[5]:.2g}" in why


def test_choose_takes_the_lowest_rate_when_nothing_trains():
    lrs = rates(1e-5, 1e-3, 5)
    lr, why = choose(lrs, [2.0, 2.1, 2.5, math.inf, math.inf], 2.0)
    assert lr == lrs[0] and "lowered" in why
    lr, _ = choose(lrs, [math.inf] * 5, 2.0)
    assert lr < lrs[0]


def test_choose_says_when_the_best_is_the_largest_rate_tried():
    lrs = rates(1e-5, 1e-3, 5)
    _, why = choose(lrs, [2.0, 1.5, 1.0, 0.8, 0.5], 2.5)
    assert "largest rate tried" in why


def _weights(out) -> dict[str, torch.Tensor]:
    delta = out / "delta"
    files = sorted(p for p in delta.glob("*.safetensors"))
    assert files
    return {f"{p.name}:{k}": v for p in files for k, v in load_file(str(p)).items()}


@pytest.mark.parametrize("method", ["lora", "sparse", "full", "experts"])
def test_auto_lr_run_equals_the_run_at_the_chosen_rate(tiny_dir, intent_file, tmp_path, method):
    auto = train_tiny(tiny_dir, intent_file, tmp_path / "a", method=method, lr="auto")
    search = auto.manifest["lr_search"]
    chosen = search["chosen"]
    assert auto.summary["lr"] == chosen
    assert search["steps"] == len(search["lrs"]) == len(search["losses"]) >= 2
    assert [h["lr"] for h in auto.history][-1] < chosen  # the schedule runs from it
    fixed = train_tiny(tiny_dir, intent_file, tmp_path / "f", method=method, lr=chosen)
    logged = ("loss", "grad_norm", "lr", "balance_loss")
    assert [{k: h.get(k) for k in logged} for h in auto.history] == [
        {k: h.get(k) for k in logged} for h in fixed.history
    ]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "f")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the range test leaked into the run"
    # and it trained: a run at another rate ends elsewhere
    train_tiny(tiny_dir, intent_file, tmp_path / "o", method=method, lr=chosen * 3)
    c = _weights(tmp_path / "o")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_keeps_the_chosen_rate_without_a_second_search(tiny_dir, intent_file, tmp_path):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", save_every=2, lr="auto")
    stop_after_checkpoint(cfg, 2)
    ckpt = json.loads((tmp_path / "r" / "checkpoint" / "checkpoint.json").read_text())
    chosen = ckpt["identity"]["lr"]
    assert ckpt["lr_search"]["chosen"] == chosen

    searched = []
    import slimtune.training.trainer as T

    original = T.search_lr

    def spy(**kw):
        searched.append(1)
        return original(**kw)

    T.search_lr = spy
    try:
        res = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True})).run()
    finally:
        T.search_lr = original
    assert not searched
    assert res.summary["lr"] == chosen and res.manifest["lr_search"]["chosen"] == chosen
    train_tiny(tiny_dir, intent_file, tmp_path / "w", lr="auto")
    a, b = _weights(tmp_path / "r"), _weights(tmp_path / "w")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_lower_the_chosen_rate_not_raise_it(tiny_dir, intent_file, tmp_path):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", save_every=2, lr="auto")
    stop_after_checkpoint(cfg, 2)
    ckpt = json.loads((tmp_path / "r" / "checkpoint" / "checkpoint.json").read_text())
    chosen = ckpt["identity"]["lr"]
    with pytest.raises(UserInputError, match=r"differs in \['lr'\]"):
        Trainer(TrainConfig(**{**cfg.__dict__, "resume": True, "lr": chosen * 2}))
    res = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True, "lr": chosen / 2})).run()
    assert res.summary["lr"] == chosen / 2
    assert res.manifest["resume_changes"][0]["changed"] == {"lr": [chosen, chosen / 2]}


@pytest.mark.parametrize("value", ["fast", -1.0, 0.0])
def test_bad_lr_values_are_refused(value):
    with pytest.raises(UserInputError, match=r"lr'? must be a number( > 0)? or 'auto'"):
        TrainConfig(data="x.jsonl", lr=value).validated()


def test_full_fine_tuning_chooses_its_rate_unless_one_is_given(tiny_dir, intent_file, tmp_path):
    """Full fine-tuning's default is the range test (its best rate moves with the model);
    an explicit rate skips it, and the other methods keep their fixed defaults."""
    from slimtune.methods import METHODS

    auto = train_tiny(tiny_dir, intent_file, tmp_path / "a", method="full", lr=None, max_steps=2)
    assert auto.manifest["lr_search"]["chosen"] == auto.summary["lr"]
    given = train_tiny(tiny_dir, intent_file, tmp_path / "g", method="full", lr=1e-3, max_steps=2)
    assert given.manifest.get("lr_search") is None and given.summary["lr"] == 1e-3
    lora = train_tiny(tiny_dir, intent_file, tmp_path / "l", method="lora", lr=None, max_steps=2)
    assert lora.manifest.get("lr_search") is None
    assert lora.summary["lr"] == METHODS["lora"].default_lr


def test_a_frozen_run_at_the_default_rate_is_pointed_to_lr_auto(
    tiny_dir, intent_file, tmp_path, monkeypatch
):
    """Frozen LoRA runs scored 5-6 points more at --lr auto on extraction (BENCHMARKS.md):
    a frozen run left at the default rate says so; one with a rate, at auto, of a method
    whose default is auto, or without freezing does not."""
    from slimtune.training import trainer as trainer_module

    said: list[str] = []
    monkeypatch.setattr(trainer_module, "info", said.append)

    def notes(**overrides) -> list[str]:
        said.clear()
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a Trainer locks its folder
        cfg = TrainConfig(**{**tiny_cfg(tiny_dir, intent_file, out).__dict__, **overrides})
        Trainer(cfg).close()  # the setup decides (nothing is trained)
        return [s for s in said if "note:" in s and "--lr auto" in s]

    (note,) = notes(lr=None, freeze_below=2)
    assert "2 of 4 layers" in note
    assert notes(lr=3e-3, freeze_below=2) == []
    assert notes(lr="auto", freeze_below=2, max_steps=2) == []
    assert notes(lr=None, freeze_below=2, method="full", max_steps=2) == []
    assert notes(lr=None, freeze_below=0) == []
