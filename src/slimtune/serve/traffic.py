"""A/B traffic: splits that send a share of requests to each arm, and the request log.

A split ``exp:prod=90,v5=10`` answers requests for the model ``exp`` from ``prod`` 90% of
the time and from ``v5`` 10% (each arm a tag, a version id or ``base``, resolved per request
like any model name). Without a name (``prod=90,v5=10``) the split takes its first arm's
name: requests for ``prod`` then go 10% to ``v5``, a canary without changing clients.
A request with a ``user`` always gets the same arm of a split (a hash of split and user
picks it); one without gets a random arm.

The log is JSON Lines, one line per answered request and one per outcome posted back;
:func:`read_log` joins them and ``slimtune ab --log`` compares the arms.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Split:
    name: str
    arms: tuple[tuple[str, float], ...]  # (model name, share), shares summing to 1

    @classmethod
    def parse(cls, text: str) -> Split:
        """``[name:]arm=weight,arm=weight,...``; weights are relative (90,10 or 0.9,0.1)."""
        name, _, spec = text.rpartition(":")
        arms: list[tuple[str, float]] = []
        for part in spec.split(","):
            arm, eq, weight = part.strip().partition("=")
            if not eq or not _NAME.match(arm):
                raise UserInputError(
                    f"--split {text!r}: {part.strip()!r} is not ARM=WEIGHT (e.g. prod=90,v5=10)"
                )
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            if not w > 0 or w != w or w == float("inf"):
                raise UserInputError(f"--split {text!r}: the weight of {arm} must be > 0")
            if arm in dict(arms):
                raise UserInputError(f"--split {text!r}: {arm} is named twice")
            arms.append((arm, w))
        if len(arms) < 2:
            raise UserInputError(f"--split {text!r}: a split needs at least two arms")
        name = name.strip() or arms[0][0]
        if not _NAME.match(name):
            raise UserInputError(f"--split {text!r}: {name!r} is not a valid split name")
        total = sum(w for _, w in arms)
        return cls(name, tuple((a, w / total) for a, w in arms))

    def choose(self, user: str | None, rng: random.Random | None = None) -> str:
        """The arm for this request: fixed per ``user`` (sticky), random without one."""
        if user is None:
            u = (rng or random).random()
        else:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for arm, share in self.arms:
            edge += share
            if u < edge:
                return arm
        return self.arms[-1][0]

    def __str__(self) -> str:
        arms = ",".join(f"{a}={100 * s:g}" for a, s in self.arms)
        return f"{self.name}:{arms}"


def parse_splits(texts: list[str]) -> dict[str, Split]:
    splits: dict[str, Split] = {}
    for text in texts:
        s = Split.parse(text)
        if s.name in splits:
            raise UserInputError(f"--split: two splits are named {s.name!r}")
        splits[s.name] = s
    return splits


class RequestLog:
    """Appends one JSON line per request and per outcome; every line is flushed when
    written (a crash loses at most the line being written, which the reader skips)."""

    def __init__(self, path: str | Path, *, remember: int = 100_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 (kept open)
        if self._file.tell() > 0:  # a crash cut the last line: end it, so ours start clean
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._remember = remember

    def request(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._write({"type": "request", "time": time.time(), **record})
            self._recent[record["id"]] = record
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)

    def answered(self, request_id: str) -> dict[str, Any] | None:
        """The logged request with this id, if it is recent enough to be remembered."""
        with self._lock:
            return self._recent.get(request_id)

    def outcome(self, request_id: str, value: float) -> None:
        with self._lock:
            self._write({"type": "outcome", "time": time.time(), "id": request_id, "value": value})

    def _write(self, line: dict[str, Any]) -> None:
        self._file.write((json.dumps(line, separators=(",", ":")) + "\n").encode())
        self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


@dataclass
class LoggedRequest:
    id: str
    model: str  # what the client asked for
    split: str | None
    arm: str | None
    delta: str  # the version that served it
    latency_s: float | None
    outcome: float | None  # the last outcome posted for it
    user: str | None = None


def read_log(path: str | Path) -> tuple[list[LoggedRequest], list[str]]:
    """The answered requests of a log with their outcomes, and warnings (lines skipped:
    one torn by a crash, an outcome for a request not in the log). A line that is JSON
    but not a request or an outcome is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such log") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not a UTF-8 JSON Lines log") from None
    except OSError as e:  # a folder, no permission
        raise UserInputError(f"{path}: cannot read the log ({e.strerror})") from None
    requests: dict[str, LoggedRequest] = {}
    outcomes: list[tuple[int, str, float]] = []
    warnings: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a write cut short by a crash
            warnings.append(f"{path}:{n}: skipped an incomplete line")
            continue
        try:
            kind = rec["type"]
            if kind == "request":
                if rec.get("status", "ok") != "ok":
                    continue
                requests[rec["id"]] = LoggedRequest(
                    rec["id"],
                    rec["model"],
                    rec.get("split"),
                    rec.get("arm"),
                    rec["delta"],
                    rec.get("latency_s"),
                    None,
                    rec.get("user"),
                )
            elif kind == "outcome":
                value = float(rec["value"])
                if not math.isfinite(value):
                    raise ValueError(f"outcome {value} is not a finite number")
                outcomes.append((n, str(rec["id"]), value))
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{path}:{n}: not a request or outcome line ({e})") from None
    for n, rid, value in outcomes:
        if rid in requests:
            requests[rid].outcome = value
        else:
            warnings.append(f"{path}:{n}: outcome for {rid}, which the log does not hold")
    return list(requests.values()), warnings
