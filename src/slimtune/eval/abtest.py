"""A/B tests of two deltas: paired statistics on the same examples, or unpaired ones on
live traffic, a winner, and costs.

Offline, per example, each side is correct or not (classification, exact match) or has a
loss (language modelling). The difference B - A is reported with a paired bootstrap 95%
confidence interval (resampling examples), and, for correctness, McNemar's exact test on
the discordant pairs. A side wins when it scores better; the result is *significant* when
the test's p < 0.05 (correctness) or the interval excludes 0 (loss).

On live traffic (``slimtune serve``'s log) each request saw one side only: the difference
of the mean outcomes gets a bootstrap interval resampling each side on its own, and 0/1
outcomes Fisher's exact test instead of McNemar's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Resampled means are drawn this many samples at a time: (chunk, n) int64 indices stay ~40 MB
# at n = 20,000 examples instead of the 320 MB one draw of all 2,000 samples would take.
_BOOTSTRAP_CHUNK = 256
# Up to this many distinct differences the resample is drawn as category counts.
_FEW_VALUES = 64


def _log_factorials(n: int) -> np.ndarray:
    """log(k!) for k = 0..n, by cumulative sum: exact tests stay in log space."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def _interval(mean_diff: float, means: np.ndarray) -> dict:
    """The bootstrap's verdict: the observed difference and the percentile 95% interval
    of the resampled ones."""
    means = np.sort(means)
    samples = len(means)
    return {
        "mean_diff": float(mean_diff),
        "ci_low": float(means[int(0.025 * samples)]),
        "ci_high": float(means[int(0.975 * samples) - 1]),
        "samples": samples,
    }


