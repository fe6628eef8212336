"""Serving's parts without a server: the LoRA bank (rows of several deltas in one forward),
A/B splits, the request log and the live-traffic statistics of ``slimtune ab --log``."""

import json
import math

import pytest
import torch

from slimtune.cli.app import main
from slimtune.delta import apply_delta
from slimtune.errors import UserInputError
from slimtune.eval.abtest import ab_from_log, fisher_exact
from slimtune.model.loading import fingerprint, load_model
from slimtune.serve.bank import LoraBank
from slimtune.serve.traffic import RequestLog, Split, parse_splits, read_log
from slimtune.testing import random_delta


def test_bank_runs_each_row_through_its_own_adapter_and_gives_the_base_back(tiny_dir, tmp_path):
    folders = {}
    for seed in (1, 2, 3):
        random_delta(tmp_path / f"d{seed}", seed, str(tiny_dir))
        folders[f"v{seed}"] = tmp_path / f"d{seed}"
    loaded = load_model(str(tiny_dir), device="cpu")
    base = loaded.model.eval()
    fp = fingerprint(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[5, 17, 42, 9, 3, 28]] * 3)
    alone = {}
    with torch.no_grad():
        alone[None] = base(ids[:1]).logits
        for v in ("v1", "v2"):
            applied = apply_delta(base, folders[v], fp)
            alone[v] = applied.model(ids[:1]).logits
            base = applied.remove()
    assert not torch.allclose(alone["v1"], alone["v2"])

    bank = LoraBank(base, fp, capacity=2)
    model, failed = bank.ready({"v1": folders["v1"], "v2": folders["v2"]})
    assert failed == {}
    rows = ["v2", None, "v1"]
    with torch.no_grad():
        out = model(ids, adapter_names=bank.rows(rows)).logits
    for i, v in enumerate(rows):
        torch.testing.assert_close(out[i : i + 1], alone[v], rtol=1e-5, atol=1e-5)

    bank.ready({"v1": folders["v1"]})  # v1 used last: v2 is the one to make room
    bank.ready({"v3": folders["v3"]})
    assert bank.loaded() == ["v1", "v3"]
    base = bank.release()
    assert not bank.active
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    with pytest.raises(ValueError, match="holds 2"):
        bank.ready({v: folders[v] for v in ("v1", "v2", "v3")})


def test_bank_refuses_a_delta_of_another_base(tiny_dir, tmp_path):
    from slimtune.errors import DeltaError
    from slimtune.testing import tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", seed=7)
    random_delta(tmp_path / "d", 1, str(other))
    loaded = load_model(str(tiny_dir), device="cpu")
    bank = LoraBank(loaded.model, fingerprint(loaded.model))
    _, failed = bank.ready({"v1": tmp_path / "d"})
    assert isinstance(failed["v1"], DeltaError) and "different base" in str(failed["v1"])
    assert not bank.active


def test_split_parses_normalises_and_is_sticky_per_user():
    s = Split.parse("prod=90,v5=10")
    assert s.name == "prod" and s.arms == (("prod", 0.9), ("v5", 0.1))
    named = Split.parse("exp:a=1,b=1,c=2")
    assert named.name == "exp" and [w for _, w in named.arms] == [0.25, 0.25, 0.5]
    assert all(named.choose(f"u{i}") == named.choose(f"u{i}") for i in range(50))
    drawn = [named.choose(f"user-{i}") for i in range(4000)]
    assert abs(drawn.count("c") / 4000 - 0.5) < 0.04  # the weights hold over users
    assert abs(drawn.count("a") / 4000 - 0.25) < 0.04
    # another split name draws users independently
    other = Split.parse("exp2:a=1,b=1,c=2")
    assert [other.choose(f"user-{i}") for i in range(200)] != drawn[:200]


