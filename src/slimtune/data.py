"""Data files -> tokenized training examples with loss masks.

Accepted files: JSONL (one object per line), JSON (an array of objects), CSV (with a
header row), Parquet (needs ``pyarrow``) and plain text (paragraphs separated by blank
lines). The Python API also takes the rows themselves: a Hugging Face ``datasets.Dataset``
or a list of dicts (see :func:`in_memory`). Every record in a file has one of three shapes,
and all records of a file share it:

* ``{"text": ...}``: language modelling; loss on every token.
* ``{"prompt": ..., "completion": ...}``: loss on the completion (and its end token) only.
* chat: rendered with the tokenizer's chat template; loss on the assistant turns only. Any of
  ``{"messages": [{"role": ..., "content": ...}, ...]}``, ShareGPT's ``{"conversations":
  [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``, or TRL's conversational
  ``{"prompt": [messages], "completion": [messages]}`` (loss on the completion's assistant
  turns only).

Every problem is reported as a :class:`~slimtune.errors.DataError` naming file and line
(for Parquet and in-memory rows, the 1-based row number).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import DataError, UserInputError

IGNORE_INDEX = -100
# Text is cut to this many characters per token of max_length before it is tokenized, so an
# absurd line (a 50 MB record) costs no more than a normal one; no common tokenizer averages
# more characters per token, so the cut never changes what survives token truncation.
CHARS_PER_TOKEN = 20
SHAPES = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")
BUILTIN_PREFIX = "builtin:"
MEMORY_PREFIX = "memory:"
# ShareGPT's "from" -> chat role
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
# Rows given as objects, by content: a spec string stands for them in configs, manifests
# and checkpoints (so resume recognises the same rows), for the life of the process.
_IN_MEMORY: dict[str, list[Record]] = {}


@dataclass
class Record:
    """One raw record and where it came from, so later errors can point at it."""

    fields: dict
    path: str
    line: int


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int = 0

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class Dataset:
    """Records of one file plus their tokenized examples."""

    path: str
    shape: str
    records: list[Record]
    examples: list[Example] = field(default_factory=list)
    max_length: int = 512  # the token limit the examples were cut to; evaluation keeps it

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.records)

    def __len__(self) -> int:
        return len(self.examples)


def builtin_datasets() -> dict[str, Path]:
    """Datasets bundled with slimtune, by name (``builtin:NAME[:train|test]``)."""
    root = resources.files("slimtune") / "datasets"
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".jsonl"):
            out[entry.name.removesuffix(".jsonl")] = Path(str(entry))
    return out


def resolve_path(spec: str | Path) -> Path:
    """Map ``builtin:support_intents_train`` to the bundled file; other specs are paths."""
    s = str(spec)
    if s.startswith(BUILTIN_PREFIX):
        name = s[len(BUILTIN_PREFIX) :]
        table = builtin_datasets()
        if name not in table:
            raise DataError(s, f"no bundled dataset {name!r}; bundled: {', '.join(sorted(table))}")
        return table[name]
    return Path(s).expanduser()


def in_memory(data):
    """Rows given as an object (a Hugging Face ``datasets.Dataset``, or any iterable of
    mappings) -> a ``memory:HASH`` spec that :func:`read_records` resolves in this process;
    ``None``, strings and paths are returned unchanged."""
    if data is None or isinstance(data, (str, Path)):
        return data
    if hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
        data = data.to_dict("records")
    if hasattr(data, "keys") and not isinstance(data, Sequence):
        raise UserInputError(
            f"training data is a mapping ({type(data).__name__}, keys "
            f"{list(data.keys())[:5]}); pass one split, e.g. data['train']"
        )
    try:
        rows = list(data)
    except TypeError as e:
        raise UserInputError(
            f"training data must be a file, a Hugging Face datasets object or "
            f"a list of dicts, got {type(data).__name__}"
        ) from e
    spec = MEMORY_PREFIX + "rows"
    if not rows:
        raise DataError(spec, "contains no examples")
    records = _records_from_rows(rows, spec)
    spec = MEMORY_PREFIX + dataset_fingerprint(records).removeprefix("sha256:")[:16]
    for rec in records:
        rec.path = spec
    _IN_MEMORY.setdefault(spec, records)
    return spec


def _records_from_rows(rows: Sequence, where: str) -> list[Record]:
    """Rows of a table (Parquet, ``datasets``): a null cell is an absent field."""
    records = []
    for i, row in enumerate(rows, start=1):
        if not hasattr(row, "items"):
            raise DataError(where, f"row is {type(row).__name__}, expected a mapping", i)
        records.append(Record({k: v for k, v in row.items() if v is not None}, where, i))
    return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserInputError(
            f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
            "(or pip install 'slimtune[data]')"
        ) from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise DataError(path, f"not a readable Parquet file ({e})") from e
    return _records_from_rows(rows, str(path))


def read_records(spec: str | Path) -> list[Record]:
    if str(spec).startswith(MEMORY_PREFIX):
        if str(spec) not in _IN_MEMORY:
            raise DataError(
                spec,
                "no such in-memory dataset in this process; pass the rows "
                "(a datasets.Dataset or a list of dicts) themselves",
            )
        return _IN_MEMORY[str(spec)]
    path = resolve_path(spec)
    if not path.exists():
        raise DataError(path, "no such file")
    if path.is_dir():
        raise DataError(path, "is a folder; expected a .jsonl, .json, .csv, .parquet or .txt file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_text}
    if suffix == ".parquet":
        records = _read_parquet(path)
        if not records:
            raise DataError(path, "contains no examples")
        return records
    if suffix not in readers:
        raise DataError(
            path,
            f"unsupported file type {suffix or '(none)'!r}; "
            "use .jsonl, .json, .csv, .parquet or .txt",
        )
    try:  # utf-8-sig: a leading byte-order mark (Excel's CSV, Notepad) is not data
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 text (byte {e.start})", line) from e
    records = readers[suffix](path, text)
    if not records:
        raise DataError(path, "contains no examples")
    return records


def _lines(text: str) -> list[str]:
    """The file's lines. Only newlines end one (the file was read with universal newlines):
    ``str.splitlines`` would also split at U+2028/U+2029/U+0085, which JSON strings may hold
    unescaped (``json.dumps(ensure_ascii=False)`` writes them so)."""
    return text.split("\n")


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for i, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", i) from e
        except RecursionError:
            raise DataError(path, "invalid JSON (nested too deeply)", i) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", i)
        records.append(Record(obj, str(path), i))
    return records


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, and no other


def _read_json(path: Path, text: str) -> list[Record]:
    """A JSON array of objects, each record with the line its element starts on (so an
    error names the line an editor shows, not the element's index)."""
    decoder = json.JSONDecoder()
    counted = [0, 1]  # (position, line there): lines are counted forward, once

    def line_of(pos: int) -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def invalid(e: Exception) -> DataError:
        if isinstance(e, json.JSONDecodeError):
            return DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", e.lineno)
        return DataError(path, "invalid JSON (nested too deeply)")

    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        try:
            json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise invalid(e) from None
        raise DataError(path, "expected a JSON array of objects")
    records: list[Record] = []
    pos = _SPACE.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    pos += closed
    while not closed:
        start = _SPACE.match(text, pos).end()
        try:
            obj, pos = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError) as e:
            raise invalid(e) from None
        line = line_of(start)
        if not isinstance(obj, dict):
            raise DataError(
                path,
                f"element {len(records) + 1} is {type(obj).__name__}, expected an object",
                line,
            )
        records.append(Record(obj, str(path), line))
        pos = _SPACE.match(text, pos).end()
        if not text.startswith((",", "]"), pos):
            raise DataError(
                path, "invalid JSON (expected ',' or ']' after an element)", line_of(pos)
            )
        closed = text[pos] == "]"
        pos += 1
    if _SPACE.match(text, pos).end() != len(text):
        raise DataError(path, "invalid JSON (extra data after the array)", line_of(pos))
    return records


