"""The run summary and the delta manifest as typed structures, each declared once."""

import json
import shutil
from dataclasses import dataclass, field

import pytest

from slimtune.delta import read_manifest
from slimtune.delta.manifest import ABSENT, Manifest
from slimtune.errors import DeltaError
from slimtune.eval.report import METRICS, comparison_rows
from slimtune.training.summary import RunSummary, report_metrics, shown, sweep_columns
from slimtune.training.sweep import COLUMNS

from .conftest import intent_rows, train_tiny, write_jsonl


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summary")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return train_tiny(tiny_dir, data, tmp / "run", max_steps=2)


def _summary(**changes):
    base = dict(
        method="lora",
        steps=3,
        freeze_below=1,
        trainable_params=10,
        total_params=100,
        train_time_s=1.5,
        tokens_per_s=None,
        step_time_p50_s=0.5,
        peak_memory_bytes=2048,
        peak_memory_kind="cpu_rss",
        final_train_loss=1.25,
        device="cpu",
    )
    return RunSummary(**{**base, **changes})


def test_report_rows_and_sweep_columns_are_read_off_run_summary():
    assert report_metrics(RunSummary) == METRICS and sweep_columns(RunSummary) == COLUMNS
    # the rows and their order as the report has always shown them
    assert [label for _, label, _ in METRICS] == [
        "accuracy",
        "exact match",
        "normalized match",
        "eval loss",
        "perplexity",
        "train wall time",
        "step time p50",
        "train tokens/s",
        "peak memory",
        "decode latency p50",
        "decode latency p95",
        "trainable params",
        "active adapter params/token",
        "delta on disk",
    ]
    assert "eval_perplexity" not in COLUMNS and "eval_latency_p95_ms" not in COLUMNS
    assert list(COLUMNS) == [k for k, _, _ in METRICS if k in COLUMNS]

    @dataclass
    class WithF1(RunSummary):
        eval_f1: float | None = field(default=None, metadata=shown(15, "f1", "pct", omit_none=True))
        # the same field, now shown under another label and in the sweep too
        eval_perplexity: float | None = field(
            default=None, metadata=shown(40, "ppl", "f2", omit_none=True)
        )

    metrics = report_metrics(WithF1)
    assert [k for k, _, _ in metrics][:3] == ["eval_accuracy", "eval_f1", "eval_exact_match"]
    assert ("eval_perplexity", "ppl", "f2") in metrics
    assert "eval_f1" in sweep_columns(WithF1) and "eval_perplexity" in sweep_columns(WithF1)
    column = WithF1(**{**_summary().__dict__, "eval_f1": 0.5, "eval_perplexity": 3.0}).to_dict()
    rows = comparison_rows([column], metrics)
    assert ["f1", "50.0%"] in rows and ["ppl", "3.00"] in rows
    assert ["f1", "50.0%"] not in comparison_rows([column])  # the default rows: RunSummary's


def test_run_summary_round_trips_and_keeps_method_facts():
    s = _summary(
        eval_accuracy=0.75,
        eval_examples=12,
        task="classification",
        adapter_params=40,
        active_params_per_token=20,
        expert_usage={"0": [1.0, 3.0]},
        delta_bytes=4096,
    )
    s.update({"router_entropy": 0.3, "eval_loss": 0.9})  # a method's key that is no field
    assert s.eval_loss == 0.9 and s.extra == {"router_entropy": 0.3}
    d = s.to_dict()
    assert d["router_entropy"] == 0.3 and "extra" not in d
    assert RunSummary.from_dict(d) == s
    assert RunSummary.from_dict(json.loads(json.dumps(d))) == s
    # absent eval metrics and method facts are not written; task is, even when None
    bare = _summary().to_dict()
    assert bare["task"] is None and bare["tokens_per_s"] is None
    assert not [k for k in bare if k.startswith("eval_")]
    assert "delta_bytes" not in bare and "expert_usage" not in bare and "extra" not in bare
    with pytest.raises(ValueError, match="lacks steps"):
        RunSummary.from_dict({k: v for k, v in bare.items() if k != "steps"})


def test_the_trainer_writes_exactly_the_run_summary(run):
    written = json.loads((run.output_dir / "summary.json").read_text())
    assert written == run.summary == run.run_summary.to_dict()
    assert RunSummary.from_dict(written) == run.run_summary
    assert run.run_summary.delta_bytes == written["delta_bytes"] > 0
    assert run.run_summary.eval_accuracy is not None and run.run_summary.task == "classification"
    on_disk = json.loads((run.delta_dir / "manifest.json").read_text())
    assert on_disk == run.manifest  # what train returns is what it wrote
    assert on_disk["metrics"] == {k: v for k, v in written.items() if k != "delta_bytes"}


