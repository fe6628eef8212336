"""--report-to: the metrics of metrics.jsonl reach accelerate's experiment trackers."""

import json

import pytest

from slimtune.cli.app import main
from slimtune.errors import UserInputError
from slimtune.training.trackers import parse_report_to

from .conftest import train_tiny


def test_tensorboard_gets_every_metrics_record_and_the_final_eval(tiny_dir, intent_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = train_tiny(tiny_dir, intent_file, out, max_steps=3, report_to="tensorboard")
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under RUN/logs"
    scalars = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        logged = sorted(scalars[key])
        assert [s for s, _ in logged] == [1, 2, 3]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in records], rel=1e-5)
    assert scalars["eval_accuracy"] == [(3, pytest.approx(result.summary["eval_accuracy"]))]


def test_unknown_or_missing_tracker_is_a_clear_user_error(
    monkeypatch, tiny_dir, intent_file, tmp_path, capsys
):
    with pytest.raises(UserInputError, match="'neptune': unknown tracker"):
        parse_report_to("tensorboard,neptune")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    rc = main(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "r"),
            "--no-store",
            "--report-to",
            "wandb",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "the package 'wandb' is not installed; pip install wandb" in err
    assert not (tmp_path / "r" / "delta").exists()