def _read_csv(path: Path, text: str) -> list[Record]:
    # no cell is too long for the reader (the module's limit, restored after)
    limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        return _csv_records(path, text)
    finally:
        csv.field_size_limit(limit)


def _csv_records(path: Path, text: str) -> list[Record]:
    # newline="": a quoted cell keeps its line breaks
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(path, f"malformed CSV header ({e})", 1) from e
    if not header:
        return []
    names = [h.strip() for h in header]  # "prompt, completion" names two fields
    # a spreadsheet's trailing empty columns have empty names: not a repeat
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise DataError(path, f"the header names {', '.join(map(repr, repeated))} twice", 1)
    reader.fieldnames = names
    records = []
    ended = reader.line_num  # the line the previous row ended on
    try:
        for row in reader:
            line, ended = ended + 1, reader.line_num  # where the row starts (a cell may span)
            if None in row:
                raise DataError(
                    path, f"row has more cells than the header's {len(names)} columns", line
                )
            if any(v is None for v in row.values()):
                raise DataError(path, "row has fewer cells than the header", line)
            if all(not (v or "").strip() for v in row.values()):
                continue
            row.pop("", None)  # an unnamed column holds nothing a record reads
            records.append(Record(dict(row), str(path), line))
    except csv.Error as e:
        raise DataError(path, f"malformed CSV ({e})", reader.line_num) from e
    return records


