"""Measured quality per method: what ``slimtune plan`` weighs against cost.

A cost model alone cannot choose between methods: every candidate that trains every layer
has the same SALF gain G(0) = 1, so the cheapest would always win, whatever it reaches
(issue 18: plan chose full fine-tuning, the lowest scorer on that task). This module holds
the scores slimtune's own benchmarks measured for each method and turns them into a
*prior*: the method's score relative to LoRA r=8 (the default method, the reference) on
the same task in the same benchmark, averaged over the tasks measured, with the lowest and
highest ratio kept as its spread.

What the prior is, and is not: measurements of the two packaged models on the two bundled
tasks (6-class support intents, accuracy; support extraction, exact match), mostly three
seeds, each method at the default learning rate ``slimtune train`` gives it on that model
(for full fine-tuning, whose default is the range test, the swept rate it lands near; on
the default model only), plus CPU rows: LoRA r=16 against r=8, experts and SHiRA on
extraction, which the sweep lacks at their default rates, and on Gemma 3 LoRA and sparse
(three seeds on intents, one on extraction; a method's GPU and CPU rows are averaged,
each against LoRA in its own source). Gemma 3's GPU rows were measured again after
left-padded scoring on CUDA was fixed (``model/masks.py``), at the rates
``training/lr_scale.py`` now gives it. SHiRA's default-model rows are at its default 1e-2
(the sweep's ran at 3e-3): intents beside LoRA in a later GPU call with the right
tokenizer, extraction on the CPU. A plan for a model measured here uses that model's rows;
another model gets the rows of all measured models, and says so. Nothing certain follows
for a task of another kind. A short pilot run on the user's own data would say more (not
built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SWEEP = "sweep"
DEFAULT_CHECK = "default-check"
GEMMA_SWEEP = "gemma-sweep"
CPU = "cpu-quality"
CPU_SWEEP = "cpu-sweep"
SOURCES = {
    SWEEP: (
        "BENCHMARKS.md, 'Default learning rates: a sweep on both bundled tasks and both "
        "packaged models': 1 x H200, 100 steps x 8, default options and learning rates, "
        "the 240 test records; the mean of seeds 0-2 where three were run"
    ),
    DEFAULT_CHECK: (
        "BENCHMARKS.md, 'The default model's defaults with the right tokenizer': 1 x H200, "
        "100 steps x 8, default options, seeds 0-2, the 240 test records"
    ),
    GEMMA_SWEEP: (
        "BENCHMARKS.md, 'Scoring on the GPU, fixed' and 'Gemma 3's rates after the fix': "
        "1 x H200, 100 steps x 8, default options and learning rates, seeds 0-2, the 240 "
        "test records"
    ),
    CPU: (
        "BENCHMARKS.md, 'Routed expert adapters: quality against LoRA of equal active "
        "parameters' and the sparse quality table: CPU, 80 steps x 8, seed 0, lr 1e-3"
    ),
    CPU_SWEEP: (
        "BENCHMARKS.md, 'Default learning rates' (experts and SHiRA on extraction; on "
        "Gemma 3 LoRA and sparse at its scaled rate) and the SALF table 'A higher rate for "
        "a frozen run': 2-core CPU, fp32, 100 steps x 8, default options, the 240 test "
        "records"
    ),
}
ON_GPU = (SWEEP, DEFAULT_CHECK, GEMMA_SWEEP)  # the other sources' rows are cited with "(CPU)"
INTENTS, EXTRACT = "support-intents", "support-extract"

#: Relative differences this small are within the evidence's noise: about one point at
#: 80-97% (the sweep's seeds differ by 1-2 points; one seed's accuracy on 240 test
#: records has a standard error of ~1.5-2 points).
NEAR_TIE = 0.01


@dataclass(frozen=True)
class Measured:
    """One measured score (percent: accuracy or exact match) of a method on a task."""

    source: str  # rows are compared only within one source
    model: str  # the packaged model's spec
    task: str
    method: str
    options: dict  # what tells two rows of one method apart (the LoRA rank)
    lr: float
    score: float
    seeds: int = 1


def _sweep(
    model: str,
    task: str,
    scores: dict[str, tuple[float, int]],
    source: str = SWEEP,
    lrs: dict[str, float] | None = None,
) -> list[Measured]:
    """One sweep's rows: each method at ``lrs`` (default 1e-3), LoRA at rank 8."""
    # full: the rows at 3e-4, the rate its default (the range test, --lr auto) lands near
    # on the default model (3.6e-4 and 1.9e-4 on the two tasks); the rest: their defaults
    lrs = {"full": 3e-4} if lrs is None else lrs
    return [
        Measured(source, model, task, m, {"r": 8} if m == "lora" else {}, lrs.get(m, 1e-3), s, n)
        for m, (s, n) in scores.items()
    ]