def test_manifest_round_trips_and_keeps_absent_apart_from_null(run):
    read = read_manifest(run.delta_dir)
    m = Manifest.from_dict(read, run.delta_dir / "manifest.json")
    assert m.to_dict() == read and m.auto_freeze is None and m.imported_from is ABSENT
    assert "auto_freeze" in m.to_dict() and "imported_from" not in m.to_dict()
    m.update({"future_field": [1, 2]})  # a key a newer slimtune writes is kept as read
    assert Manifest.from_dict(m.to_dict()).to_dict()["future_field"] == [1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("method"), "manifest lacks field 'method'"),
        (lambda m: m.update(layers="1,2"), "'layers' is not a list"),
        (lambda m: m.update(layers=[1, "2"]), "'layers' is not a list"),
        (lambda m: m.update(mergeable="yes"), "'mergeable' is not a boolean"),
        (lambda m: m.update(auto_freeze=[]), "'auto_freeze' is not an object"),
        (lambda m: m.update(created=5), "'created' is not a string"),
        (lambda m: m.update(method_config=[]), "'method_config' is not an object"),
        (
            lambda m: m["base"].pop("fingerprint"),
            "'base' is not an object with a 'fingerprint' string",
        ),
        (lambda m: m["base"].update(fingerprint=5), "'base' is not an object with a 'fingerprint'"),
        (lambda m: m["base"].update(num_layers="4"), "'base.num_layers' is not an integer"),
        (lambda m: m["base"].update(source=["hf"]), "'base.source' is not a string"),
        (lambda m: m.update(base=None), "'base' is not an object with a 'fingerprint' string"),
        (lambda m: m.update(method=None), "'method' is not a string"),
        (lambda m: m.update(metrics=[]), "'metrics' is not an object"),
        (lambda m: m.update(versions={"torch": 2}), "'versions' is not an object"),
        (
            lambda m: next(iter(m["files"].values())).update(bytes=-1),
            "needs 'sha256' (a string) and 'bytes' (an integer)",
        ),
        (
            lambda m: next(iter(m["files"].values())).update(bytes=True),
            "needs 'sha256' (a string) and 'bytes' (an integer)",
        ),
        (lambda m: m.update(format_version="2"), "'format_version' is not an integer"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_named(run, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(run.delta_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    change(m)
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeltaError) as e:
        read_manifest(bad)
    assert message in str(e.value) and str(bad / "manifest.json") in str(e.value)


NOT_RECORDED = [
    "created",
    "mergeable",
    "dataset",
    "training",
    "metrics",
    "versions",
    "layers",
    "resume_changes",
    "imported_from",
    "auto_freeze",
    "imported_base",
]


def test_null_in_an_optional_manifest_field_reads_as_not_recorded(run, tmp_path):
    """Hand-edited and third-party manifests write null for what they did not record; the
    first reader took it so, and the store lists, shows and diffs such a delta."""
    from slimtune.delta import DeltaStore

    nulled = tmp_path / "nulled"
    shutil.copytree(run.delta_dir, nulled)
    m = json.loads((nulled / "manifest.json").read_text())
    m.update({k: None for k in NOT_RECORDED})
    m["base"].update(name=None, source=None, architecture=None, num_layers=None)
    m["versions_of_old"] = None  # an unknown key: kept as read
    (nulled / "manifest.json").write_text(json.dumps(m))
    read = read_manifest(nulled)
    assert read == m
    typed = Manifest.from_dict(read, nulled / "manifest.json")
    assert typed.metrics is None and typed.layers is None and typed.to_dict() == m
    versions = tmp_path / "versions"
    shutil.copytree(run.delta_dir, versions)
    m = json.loads((versions / "manifest.json").read_text())
    m["versions"]["peft"] = None
    (versions / "manifest.json").write_text(json.dumps(m))
    assert read_manifest(versions)["versions"]["peft"] is None
    store = DeltaStore(tmp_path / "store")
    a, b = store.add(nulled), store.add(run.delta_dir)
    shown_a = store.describe(a)
    assert shown_a["metrics"] is None and shown_a["base"]["fingerprint"] == m["base"]["fingerprint"]
    from slimtune.delta.store import diff

    assert diff(a, b)["fields"]["metrics.steps"] == (None, run.run_summary.steps)


def test_save_delta_writes_a_null_extra_field_that_reads_back(tiny, tmp_path):
    from slimtune.delta.format import save_delta
    from slimtune.methods import get_method

    method = get_method("lora", {"r": 2})
    model = method.prepare(tiny.model, [0, 1])
    base = {"fingerprint": "sha256:" + "0" * 64, "name": "tiny"}
    written = save_delta(
        tmp_path / "d",
        method,
        model,
        base=base,
        layers=[0, 1],
        extra={"metrics": None, "dataset": None},
    )
    assert written["metrics"] is None and written["dataset"] is None
    assert read_manifest(tmp_path / "d") == written
