import json
import os
import subprocess
import sys

import pytest

from slimtune.cli.app import build_parser, main, train_config_from_args, train_options_from_args
from slimtune.errors import DataError, UserInputError


@pytest.mark.parametrize("cmd", ["train", "eval", "generate", "demo", "fetch"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: slimtune {cmd}" in capsys.readouterr().out


def test_the_cli_module_is_importable_and_patchable_by_its_dotted_name(monkeypatch):
    """``slimtune.cli.app`` names the module (not the function ``slimtune.cli.main``), so a
    test or plugin can patch what ``main`` runs; ``from slimtune.cli import main`` stays."""
    import importlib
    import types

    import slimtune.cli
    import slimtune.cli.app as app

    assert isinstance(app, types.ModuleType) and slimtune.cli.main is app.main is main
    monkeypatch.setitem(app.COMMANDS, "eval", lambda args: 42)
    assert slimtune.cli.main(["eval", "--data", "x.jsonl"]) == 42
    assert importlib.import_module("slimtune.cli.app") is app


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: a.jsonl\nmax-steps: 7\nlr: 0.001\nmethod_options: {r: 4}\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg_file), "--lr", "0.01", "--lora-alpha", "8"]
    )
    cfg = train_config_from_args(args)
    assert (cfg.data, cfg.max_steps, cfg.lr, cfg.batch_size) == ("a.jsonl", 7, 0.01, 8)
    assert cfg.method_options == {"r": 4, "alpha": 8.0}


def test_yaml_errors_name_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: a.jsonl\nmax_steps: [1,\n")
    with pytest.raises(UserInputError, match=r"bad\.yaml:3: invalid YAML"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(bad)]))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data: a.jsonl\nlearning_rate: 1\n")
    with pytest.raises(
        UserInputError, match=r"unknown\.yaml: unknown option\(s\) \['learning_rate'\]"
    ):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(unknown)]))


def test_user_errors_print_one_line_and_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    code = main(["eval", "--model", "/nonexistent/model", "--data", str(bad)])
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1 and "no such model folder" in err
    code = main(["train", "--data", str(bad), "--max-steps", "0"])
    assert code == UserInputError.exit_code
    assert "max_steps must be >= 1" in capsys.readouterr().err


def test_bad_data_through_the_real_command(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimtune",
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(bad),
            "--output-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == DataError.exit_code
    assert proc.stderr.strip().splitlines()[-1] == (
        f"slimtune: error: {bad}:2: has 'prompt' or 'completion' but is missing field "
        "'completion' (its fields: 'prompt')"
    )
    assert "Traceback" not in proc.stderr


def test_train_eval_generate_through_the_cli(tiny_dir, intent_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(intent_file),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--output-dir",
                str(out),
                "--no-progress",
                "--freeze-below",
                "2",
                "--lora-r",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "accuracy" in printed and f"delta: {out / 'delta'}" in printed
    for name in ("report.md", "report.json", "loss.png", "summary.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    assert manifest["method_config"]["r"] == 4 and manifest["layers"] == [2, 3]

    metrics = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--delta",
                str(out / "delta"),
                "--data",
                str(intent_file),
                "--output",
                str(metrics),
                "--no-latency",
            ]
        )
        == 0
    )
    m = json.loads(metrics.read_text())
    assert m["task"] == "classification" and 0 <= m["accuracy"] <= 1 and m["examples"] == 48

    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--delta",
                str(out / "delta"),
                "--max-new-tokens",
                "3",
                "hello",
            ]
        )
        == 0
    )