# Gemma 3's default rates: the swept rates scaled to its weights (lr_scale.py)
GEMMA_LRS = {"sparse": 2e-4, "rosa": 3e-4, "shira": 1e-3, "experts": 4e-4}


EVIDENCE: tuple[Measured, ...] = (
    *_sweep(
        "default",
        INTENTS,
        {
            "lora": (96.5, 3),
            "sparse": (95.6, 3),
            "rosa": (97.5, 3),
            "experts": (97.1, 3),
            "full": (96.7, 3),
        },
    ),
    *_sweep(
        "default",
        EXTRACT,
        {
            "lora": (82.2, 3),
            "sparse": (80.6, 3),
            "rosa": (81.5, 3),
            "full": (82.1, 1),
        },
    ),
    # SHiRA at its default 1e-2 beside LoRA, the default model with the right tokenizer
    # (the sweep's shira rows ran at 3e-3, 3.6 and 6.2 points under 1e-2)
    Measured(DEFAULT_CHECK, "default", INTENTS, "lora", {"r": 8}, 1e-3, 94.9, 3),
    Measured(DEFAULT_CHECK, "default", INTENTS, "shira", {}, 1e-2, 98.1, 3),
    # Gemma 3 270M on the GPU, every method at the rate train gives it there (GEMMA_LRS,
    # lora 1e-3), scored with left-padded inference fixed (model/masks.py; the rows before
    # the fix read one intents batch in fifteen wrong; extraction's were not affected, and
    # its rosa and shira rows include the sweep's runs at these rates). Six seeds where
    # two calls ran the same three ...
    *_sweep(
        "gemma3-270m",
        INTENTS,
        {
            "lora": (96.4, 3),
            "sparse": (95.4, 3),
            "rosa": (96.4, 3),
            "shira": (96.3, 6),
            "experts": (95.3, 3),
        },
        GEMMA_SWEEP,
        GEMMA_LRS,
    ),
    *_sweep(
        "gemma3-270m",
        EXTRACT,
        {
            "lora": (90.0, 3),
            "sparse": (89.0, 3),
            "rosa": (87.2, 3),
            "shira": (89.4, 6),
            "experts": (88.6, 3),
        },
        GEMMA_SWEEP,
        GEMMA_LRS,
    ),
    # ... and the same rates on the CPU (fp32; three seeds on intents, one on extraction)
    Measured(CPU_SWEEP, "gemma3-270m", INTENTS, "lora", {"r": 8}, 1e-3, 96.0, 3),
    Measured(CPU_SWEEP, "gemma3-270m", INTENTS, "sparse", {}, 2e-4, 96.3, 3),
    Measured(CPU_SWEEP, "gemma3-270m", EXTRACT, "lora", {"r": 8}, 1e-3, 92.1),
    Measured(CPU_SWEEP, "gemma3-270m", EXTRACT, "sparse", {}, 2e-4, 91.7),
    Measured(CPU, "default", INTENTS, "lora", {"r": 8}, 1e-3, 94.2),
    Measured(CPU, "default", INTENTS, "lora", {"r": 16, "alpha": 32}, 1e-3, 96.7),
    # the sweep has no experts row on extraction: these two, on the CPU, stand in
    Measured(CPU_SWEEP, "default", EXTRACT, "lora", {"r": 8}, 1e-3, 79.6),
    Measured(CPU_SWEEP, "default", EXTRACT, "experts", {}, 1e-3, 80.4),
    # ... and SHiRA at its default 1e-2 (the default-check call ran no LoRA on extraction)
    Measured(CPU_SWEEP, "default", EXTRACT, "shira", {}, 1e-2, 82.5),
)
REFERENCE = ("lora", 8)  # (method, rank): the denominator of every ratio


