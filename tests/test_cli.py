import json
import os
import subprocess
import sys

import pytest

from slimtune.cli import build_parser, main, train_config_from_args
from slimtune.errors import DataError, UserInputError


@pytest.mark.parametrize("cmd", ["train", "eval", "generate", "demo", "fetch"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: slimtune {cmd}" in capsys.readouterr().out


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: a.jsonl\nmax-steps: 7\nlr: 0.001\nmethod_options: {r: 4}\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.01",
                                      "--lora-alpha", "8"])
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
    with pytest.raises(UserInputError, match=r"unknown\.yaml: unknown option\(s\) \['learning_rate'\]"):
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
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", "--model", str(tiny_dir),
                           "--data", str(bad), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == DataError.exit_code
    assert proc.stderr.strip().splitlines()[-1] == (
        f"slimtune: error: {bad}:2: has 'prompt' or 'completion' but is missing field "
        "'completion'")
    assert "Traceback" not in proc.stderr


def test_train_eval_generate_through_the_cli(tiny_dir, intent_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(intent_file), "--max-steps", "3",
                 "--batch-size", "4", "--output-dir", str(out), "--no-progress",
                 "--freeze-below", "2", "--lora-r", "4"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and f"delta: {out / 'delta'}" in printed
    for name in ("report.md", "report.json", "loss.png", "summary.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    assert manifest["method_config"]["r"] == 4 and manifest["layers"] == [2, 3]

    metrics = tmp_path / "m.json"
    assert main(["eval", "--model", str(tiny_dir), "--delta", str(out / "delta"), "--data",
                 str(intent_file), "--output", str(metrics), "--no-latency"]) == 0
    m = json.loads(metrics.read_text())
    assert m["task"] == "classification" and 0 <= m["accuracy"] <= 1 and m["examples"] == 48

    assert main(["generate", "--model", str(tiny_dir), "--delta", str(out / "delta"),
                 "--max-new-tokens", "3", "hello"]) == 0
