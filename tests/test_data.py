import json

import pytest

from slimtune.data import (
    IGNORE_INDEX,
    collate,
    epoch_batches,
    load_dataset,
    pack_examples,
    read_records,
    split_dataset,
)
from slimtune.errors import DataError

from .conftest import write_jsonl


def test_prompt_completion_loss_only_on_completion(tiny, tmp_path):
    tok = tiny.tokenizer
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Message: hello\nIntent:", "completion": " billing"}]
    )
    ex = load_dataset(path, tok).examples[0]
    n_prompt = len(tok("Message: hello\nIntent:")["input_ids"])
    completion = tok(" billing", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == completion
    assert ex.input_ids[n_prompt:] == completion


def test_text_shape_trains_on_every_token(tiny, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick brown fox"}])
    ex = load_dataset(path, tiny.tokenizer).examples[0]
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny.tokenizer.eos_token_id


def test_chat_shape_masks_everything_but_assistant_turns(tiny, tmp_path):
    tok = tiny.tokenizer
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "France"},
    ]
    ex = load_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok).examples[0]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained == "Paris<|im_end|>\nFrance<|im_end|>\n"


def test_csv_and_text_files(tiny, tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, b",x\nc,y\n')
    recs = read_records(tmp_path / "d.csv")
    assert [r.fields for r in recs] == [
        {"prompt": "a, b", "completion": "x"},
        {"prompt": "c", "completion": "y"},
    ]
    assert [r.line for r in recs] == [2, 3]
    (tmp_path / "d.txt").write_text("para one\nstill one\n\n\npara two\n")
    recs = read_records(tmp_path / "d.txt")
    assert [r.fields["text"] for r in recs] == ["para one\nstill one", "para two"]
    assert [r.line for r in recs] == [1, 5]


BAD = [
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
    ("arr.jsonl", '{"text": "ok"}\n[1, 2]\n', r"arr\.jsonl:2: expected a JSON object"),
    ("missing.jsonl", '{"prompt": "p"}\n', r"missing\.jsonl:1: .*missing field 'completion'"),
    (
        "type.jsonl",
        '{"prompt": "p", "completion": 3}\n',
        r"type\.jsonl:1: field 'completion' must be a string",
    ),
    ("unknown.jsonl", '{"question": "q"}\n', r"unknown\.jsonl:1: unknown record shape"),
    (
        "mixed.jsonl",
        '{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n',
        r"mixed\.jsonl:3: record has shape 'prompt_completion'",
    ),
    ("empty.jsonl", "", r"empty\.jsonl: contains no examples"),
    ("blank.jsonl", "\n   \n", r"blank\.jsonl: contains no examples"),
    ("emptytext.jsonl", '{"text": "  "}\n', r"emptytext\.jsonl:1: field 'text' is empty"),
    (
        "noasst.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
        r"noasst\.jsonl:1: 'messages' has no assistant turn",
    ),
    (
        "role.jsonl",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n",
        r"role\.jsonl:1: messages\[0\]\.role is 'robot'",
    ),
    ("rows.csv", "prompt,completion\na,b\nc,d,e\n", r"rows\.csv:3: row has more cells"),
    ("short.csv", "prompt,completion\na\n", r"short\.csv:2: row has fewer cells"),
    ("data.xlsx", "x", r"unsupported file type '\.xlsx'"),
    ("data.parquet", "x", r"data\.parquet: not a readable Parquet file"),
    (
        "sharegpt.jsonl",
        json.dumps(
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}
        )
        + "\n",
        r"sharegpt\.jsonl:1: conversations\[1\]\.from is 'robot'",
    ),
    (
        "sharegpt2.jsonl",
        json.dumps({"conversations": [{"from": "human", "text": "hi"}]}) + "\n",
        r"sharegpt2\.jsonl:1: conversations\[0\] must be an object with 'from' and 'value'",
    ),
    (
        "trl.jsonl",
        json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n",
        r"trl\.jsonl:1: .*missing field 'completion'",
    ),
    (
        "trl2.jsonl",
        json.dumps(
            {
                "prompt": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a"},
                ],
                "completion": [{"role": "user", "content": "b"}],
            }
        )
        + "\n",
        r"trl2\.jsonl:1: 'completion' has no assistant turn",
    ),
    ("whole.json", '{"text": "a"}', r"whole\.json: expected a JSON array"),
    # a .json error names the line its element starts on, elements counted from 1
    (
        "pretty.json",
        '[\n  {\n    "text": "a"\n  },\n  {\n    "prompt": "p",\n    "completion": " "\n  }\n]\n',
        r"pretty\.json:5: field 'completion' is empty",
    ),
    ("kinds.json", '[{"text": "a"},\n 3]', r"kinds\.json:2: element 2 is int"),
    ("comma.json", '[{"text": "a"}\n {"text": "b"}]', r"comma\.json:2: .*expected ',' or ']'"),
    ("extra.json", '[{"text": "a"}]\n[]', r"extra\.json:1: .*extra data after the array"),
    ("deep.jsonl", "[" * 100_000 + "\n", r"deep\.jsonl:1: invalid JSON \(nested too deeply\)"),
    ("deep.json", "[" * 100_000, r"deep\.json: invalid JSON \(nested too deeply\)"),
    (
        "labelled.jsonl",
        '{"text": "great film", "label": "positive"}\n',
        r"labelled\.jsonl:1: has 'text' and 'label': a classification record is 'prompt'",
    ),
    (
        "from.jsonl",
        json.dumps({"conversations": [{"from": ["human"], "value": "hi"}]}) + "\n",
        r"from\.jsonl:1: conversations\[0\]\.from is \['human'\]",
    ),
    (
        "twice.csv",
        "prompt,prompt,completion\na,b,c\n",
        r"twice\.csv:1: the header names 'prompt' twice",
    ),
]