@pytest.mark.parametrize(
    "text, message",
    [
        ("prod", "not ARM=WEIGHT"),
        ("prod=90", "at least two arms"),
        ("prod=90,v5", "not ARM=WEIGHT"),
        ("prod=90,v5=x", "must be > 0"),
        ("prod=90,v5=0", "must be > 0"),
        ("prod=1,prod=2", "named twice"),
        ("bad name:a=1,b=1", "not a valid split name"),
    ],
)
def test_split_errors_name_the_problem(text, message):
    with pytest.raises(UserInputError, match=message):
        Split.parse(text)


def test_two_splits_with_one_name_are_refused():
    with pytest.raises(UserInputError, match="two splits"):
        parse_splits(["prod=1,v2=1", "prod:v3=1,v4=1"])


def test_fisher_exact_matches_known_tables():
    # R's fisher.test(matrix(c(1,3,3,1),2)) and (c(8,2,2,8))
    assert math.isclose(fisher_exact(1, 4, 3, 4), 0.4857142857, rel_tol=1e-8)
    assert math.isclose(fisher_exact(8, 10, 2, 10), 0.02301413757, rel_tol=1e-8)
    assert math.isclose(fisher_exact(3, 7, 3, 7), 1.0, rel_tol=1e-9)


def _write_log(path, sides, prefix="cmpl-"):
    log = RequestLog(path)
    n = 0
    for delta, outcomes in sides.items():
        for value in outcomes:
            rid = f"{prefix}{n}"
            n += 1
            log.request(
                {"id": rid, "model": "exp", "split": "exp", "arm": delta, "delta": delta,
                 "status": "ok", "latency_s": 0.1}
            )  # fmt: skip
            if value is not None:
                log.outcome(rid, value)
    log.close()


