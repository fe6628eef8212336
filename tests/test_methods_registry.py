"""A method is one file plus one registry line: a toy method, defined and registered here
and nowhere else, trains, saves, goes into the store, hot-swaps and comes off exactly."""

import json
from dataclasses import dataclass, make_dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.delta import DeltaStore, DeltaSwitcher, apply_delta
from slimtune.errors import DeltaError
from slimtune.methods import (
    METHODS,
    Attachment,
    LoraMethod,
    LoraOptions,
    Method,
    MethodConfig,
    register_method,
    unregister_method,
)
from slimtune.methods.base import option
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
        res = train_tiny(tiny_dir, data, tmp_path / "run", method="test_norm_only", max_steps=3)
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
        torch.testing.assert_close(
            _logits(applied.model, loaded.tokenizer), trained, rtol=0, atol=0
        )
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


@dataclass
class WideLoraOptions(LoraOptions):
    """LoRA's options plus one of its own, declared once: the CLI finds it here."""

    width: int = option(3, flag="toy-width", help="a toy option of the test method", sweep=True)


class WideLoraMethod(LoraMethod):
    name = "test_wide_lora"
    config_class = WideLoraOptions

    @classmethod
    def imports_peft(cls, config: dict) -> bool:
        return False  # LoRA adapters stay LoRA's while this test method is registered


def test_a_registered_method_gets_its_flags_yaml_key_and_sweep_grid(
    tiny_dir, intent_file, tmp_path, capsys
):
    from slimtune.cli.app import build_parser, main, train_options_from_args
    from slimtune.training.sweep import grid_flags, grid_points

    assert "--toy-width" not in _train_help(capsys)
    register_method(WideLoraMethod)
    try:
        help_text = _train_help(capsys)
        assert "--toy-width" in help_text and "test_wide_lora" in help_text
        assert "a toy option of the test method (test_wide_lora; default 3)" in " ".join(
            help_text.split()
        )
        # the flag reaches the method's options; LoRA's shared flag too
        cfg, _ = train_options_from_args(
            build_parser().parse_args(
                [
                    "train",
                    "--data",
                    "a.jsonl",
                    "--method",
                    "test_wide_lora",
                    "--toy-width",
                    "5",
                    "--lora-r",
                    "2",
                ]
            )
        )
        assert cfg.method == "test_wide_lora" and cfg.method_options == {"width": 5, "r": 2}
        # its YAML key is the flag's name, as for every flag
        yaml_file = tmp_path / "c.yaml"
        yaml_file.write_text("data: a.jsonl\nmethod: test_wide_lora\ntoy-width: 7\n")
        cfg, _ = train_options_from_args(
            build_parser().parse_args(["train", "--config", str(yaml_file)])
        )
        assert cfg.method_options == {"width": 7}
        # sweepable: in the grid, and sweep takes a list for it
        assert grid_flags()["toy_width"] == "width"
        args = build_parser().parse_args(
            ["sweep", "--data", "a.jsonl", "--method", "test_wide_lora", "--toy-width", "1,4"]
        )
        assert grid_points("test_wide_lora", {"toy_width": args.toy_width}) == [
            {"width": 1},
            {"width": 4},
        ]
        # a real run: --method accepts it and the option lands in the delta's manifest
        out = tmp_path / "run"
        assert (
            main(
                [
                    "train",
                    "--model",
                    str(tiny_dir),
                    "--data",
                    str(intent_file),
                    "--method",
                    "test_wide_lora",
                    "--toy-width",
                    "6",
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "4",
                    "--output-dir",
                    str(out),
                    "--no-progress",
                    "--no-store",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        manifest = json.loads((out / "delta" / "manifest.json").read_text())
        assert manifest["method"] == "test_wide_lora"
        assert manifest["method_config"]["width"] == 6
    finally:
        unregister_method(WideLoraMethod.name)
    assert "--toy-width" not in _train_help(capsys)
    assert "toy_width" not in grid_flags()


def _train_help(capsys) -> str:
    from slimtune.cli.app import main

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "declared, message",
    [
        # --density is rosa's, shira's and sparse's float option 'density': another option
        # name or type under that flag is refused, and so is a flag train itself has
        (
            ("density", int, option(1)),
            r"--density is declared by method '\w+' for its option "
            r"'density' \(float\) and by method 'test_clash' for "
            r"'density' \(int\)",
        ),
        (
            ("share", float, option(0.1, flag="density")),
            r"for its option 'density' \(float\) and "
            r"by method 'test_clash' for 'share' "
            r"\(float\)",
        ),
        (
            ("seed_value", int, option(0, flag="seed")),
            r"--seed \(method test_clash\) is an option "
            r"train already has",
        ),
    ],
)
def test_a_flag_declared_twice_differently_is_refused_when_registered(declared, message):
    """The clash is the method's bug: registering it fails (naming it, the other method and
    the flag) and leaves it out, so every command's parser still builds."""
    from slimtune.cli.app import build_parser, main

    class ClashMethod(NormOnlyMethod):
        name = "test_clash"
        config_class = make_dataclass("ClashOptions", [declared], bases=(MethodConfig,))

    try:
        with pytest.raises(ValueError, match=message):
            register_method(ClashMethod)
        assert "test_clash" not in METHODS
        build_parser()
        assert main(["delta", "list"]) == 0
    finally:
        unregister_method(ClashMethod.name)


def test_no_method_flag_can_clash_with_a_flag_train_or_sweep_has():
    """register_method's reserved keys cover every flag of train and sweep that is not a
    method flag, so adding the method flags to the parser cannot fail."""
    import argparse

    from slimtune.cli.app import build_parser
    from slimtune.cli.train import method_flags
    from slimtune.training.config import reserved_keys

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    reserved, methods = reserved_keys(), set(method_flags())
    for command in ("train", "sweep"):
        for action in sub.choices[command]._actions:
            names = {s.lstrip("-").replace("-", "_") for s in action.option_strings}
            names = {n for n in names if len(n) > 1}  # -o is --option's short form
            assert names & methods or names <= reserved, (command, action.option_strings)


@dataclass
class OptionalWidthOptions(LoraOptions):
    """A sweepable option whose default None means "decide yourself" (``int | None``)."""

    width: int | None = option(None, flag="toy-width", help="a toy optional option", sweep=True)


class OptionalWidthMethod(WideLoraMethod):
    name = "test_optional_width"
    config_class = OptionalWidthOptions


def test_a_sweepable_option_that_may_be_none_is_swept_as_its_type():
    from slimtune.training.sweep import grid_points

    register_method(OptionalWidthMethod)
    try:
        # the values parse as int (the flag's type), not through the `int | None` union
        assert OptionalWidthOptions.sweepable() == {"r": int, "width": int}
        assert grid_points("test_optional_width", {"toy_width": "1,4"}) == [
            {"width": 1},
            {"width": 4},
        ]
    finally:
        unregister_method(OptionalWidthMethod.name)