@pytest.mark.parametrize(("name", "content", "pattern"), BAD, ids=[b[0] for b in BAD])
def test_malformed_input_names_file_and_line(tiny, tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_dataset(path, tiny.tokenizer)


def test_files_as_editors_and_spreadsheets_write_them_read_as_written(tmp_path):
    # a quoted CSV cell keeps its line breaks (CRLF files too); Excel's byte-order mark and
    # spaces after the header's commas are not part of the field names; a long cell is fine
    long = "x" * 200_000
    (tmp_path / "d.csv").write_bytes(
        b'\xef\xbb\xbfprompt, completion\r\nhi,"line one\r\nline two"\r\nq,'
        + long.encode()
        + b"\r\n"
    )
    recs = read_records(tmp_path / "d.csv")
    assert [r.fields for r in recs] == [
        {"prompt": "hi", "completion": "line one\nline two"},
        {"prompt": "q", "completion": long},
    ]
    assert [r.line for r in recs] == [2, 4]  # where each row starts
    # a spreadsheet's export with trailing unnamed columns reads as the named ones
    (tmp_path / "e.csv").write_text("prompt,completion,,\na,b,,\n")
    assert [r.fields for r in read_records(tmp_path / "e.csv")] == [
        {"prompt": "a", "completion": "b"}
    ]
    # JSON's whitespace is space, tab and line ends: json.loads refuses others between values
    (tmp_path / "nbsp.json").write_text('[{"text": "a"},\u00a0{"text": "b"}]')
    with pytest.raises(DataError, match=r"nbsp\.json:1: invalid JSON"):
        read_records(tmp_path / "nbsp.json")
    # JSON strings may hold U+2028, U+2029 and U+0085 unescaped: they do not end a line
    rows = [{"text": "a\u2028b\u2029c\x85d"}, {"text": "e"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    recs = read_records(path)
    assert [r.fields for r in recs] == rows and [r.line for r in recs] == [1, 2]
    (tmp_path / "d.txt").write_text("\ufeffpara one\n")
    assert read_records(tmp_path / "d.txt")[0].fields["text"] == "para one"


def test_non_utf8_and_missing_files(tiny, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_dataset(path, tiny.tokenizer)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl", tiny.tokenizer)
    with pytest.raises(DataError, match="no bundled dataset 'nope'"):
        load_dataset("builtin:nope", tiny.tokenizer)


def test_truncation_keeps_the_completion(tiny, tmp_path):
    long_prompt = "word " * 200
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long_prompt, "completion": " billing"}])
    ex = load_dataset(path, tiny.tokenizer, max_length=16).examples[0]
    assert len(ex.input_ids) == 16
    target = tiny.tokenizer(" billing", add_special_tokens=False)["input_ids"]
    assert [t for t in ex.labels if t != IGNORE_INDEX][: len(target)] == target


def test_absurd_lines_are_cut_before_they_are_tokenized(tiny, tmp_path):
    from slimtune.data import CHARS_PER_TOKEN

    from .test_evaluation import CountingTokenizer

    huge = "word " * 400_000  # a 2 MB line
    rows = {
        "text": [{"text": huge}],
        "prompt_completion": [{"prompt": huge + "Intent:", "completion": " billing"}],
        "messages": [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": huge},
                ]
            }
        ],
    }
    for shape, rec in rows.items():
        tok = CountingTokenizer(tiny.tokenizer)
        ex = load_dataset(
            write_jsonl(tmp_path / f"{shape}.jsonl", rec), tok, max_length=32
        ).examples[0]
        assert len(ex.input_ids) == 32
        assert tok.longest <= 32 * CHARS_PER_TOKEN + 100, shape  # + the chat template's tags
        # a cut text does not end: no end token is learned after it
        assert ex.input_ids[-1] != tiny.tokenizer.eos_token_id or shape == "prompt_completion"
    pc = load_dataset(tmp_path / "prompt_completion.jsonl", tiny.tokenizer, max_length=32)
    assert tiny.tokenizer.decode(pc.examples[0].input_ids).endswith("Intent: billing<|im_end|>")