@dataclass
class Prior:
    """A method's measured score relative to the reference, over the tasks measured."""

    method: str
    rank: int | None
    relative: float  # mean over (source, model, task) of score / the reference's score
    low: float
    high: float
    lr: float  # the learning rate of its rows
    rows: list[Measured] = field(default_factory=list)
    other_models: bool = False  # no row of the model planned for: all models' rows

    @property
    def label(self) -> str:
        return self.method + (f" r{self.rank}" if self.rank is not None else "")

    def cite(self) -> str:
        """The rows behind the prior, e.g. 'default support-intents 96.7% vs 96.5%
        (3 seeds, lr 0.0003); ...', each against the reference's score."""
        parts = []
        for row in self.rows:
            ref = _reference_row(row)
            seeds = f"{row.seeds} seeds, " if row.seeds > 1 else "1 seed, "
            where = f"{row.model} {row.task}" + (" (CPU)" if row.source not in ON_GPU else "")
            if ref is None or ref is row:
                parts.append(f"{where} {row.score:.1f}% ({seeds}lr {row.lr:g})")
            else:
                parts.append(f"{where} {row.score:.1f}% vs {ref.score:.1f}% ({seeds}lr {row.lr:g})")
        return "; ".join(parts) + (" (measured on other models)" if self.other_models else "")


def _rank(method: str, options: dict) -> int | None:
    """The LoRA rank that tells two rows of LoRA apart (None for other methods)."""
    return int(options.get("r", 8)) if method == "lora" else None


def _reference_row(row: Measured) -> Measured | None:
    """The reference's row measured beside ``row`` (same source, model and task)."""
    return next(
        (
            r
            for r in EVIDENCE
            if (r.source, r.model, r.task) == (row.source, row.model, row.task)
            and (r.method, _rank(r.method, r.options)) == REFERENCE
        ),
        None,
    )


def _rows_for(method: str, rank: int | None, model: str | None) -> tuple[list[Measured], bool]:
    """The rows of ``method`` at the measured rank nearest ``rank`` (ties: the lower) that
    have a reference beside them: ``model``'s own, else every model's (and True)."""
    rows = [r for r in EVIDENCE if r.method == method and _reference_row(r) is not None]
    if rank is not None and rows:
        ranks = {_rank(r.method, r.options) or 0 for r in rows}
        nearest = min(ranks, key=lambda x: (abs(x - rank), x))
        rows = [r for r in rows if _rank(r.method, r.options) == nearest]
    own = [r for r in rows if r.model == model]
    return (own, False) if own else (rows, bool(rows))


def prior(method: str, options: dict | None = None, model: str | None = None) -> Prior | None:
    """The measured prior of ``method`` with ``options`` for ``model`` (a packaged model's
    spec; another model takes every model's rows), or None where slimtune has measured
    nothing of the method. A LoRA rank not measured takes the nearest measured one."""
    rank = _rank(method, dict(options or {}))
    rows, other = _rows_for(method, rank, model)
    if not rows:
        return None
    ratios = []
    for r in rows:
        ref = _reference_row(r)
        assert ref is not None  # _rows_for keeps only rows with a reference
        ratios.append(r.score / ref.score)
    return Prior(
        method,
        _rank(method, rows[0].options),
        sum(ratios) / len(ratios),
        min(ratios),
        max(ratios),
        rows[0].lr,
        rows,
        other,
    )