def test_yaml_keys_are_the_flags_names(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "data: a.jsonl\nlora_r: 4\nlora-alpha: 8\nlora_dropout: 0.0\n"
        "lora_targets: q_proj,v_proj\noption: [adapter_dtype_follows_base=true]\n"
        "no_progress: true\n"
        "no_store: true\nstore: /tmp/s\nnote: first try\nparent: v2\n"
    )
    cfg, store = train_options_from_args(
        build_parser().parse_args(["train", "--config", str(cfg_file)])
    )
    assert cfg.method_options == {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "adapter_dtype_follows_base": True,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert cfg.progress is False
    assert (store.no_store, store.store, store.note, store.parent) == (
        True,
        "/tmp/s",
        "first try",
        "v2",
    )
    # flags still win over the same key in the file, and mean the same
    cfg, store = train_options_from_args(
        build_parser().parse_args(
            ["train", "--config", str(cfg_file), "--lora-r", "16", "--note", "second"]
        )
    )
    assert cfg.method_options["r"] == 16 and store.note == "second"


def test_yaml_values_are_type_checked(tmp_path):
    def load(text):
        f = tmp_path / "t.yaml"
        f.write_text("data: a.jsonl\n" + text)
        return train_config_from_args(build_parser().parse_args(["train", "--config", str(f)]))

    assert load("lr: 1e-3\n").lr == 0.001  # a string to YAML 1.1
    assert load("max_grad_norm: 2\n").max_grad_norm == 2.0
    for text, message in [
        ("lr: abc\n", r"t\.yaml: field 'lr' must be a number or 'auto', got 'abc'"),
        ('overwrite: "false"\n', r"t\.yaml: field 'overwrite' must be true or false, got 'false'"),
        ("max_steps: 1e3\n", r"field 'max_steps' must be an integer, got '1e3'"),
        ("pack: 1\n", r"field 'pack' must be true or false, got 1"),
        ("lr: .nan\n", r"field 'lr' must be a finite number, got nan"),
        ("method_options: [r]\n", r"field 'method_options' must be a mapping"),
        # a method option's type error names the file too, however the option is given
        ("lora_r: eight\n", r"t\.yaml: method options: field 'r' must be an integer, got 'eig"),
        ("method_options: {r: x}\n", r"t\.yaml: method options: field 'r' must be an integer"),
        ("option: {dropout: x}\n", r"t\.yaml: method options: field 'dropout' must be a number"),
        ("no_progress: 'yes'\n", r"field 'no_progress' must be true or false"),
    ]:
        with pytest.raises(UserInputError, match=message):
            load(text)


def test_yaml_budgets_take_plain_numbers_as_their_parsers_do(tmp_path):
    # options.parse_duration/parse_size read 3 as 3 s and 6000000000 as bytes; the type check
    # must not refuse what they accept (it did: "must be a string")
    f = tmp_path / "b.yaml"
    f.write_text("data: a.jsonl\nfreeze: auto\nbudget_step_time: 3\nbudget_memory: 6000000000\n")
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(f)]))
    assert (cfg.budget_step_time, cfg.budget_memory) == (3, 6000000000)
    f.write_text("data: a.jsonl\nfreeze: auto\nbudget_step_time: [3]\n")
    with pytest.raises(UserInputError, match="field 'budget_step_time' must be"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(f)]))


def test_bad_option_values_and_devices_exit_2_without_traceback(tmp_path, capsys, monkeypatch):
    import torch

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n' * 4)
    base = ["train", "--data", str(data), "--output-dir", str(tmp_path / "r"), "--no-store"]
    for extra, message in [
        (["-o", "r=abc"], "field 'r' must be an integer, got 'abc'"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--max-grad-norm", "nan"], "field 'max_grad_norm' must be a finite"),
        (["--lr", "inf"], "field 'lr' must be a finite number"),
    ]:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--device", "cuda"]) == 2  # never a silent CPU run
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert main(["generate", "--device", "cuda", "hi"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert main([*base, "--device", "gpu0"]) == 2
    assert "not a device" in capsys.readouterr().err


def test_resume_of_a_finished_run_only_finishes_the_store_add(
    tiny_dir, intent_file, tmp_path, capsys
):
    from slimtune.delta import DeltaStore

    out, store = tmp_path / "run", tmp_path / "store"
    train = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(intent_file),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*train, "--no-store"]) == 0  # as if killed during the add
    delta_time = (out / "delta" / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*train, "--resume", "--store", str(store), "--lr", "1e-5"]) == 0
    printed = capsys.readouterr().out
    assert "holds a finished run: nothing to train" in printed and "stored as v1" in printed
    assert main([*train, "--resume", "--store", str(store)]) == 0
    assert "already stored as v1" in capsys.readouterr().out
    assert [v.id for v in DeltaStore(store).list()] == ["v1"]
    assert (out / "delta" / "manifest.json").stat().st_mtime_ns == delta_time  # not retrained