def test_split_is_seeded_and_disjoint(tiny, intent_file):
    ds = load_dataset(intent_file, tiny.tokenizer)
    tr1, ev1 = split_dataset(ds, 0.25, seed=1)
    _tr2, ev2 = split_dataset(ds, 0.25, seed=1)
    _, ev3 = split_dataset(ds, 0.25, seed=2)
    lines = lambda d: [e.line for e in d.examples]  # noqa: E731
    assert lines(ev1) == lines(ev2) != lines(ev3)
    assert len(ev1) == 12 and not set(lines(tr1)) & set(lines(ev1))
    assert [r.line for r in ev1.records] == lines(ev1)


def test_collate_pads_without_loss_and_pack_fills_blocks(tiny, intent_file):
    ds = load_dataset(intent_file, tiny.tokenizer)
    batch = collate(ds.examples[:3], pad_id=0)
    lengths = [len(e.input_ids) for e in ds.examples[:3]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    blocks = pack_examples(ds.examples, 64)
    assert all(len(b.input_ids) == 64 for b in blocks[:-1])
    assert sum(len(b.input_ids) for b in blocks) == sum(len(e.input_ids) for e in ds.examples)


def test_epoch_batches_cover_every_example_once():
    b = epoch_batches(10, 3, seed=0, epoch=0)
    assert sorted(i for x in b for i in x) == list(range(10))
    assert b == epoch_batches(10, 3, seed=0, epoch=0) != epoch_batches(10, 3, seed=0, epoch=1)


CHAT = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "France"},
]


def test_sharegpt_conversations_train_like_messages(tiny, tmp_path):
    who = {"user": "human", "assistant": "gpt"}
    conv = [{"from": who[m["role"]], "value": m["content"]} for m in CHAT]
    ours = load_dataset(
        write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]), tiny.tokenizer
    )
    ref = load_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tiny.tokenizer)
    assert ours.shape == "messages"
    assert ours.examples[0].input_ids == ref.examples[0].input_ids
    assert ours.examples[0].labels == ref.examples[0].labels