def _read_text(path: Path, text: str) -> list[Record]:
    records, buf, start = [], [], 0
    for i, line in enumerate([*_lines(text), ""], start=1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
        elif buf:
            records.append(Record({"text": "\n".join(buf)}, str(path), start))
            buf = []
    return records


def record_shape(rec: Record) -> str:
    """Validate one record and say which of :data:`SHAPES` it has."""
    f = rec.fields

    def fail(msg: str):
        raise DataError(rec.path, msg, rec.line)

    if "messages" in f and isinstance(f["messages"], str):  # a CSV cell holding JSON
        try:
            f["messages"] = json.loads(f["messages"])
        except json.JSONDecodeError:
            fail("field 'messages' must be a list of {role, content} objects")
    if (
        "messages" in f
        or "conversations" in f
        or isinstance(f.get("prompt"), list)
        or isinstance(f.get("completion"), list)
    ):
        chat_turns(rec)
        return "messages"
    if "prompt" in f or "completion" in f:
        for key in ("prompt", "completion"):
            if key not in f:
                fail(
                    f"has 'prompt' or 'completion' but is missing field '{key}' "
                    f"(its fields: {', '.join(map(repr, sorted(f)))})"
                )
            if not isinstance(f[key], str):
                fail(f"field '{key}' must be a string, got {type(f[key]).__name__}")
        if not f["completion"].strip():
            fail("field 'completion' is empty")
        return "prompt_completion"
    if "text" in f:
        label = next((k for k in ("label", "labels") if k in f), None)
        if label is not None:  # IMDB's, AG News' layout: trained as plain text, the label
            fail(  # would be ignored and nothing scored
                f"has 'text' and '{label}': a classification record is 'prompt' + "
                "'completion' here (e.g. prompt: the text and a question, completion: the "
                "label's name), so the label is trained and scored"
            )
        if not isinstance(f["text"], str):
            fail(f"field 'text' must be a string, got {type(f['text']).__name__}")
        if not f["text"].strip():
            fail("field 'text' is empty")
        return "text"
    fail(
        f"unknown record shape with fields {sorted(f)}; expected 'text', "
        "'prompt' + 'completion', 'messages' or 'conversations'"
    )
    raise AssertionError  # unreachable


def chat_turns(rec: Record) -> tuple[list[dict], int]:
    """A chat record's messages, validated, and the index of the first one whose assistant
    turns are trained: 0, except for TRL's conversational prompt/completion, whose prompt
    (assistant turns included) is context only."""
    f = rec.fields

    def fail(msg: str):
        raise DataError(rec.path, msg, rec.line)

    def turns(value, name: str, key: str, text: str) -> list[dict]:
        if not isinstance(value, list) or not value:
            fail(f"field '{name}' must be a non-empty list of {{{key}, {text}}} objects")
        for j, m in enumerate(value):
            if not isinstance(m, dict) or key not in m or text not in m:
                fail(f"{name}[{j}] must be an object with '{key}' and '{text}'")
            if not isinstance(m[text], str):
                fail(f"{name}[{j}].{text} must be a string")
            if key == "role" and m["role"] not in ROLES:
                fail(f"{name}[{j}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        return value

    if "conversations" in f:  # ShareGPT
        msgs = []
        for j, m in enumerate(turns(f["conversations"], "conversations", "from", "value")):
            if not isinstance(m["from"], str) or m["from"] not in SHAREGPT_ROLES:
                fail(
                    f"conversations[{j}].from is {m['from']!r}; expected one of "
                    f"{', '.join(SHAREGPT_ROLES)}"
                )
            msgs.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        first, where = 0, "'conversations'"
    elif "messages" in f:
        msgs, first, where = turns(f["messages"], "messages", "role", "content"), 0, "'messages'"
    else:  # TRL's conversational prompt/completion
        for key in ("prompt", "completion"):
            if key not in f:
                fail(f"has 'prompt' or 'completion' but is missing field '{key}'")
        prompt = turns(f["prompt"], "prompt", "role", "content")
        msgs = prompt + turns(f["completion"], "completion", "role", "content")
        first, where = len(prompt), "'completion'"
    if not any(m["role"] == "assistant" for m in msgs[first:]):
        fail(f"{where} has no assistant turn, so there is nothing to learn")
    return msgs, first


def file_shape(records: Sequence[Record]) -> str:
    shape = record_shape(records[0])
    for rec in records[1:]:
        s = record_shape(rec)
        if s != shape:
            raise DataError(
                rec.path,
                f"record has shape '{s}' but the file's first record "
                f"(line {records[0].line}) has shape '{shape}'",
                rec.line,
            )
    return shape


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def clip_text(text: str, max_tokens: int, *, keep_end: bool = False) -> str:
    """``text`` cut cheaply to what can survive truncation to ``max_tokens`` tokens (its
    start, or with ``keep_end`` its end), so tokenizing never sees a whole absurd line."""
    limit = max(max_tokens, 0) * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    return text[len(text) - limit :] if keep_end else text[:limit]


def prompt_ids(tokenizer, prompt: str, budget: int) -> list[int]:
    """The last ``budget`` tokens of ``prompt``: truncation keeps the end of a prompt, where
    the question and the answer slot are. Training and every evaluation path use this."""
    if budget <= 0:
        return []
    ids = _ids(tokenizer, clip_text(prompt, budget, keep_end=True), True)
    return ids[max(0, len(ids) - budget) :]


def tokenize_record(rec: Record, shape: str, tokenizer, max_length: int) -> Example | None:
    """Tokenize one record; ``None`` when truncation leaves no target token."""
    f = rec.fields
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if shape == "text":
        text = clip_text(f["text"], max_length)
        ids = _ids(tokenizer, text, True) + (eos if len(text) == len(f["text"]) else [])
        labels = list(ids)
    elif shape == "prompt_completion":
        completion = clip_text(f["completion"], max_length)
        c = _ids(tokenizer, completion, False)
        c = (c + (eos if len(completion) == len(f["completion"]) else []))[:max_length]
        p = prompt_ids(tokenizer, f["prompt"], max_length - len(c))
        ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
    else:
        ids, labels = _tokenize_chat(rec, tokenizer, max_length)
        # like a prompt, the context before the first trained token loses its start first
        first_target = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), 0)
        cut = min(first_target, max(0, len(ids) - max_length))
        ids, labels = ids[cut:], labels[cut:]
    ids, labels = ids[:max_length], labels[:max_length]
    ex = Example(ids, labels, rec.line)
    return ex if ex.num_target_tokens > 0 else None


