"""Measured quality per method: what ``slimtune plan`` weighs against cost.

A cost model alone cannot choose between methods: every candidate that trains every layer
has the same SALF gain G(0) = 1, so the cheapest would always win, whatever it reaches.
This module holds the accuracies slimtune's own benchmarks measured for each method, and
turns them into a *prior*: a method's accuracy relative to LoRA r=16 (the reference) at
the same steps on the same task, averaged over the tasks measured, with the lowest and
highest ratio kept as its spread.

What the prior is, and is not: measurements of the default model (SmolLM2-135M-Instruct)
on two 6-class classification tasks, one seed each, each method at its best measured
learning rate. The standard error of one accuracy on 240 test messages is about 1.5-2
points, so differences of a point or two between methods are within noise
(:data:`NEAR_TIE`). It says nothing certain about another model or a task of another
kind; a short pilot run on the user's own data would (not built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Where the rows come from. Each task's rows share model, steps, batch and test set.
INTENTS = "support-intents"
ISSUE18 = "issue-18 task"
SOURCES = {
    INTENTS: (
        "bundled support-intents, default model, 80 steps x 8, seed 0, CPU; BENCHMARKS.md "
        "'Sparse fine-tuning and robust sparse adapters: quality' and 'Routed expert "
        "adapters: quality'"
    ),
    ISSUE18: (
        "a held-out 6-class task (720 train / 240 test), default model, 150 steps x 8; "
        "issue 18's table"
    ),
}

#: Relative differences this small are within the evidence's noise: about one point of
#: accuracy at 90-97% (one seed per row; ~1.5-2 points standard error per accuracy).
NEAR_TIE = 0.01


@dataclass(frozen=True)
class Measured:
    """One measured accuracy (percent) of a method at one learning rate on one task."""

    task: str
    method: str
    options: dict
    lr: float
    accuracy: float


#: Each method's best measured row per task (the rates measured are in the sources).
EVIDENCE: tuple[Measured, ...] = (
    Measured(INTENTS, "full", {}, 1e-4, 97.9),
    Measured(INTENTS, "lora", {"r": 8}, 1e-3, 94.2),
    Measured(INTENTS, "lora", {"r": 16, "alpha": 32}, 1e-3, 96.7),
    Measured(INTENTS, "sparse", {}, 1e-3, 96.7),  # defaults: 1% of each weight, fisher
    Measured(INTENTS, "rosa", {}, 1e-3, 98.8),  # defaults: LoRA r=8 + 0.5%, fisher
    Measured(INTENTS, "experts", {"experts": 8, "top_k": 2, "rank": 8}, 5e-4, 94.6),
    Measured(ISSUE18, "full", {}, 1e-4, 85.0),
    Measured(ISSUE18, "lora", {"r": 8}, 2e-4, 86.3),  # only its default rate was measured
    Measured(ISSUE18, "lora", {"r": 16}, 1e-3, 90.4),
    Measured(ISSUE18, "sparse", {}, 1e-3, 89.6),
    Measured(ISSUE18, "rosa", {}, 1e-3, 91.7),
    Measured(ISSUE18, "experts", {}, 1e-3, 89.2),
)
REFERENCE = ("lora", 16)  # (method, rank): the denominator of every ratio


@dataclass
class Prior:
    """A method's measured accuracy relative to the reference, over the tasks measured."""

    method: str
    rank: int | None
    relative: float  # mean over tasks of accuracy / reference accuracy
    low: float
    high: float
    lr: float  # the rate of its row on the bundled task (reproducible there)
    rows: list[Measured] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method + (f" r{self.rank}" if self.rank is not None else "")

    def cite(self) -> str:
        """The rows behind the prior, e.g. 'support-intents 97.9% vs 96.7% (lr 1e-4); ...'."""
        parts = []
        for row in self.rows:
            ref = _reference_row(row.task)
            parts.append(
                f"{row.task} {row.accuracy:.1f}% vs {ref.accuracy:.1f}% (lr {row.lr:g})"
                if ref is not None and ref is not row
                else f"{row.task} {row.accuracy:.1f}% (lr {row.lr:g})"
            )
        return "; ".join(parts)


def _rank(method: str, options: dict) -> int | None:
    """The LoRA rank that tells two rows of a low-rank method apart (None for the rest)."""
    return int(options["r"]) if method == "lora" and "r" in options else None


def _reference_row(task: str) -> Measured | None:
    return next(
        (
            r
            for r in EVIDENCE
            if r.task == task and (r.method, _rank(r.method, r.options)) == REFERENCE
        ),
        None,
    )


def _rows_for(method: str, rank: int | None) -> list[Measured]:
    """Per task, the row of ``method`` whose rank is nearest ``rank`` (ties: the lower)."""
    rows = [r for r in EVIDENCE if r.method == method]
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        if rank is not None:
            mine.sort(
                key=lambda r: (
                    abs((_rank(r.method, r.options) or rank) - rank),
                    _rank(r.method, r.options) or 0,
                )
            )
        out.append(mine[0])
    return out


def prior(method: str, options: dict | None = None) -> Prior | None:
    """The measured prior of ``method`` with ``options`` (a LoRA rank not measured takes the
    nearest measured one), or None where slimtune has no measurement of the method."""
    rank = _rank(method, dict(options or {}))
    rows = [r for r in _rows_for(method, rank) if _reference_row(r.task) is not None]
    if not rows:
        return None
    ratios = [r.accuracy / _reference_row(r.task).accuracy for r in rows]  # type: ignore[union-attr]
    bundled = next((r for r in rows if r.task == INTENTS), rows[0])
    measured_rank = _rank(method, bundled.options)
    return Prior(
        method,
        measured_rank,
        sum(ratios) / len(ratios),
        min(ratios),
        max(ratios),
        bundled.lr,
        rows,
    )
