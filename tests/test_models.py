"""Model loading: hub ids without a network, and the cache of a user's own GGUF file."""

import socket
import time

import pytest

from slimtune import models
from slimtune.cli import main
from slimtune.errors import ModelLoadError

PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def no_network_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", *PROXIES):
        monkeypatch.delenv(var, raising=False)


def test_hub_id_with_hf_hub_offline_fails_fast_and_says_what_was_tried(
        no_network_env, monkeypatch, intent_file, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_connect(*_a, **_k):
        raise AssertionError("must not try the network when HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    t0 = time.perf_counter()
    rc = main(["eval", "--model", "nobody/no-such-model", "--data", str(intent_file),
               "--device", "cpu"])
    assert time.perf_counter() - t0 < 20  # the hub client's retries took 63 s
    err = capsys.readouterr().err
    assert rc == ModelLoadError.exit_code == 4
    assert "nobody/no-such-model" in err and "not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE is set" in err


def test_unreachable_hub_host_tries_only_the_cache(no_network_env, monkeypatch):
    calls = []

    def refused(address, timeout=None):
        calls.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"huggingface\.co:443 cannot be reached"):
        models.load_model("nobody/no-such-model")
    assert time.perf_counter() - t0 < 20
    assert calls == [(("huggingface.co", 443), models.HUB_CONNECT_TIMEOUT_S)]


def test_reachable_hub_says_it_is_fetching_before_it_waits(no_network_env, monkeypatch, capfd):
    import transformers

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *_a, **_k: Connection())
    seen = {}

    def from_pretrained(spec, **kwargs):
        seen.update(kwargs)
        raise OSError("stand-in for a hub error")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError, match="loading it from the hub failed"):
        models.load_model("nobody/no-such-model")
    assert "fetching nobody/no-such-model from the Hugging Face hub" in capfd.readouterr().err
    assert seen["local_files_only"] is False