def _winner(mean_diff: float, higher_is_better: bool) -> str:
    if mean_diff == 0:
        return "tie"
    return "B" if (mean_diff > 0) == higher_is_better else "A"


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> dict:
    """Exact two-sided McNemar test: only examples where exactly one side is right count.

    The binomial tail is summed in log space (log factorials by cumulative sum), so it stays
    exact to float precision and O(n) where exact integer binomials grow with 2**n.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    k = min(only_a, only_b)
    log_fact = _log_factorials(n)
    i = np.arange(k + 1)
    log_pmf = log_fact[n] - log_fact[i] - log_fact[n - i] - n * np.log(2.0)
    top = log_pmf.max()
    tail = float(np.exp(top) * np.exp(log_pmf - top).sum())
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = 2000, seed: int = 0
) -> dict:
    """Mean of b - a and a percentile 95% interval over examples resampled with replacement."""
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(diffs)
    rng = np.random.default_rng(seed)
    values, counts = np.unique(diffs, return_counts=True)
    if len(values) <= _FEW_VALUES:
        # Correct/incorrect scores give diffs in {-1, 0, 1}: resampling n examples with
        # replacement is then one multinomial draw over those values per sample (exact, O(1)).
        means = rng.multinomial(n, counts / n, size=samples) @ values / n
    else:
        means = np.empty(samples)
        for s in range(0, samples, _BOOTSTRAP_CHUNK):
            m = min(_BOOTSTRAP_CHUNK, samples - s)
            means[s : s + m] = diffs[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return _interval(diffs.mean(), means)


def fisher_exact(a_yes: int, a_n: int, b_yes: int, b_n: int) -> float:
    """Two-sided p of Fisher's exact test on the 2x2 table (yes/no by side): the
    probability, with the margins fixed, of a table no more likely than the one seen."""
    yes, n = a_yes + b_yes, a_n + b_n
    lf = _log_factorials(n)
    lo, hi = max(0, yes - b_n), min(yes, a_n)
    k = np.arange(lo, hi + 1)
    log_p = (
        lf[yes] + lf[n - yes] + lf[a_n] + lf[b_n] - lf[n]
        - lf[k] - lf[yes - k] - lf[a_n - k] - lf[b_n - yes + k]
    )  # fmt: skip
    seen = log_p[a_yes - lo]
    return float(min(1.0, np.exp(log_p[log_p <= seen + 1e-7]).sum()))


def unpaired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = 2000, seed: int = 0
) -> dict:
    """Mean of b minus mean of a and a percentile 95% interval, each side resampled with
    replacement on its own (its requests are not the other side's)."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for s in range(0, samples, _BOOTSTRAP_CHUNK):
        m = min(_BOOTSTRAP_CHUNK, samples - s)
        ma = a_[rng.integers(0, len(a_), size=(m, len(a_)))].mean(axis=1)
        mb = b_[rng.integers(0, len(b_), size=(m, len(b_)))].mean(axis=1)
        means[s : s + m] = mb - ma
    return _interval(b_.mean() - a_.mean(), means)


def compare_unpaired(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool) -> dict:
    """The verdict on outcomes of two groups of requests (each answered by one side)."""
    if not len(a) or not len(b):
        raise ValueError("A and B need at least one outcome each")
    boot = unpaired_bootstrap(a, b)
    out: dict = {"bootstrap": boot, "winner": _winner(boot["mean_diff"], higher_is_better)}
    if set(a) <= {0.0, 1.0} and set(b) <= {0.0, 1.0}:
        p = fisher_exact(int(sum(a)), len(a), int(sum(b)), len(b))
        out["fisher"] = {"a_yes": int(sum(a)), "b_yes": int(sum(b)), "p_value": p}
        out["significant"] = p < 0.05
    else:
        out["significant"] = boot["ci_low"] > 0 or boot["ci_high"] < 0
    return out


def compare(
    a_scores: Sequence[float], b_scores: Sequence[float], *, higher_is_better: bool, binary: bool
) -> dict:
    """The verdict on per-example scores of A and B (same examples, same order)."""
    if len(a_scores) != len(b_scores) or len(a_scores) == 0:
        raise ValueError("A and B need scores for the same, non-empty list of examples")
    boot = paired_bootstrap(a_scores, b_scores)
    out: dict = {"bootstrap": boot, "winner": _winner(boot["mean_diff"], higher_is_better)}
    if binary:
        out["mcnemar"] = mcnemar_exact([int(x) for x in a_scores], [int(y) for y in b_scores])
        out["significant"] = out["mcnemar"]["p_value"] < 0.05
    else:
        out["significant"] = boot["ci_low"] > 0 or boot["ci_high"] < 0
    return out


def run_ab(
    switcher,
    ref_a: str,
    ref_b: str,
    dataset,
    *,
    task: str = "auto",
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    latency: bool = True,
) -> dict:
    """Evaluate two deltas on ``dataset`` with one loaded base; return the paired verdict.
    ``labels``: the classification candidates (default: the dataset's completions)."""
    from ..delta import delta_bytes
    from .evaluate import detect_task, evaluate, label_set, per_example_loss

    task = detect_task(dataset) if task == "auto" else task
    if labels is None and task == "classification":
        labels = label_set(dataset.records)
    sides = {}
    for side, ref in (("A", ref_a), ("B", ref_b)):
        switcher.switch(ref)
        metrics, details = evaluate(
            switcher.model,
            switcher.loaded.tokenizer,
            dataset,
            task=task,
            labels=labels,
            batch_size=batch_size,
            latency=latency,
        )
        if task in ("classification", "generation"):
            scores = [float(c) for c in details["correct"]]
        else:
            scores = per_example_loss(
                switcher.model, dataset.examples, switcher.loaded.tokenizer.pad_token_id
            )
        manifest = switcher.current.manifest if switcher.current else {}
        sides[side] = {
            "ref": switcher.label,
            "metrics": metrics,
            "scores": scores,
            "method": manifest.get("method"),
            "trainable_params": (manifest.get("metrics") or {}).get("trainable_params"),
            "delta_bytes": delta_bytes(manifest) if manifest else 0,
        }
    switcher.switch(None)
    binary = task in ("classification", "generation")
    verdict = compare(
        sides["A"]["scores"], sides["B"]["scores"], higher_is_better=binary, binary=binary
    )
    # chats by loss: exact matches of free-form turns are mostly 0 on both sides (a tie)
    metric = {"classification": "accuracy", "generation": "exact_match"}.get(task, "loss")
    return {
        "task": task,
        "metric": metric,
        "examples": len(sides["A"]["scores"]),
        "A": {k: v for k, v in sides["A"].items() if k != "scores"},
        "B": {k: v for k, v in sides["B"].items() if k != "scores"},
        **verdict,
    }


def _per_unit(requests: list) -> tuple[list[float], str]:
    """The outcomes of one side, one score per independent unit: a user's requests are
    not independent (a split is sticky per user), so each user counts once, with the
    mean of their outcomes; a request without a user is its own unit."""
    by_unit: dict[str, list[float]] = {}
    for r in requests:
        if r.outcome is not None:
            by_unit.setdefault(f"user:{r.user}" if r.user else f"id:{r.id}", []).append(r.outcome)
    repeated = any(len(v) > 1 for v in by_unit.values())
    return [float(np.mean(v)) for v in by_unit.values()], "users" if repeated else "requests"


def ab_from_log(
    requests: list, a: str | None = None, b: str | None = None, *, split: str | None = None
) -> dict:
    """Compare two sides of live traffic (``serve.traffic.read_log``'s requests): each side
    is named by the version that served it or the split arm that chose it; by default the
    two versions that got the most outcomes (``base`` as A when it is one of them). The
    unit is the user where users send several rated requests (see :func:`_per_unit`)."""
    if split is not None:
        requests = [r for r in requests if r.split == split]
        if not requests:
            raise ValueError(f"the log holds no request of split {split!r}")
    rated = [r for r in requests if r.outcome is not None]

    def side(name: str) -> list:
        return [r for r in requests if name in (r.delta, r.arm)]

    if a is None or b is None:
        counts: dict[str, int] = {}
        for r in rated:
            counts[r.delta] = counts.get(r.delta, 0) + 1
        top = sorted(counts, key=lambda d: -counts[d])
        if len(top) < 2:
            raise ValueError(
                "the log has outcomes for fewer than two versions; name A and B, or post "
                "outcomes (POST /v1/outcomes)"
            )
        a, b = sorted(top[:2], key=lambda d: (d != "base", len(d), d))
    got = {"A": side(a), "B": side(b)}
    shared = {r.id for r in got["A"]} & {r.id for r in got["B"]}
    if shared:
        raise ValueError(
            f"{a!r} and {b!r} share {len(shared)} requests (an arm served by that version?); "
            "name two sides that do not overlap"
        )
    sides = {}
    for key, name in (("A", a), ("B", b)):
        if not got[key]:
            raise ValueError(f"no request in the log was answered by or chosen as {name!r}")
        scores, unit = _per_unit(got[key])
        if not scores:
            raise ValueError(f"{name!r} served {len(got[key])} requests but none has an outcome")
        lat = [r.latency_s for r in got[key] if r.latency_s is not None]
        sides[key] = {
            "ref": name,
            "served_by": sorted({r.delta for r in got[key]}),
            "requests": len(got[key]),
            "outcomes": sum(r.outcome is not None for r in got[key]),
            "units": len(scores),
            "unit": unit,
            "mean_outcome": float(np.mean([r.outcome for r in got[key] if r.outcome is not None])),
            "latency_p50_ms": 1000 * float(np.percentile(lat, 50)) if lat else None,
            "latency_p95_ms": 1000 * float(np.percentile(lat, 95)) if lat else None,
            "scores": scores,
        }
    verdict = compare_unpaired(sides["A"]["scores"], sides["B"]["scores"], higher_is_better=True)
    return {
        "source": "log",
        "split": split,
        "randomised": split is not None,
        "metric": "mean_outcome",
        "A": {k: v for k, v in sides["A"].items() if k != "scores"},
        "B": {k: v for k, v in sides["B"].items() if k != "scores"},
        **verdict,
    }
