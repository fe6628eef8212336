"""One base model, many deltas, requests from many clients: the serving loop.

Requests go into one queue; a single worker thread owns the model. It takes the oldest
request, resolves its ``model`` name (``base``, a version id or a tag) against the store
*at that moment* (so a moved tag serves its new version from the next batch on, with no
restart), collects the waiting requests that can run with it (up to ``max_batch``, same
sampling settings) and generates for them in one ``generate`` call. Tokens go back to each
request as they are produced (streaming) and the whole answer at the end, with the version
that served it.

What can share a batch depends on how a delta sits on the base:

- LoRA deltas sit beside the base weights: any mix of them and the base runs in one batch,
  each row through its own adapter (:class:`~slimtune.serve.bank.LoraBank`, peft's
  ``adapter_names``).
- Deltas that write the base weights (full, sparse, rosa's sparse part, merged in place),
  route through it (experts) or are DoRA/SHiRA layers run one version per batch: the
  worker switches the base to that delta (one apply and one remove, BENCHMARKS.md) and
  groups the waiting requests for it, so the switch is paid once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import DeltaError
from ..model.masks import left_pad, padded_inference
from .bank import LoraBank, can_hold
from .traffic import Split

BASE = "base"


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` names now: a store version (its method and folder), or
    the base (``version`` "base", no method)."""

    version: str
    method: str | None = None
    path: Path | None = None


