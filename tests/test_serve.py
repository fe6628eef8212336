"""slimtune serve: a real server process on the default model, real HTTP clients.

Two LoRA deltas and a sparse one (built here: seeded random values on the top layers, so
that each answers the probe its own way) in a store; the server picks one per request by
version id, tag or split, LoRA requests of different versions share batches, and a tag
moved under load serves its new version at once."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from slimtune.cli.app import main
from slimtune.delta import DeltaStore
from slimtune.testing import random_delta

pytestmark = pytest.mark.default_model

PROBE = "Name a colour."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = DeltaStore(root / "store")
    versions = []
    for seed, method in ((1, "lora"), (2, "lora"), (3, "sparse")):
        random_delta(root / f"d{seed}", seed, method=method)
        versions.append(store.add(root / f"d{seed}").id)
    store.tag("prod", versions[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "slimtune", "serve", "--model", "default", "--device", "cpu"]
    cmd += ["--store", str(root / "store"), "--port", str(port), "--max-tokens", "8"]
    cmd += ["--split", f"exp:prod=50,{versions[1]}=50", "--log", str(root / "requests.jsonl")]
    log = open(root / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError((root / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url, root / "store", versions[:2]
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _ask(url: str, model: str, *, client=None, **extra) -> tuple[str, str]:
    data = _chat(url, model, client=client, **extra)
    return data["slimtune"]["delta"], data["choices"][0]["message"]["content"]


def _chat(url: str, model: str, *, client=None, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "max_tokens": 8}
    r = (client or httpx).post(f"{url}/v1/chat/completions", json={**body, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert r.headers["x-slimtune-delta"] == data["slimtune"]["delta"]
    return data


def test_models_lists_the_base_versions_and_tags(server):
    url, _, versions = server
    data = httpx.get(f"{url}/v1/models").json()
    ids = [m["id"] for m in data["data"]]
    assert ids[0] == "base" and set(versions) <= set(ids) and "prod" in ids
    prod = next(m for m in data["data"] if m["id"] == "prod")
    assert prod["slimtune"]["serves"] == versions[0]


def test_concurrent_clients_each_get_the_delta_they_asked_for(server):
    """LoRA versions and the base share batches (each row through its own adapter); the
    sparse version, merged into the base, runs in batches of its own between them."""
    url, store, (v1, v2) = server
    v3 = DeltaStore(store).resolve("v3").id  # the sparse one
    reference = {m: _ask(url, m)[1] for m in ("base", v1, v2, v3)}
    assert len(set(reference.values())) == 4, reference  # the probe tells them apart
    asks = ["base", v1, v2, "prod", v3, v1, v2, "base"] * 4  # interleaved, 8 clients
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: (m, *_ask(url, m, client=client)), asks))
    for model, served, text in answers:
        want = v1 if model == "prod" else model
        assert served == want and text == reference[want], (model, served, text)
    metrics = httpx.get(f"{url}/metrics").text
    mixed = [
        ln for ln in metrics.splitlines() if ln.startswith('slimtune_batches_total{kind="mixed"')
    ]
    assert mixed and float(mixed[0].split()[-1]) >= 1, metrics  # rows of versions did mix


def test_a_tag_moved_and_rolled_back_under_load_fails_no_request(server):
    url, store, (v1, v2) = server
    reference = {v: _ask(url, v)[1] for v in (v1, v2)}
    stop = threading.Event()
    seen: list[tuple[float, float, str, str]] = []  # sent, answered, version, text

    def client_loop():
        with httpx.Client() as c:
            while not stop.is_set():
                sent = time.monotonic()
                served, text = _ask(url, "prod", client=c)
                seen.append((sent, time.monotonic(), served, text))

    def answered_after(t: float, n: int = 4) -> None:
        """Waits for n answers to requests sent after t: as long as the host needs."""
        deadline = time.monotonic() + 300
        while sum(sent > t for sent, *_ in seen) < n:
            for r in runs:
                if r.done():
                    r.result()  # a client's failed request raises here
                    raise AssertionError("a client stopped")
            assert time.monotonic() < deadline, "no answers for 300 s"
            time.sleep(0.1)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(client_loop) for _ in range(4)]
        try:
            answered_after(0.0)
            moving = time.monotonic()
            assert main(["delta", "--store", str(store), "tag", v2, "prod"]) == 0
            moved = time.monotonic()
            answered_after(moved)
            rolling = time.monotonic()
            assert main(["delta", "--store", str(store), "rollback", "prod"]) == 0
            back = time.monotonic()
            answered_after(back)
        finally:
            stop.set()
        for r in runs:
            r.result()  # a failed request raises here
    for *_, served, text in seen:
        assert text == reference[served]  # never a mixed-up answer
    # a request resolves its tag when its batch forms, between its sending and its answer:
    # one sent after a move's commit and answered before the next move began is served by
    # the new version, however slow the host (a request resolved just before a move may be
    # answered well after it, so the answer's time alone says nothing)
    before = [s for _, done, s, _ in seen if done < moving]
    assert before and set(before) == {v1}
    between = [s for sent, done, s, _ in seen if moved < sent and done < rolling]
    assert len(between) >= 4 and set(between) == {v2}
    after = [s for sent, _, s, _ in seen if sent > back]
    assert len(after) >= 4 and set(after) == {v1}


def test_streaming_sends_the_same_answer_in_chunks(server):
    url, _, (v1, _) = server
    _, whole = _ask(url, v1)
    body = {
        "model": v1,
        "messages": [{"role": "user", "content": PROBE}],
        "max_tokens": 8,
        "stream": True,
    }
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-slimtune-delta"] == v1
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: ") :])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole and len(events) > 2
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_requests_get_the_api_error_shape(server):
    url, _, _ = server

    def error(r, status):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return err

    chat = f"{url}/v1/chat/completions"
    msgs = [{"role": "user", "content": PROBE}]
    err = error(httpx.post(chat, json={"model": "nope", "messages": msgs}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    raw = httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert error(raw, 400)["code"] == "invalid_json"
    assert error(httpx.post(chat, json={"model": "base"}), 400)["param"] == "messages"
    long = [{"role": "user", "content": "word " * 9000}]
    err = error(httpx.post(chat, json={"model": "base", "messages": long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error(httpx.post(chat, json={"model": "base", "messages": msgs, "temperature": 9}), 400)
    assert err["param"] == "temperature"
    assert error(httpx.get(f"{url}/v1/nothing"), 404)["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # still up
    metrics = httpx.get(f"{url}/metrics").text
    assert 'slimtune_request_errors_total{status="404"}' in metrics
    assert "slimtune_request_latency_seconds_bucket" in metrics


def test_a_split_is_sticky_per_user_and_its_outcomes_reach_ab(server, tmp_path, capsys):
    url, store, (v1, v2) = server
    arms: dict[str, set[str]] = {}
    ids = {}
    with httpx.Client() as client:
        for round_ in range(2):
            for u in range(16):
                data = _chat(url, "exp", client=client, user=f"user{u}")
                info = data["slimtune"]
                assert data["model"] == "exp" and info["split"] == "exp"
                assert info["delta"] == {"prod": v1, v2: v2}[info["arm"]]
                arms.setdefault(f"user{u}", set()).add(info["arm"])
                ids[(u, round_)] = (data["id"], info["delta"])
        assert all(len(a) == 1 for a in arms.values()), arms  # sticky
        assert {next(iter(a)) for a in arms.values()} == {"prod", v2}  # both arms drawn
        for rid, delta in ids.values():  # v2 answers well, v1 not
            r = client.post(f"{url}/v1/outcomes", json={"id": rid, "value": delta == v2})
            assert r.status_code == 200 and r.json()["delta"] == delta
        r = client.post(f"{url}/v1/outcomes", json={"id": "cmpl-nothing", "value": 1})
        assert r.status_code == 404 and r.json()["error"]["param"] == "id"
        rid = ids[(0, 0)][0]
        r = client.post(
            f"{url}/v1/outcomes",
            content=b'{"id": "' + rid.encode() + b'", "value": NaN}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "value"
    out = tmp_path / "ab.json"
    log = store.parent / "requests.jsonl"
    assert main(["ab", "--log", str(log), "--split", "exp", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["A"]["ref"], r["B"]["ref"]) == (v1, v2)
    assert r["A"]["outcomes"] + r["B"]["outcomes"] == 32
    assert r["A"]["mean_outcome"] == 0 and r["B"]["mean_outcome"] == 1
    assert r["A"]["units"] + r["B"]["units"] == 16 and r["B"]["unit"] == "users"  # once each
    assert r["winner"] == "B" and r["significant"] and r["fisher"]["p_value"] < 0.01
    assert "winner: " + v2 in capsys.readouterr().out


def test_stop_strings_end_the_answer_before_them(server):
    url, _, (v1, _) = server
    whole = _ask(url, v1)[1]
    stop = whole[4:7]
    cut = whole[: whole.find(stop)]
    data = _chat(url, v1, stop=[stop, "never appears"])
    assert data["choices"][0]["message"]["content"] == cut
    assert data["choices"][0]["finish_reason"] == "stop"
    body = {"model": v1, "messages": [{"role": "user", "content": PROBE}], "stop": stop}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stop": ["a"] * 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_a_split_set_in_the_store_is_live_and_removed_live(server, capsys):
    url, store, (_, v2) = server
    cli = ["delta", "--store", str(store)]
    assert main([*cli, "split", "canary", f"prod=50,{v2}=50"]) == 0
    assert f"{v2}=50" in capsys.readouterr().out
    served = {_chat(url, "canary", user=f"u{i}")["slimtune"]["arm"] for i in range(12)}
    assert served == {"prod", v2}  # no restart: the next request reads the store
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert listed["canary"]["slimtune"]["split"] == {"prod": 0.5, v2: 0.5}
    assert main([*cli, "rm", v2]) == 2  # a split still sends traffic there
    assert "split canary" in capsys.readouterr().err
    assert main([*cli, "split", "canary", "--rm"]) == 0
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "canary", "messages": [{"role": "user", "content": PROBE}]},
    )
    assert r.status_code == 404
    assert main([*cli, "split", "typo", "prod=1,v99=1"]) != 0  # an arm that does not resolve
    assert "v99" in capsys.readouterr().err
