"""Quality and inference-cost metrics.

* ``loss`` / ``perplexity`` over the target tokens of a dataset.
* ``accuracy`` for classification-style data (prompt/completion with a small set of distinct
  completions): each label is scored by its log-likelihood given the prompt. The prompt
  runs once per example; its KV cache is then repeated for all labels and the label
  tokens of every (example, label) pair run in one batched pass. The tokens every prompt
  starts with (an instruction, a template) run once for the whole set, and batches are
  formed by length, so little compute goes to padding.
* ``exact_match`` for other prompt/completion data: greedy generation compared to the
  completion (whitespace-stripped); the prompts' shared tokens run once here too.
* ``latency``: per-token decode time (p50/p95) with a KV cache, and the prefill time.

Every path cuts its inputs to ``max_length`` tokens (the dataset's, by default); a prompt
keeps its end, where the question and the answer slot are (as in training). Each phase
shows a progress bar when ``progress`` is true.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import string
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..data import Dataset, Example, Record, chat_turns, collate, prompt_ids, records_subset
from ..errors import UserInputError
from ..log import info
from ..model.anatomy import backbone_and_head, base_model, with_cache
from ..model.masks import left_pad, padded_inference
from ..training.loss import target_loss
from .cost import percentile
from .tasks import check_task


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _bar(total: int, desc: str, progress: bool, unit: str = "example"):
    """A tqdm bar on stderr, silent unless ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int = 16,
    autocast=contextlib.nullcontext,
    progress: bool = False,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    dev = _device(model)
    total, count = 0.0, 0
    with _bar(len(examples), "eval loss", progress) as bar:
        for chunk in _batches(list(examples), batch_size):
            batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
            with autocast():
                loss, n = target_loss(model, batch)
            total += float(loss)
            count += n
            bar.update(len(chunk))
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "target_tokens": count}


@torch.no_grad()
def per_example_loss(
    model: nn.Module, examples: Sequence[Example], pad_id: int, *, autocast=contextlib.nullcontext
) -> list[float]:
    """Mean target-token loss of each example (for paired comparisons); one example per
    pass, since the loss helper sums over its batch."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    out: list[float] = []
    for ex in examples:
        batch = {k: v.to(dev) for k, v in collate([ex], pad_id).items()}
        with autocast():
            loss, n = target_loss(model, batch)
        out.append(float(loss) / max(n, 1))
    model.train(was_training)
    return out


def detect_task(dataset: Dataset, max_labels: int = 50) -> str:
    """``classification``, ``generation``, ``chat`` or ``lm`` from the data's shape and
    completions."""
    if dataset.shape == "messages":
        return "chat"
    if dataset.shape != "prompt_completion":
        return "lm"
    labels = {r.fields["completion"] for r in dataset.records}
    if 2 <= len(labels) <= max_labels and len(labels) <= len(dataset.records) / 2:
        return "classification"
    return "generation"


def label_set(records: Sequence[Record]) -> list[str]:
    return sorted({r.fields["completion"] for r in records})


def first_records(
    dataset: Dataset, task: str, limit: int | None
) -> tuple[Dataset, str, list[str] | None]:
    """The first ``limit`` records of ``dataset`` (all with None) and their examples, with
    the task and the classification labels of the whole file: a few records hold fewer
    labels (chance rises) or too few to be told from generation (``eval``/``ab --limit``)."""
    check_task(task, dataset)
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {limit}")
    task = detect_task(dataset) if task == "auto" else task
    labels = label_set(dataset.records) if task == "classification" else None
    if limit is not None:
        dataset = records_subset(dataset, dataset.records[:limit])
    return dataset, task, labels


def _prompt_ids(tokenizer, prompt: str, budget: int | None) -> list[int]:
    """A prompt's ids; with a ``budget``, its last ``budget`` (at least one) tokens."""
    if budget is None:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return prompt_ids(tokenizer, prompt, max(budget, 1))


