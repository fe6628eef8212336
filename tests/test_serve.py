"""slimtune serve: a real server process on the default model, real HTTP clients.

Two LoRA deltas (built here: seeded random adapters on the top layers, so that each
answers the probe its own way) in a store; the server picks one per request by version
id or tag, and a tag moved under load serves its new version at once."""

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
from slimtune.testing import random_lora_delta

pytestmark = pytest.mark.default_model

PROBE = "Name a colour."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = DeltaStore(root / "store")
    versions = []
    for seed in (1, 2):
        random_lora_delta(root / f"d{seed}", seed)
        versions.append(store.add(root / f"d{seed}").id)
    store.tag("prod", versions[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "slimtune", "serve", "--model", "default", "--device", "cpu"]
    cmd += ["--store", str(root / "store"), "--port", str(port), "--max-tokens", "8"]
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
    yield url, root / "store", versions
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _ask(url: str, model: str, *, client=None) -> tuple[str, str]:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "max_tokens": 8}
    r = (client or httpx).post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert r.headers["x-slimtune-delta"] == data["slimtune"]["delta"]
    return data["slimtune"]["delta"], data["choices"][0]["message"]["content"]


def test_models_lists_the_base_versions_and_tags(server):
    url, _, versions = server
    data = httpx.get(f"{url}/v1/models").json()
    ids = [m["id"] for m in data["data"]]
    assert ids[0] == "base" and set(versions) <= set(ids) and "prod" in ids
    prod = next(m for m in data["data"] if m["id"] == "prod")
    assert prod["slimtune"]["serves"] == versions[0]


def test_concurrent_clients_each_get_the_delta_they_asked_for(server):
    url, _, (v1, v2) = server
    reference = {m: _ask(url, m)[1] for m in ("base", v1, v2)}
    assert len(set(reference.values())) == 3, reference  # the probe tells them apart
    asks = ["base", v1, v2, "prod"] * 6  # interleaved, 8 clients at a time
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: (m, *_ask(url, m, client=client)), asks))
    for model, served, text in answers:
        want = v1 if model == "prod" else model
        assert served == want and text == reference[want], (model, served, text)


def test_a_tag_moved_and_rolled_back_under_load_fails_no_request(server):
    url, store, (v1, v2) = server
    reference = {v: _ask(url, v)[1] for v in (v1, v2)}
    stop = threading.Event()
    seen: list[tuple[float, str, str]] = []

    def client_loop():
        with httpx.Client() as c:
            while not stop.is_set():
                served, text = _ask(url, "prod", client=c)
                seen.append((time.time(), served, text))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(client_loop) for _ in range(4)]
        try:
            time.sleep(2)
            assert main(["delta", "--store", str(store), "tag", v2, "prod"]) == 0
            moved = time.time()
            time.sleep(4)
            assert main(["delta", "--store", str(store), "rollback", "prod"]) == 0
            back = time.time()
            time.sleep(4)
        finally:
            stop.set()
        for r in runs:
            r.result()  # a failed request raises here
    for _, served, text in seen:
        assert text == reference[served]  # never a mixed-up answer
    # within a second of each move (plus one request in flight), only the new version
    late = [s for t, s, _ in seen if moved + 1.5 < t < back]
    assert late and set(late) == {v2}
    after = [s for t, s, _ in seen if t > back + 1.5]
    assert after and set(after) == {v1}


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
