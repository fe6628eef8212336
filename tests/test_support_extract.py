"""The bundled support-extract data: its generator reproduces the committed files, test
phrasings and held-out products never reach training, answers are canonical and short,
and evaluation treats it as generation (exact match), not classification."""

import json
import re
import sys
from pathlib import Path

import pytest

from slimtune.data import Dataset, file_shape, read_records, resolve_path
from slimtune.eval.evaluate import detect_task

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
ANSWER = re.compile(r"^ (\d{6,7}|none) \| (.+)$")


@pytest.fixture(scope="module")
def gen():
    """scripts/make_support_extract.py as a module (it imports make_support_intents)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_support_extract

        yield make_support_extract
    finally:
        sys.path.remove(str(SCRIPTS))


def rows(split: str) -> list[dict]:
    path = resolve_path(f"builtin:support_extract_{split}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def message(gen, row: dict) -> str:
    return row["prompt"].removeprefix(gen.PROMPT_HEAD).removesuffix(gen.PROMPT_TAIL)


def test_generators_reproduce_the_committed_files(gen, tmp_path):
    import make_support_intents

    train, test = gen.build()
    make_support_intents.write_jsonl(tmp_path / "train.jsonl", train)
    make_support_intents.write_jsonl(tmp_path / "test.jsonl", test)
    assert (tmp_path / "train.jsonl").read_bytes() == resolve_path(
        "builtin:support_extract_train"
    ).read_bytes()
    assert (tmp_path / "test.jsonl").read_bytes() == resolve_path(
        "builtin:support_extract_test"
    ).read_bytes()
    # the helpers support-extract shares with support-intents leave that file as it was
    train, test = make_support_intents.build()
    make_support_intents.write_jsonl(tmp_path / "intents.jsonl", train + test)
    committed = b"".join(
        resolve_path(f"builtin:support_intents_{s}").read_bytes() for s in ("train", "test")
    )
    assert (tmp_path / "intents.jsonl").read_bytes() == committed


def test_sizes_and_held_out_phrasings_products(gen):
    train, test = rows("train"), rows("test")
    assert (len(train), len(test)) == (gen.TRAIN_RECORDS, gen.TEST_RECORDS) == (720, 240)
    assert not {p for _, p in gen.phrasings("train")} & {p for _, p in gen.phrasings("test")}
    assert not set(gen.order_refs("train")) & set(gen.order_refs("test"))
    assert not set(gen.held_out(gen.OTHER_REFS, "train")) & set(
        gen.held_out(gen.OTHER_REFS, "test")
    )
    assert len(gen.phrasings("test")) >= 30  # enough distinct test phrasings to measure
    # no message in both files, and no held-out product named in training, in any case
    assert not {message(gen, r) for r in train} & {message(gen, r) for r in test}
    held = gen.heldout_products()
    train_text = "\n".join(message(gen, r).lower() for r in train)
    assert not [p for p in held if p.lower() in train_text]
    answers = [ANSWER.match(r["completion"]).group(2) for r in test]
    assert sum(a in held for a in answers) >= 0.1 * len(test)


def test_answers_are_canonical_and_derivable_from_the_message(gen):
    catalogue = set(gen.PRODUCTS["product"])
    held = gen.heldout_products()
    kinds = set()
    decoys = 0  # messages with a long number that is not the answer (a case number)
    for row in rows("train") + rows("test"):
        m = ANSWER.match(row["completion"])
        assert m, row["completion"]
        order, product = m.groups()
        assert (order, product) != ("none", "none")
        assert product == "none" or product in catalogue
        text = message(gen, row)
        if order != "none":
            assert order in text  # the digits as written (#, ORD-, no. aside)
        decoys += any(n != order for n in re.findall(r"\d{6,7}", text))
        if product in held:
            assert product in text  # spelt as in the catalogue, so it can be copied
        kinds.add((order == "none", product == "none", product != "none" and product in text))
    # both fields go missing, and products appear both as catalogued and as informal
    assert kinds >= {(True, False, True), (False, True, False), (False, False, False)}
    assert decoys >= 0.2 * (gen.TRAIN_RECORDS + gen.TEST_RECORDS)


def test_evaluation_detects_generation(gen):
    for split in ("train", "test"):
        records = read_records(f"builtin:support_extract_{split}")
        ds = Dataset(path=split, shape=file_shape(records), records=records)
        assert ds.shape == "prompt_completion"
        assert detect_task(ds) == "generation"


@pytest.mark.default_model
def test_answers_are_short_for_the_default_tokenizer():
    from transformers import AutoTokenizer

    from slimtune.model.loading import default_model_dir

    if not (default_model_dir() / "tokenizer.json").exists():
        pytest.skip("the default model is not cached (slimtune fetch)")
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    lengths = [
        len(tok(r["completion"], add_special_tokens=False)["input_ids"])
        for r in rows("train") + rows("test")
    ]
    assert max(lengths) <= 20 and sum(lengths) / len(lengths) <= 12