@torch.no_grad()
def score_labels(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Log-likelihood of each label (plus the end token) after each prompt: ``[n, n_labels]``.

    With ``max_length``, each prompt keeps its last ``max_length`` minus label tokens."""

    was_training = model.training
    model.eval()
    dev = _device(model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    label_ids = [
        list(tokenizer(lab, add_special_tokens=False)["input_ids"]) + eos for lab in labels
    ]
    n_lab, m = len(labels), max(len(t) for t in label_ids)
    lab = torch.full((n_lab, m), tokenizer.pad_token_id, dtype=torch.long)
    lab_mask = torch.zeros((n_lab, m), dtype=torch.bool)
    for j, t in enumerate(label_ids):
        lab[j, : len(t)] = torch.tensor(t)
        lab_mask[j, : len(t)] = True
    lab, lab_mask = lab.to(dev), lab_mask.to(dev)
    parts = backbone_and_head(model)
    budget = max(1, max_length - m) if max_length else None
    seqs = [_prompt_ids(tokenizer, p, budget) for p in prompts]
    out_scores: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    bar = _bar(len(prompts), "eval classification", progress)
    batches = _after_shared_prefix(
        model, seqs, batch_size, tokenizer.pad_token_id, autocast, answer_tokens=m
    )
    for chunk, ids, mask, cache, shared in batches:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        with autocast(), padded_inference(dev):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **with_cache(model, cache),
            )
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # [b, vocab]
        b = ids.shape[0]
        score = first[:, lab[:, 0]]  # [b, n_lab]
        if m > 1:
            cache.batch_repeat_interleave(n_lab)
            cont = lab[:, :-1].repeat(b, 1)  # [b*n_lab, m-1]
            cmask = torch.cat([mask.repeat_interleave(n_lab, 0), torch.ones_like(cont)], dim=1)
            cpos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(m - 1, device=dev)
            with autocast(), padded_inference(dev):
                if parts is not None:
                    backbone, head = parts
                    h = backbone(
                        input_ids=cont,
                        attention_mask=cmask,
                        position_ids=cpos,
                        use_cache=True,
                        **with_cache(model, cache),
                    ).last_hidden_state
                    logits = head(h)
                else:
                    logits = model(
                        input_ids=cont,
                        attention_mask=cmask,
                        position_ids=cpos,
                        use_cache=True,
                        **with_cache(model, cache),
                    ).logits
            logp = torch.log_softmax(logits.float(), -1)
            nxt = lab[:, 1:].repeat(b, 1)
            tok_lp = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            tok_lp = tok_lp * lab_mask[:, 1:].repeat(b, 1)
            score = score + tok_lp.sum(-1).view(b, n_lab)
        for i, row in zip(chunk, score.cpu()):
            out_scores[i] = row
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return torch.stack(out_scores) if out_scores else torch.empty(0, n_lab)


MIN_SHARED_PREFIX = 4  # tokens; below this a separate forward costs more than it saves


ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def _attention_span(model: nn.Module) -> int | None:
    """The fewest cache slots a query may look back over (a sliding window, an attention
    chunk), or None. Those masks count slots, not positions: padding between a shared
    prefix and the rest of a prompt would push real tokens out of them. 0 where a layer is
    no attention (linear attention, a convolution: its state would take the padding in)."""
    cfg = getattr(base_model(model), "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if any(t not in ATTENTION_LAYERS for t in getattr(cfg, "layer_types", None) or ()):
        return 0
    spans = [getattr(cfg, k, None) for k in ("sliding_window", "attention_chunk_size")]
    spans = [s for s in spans if isinstance(s, int) and s > 0]
    return min(spans) if spans else None


def _after_shared_prefix(
    model: nn.Module,
    seqs: list[list[int]],
    batch_size: int,
    pad_id: int,
    autocast,
    *,
    answer_tokens: int,
):
    """Batches of ``seqs`` formed by length, each ``(indices, ids, mask, cache, shared)``:
    the tokens every sequence starts with (``shared`` of them) run once and each batch gets
    a copy of their cache; ``ids`` are the rest of each sequence, left-padded, and ``mask``
    covers ``[prefix][padding][rest]``. Without a shared prefix: the whole sequences, a
    fresh cache and ``shared`` 0."""
    from transformers import DynamicCache

    dev = _device(model)
    shared, prefix_cache = _shared_prefix(model, seqs, dev, autocast, answer_tokens)
    for chunk in _batches(sorted(range(len(seqs)), key=lambda i: len(seqs[i])), batch_size):
        ids, mask = left_pad([seqs[i][shared:] for i in chunk], pad_id, dev)
        if prefix_cache is None:
            yield chunk, ids, mask, DynamicCache(), 0
            continue
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(chunk))
        yield chunk, ids, torch.cat([mask.new_ones(len(chunk), shared), mask], 1), cache, shared


@torch.no_grad()
def _shared_prefix(
    model: nn.Module, seqs: list[list[int]], dev: torch.device, autocast, answer_tokens: int
):
    """(length, KV cache) of the tokens every sequence starts with, each keeping at least
    its last token; (0, None) when they share fewer than ``MIN_SHARED_PREFIX``, or when a
    sequence and its ``answer_tokens`` overrun the model's attention span."""
    from transformers import DynamicCache

    span = _attention_span(model)
    if len(seqs) < 2 or (span is not None and max(map(len, seqs)) > span - answer_tokens):
        return 0, None
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    if n < MIN_SHARED_PREFIX:
        return 0, None
    cache = DynamicCache()
    with autocast():
        model(
            input_ids=torch.tensor([first[:n]], device=dev),
            use_cache=True,
            logits_to_keep=1,
            **with_cache(model, cache),
        )
    return n, cache


def classification_accuracy(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """Accuracy of the highest-scoring label, and the loss of the gold labels from the same
    scores (so the loss needs no second pass over the data)."""
    labels = list(labels) if labels is not None else label_set(records)
    scores = score_labels(
        model,
        tokenizer,
        [r.fields["prompt"] for r in records],
        labels,
        batch_size=batch_size,
        autocast=autocast,
        max_length=max_length,
        progress=progress,
    )
    pred = scores.argmax(-1).tolist()
    gold = [
        labels.index(r.fields["completion"]) if r.fields["completion"] in labels else -1
        for r in records
    ]
    correct = [int(p == g) for p, g in zip(pred, gold)]
    n_tok = label_token_counts(tokenizer, labels)
    loss = None
    if all(g >= 0 for g in gold):
        loss = -float(sum(scores[i, g] for i, g in enumerate(gold))) / sum(n_tok[g] for g in gold)
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "predictions": [labels[p] for p in pred],
        "correct": correct,
        "labels": labels,
        "gold_loss": loss,
        "gold_tokens": [n_tok[g] if g >= 0 else 0 for g in gold],
    }


def label_token_counts(tokenizer, labels: Sequence[str]) -> list[int]:
    """Tokens scored per label: the label's tokens plus the end token."""
    eos = 1 if tokenizer.eos_token_id is not None else 0
    return [len(tokenizer(lab, add_special_tokens=False)["input_ids"]) + eos for lab in labels]


def chat_prompts(tokenizer, prompts: Sequence[str], *, raw: bool = False) -> list[str]:
    """What a user's prompts are sent as: a user turn of the chat template (when the
    tokenizer has one) unless ``raw``. Every path that answers a user's prompt uses this,
    so one delta gives one answer whichever way it is asked."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches); with ``max_length``, each
    prompt keeps its last ``max_length - max_new_tokens`` tokens."""
    budget = max_length - max_new_tokens if max_length else None
    seqs = [_prompt_ids(tokenizer, p, budget) for p in prompts]
    return generate_ids(
        model,
        tokenizer,
        seqs,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast=autocast,
        progress=progress,
    )


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    seqs: Sequence[list[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    autocast=contextlib.nullcontext,
    progress: bool = False,
    eos_token_id=None,
) -> list[str]:
    """Greedy completions of prompts given as token ids, ending at ``eos_token_id``
    (default: the tokenizer's end of sequence), in the order given. Batches go by length;
    the tokens every prompt starts with run once, each batch's rest left-padded after them
    (see :func:`score_labels`)."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    seqs = list(seqs)
    outs: list[str] = [""] * len(seqs)
    bar = _bar(len(seqs), "eval generation", progress)
    batches = _after_shared_prefix(
        model, seqs, batch_size, tokenizer.pad_token_id, autocast, answer_tokens=max_new_tokens
    )
    for chunk, ids, mask, cache, shared in batches:
        cached: dict = {}  # without a shared prefix generate makes the cache it would
        if shared:  # generate takes the whole input and runs what its cache lacks
            prefix = torch.tensor(seqs[chunk[0]][:shared], device=dev).expand(len(chunk), -1)
            ids = torch.cat([prefix, ids], 1)
            # the cache given, not the one a generation config names (static, offloaded...)
            cached = {**with_cache(model, cache), "cache_implementation": None}
        with autocast(), padded_inference(dev):
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,  # greedy, whatever the model's generation config says
                num_return_sequences=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
                **cached,
            )
        for i, row in zip(chunk, gen[:, ids.shape[1] :]):
            outs[i] = tokenizer.decode(row, skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return outs


def _end_tokens(model: nn.Module, tokenizer) -> list[int]:
    """Where a generated chat turn ends: the model's own end tokens (generation config),
    the tokenizer's end of sequence, and the token the chat template closes an assistant
    turn with when that is a special token (``<|im_end|>``, ``<|eot_id|>``: a base model's
    config may name only ``<|endoftext|>``)."""
    ends: list[int] = []
    for eos in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        ends += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063slimtune\u2063"
        turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(turn, tokenize=False)
        except Exception:  # a template that wants other roles: the configured ends only
            text = ""
        after = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and ids[0] in set(tokenizer.all_special_ids):
            ends.append(ids[0])
    return list(dict.fromkeys(ends))


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single
    spaces; a normalised match forgives "Paris." for "paris"."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _scored(outs: list[str], references: list[str]) -> dict:
    correct = [int(o.strip() == r.strip()) for o, r in zip(outs, references)]
    normalized = [int(normalize_answer(o) == normalize_answer(r)) for o, r in zip(outs, references)]
    n = max(len(correct), 1)
    return {
        "exact_match": sum(correct) / n,
        "normalized_match": sum(normalized) / n,
        "n": len(correct),
        "predictions": outs,
        "references": references,
        "correct": correct,
        "normalized": normalized,
    }


def chat_reply(rec: Record, tokenizer, budget: int | None) -> tuple[list[int], str]:
    """A chat's context up to its last assistant turn, rendered by the chat template with
    the generation prompt (token ids, its last ``budget``), and that turn's text: what
    the model is asked and what it should answer."""
    turns, _ = chat_turns(rec)
    last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(turns[:last], tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if budget is not None:
        ids = ids[max(0, len(ids) - max(budget, 1)) :]
    return ids, turns[last]["content"]


def exact_match(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """Greedy answers scored by exact and normalised match: a prompt/completion record's
    completion from its prompt, or (``chat``) a chat's last assistant turn from the turns
    before it, ending where the template ends a turn."""
    budget = max_length - max_new_tokens if max_length else None
    if chat:
        pairs = [chat_reply(r, tokenizer, budget) for r in records]
    else:
        pairs = [
            (_prompt_ids(tokenizer, r.fields["prompt"], budget), r.fields["completion"])
            for r in records
        ]
    outs = generate_ids(
        model,
        tokenizer,
        [ids for ids, _ in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast=autocast,
        progress=progress,
        eos_token_id=_end_tokens(model, tokenizer) if chat else None,
    )
    references = [ref for _, ref in pairs]
    # a one-line answer: after a line break a model that has not learnt where an answer
    # ends (a base model, zero-shot) goes on writing; its answer is its first line
    outs = [o if "\n" in ref.strip() else _first_line(o) for o, ref in zip(outs, references)]
    return _scored(outs, references)


def _first_line(text: str) -> str:
    stripped = text.lstrip()
    return text[: len(text) - len(stripped)] + stripped.split("\n", 1)[0]


@torch.no_grad()
def decode_latency(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    max_seconds: float = 2.0,
    warmup_tokens: int = 4,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Per-token decode latency with a KV cache, greedy, batch 1; the prompt keeps its last
    ``max_length - new_tokens`` tokens.

    A short warm-up round, then up to ``repeats`` timed rounds of ``new_tokens`` steps, but no
    new round once ``max_seconds`` have gone: on a GPU that is every round, on a CPU where a
    step takes ~100 ms it is one, so a small run's report does not cost more than its training.
    """
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    dev = _device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    budget = max_length - new_tokens if max_length else None
    ids = torch.tensor([_prompt_ids(tokenizer, prompt, budget)], device=dev)
    steps: list[float] = []
    prefill: list[float] = []
    bar = _bar(repeats + 1, "eval latency", progress, unit="round")
    start = time.perf_counter()
    for r in range(repeats + 1):  # round 0 warms up
        if r > 1 and time.perf_counter() - start > max_seconds:
            bar.total = r  # the budget ended it: the bar ends full
            bar.refresh()
            break
        cache = DynamicCache()
        sync()
        t0 = time.perf_counter()
        with autocast():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        if r:
            prefill.append(time.perf_counter() - t0)
        for _ in range(new_tokens if r else warmup_tokens):
            t0 = time.perf_counter()
            with autocast():
                out = model(input_ids=nxt, use_cache=True, **with_cache(model, cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            if r:
                steps.append(time.perf_counter() - t0)
        if not r:
            start = time.perf_counter()  # the budget counts the timed rounds only
        bar.update(1)
    bar.close()
    model.train(was_training)
    return {
        "latency_p50_ms": 1000 * percentile(steps, 50),
        "latency_p95_ms": 1000 * percentile(steps, 95),
        "prefill_ms": 1000 * percentile(prefill, 50),
        "latency_steps": len(steps),
    }


def evaluate(
    model: nn.Module,
    tokenizer,
    dataset: Dataset,
    *,
    task: str = "auto",
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    latency: bool = True,
    max_new_tokens: int = 64,
    autocast=contextlib.nullcontext,
    max_length: int | None = None,
    progress: bool = False,
) -> tuple[dict, dict | None]:
    """Quality metrics of ``dataset`` for ``task`` (auto-detected) plus decode latency,
    and the per-example details (predictions, correctness) where the task has them.

    ``labels`` are the classification candidates (default: the dataset's completions);
    pass the training set's labels so a label missing from a small eval set still competes.
    Inputs are cut to ``max_length`` tokens (default: the one the dataset was loaded with).
    """
    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    check_task(task, dataset)
    max_length = max_length or dataset.max_length
    task = detect_task(dataset) if task == "auto" else task
    if task in ("generation", "chat") and max_length and max_new_tokens > max_length // 2:
        # an answer as long as the context would cut every prompt to one token
        max_new_tokens = max(1, max_length // 2)
        info(
            f"eval: answers of up to {max_new_tokens} new tokens, half the {max_length}-token "
            "limit, so that prompts keep the other half"
        )
    metrics: dict = {"task": task, "examples": len(dataset.records)}
    details = None
    loss_known = False
    if task == "classification":
        details = classification_accuracy(
            model,
            tokenizer,
            dataset.records,
            labels=labels,
            batch_size=batch_size,
            autocast=autocast,
            max_length=max_length,
            progress=progress,
        )
        metrics["accuracy"] = details["accuracy"]
        # The gold label's score is the loss of the completion; reuse it unless truncation
        # made the training-time targets differ from the scored ones.
        same_targets = len(dataset.examples) == len(dataset.records) and all(
            e.num_target_tokens == n for e, n in zip(dataset.examples, details["gold_tokens"])
        )
        if details["gold_loss"] is not None and same_targets:
            mean = details["gold_loss"]
            metrics.update(
                loss=mean,
                perplexity=math.exp(min(mean, 50.0)),
                target_tokens=sum(details["gold_tokens"]),
            )
            loss_known = True
    if not loss_known:
        metrics.update(
            eval_loss(
                model,
                dataset.examples,
                tokenizer.pad_token_id,
                batch_size=batch_size,
                autocast=autocast,
                progress=progress,
            )
        )
    if task in ("generation", "chat"):
        details = exact_match(
            model,
            tokenizer,
            dataset.records,
            chat=task == "chat",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            autocast=autocast,
            max_length=max_length,
            progress=progress,
        )
        metrics["exact_match"] = details["exact_match"]
        metrics["normalized_match"] = details["normalized_match"]
    if latency:
        first = dataset.records[0].fields  # a chat's prompt is a list: latency on "Hello"
        prompt = next(
            (first[k] for k in ("prompt", "text") if isinstance(first.get(k), str) and first[k]),
            "Hello",
        )
        metrics.update(
            decode_latency(
                model,
                tokenizer,
                prompt,
                autocast=autocast,
                max_length=max_length,
                progress=progress,
            )
        )
    return metrics, details


def merge_evaluations(parts: Sequence[tuple[dict, dict | None]]) -> tuple[dict, dict | None]:
    """One :func:`evaluate` result from those of contiguous shares of a dataset, in order
    (each process of a run evaluates one): the counts summed, the losses weighted by
    their target tokens, the per-example details joined. Latency is the first share's."""
    parts = [p for p in parts if p[0]]  # a process with no share of a small eval set
    if len(parts) == 1:
        return parts[0]
    metrics = dict(parts[0][0])
    metrics["examples"] = sum(m["examples"] for m, _ in parts)
    tokens = sum(m["target_tokens"] for m, _ in parts)
    mean = sum(m["loss"] * m["target_tokens"] for m, _ in parts) / max(tokens, 1)
    metrics.update(loss=mean, perplexity=math.exp(min(mean, 50.0)), target_tokens=tokens)
    shares = [d for _, d in parts]
    if any(d is None for d in shares):
        return metrics, None
    details = {**shares[0]}
    for key in ("predictions", "correct", "gold_tokens", "references", "normalized"):
        if key in details:
            details[key] = [x for d in shares for x in d[key]]
    details["n"] = len(details["correct"])
    score = "accuracy" if "accuracy" in details else "exact_match"
    details[score] = metrics[score] = sum(details["correct"]) / max(details["n"], 1)
    if "normalized" in details:
        share = sum(details["normalized"]) / max(details["n"], 1)
        details["normalized_match"] = metrics["normalized_match"] = share
    if "gold_loss" in details:
        gold = [d["gold_loss"] for d in shares]
        details["gold_loss"] = (
            None
            if any(g is None for g in gold)
            else sum(g * sum(d["gold_tokens"]) for g, d in zip(gold, shares))
            / max(sum(details["gold_tokens"]), 1)
        )
    return metrics, details