def test_trl_conversational_prompt_completion_trains_on_the_completion_only(tiny, tmp_path):
    tok = tiny.tokenizer
    row = {"prompt": CHAT[:3], "completion": CHAT[3:]}
    ex = load_dataset(write_jsonl(tmp_path / "t.jsonl", [row]), tok).examples[0]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    # the prompt's assistant turn ("Paris") is context, as in TRL
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "France<|im_end|>\n"


def test_chat_truncation_keeps_the_completion_too(tiny, tmp_path):
    # README (Data): longer examples lose the start of their prompt, never their completion;
    # a chat's long prompt cut the answer off instead, and the example was dropped
    tok = tiny.tokenizer
    long = "word " * 200 + "Which city?"
    for row in (
        {
            "prompt": [{"role": "user", "content": long}],
            "completion": [{"role": "assistant", "content": "Paris"}],
        },
        {
            "messages": [
                {"role": "user", "content": long},
                {"role": "assistant", "content": "Paris"},
            ]
        },
    ):
        ex = load_dataset(write_jsonl(tmp_path / "t.jsonl", [row]), tok, max_length=32).examples[0]
        assert len(ex.input_ids) == 32
        assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "Paris<|im_end|>\n"
        assert "Which city?" in tok.decode(ex.input_ids)


def rows_with_a_bad_second_row():
    rows = [{"prompt": f"Message: {i}\nIntent:", "completion": f" label{i % 2}"} for i in range(4)]
    return rows, [rows[0], {"prompt": "no completion here", "completion": None}, *rows[2:]]


def test_parquet_rows_load_like_jsonl_and_bad_rows_name_their_row(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, bad = rows_with_a_bad_second_row()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ours = load_dataset(tmp_path / "d.parquet", tiny.tokenizer)
    ref = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tiny.tokenizer)
    assert [e.input_ids for e in ours.examples] == [e.input_ids for e in ref.examples]
    assert [e.labels for e in ours.examples] == [e.labels for e in ref.examples]
    assert [r.line for r in ours.records] == [1, 2, 3, 4]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:2: .*missing field 'completion'"):
        load_dataset(tmp_path / "bad.parquet", tiny.tokenizer)


def test_table_columns_json_cannot_hold_are_fingerprinted_too(tiny, tmp_path):
    # Parquet and datasets rows carry dates, bytes, ... in unused columns: loading must not
    # crash (a TypeError, exit 1) while fingerprinting them
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"text": f"hello {i}", "at": datetime.datetime(2026, 1, i + 1), "raw": b"\x00"}
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = load_dataset(tmp_path / "d.parquet", tiny.tokenizer)
    b = load_dataset(rows, tiny.tokenizer)
    assert a.fingerprint() == b.fingerprint() and len(a.examples) == 3


def test_datasets_objects_load_and_train(tiny, tiny_dir, tmp_path):
    import datasets

    from slimtune.errors import UserInputError
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    from .conftest import intent_rows

    rows, bad = rows_with_a_bad_second_row()
    ours = load_dataset(datasets.Dataset.from_list(rows), tiny.tokenizer)
    ref = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tiny.tokenizer)
    assert [e.input_ids for e in ours.examples] == [e.input_ids for e in ref.examples]
    assert ours.path.startswith("memory:") and ours.fingerprint() == ref.fingerprint()
    with pytest.raises(DataError, match=r"memory:\w+:2: .*missing field 'completion'"):
        load_dataset(bad, tiny.tokenizer)  # a plain list of dicts works the same way
    with pytest.raises(UserInputError, match=r"pass one split, e\.g\. data\['train'\]"):
        load_dataset(
            datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}), tiny.tokenizer
        )
    result = train(
        TrainConfig(
            model=str(tiny_dir),
            data=datasets.Dataset.from_list(intent_rows()),
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            batch_size=4,
            eval_fraction=0.25,
            progress=False,
            device="cpu",
            save_every=0,
        )
    )
    assert result.manifest["dataset"]["path"].startswith("memory:")
    assert result.manifest["training"]["data"] == result.manifest["dataset"]["path"]
    assert result.summary["eval_accuracy"] is not None