def _tokenize_chat(rec: Record, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Render turn by turn so each assistant turn's tokens are known exactly.

    The template rendering of messages[:i] with a generation prompt must be a prefix of
    the rendering of messages[:i+1]; it is for every common template, and we check.
    Contents are clipped and rendering stops at ``max_length`` tokens, since the rest is
    cut anyway.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            rec.path, "records are chats but the tokenizer has no chat template", rec.line
        )
    turns, first = chat_turns(rec)
    # the turns before the first trained one are its context: they keep their end
    trained = next(
        (i for i, m in enumerate(turns) if m["role"] == "assistant" and i >= first), len(turns)
    )
    msgs = [
        {**m, "content": clip_text(m["content"], max_length, keep_end=i < trained)}
        for i, m in enumerate(turns)
    ]
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first:
            continue
        prefix = (
            tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(
                rec.path,
                "the chat template does not render turns as prefixes of "
                "each other, so assistant tokens cannot be located",
                rec.line,
            )
        context = _ids(tokenizer, prefix[len(done) :], False)
        answer = _ids(tokenizer, full[len(prefix) :], False)
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = full
        if len(ids) >= max_length:
            break
    return ids, labels


def load_dataset(spec, tokenizer, *, max_length: int = 512) -> Dataset:
    """Read, validate and tokenize one data file (or rows given as an object: see
    :func:`in_memory`)."""
    spec = in_memory(spec)
    records = read_records(spec)
    shape = file_shape(records)
    examples = []
    for rec in records:
        ex = tokenize_record(rec, shape, tokenizer, max_length)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise DataError(
            records[0].path, f"no example keeps a target token within max_length={max_length}"
        )
    return Dataset(records[0].path, shape, records, examples, max_length)


def split_dataset(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split into train and eval parts (eval gets at least one example if any)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(ds.path, f"eval fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(ds.examples)))
    random.Random(seed).shuffle(order)
    n_eval = (
        0 if eval_fraction == 0 or len(order) < 2 else max(1, round(eval_fraction * len(order)))
    )
    ev, tr = sorted(order[:n_eval]), sorted(order[n_eval:])
    by_line = {r.line: r for r in ds.records}

    def part(idx: list[int]) -> Dataset:
        exs = [ds.examples[i] for i in idx]
        return Dataset(ds.path, ds.shape, [by_line[e.line] for e in exs], exs, ds.max_length)

    return part(tr), part(ev)


def shard_dataset(ds: Dataset, rank: int, world: int) -> Dataset:
    """Part ``rank`` of ``world`` contiguous parts of ``ds`` (by record, with their
    examples), as even as they come: each process evaluates one."""
    share, extra = divmod(len(ds.records), world)
    start = rank * share + min(rank, extra)
    return records_subset(ds, ds.records[start : start + share + (rank < extra)])


def records_subset(ds: Dataset, records: list[Record]) -> Dataset:
    """``ds`` with only ``records`` (some of its own) and their examples, matched by line."""
    lines = {r.line for r in records}
    exs = [e for e in ds.examples if e.line in lines]
    return Dataset(ds.path, ds.shape, records, exs, ds.max_length)


def dataset_fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        # default=str: table rows (Parquet, datasets) may hold dates or bytes; JSON data
        # never reaches it, so the fingerprints of JSON files are unchanged
        h.update(json.dumps(r.fields, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def pack_examples(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate examples into full blocks (less padding for short texts)."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
    blocks = []
    for s in range(0, len(ids), block_size):
        ex = Example(ids[s : s + block_size], labels[s : s + block_size])
        if ex.num_target_tokens:
            blocks.append(ex)
    return blocks


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and no loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), so resume can find its place."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