def _help(capsys, cmd: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_method_flags_come_from_the_methods_with_each_ones_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens too
    from slimtune.methods import METHODS

    text = _help(capsys, "train")
    # every registered method, dora included, and the default
    assert f"--method METHOD {', '.join(sorted(METHODS))} (default lora)" in text
    assert "dora" in sorted(METHODS)
    # a shared flag names its methods; their defaults where they differ
    assert "share of each weight to train (rosa 0.005, shira 0.01, sparse 0.01)" in text
    assert "LoRA rank (dora, lora, rosa; default 8)" in text
    assert "rank of each expert (experts; default 8)" in text
    # a default resolved later reads as the method words it, not as None
    assert "(rosa entries, sparse columns or, with --regrow-every, entries)" in text
    assert "None" not in text
    assert "comma-separated values to sweep" not in text
    sweep = _help(capsys, "sweep")
    assert "LoRA rank (dora, lora, rosa; default 8; comma-separated values to sweep)" in sweep
    assert "LoRA alpha (dora, lora, rosa; default 16)" in sweep  # not sweepable


def test_every_method_flag_sets_its_option(tmp_path):
    from slimtune.training.sweep import grid_flags

    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "a.jsonl",
            "--method",
            "rosa",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0",
            "--lora-targets",
            "q_proj, v_proj",
            "--density",
            "0.02",
            "--importance",
            "grad",
            "--selection",
            "global",
            "--regrow-every",
            "5",
        ]
    )
    assert train_config_from_args(args).method_options == {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "density": 0.02,
        "importance": "grad",
        "selection": "global",
        "regrow_every": 5,
    }
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "a.jsonl",
            "--method",
            "experts",
            "--experts",
            "4",
            "--top-k",
            "1",
            "--expert-rank",
            "2",
            "--aux-weight",
            "0.1",
        ]
    )
    assert train_config_from_args(args).method_options == {
        "experts": 4,
        "top_k": 1,
        "rank": 2,
        "aux_weight": 0.1,
    }
    assert grid_flags() == {
        "lora_r": "r",
        "experts": "experts",
        "top_k": "top_k",
        "expert_rank": "rank",
        "density": "density",
    }


def test_a_sweep_runs_in_its_own_folder_unless_the_flags_or_the_yaml_name_one(tmp_path, capsys):
    from slimtune.cli.train import sweep_config_from_args

    def folder(*argv: str) -> str:
        args = build_parser().parse_args(["sweep", "--data", "a.jsonl", *argv])
        return sweep_config_from_args(args)[0].output_dir

    assert folder("--lora-r", "2,4") == "runs/sweep-lora"
    assert folder("--method", "sparse") == "runs/sweep-sparse"
    f = tmp_path / "s.yaml"
    f.write_text("method: rosa\n")
    assert folder("--config", str(f)) == "runs/sweep-rosa"
    f.write_text("method: rosa\noutput_dir: runs/mine\n")  # the YAML's folder was dropped
    assert folder("--config", str(f)) == "runs/mine"
    assert folder("--config", str(f), "--output-dir", "runs/flag") == "runs/flag"
    assert _help(capsys, "sweep").count("run folder (default runs/sweep-METHOD)") == 1
    assert "run folder (default runs/train)" in _help(capsys, "train")


def test_eval_ab_plan_analyze_check_their_flags_before_loading_a_model(capsys, monkeypatch):
    import slimtune.cli.run
    import slimtune.delta
    import slimtune.model.loading

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(slimtune.cli.run, "_load_with_delta", no_model)
    monkeypatch.setattr(slimtune.delta.DeltaSwitcher, "with_delta", no_model)
    monkeypatch.setattr(slimtune.model.loading, "load_model", no_model)
    cases = [
        (["eval", "--data", "d.jsonl", "--limit", "0"], "--limit: must be >= 1, got 0"),
        (["eval", "--data", "d.jsonl", "--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
        (
            ["eval", "--data", "d.jsonl", "--task", "clasification"],
            "invalid choice: 'clasification'",
        ),
        (["ab", "v1", "v2", "--data", "d.jsonl", "--limit", "-3"], "--limit: must be >= 1"),
        (["ab", "v1", "v2", "--data", "d.jsonl", "--task", "Chat"], "invalid choice: 'Chat'"),
        (["plan", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["analyze", "--data", "d.jsonl", "--max-examples", "x"], "'x' is not a whole number"),
        (["analyze", "--data", "d.jsonl", "--max-length", "4"], "--max-length must be >= 8"),
        (["plan", "--data", "d.jsonl", "--budget-memory", "nan"], "cannot read memory size"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusal of a flag's value
            code = e.code
        assert code == 2, argv
        assert message in " ".join(capsys.readouterr().err.split()), argv
