"""`slimtune sweep`: one run per grid point, one table and plot, resumable."""

import json

from slimtune.cli.app import main


def _sweep(tiny_dir, intent_file, out, *extra):
    return main(
        [
            "sweep",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--output-dir",
            str(out),
            *extra,
        ]
    )


def test_sweep_trains_every_point_and_reuses_finished_ones(tiny_dir, intent_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        _sweep(
            tiny_dir,
            intent_file,
            out,
            "--method",
            "experts",
            "--experts",
            "2,4",
            "--expert-rank",
            "2",
        )
        == 0
    )
    first = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["point"] for r in first] == ["experts=2,rank=2", "experts=4,rank=2"]
    # twice the experts: twice the adapter, the same active parameters per token (+ router)
    a, b = first
    assert b["trainable_params"] > 1.9 * a["active_params_per_token"]
    assert b["active_params_per_token"] < 1.1 * a["active_params_per_token"]
    assert (out / "sweep.png").stat().st_size > 1000
    assert "experts=4,rank=2" in (out / "report.md").read_text()
    capsys.readouterr()
    assert (
        _sweep(
            tiny_dir,
            intent_file,
            out,
            "--method",
            "experts",
            "--experts",
            "2,4",
            "--expert-rank",
            "2",
        )
        == 0
    )
    assert capsys.readouterr().err.count("finished earlier") == 2
    assert json.loads((out / "sweep.json").read_text())["rows"] == first


def test_sweep_over_lora_rank_and_sparse_density(tiny_dir, intent_file, tmp_path):
    assert _sweep(tiny_dir, intent_file, tmp_path / "l", "--method", "lora", "--lora-r", "2,8") == 0
    rows = json.loads((tmp_path / "l" / "sweep.json").read_text())["rows"]
    assert rows[1]["trainable_params"] == 4 * rows[0]["trainable_params"]
    assert (
        _sweep(
            tiny_dir, intent_file, tmp_path / "s", "--method", "sparse", "--density", "0.01,0.05"
        )
        == 0
    )
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]


def test_sweep_refuses_bad_grids_and_changed_options(tiny_dir, intent_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(tiny_dir, intent_file, out, "--method", "lora", "--lora-r", "2,x") == 2
    assert "'x' is not an integer" in capsys.readouterr().err
    assert _sweep(tiny_dir, intent_file, out, "--method", "lora", "--experts", "2") == 2
    assert "does not apply to --method lora" in capsys.readouterr().err
    assert _sweep(tiny_dir, intent_file, out, "--method", "lora") == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert _sweep(tiny_dir, intent_file, out, "--method", "lora", "--lora-r", "2") == 0
    rc = main(
        [
            "sweep",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--output-dir",
            str(out),
            "--method",
            "lora",
            "--lora-r",
            "2",
        ]
    )
    assert rc == 2 and "other options" in capsys.readouterr().err
