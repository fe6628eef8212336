"""One base model, many deltas, requests from many clients: the serving loop.

Requests go into one queue; a single worker thread owns the model. It takes the oldest
request, resolves its ``model`` name (``base``, a version id or a tag) against the store
*at that moment* (so a moved tag serves its new version from the next batch on, with no
restart), collects the waiting requests that resolve to the same version and sampling
settings (up to ``max_batch``), switches the delta on if another one is on, and
generates for the batch in one ``generate`` call. Tokens go back to each request as they
are produced (streaming) and the whole answer at the end, with the version that served it.

Why one thread and groups per delta: a delta is applied to the one base in memory (merged
in place for full, sparse and rosa's sparse part; routed for experts; peft layers for
LoRA), so two deltas cannot run in one forward of this model. Switching costs one apply
and one remove (BENCHMARKS.md); grouping pays it once per batch, not per request.
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
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import DeltaError

BASE = "base"


@dataclass
class Job:
    """One request: what to run, and where its tokens go (an asyncio queue of its loop)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    user: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: float = field(default_factory=time.time)
    # filled by the engine
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    delta: str | None = None  # the version id that served it ("base" for the base)
    cancelled: bool = False  # the client went away: stop generating for it


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (end token) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    delta: str
    seconds: float


class UnknownModel(LookupError):
    pass


class _RowStreamer:
    """``generate``'s streamer for a batch: each row's new text goes to its job as it is
    decoded; a row stops at its end token or its own ``max_tokens``."""

    def __init__(self, engine: Engine, jobs: list[Job], eos: set[int]) -> None:
        self.engine, self.jobs, self.eos = engine, jobs, eos
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
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
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(self.sent[i]):
                self.engine._emit(self.jobs[i], ("delta", text[len(self.sent[i]) :]))
                self.sent[i] = text
            if len(self.tokens[i]) >= self.jobs[i].max_tokens:
                self.done[i] = "length"

    def end(self) -> None:
        pass


class _AllDone(StoppingCriteria):
    """Stop ``generate`` once every row has ended (its end token, its own max_tokens, or
    its client gone), not at the batch's largest max_tokens."""

    def __init__(self, streamer: _RowStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = all(d is not None for d in self.streamer.done)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The serving loop over ``switcher`` (a :class:`~slimtune.delta.DeltaSwitcher`)."""

    def __init__(
        self,
        switcher,
        *,
        max_batch: int = 8,
        on_finished: Callable[[Job, Finished], None] | None = None,
    ) -> None:
        self.switcher = switcher
        self.tokenizer = switcher.loaded.tokenizer
        self.max_batch = max_batch
        self.on_finished = on_finished
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="slimtune-serve", daemon=True)
        self._lock = threading.Lock()  # the store's reads, one at a time (never a switch)
        self._on = switcher.current.ref if switcher.current is not None else BASE
        config = getattr(switcher.base, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2048)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- names ---------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The version id ``name`` serves now ("base" for the base); UnknownModel if none."""
        if name == BASE:
            return BASE
        store = self.switcher.store
        if store is None:
            raise UnknownModel(f"no delta store: only {BASE!r} is served")
        try:
            with self._lock:
                return store.resolve(name).id
        except DeltaError as e:
            raise UnknownModel(str(e)) from None

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
        """The oldest job and those waiting that run with it (same version and sampling)."""
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
        first = self._waiting[0]
        resolved: dict[str, str] = {}

        def version(j: Job) -> str | None:
            if j.model not in resolved:
                try:
                    resolved[j.model] = self.resolve(j.model)
                except UnknownModel as e:  # a tag removed while the job waited
                    self._waiting.remove(j)
                    self._emit(j, ("error", (404, str(e))))
                    return None
            return resolved[j.model]

        key = version(first)
        if key is None:
            return []
        batch = []
        for j in [j for j in self._waiting if j.cancelled]:  # gone before their turn
            self._waiting.remove(j)
        for j in list(self._waiting):
            if len(batch) == self.max_batch:
                break
            if (j.temperature, j.top_p) != (first.temperature, first.top_p):
                continue
            if version(j) == key:
                j.delta = key
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

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        version = jobs[0].delta
        assert version is not None
        if version != self._on:
            self._on = BASE  # until the switch below has finished
            self.switcher.switch(None if version == BASE else version)
            self._on = version
        model = self.switcher.model
        model.eval()
        tok = self.tokenizer
        device = next(model.parameters()).device
        width = max(len(j.prompt_ids) for j in jobs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(jobs):  # left padding: every row's next token is at the end
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        # the model's own end tokens (a chat model's end-of-turn among them), else the
        # tokenizer's
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        streamer = _RowStreamer(self, jobs, eos_ids)
        sample = jobs[0].temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=jobs[0].temperature, top_p=jobs[0].top_p)
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(j.max_tokens for j in jobs),
            pad_token_id=pad,
            eos_token_id=eos,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_AllDone(streamer)]),
            **kwargs,
        )
        seconds = time.perf_counter() - t0
        for i, j in enumerate(jobs):
            text = tok.decode(streamer.tokens[i], skip_special_tokens=True)
            if len(text) > len(streamer.sent[i]):  # the tail held back as incomplete
                self._emit(j, ("delta", text[len(streamer.sent[i]) :]))
            done = Finished(
                text=text,
                finish_reason=streamer.done[i] or "length",
                prompt_tokens=len(j.prompt_ids),
                completion_tokens=len(streamer.tokens[i]),
                delta=version,
                seconds=seconds,
            )
            if self.on_finished is not None:
                with contextlib.suppress(Exception):
                    self.on_finished(j, done)
            self._emit(j, ("done", done))