@dataclass
class Job:
    """One request: what to run, and where its tokens go (an asyncio queue of its loop)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    user: str | None = None
    split: str | None = None  # the split that chose ``model`` (an arm of it)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: float = field(default_factory=time.time)
    # filled by the engine
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    target: Target | None = None  # what serves it, resolved when its batch is formed
    cancelled: bool = False  # the client went away: stop generating for it


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (end token or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    delta: str
    seconds: float


class UnknownModel(LookupError):
    pass


def _cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string in it, and whether there was one."""
    cut = min((c for c in (text.find(s) for s in stops) if c >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (not sent yet:
    the next token may complete it)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


class _RowStreamer:
    """``generate``'s streamer for a batch: each row's new text goes to its job as it is
    decoded; a row stops at its end token, a stop string or its own ``max_tokens``."""

    def __init__(self, engine: Engine, jobs: list[Job], eos: set[int]) -> None:
        self.engine, self.jobs, self.eos = engine, jobs, eos
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.text = [""] * len(jobs)  # each row's answer so far (cut at a stop string)
        self.sent = [0] * len(jobs)  # characters of it already sent
        self.done: list[str | None] = [None] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call hands over the prompts
            self.prompt_seen = True
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            if self.done[i] is None and self.jobs[i].cancelled:
                self.done[i] = "cancelled"
            if self.done[i] is not None:
                continue
            if tok in self.eos:
                self.done[i] = "stop"
                continue
            self.tokens[i].append(tok)
            self._update(i)
            if self.done[i] is None and len(self.tokens[i]) >= self.jobs[i].max_tokens:
                self.done[i] = "length"

    def _update(self, i: int) -> None:
        text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        text, stopped = _cut(text, self.jobs[i].stop)
        if stopped:
            self.done[i] = "stop"
        self.text[i] = text
        ready = len(text) if stopped else len(text) - _held_back(text, self.jobs[i].stop)
        if ready > self.sent[i]:
            self.engine._emit(self.jobs[i], ("delta", text[self.sent[i] : ready]))
            self.sent[i] = ready

    def finish(self, i: int) -> str:
        """Row ``i``'s whole answer; what was still held back is sent now."""
        if self.done[i] != "stop" and self.tokens[i]:  # the last tokens may not be decoded yet
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            self.text[i], stopped = _cut(text, self.jobs[i].stop)
            if stopped:
                self.done[i] = "stop"
        if len(self.text[i]) > self.sent[i]:
            self.engine._emit(self.jobs[i], ("delta", self.text[i][self.sent[i] :]))
            self.sent[i] = len(self.text[i])
        return self.text[i]

    def end(self) -> None:
        pass


class _AllDone(StoppingCriteria):
    """Stop ``generate`` once every row has ended (its end token, a stop string, its own
    max_tokens, or its client gone), not at the batch's largest max_tokens."""

    def __init__(self, streamer: _RowStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = all(d is not None for d in self.streamer.done)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The serving loop over ``switcher`` (a :class:`~slimtune.delta.DeltaSwitcher`).

    ``adapters``: how many LoRA deltas stay loaded side by side for mixed batches (0: none;
    every delta is then switched on for its own batches).
    """

    def __init__(
        self,
        switcher,
        *,
        max_batch: int = 8,
        adapters: int = 16,
        on_finished: Callable[[Job, Finished], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.switcher = switcher
        self.tokenizer = switcher.loaded.tokenizer
        self.max_batch = max_batch
        self.on_finished = on_finished
        # told each batch's kind ("mixed": rows of several versions in one forward, else
        # "single") and size
        self.on_batch = on_batch
        self.bank = (
            LoraBank(switcher.base, switcher.fingerprint, capacity=adapters) if adapters else None
        )
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="slimtune-serve", daemon=True)
        self._lock = threading.Lock()  # the store's reads, one at a time (never a switch)
        if switcher.current is not None:  # the engine switches by version id from here on
            switcher.switch(None)
        self._on = BASE  # the version switched onto the base (not the bank's adapters)
        self._holdable: dict[str, bool] = {}  # version -> whether the bank can hold it
        config = getattr(switcher.base, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2048)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def serving(self) -> list[str]:
        """What is on the base now: the version switched on, or the bank's adapters."""
        if self.bank is not None and self.bank.active:
            return [BASE, *self.bank.loaded()]
        return [self._on]

    # -- names ---------------------------------------------------------------------------

    def resolve(self, name: str) -> Target:
        """What ``name`` serves now; UnknownModel if nothing."""
        if name == BASE:
            return Target(BASE)
        store = self.switcher.store
        if store is None:
            raise UnknownModel(f"no delta store: only {BASE!r} is served")
        try:
            with self._lock:
                v = store.resolve(name)
        except DeltaError as e:
            raise UnknownModel(str(e)) from None
        return Target(v.id, v.method, v.path)

    def splits(self) -> dict[str, Split]:
        """The store's A/B splits now (``slimtune delta split``), by name."""
        store = self.switcher.store
        if store is None:
            return {}
        with self._lock:
            stored = store.splits()
        return {name: Split.parse(f"{name}:{arms}") for name, arms in stored.items()}

    def models(self) -> list[dict[str, Any]]:
        """The base, every version and every tag, as ``/v1/models`` lists them."""
        store = self.switcher.store
        out = [{"id": BASE, "serves": BASE}]
        if store is not None:
            with self._lock:
                versions, tags = store.list(), store.tags()
            out += [{"id": v.id, "serves": v.id, "created": v.created} for v in versions]
            out += [{"id": t, "serves": vid} for t, vid in sorted(tags.items())]
        return out

    def mixes(self, target: Target) -> bool:
        """Whether ``target`` runs in a batch with the base and LoRA deltas (the bank)."""
        if target.version == BASE:
            return True
        from ..methods import METHODS

        method = METHODS.get(target.method or "")
        if self.bank is None or method is None or not method.mixes_in_batch:
            return False
        if target.version not in self._holdable:  # e.g. an imported adapter that trains biases
            self._holdable[target.version] = target.path is not None and can_hold(target.path)
        return self._holdable[target.version]

    # -- requests ------------------------------------------------------------------------

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue ``job``; its events arrive on the returned queue: ("delta", text) while it
        runs, then ("done", Finished) or ("error", (HTTP status, message))."""
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        self._queue.put(job)
        return job.events

    def _emit(self, job: Job, event: tuple) -> None:
        assert job.loop is not None and job.events is not None
        with contextlib.suppress(RuntimeError):  # the server's loop has closed: no one waits
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the worker ----------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and those waiting that run with it: the same sampling, and the same
        version, or (LoRA deltas and the base) any mix the bank can hold."""
        if not self._waiting:
            job = self._queue.get()
            if job is None:
                return None
            self._waiting.append(job)
        while True:  # everything that arrived meanwhile joins the line
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return None
            self._waiting.append(job)
        for j in [j for j in self._waiting if j.cancelled]:  # gone before their turn
            self._waiting.remove(j)
        if not self._waiting:
            return []
        resolved: dict[str, Target] = {}

        def target(j: Job) -> Target | None:
            if j.model not in resolved:
                try:
                    resolved[j.model] = self.resolve(j.model)
                except Exception as e:  # this job's lookup failed: it alone fails
                    self._waiting.remove(j)
                    unknown = isinstance(e, UnknownModel)  # a tag removed while it waited
                    why = str(e) if unknown else f"{type(e).__name__}: {e}"
                    self._emit(j, ("error", (404 if unknown else 500, why)))
                    return None
            return resolved[j.model]

        first = self._waiting[0]
        key = target(first)
        if key is None:
            return []
        mixed = self.mixes(key)
        batch: list[Job] = []
        adapters: set[str] = set()
        for j in list(self._waiting):
            if len(batch) == self.max_batch:
                break
            if (j.temperature, j.top_p) != (first.temperature, first.top_p):
                continue
            t = target(j)
            if t is None:
                continue
            if mixed and self.mixes(t):
                assert self.bank is not None or t.version == BASE
                new = t.version != BASE and t.version not in adapters
                if new and self.bank is not None and len(adapters) == self.bank.capacity:
                    continue  # the bank is full for this batch: it waits for the next
                if new:
                    adapters.add(t.version)
            elif t != key:
                continue
            j.target = t
            batch.append(j)
        for j in batch:
            self._waiting.remove(j)
        return batch

    def _run(self) -> None:
        while True:
            batch: list[Job] | None = []
            try:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._generate(batch)
            except Exception as e:  # those requests fail, the server stays up
                failed = batch or list(self._waiting[:1])  # a store error before the batch
                for j in failed:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(j)
                    self._emit(j, ("error", (500, f"{type(e).__name__}: {e}")))

    def _model_for(self, jobs: list[Job]) -> tuple[torch.nn.Module, dict[str, Any], list[Job]]:
        """Put on the base what the batch needs; (model to run, extra generate kwargs, the
        jobs it runs: those of a LoRA version that failed to load get their error here)."""
        bank, sw = self.bank, self.switcher
        targets = [j.target for j in jobs]
        assert all(t is not None for t in targets)
        adapters = {t.version: t.path for t in targets if t and t.version != BASE}
        if self.mixes(targets[0]) and (adapters or (bank is not None and bank.active)):  # type: ignore[arg-type]
            assert bank is not None
            if sw.current is not None:  # a delta that writes the base: off first
                try:
                    bank.base = sw.switch(None)
                finally:
                    self._on = self._switched()
            model, failed = bank.ready({v: p for v, p in adapters.items() if p is not None})
            for j in [j for j in jobs if j.target and j.target.version in failed]:
                e = failed[j.target.version]  # type: ignore[union-attr]
                self._emit(j, ("error", (500, f"{type(e).__name__}: {e}")))
            jobs = [j for j in jobs if not (j.target and j.target.version in failed)]
            rows = bank.rows([None if j.target.version == BASE else j.target.version for j in jobs])  # type: ignore[union-attr]
            return model, ({"adapter_names": rows} if bank.active else {}), jobs
        if bank is not None and bank.active:
            sw.base = bank.release()
        version = targets[0].version  # type: ignore[union-attr]
        if version != self._on:
            try:
                sw.switch(None if version == BASE else version)
            finally:
                self._on = self._switched()
        return sw.model, {}, jobs

    def _switched(self) -> str:
        """The version the switcher has on the base (it switches by version id)."""
        current = self.switcher.current
        return BASE if current is None else current.ref

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        model, kwargs, jobs = self._model_for(jobs)
        if not jobs:
            return
        if self.on_batch is not None:
            kind = "mixed" if len({j.target.version for j in jobs if j.target}) > 1 else "single"
            with contextlib.suppress(Exception):
                self.on_batch(kind, len(jobs))
        model.eval()
        tok = self.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, mask = left_pad([j.prompt_ids for j in jobs], pad, device)
        # the model's own end tokens (a chat model's end-of-turn among them), else the
        # tokenizer's
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        streamer = _RowStreamer(self, jobs, eos_ids)
        sample = jobs[0].temperature > 0
        kwargs["do_sample"] = sample
        if sample:
            kwargs.update(temperature=jobs[0].temperature, top_p=jobs[0].top_p)
        with padded_inference(device):  # left-padded rows (model/masks.py)
            model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(j.max_tokens for j in jobs),
                pad_token_id=pad,
                eos_token_id=eos,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_AllDone(streamer)]),
                **kwargs,
            )
        seconds = time.perf_counter() - t0
        for i, j in enumerate(jobs):
            text = streamer.finish(i)
            assert j.target is not None
            done = Finished(
                text=text,
                finish_reason=streamer.done[i] or "length",
                prompt_tokens=len(j.prompt_ids),
                completion_tokens=len(streamer.tokens[i]),
                delta=j.target.version,
                seconds=seconds,
            )
            if self.on_finished is not None:
                with contextlib.suppress(Exception):
                    self.on_finished(j, done)
            self._emit(j, ("done", done))