def test_ab_reads_the_log_and_tolerates_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    _write_log(path, {"v1": [1, 0] * 20, "v2": [1] * 36 + [0] * 4 + [None] * 3})
    with open(path, "a") as f:
        f.write('{"type": "outcome", "id": "cmpl-1", "va')  # killed mid-write
    requests, warnings = read_log(path)
    assert len(requests) == 83 and len(warnings) == 1 and "incomplete line" in warnings[0]
    r = ab_from_log(requests)
    assert (r["A"]["ref"], r["B"]["ref"]) == ("v1", "v2")
    assert (r["A"]["outcomes"], r["B"]["outcomes"], r["B"]["requests"]) == (40, 40, 43)
    assert math.isclose(r["bootstrap"]["mean_diff"], 0.9 - 0.5)
    assert r["bootstrap"]["ci_low"] > 0 and r["winner"] == "B" and r["significant"]
    assert math.isclose(r["fisher"]["p_value"], fisher_exact(20, 40, 36, 40))
    out = tmp_path / "r.json"
    assert main(["ab", "--log", str(path), "v2", "v1", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["winner"] == "A"  # v2 named first this time


def test_ab_log_errors_exit_2_with_the_reason(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    _write_log(path, {"v1": [1, 0], "v2": [None]})
    assert main(["ab", "--log", str(path)]) == 2
    assert "fewer than two versions" in capsys.readouterr().err
    assert main(["ab", "--log", str(path), "v1", "v2"]) == 2
    assert "none has an outcome" in capsys.readouterr().err
    assert main(["ab", "v1", "v2"]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "request"}\n{"type": "outcome", "id": "x", "value": 1}\n')
    assert main(["ab", "--log", str(bad)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err


def test_logs_that_cannot_be_read_or_written_are_named(tmp_path, capsys, monkeypatch):
    import slimtune.model.loading

    assert main(["ab", "--log", str(tmp_path), "v1", "v2"]) == 2  # a folder
    assert f"{tmp_path}: cannot read the log" in capsys.readouterr().err

    def no_model(*a, **kw):
        raise AssertionError("the model loaded before --log was checked")

    monkeypatch.setattr(slimtune.model.loading, "load_model", no_model)
    argv = ["serve", "--store", str(tmp_path / "store"), "--log", str(tmp_path)]
    assert main(argv) == 2
    assert f"--log {tmp_path}: cannot append to it" in capsys.readouterr().err


def _lora_store(tiny_dir, tmp_path, n=2):
    from slimtune.delta import DeltaStore

    store = DeltaStore(tmp_path / "store")
    for seed in range(1, n + 1):
        random_delta(tmp_path / f"d{seed}", seed, str(tiny_dir))
        store.add(tmp_path / f"d{seed}")
    return store


def test_a_version_that_fails_to_load_fails_only_its_own_requests(tiny_dir, tmp_path):
    import asyncio

    from peft.tuners.tuners_utils import BaseTunerLayer

    from slimtune.delta import DeltaSwitcher
    from slimtune.serve.engine import Engine, Job

    store = _lora_store(tiny_dir, tmp_path)
    weights = store.resolve("v1").path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # one flipped tail
    engine = Engine(DeltaSwitcher(load_model(str(tiny_dir), device="cpu"), store)).start()

    async def ask(model):
        events = engine.submit(Job(model=model, prompt_ids=[5, 17, 42], max_tokens=3))
        while True:
            kind, value = await events.get()
            if kind in ("done", "error"):
                return kind, value

    async def main():
        return await asyncio.gather(*[ask(m) for m in ("v1", "v2", "base", "v1", "v2")])

    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    kinds = [k for k, _ in results]
    assert kinds == ["error", "done", "done", "error", "done"], results
    assert "adapter_model.safetensors" in results[0][1][1]  # the file is named
    assert {v.delta for k, v in results if k == "done"} == {"v2", "base"}
    assert engine.bank.loaded() == ["v2"]
    base = engine.bank.release()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())


def test_a_store_error_fails_only_the_request_whose_lookup_hit_it(tiny_dir, tmp_path):
    """An error other than "no such version" while a batch forms (an unreadable file in a
    shared store) fails the job that named that version, not the one first in line."""
    import asyncio

    from slimtune.delta import DeltaSwitcher
    from slimtune.serve.engine import Engine, Job

    store = _lora_store(tiny_dir, tmp_path)
    resolve = store.resolve

    def unreadable_v2(ref, **kw):
        if ref == "v2":
            raise PermissionError(13, "Permission denied", "objects/v2/manifest.json")
        return resolve(ref, **kw)

    store.resolve = unreadable_v2
    engine = Engine(DeltaSwitcher(load_model(str(tiny_dir), device="cpu"), store))

    async def main():
        queues = [
            engine.submit(Job(model=m, prompt_ids=[5, 17, 42], max_tokens=2))
            for m in ("base", "v2", "base", "v1")
        ]
        engine.start()  # all four wait in line when the first batch forms

        async def outcome(events):
            while True:
                kind, value = await events.get()
                if kind in ("done", "error"):
                    return kind, value

        return await asyncio.gather(*[outcome(q) for q in queues])

    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    assert [k for k, _ in results] == ["done", "error", "done", "done"], results
    assert results[1][1][0] == 500 and "Permission denied" in results[1][1][1]
    assert [v.delta for k, v in results if k == "done"] == ["base", "base", "v1"]


def test_a_chat_template_that_refuses_the_turns_is_a_400(tiny_dir, tmp_path):
    from fastapi.testclient import TestClient

    from slimtune.delta import DeltaSwitcher
    from slimtune.serve.app import create_app
    from slimtune.serve.engine import Engine

    engine = Engine(DeltaSwitcher(load_model(str(tiny_dir), device="cpu"), None)).start()
    # as Gemma 3's template does for two user turns in a row
    engine.tokenizer.chat_template = (
        "{% if messages | length > 1 %}{{ raise_exception('Conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    user = {"role": "user", "content": "hello"}
    try:
        with TestClient(create_app(engine)) as client:
            bad = client.post(
                "/v1/chat/completions",
                json={"model": "base", "messages": [user, user], "max_tokens": 2},
            )
            good = client.post(
                "/v1/chat/completions", json={"model": "base", "messages": [user], "max_tokens": 2}
            )
    finally:
        engine.stop()
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["param"] == "messages" and "roles must alternate" in err["message"]
    assert good.status_code == 200, good.text


def test_a_failed_first_load_leaves_no_adapter_layers_on_the_base(tiny_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from slimtune.errors import DeltaError

    random_delta(tmp_path / "d", 1, str(tiny_dir))
    loaded = load_model(str(tiny_dir), device="cpu")
    bank = LoraBank(loaded.model, fingerprint(loaded.model))

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PeftModel, "load_adapter", fail)  # after peft injected the layers
    model, failed = bank.ready({"v1": tmp_path / "d"})
    assert isinstance(failed["v1"], DeltaError) and "out of memory" in str(failed["v1"])
    assert not bank.active and model is bank.base
    assert not any(isinstance(m, BaseTunerLayer) for m in bank.base.modules())


def test_only_plain_lora_adapters_share_the_base(tmp_path):
    from slimtune.serve.bank import can_hold

    for name, config, holds in [
        ("plain", {"peft_type": "LORA", "bias": "none"}, True),
        ("bias", {"peft_type": "LORA", "bias": "all"}, False),
        ("dora", {"peft_type": "LORA", "use_dora": True}, False),
        ("shira", {"peft_type": "SHIRA"}, False),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        assert can_hold(tmp_path / name) is holds, name


def test_a_log_cut_by_a_crash_stays_readable_after_a_restart(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_log(path, {"v1": [1, 0]})
    with open(path, "a") as f:
        f.write('{"type": "outcome", "id": "cmpl-0", "va')  # killed mid-write
    _write_log(path, {"v2": [1, 1]}, prefix="again-")  # the server again, appending
    requests, warnings = read_log(path)
    assert [w.split(": ", 1)[1] for w in warnings] == ["skipped an incomplete line"]
    assert sorted(r.delta for r in requests) == ["v1", "v1", "v2", "v2"]
    with open(path, "a") as f:
        f.write('{"type": "outcome", "id": "cmpl-0", "value": NaN}\n')
    with pytest.raises(UserInputError, match=r"log.jsonl:\d+: .*not a finite number"):
        read_log(path)


def test_ab_log_counts_each_user_once_and_puts_the_base_first(tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    n = 0
    for delta, users in {"v3": ["ann"] * 5 + ["bob"] * 5, "base": ["cy", "dee", "eve"]}.items():
        for user in users:
            log.request({"id": f"c{n}", "model": "exp", "split": "exp", "arm": delta,
                         "delta": delta, "user": user, "status": "ok", "latency_s": 0.1})  # fmt: skip
            log.outcome(f"c{n}", 1.0 if user == "ann" else 0.0)
            n += 1
    log.close()
    requests, _ = read_log(tmp_path / "log.jsonl")
    r = ab_from_log(requests, split="exp")
    assert (r["A"]["ref"], r["B"]["ref"]) == ("base", "v3")
    assert (r["B"]["outcomes"], r["B"]["units"], r["B"]["unit"]) == (10, 2, "users")
    assert (r["A"]["units"], r["A"]["unit"]) == (3, "requests")
    assert not r["significant"]  # 2 users, not 10 requests: no evidence either way
    with pytest.raises(ValueError, match="share 10 requests"):
        ab_from_log(requests, "v3", "v3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--split", "prod=90"], "at least two arms"),
        (["serve", "--split", "a=1,b=1", "--split", "a:c=1,d=1"], "two splits"),
        (["serve", "--adapters", "-1"], "--adapters must be >= 0"),
        (["serve", "--max-batch", "0"], "--max-batch"),
        (["dashboard", "--runs", "/nonexistent/runs"], "no such folder"),
    ],
)
def test_server_options_are_checked_before_anything_loads(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
