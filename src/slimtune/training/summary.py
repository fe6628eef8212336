"""The run summary as one typed structure: what ``summary.json`` holds, and what reports show.

Every key the trainer writes is a field here, so the report's rows (``eval.report.METRICS``)
and the sweep's columns (``training.sweep.COLUMNS``) are read off the fields' metadata instead
of lists kept by hand beside the trainer. A metric gets a report row by giving its field
``metadata=shown(row, label, kind)``.

Fields marked ``omit_none`` are left out of ``to_dict()`` while None: the eval metrics of a run
without eval data, a method's facts for the other methods, and ``delta_bytes`` in the copy the
manifest holds (the delta is still being written then). Keys a method's ``Method.summary``
returns that are not fields go to ``extra`` and are written as top-level keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

REPORT = "report"
OMIT_NONE = "omit_none"


@dataclass(frozen=True)
class Shown:
    """How reports show a summary field: its row's position (lower first), label and the
    format kind of ``eval.report.fmt`` (pct, f3, f2, f0, sec, ms, bytes, int)."""

    row: int
    label: str
    kind: str
    sweep: bool = True  # also a column of each sweep row


def shown(
    row: int, label: str, kind: str, *, sweep: bool = True, omit_none: bool = False
) -> dict[str, Any]:
    """Field metadata that gives a summary field a report row (and by default a sweep column)."""
    return {REPORT: Shown(row, label, kind, sweep), OMIT_NONE: omit_none}


OPTIONAL = {OMIT_NONE: True}  # metadata of a field written only when it is not None


@dataclass
class RunSummary:
    """One training run's numbers: ``summary.json``, the manifest's ``metrics``."""

    method: str
    steps: int
    freeze_below: int
    trainable_params: int = field(metadata=shown(110, "trainable params", "int"))
    total_params: int
    train_time_s: float = field(metadata=shown(50, "train wall time", "sec"))
    tokens_per_s: float | None = field(metadata=shown(70, "train tokens/s", "f0"))
    step_time_p50_s: float | None = field(metadata=shown(60, "step time p50", "sec"))
    peak_memory_bytes: int = field(metadata=shown(80, "peak memory", "bytes"))
    peak_memory_kind: str
    final_train_loss: float | None
    device: str
    lr: float | None = field(default=None, metadata=OPTIONAL)  # the peak rate trained with
    # the fused GPU kernels the run used (model.kernels; absent when none ran)
    fused_kernels: list[str] | None = field(default=None, metadata=OPTIONAL)
    # --cache-frozen: the cache's examples, bytes and the micro-batches it served or filled
    frozen_cache: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    # evaluation on the eval set (absent without one); the keys of eval.evaluate.evaluate
    eval_examples: int | None = field(default=None, metadata=OPTIONAL)
    eval_accuracy: float | None = field(
        default=None, metadata=shown(10, "accuracy", "pct", omit_none=True)
    )
    eval_loss: float | None = field(
        default=None, metadata=shown(30, "eval loss", "f3", omit_none=True)
    )
    eval_perplexity: float | None = field(
        default=None, metadata=shown(40, "perplexity", "f2", sweep=False, omit_none=True)
    )
    eval_target_tokens: int | None = field(default=None, metadata=OPTIONAL)
    eval_exact_match: float | None = field(
        default=None, metadata=shown(20, "exact match", "pct", omit_none=True)
    )
    eval_normalized_match: float | None = field(
        default=None, metadata=shown(25, "normalized match", "pct", omit_none=True)
    )
    eval_latency_p50_ms: float | None = field(
        default=None, metadata=shown(90, "decode latency p50", "ms", omit_none=True)
    )
    eval_latency_p95_ms: float | None = field(
        default=None, metadata=shown(100, "decode latency p95", "ms", sweep=False, omit_none=True)
    )
    eval_prefill_ms: float | None = field(default=None, metadata=OPTIONAL)
    eval_latency_steps: int | None = field(default=None, metadata=OPTIONAL)  # timed decode steps
    task: str | None = None  # None (and written so) without eval data
    # facts a method adds (Method.summary); the mixture of experts' today
    adapter_params: int | None = field(default=None, metadata=OPTIONAL)
    active_params_per_token: int | None = field(
        default=None, metadata=shown(120, "active adapter params/token", "int", omit_none=True)
    )
    expert_usage: dict[str, list[float]] | None = field(default=None, metadata=OPTIONAL)
    extra: dict[str, Any] = field(default_factory=dict)  # other Method.summary keys
    delta_bytes: int | None = field(
        default=None, metadata=shown(130, "delta on disk", "bytes", omit_none=True)
    )

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the fields ``values`` names; keys that are no field go to ``extra``."""
        names = _names(type(self))
        for key, value in values.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def to_dict(self) -> dict[str, Any]:
        """The summary.json object: fields in order, ``extra``'s keys where it is declared."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
            elif value is not None or not f.metadata.get(OMIT_NONE):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Read a summary.json object back (keys that are no field land in ``extra``)."""
        names = _names(cls)
        missing = [f.name for f in fields(cls) if _required(f) and f.name not in data]
        if missing:
            raise ValueError(f"run summary lacks {', '.join(missing)}")
        summary = cls(**{k: v for k, v in data.items() if k in names})
        summary.extra = {k: v for k, v in data.items() if k not in names}
        return summary


def _names(cls: type[RunSummary]) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def report_metrics(cls: type[RunSummary] = RunSummary) -> list[tuple[str, str, str]]:
    """(key, label, format kind) of each field a report shows, in row order."""
    rows = [(f.metadata[REPORT], f.name) for f in fields(cls) if REPORT in f.metadata]
    return [(name, s.label, s.kind) for s, name in sorted(rows, key=lambda r: r[0].row)]


def sweep_columns(cls: type[RunSummary] = RunSummary) -> tuple[str, ...]:
    """The summary keys of a sweep row, in report row order."""
    rows = [
        (f.metadata[REPORT], f.name)
        for f in fields(cls)
        if REPORT in f.metadata and f.metadata[REPORT].sweep
    ]
    return tuple(name for s, name in sorted(rows, key=lambda r: r[0].row))
