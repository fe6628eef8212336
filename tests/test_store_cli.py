"""The store through the command line: train -> versions -> tags -> ab -> export / import / apply."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.delta import DeltaStore


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")


def test_store_workflow_from_the_command_line(tiny_dir, intent_file, tmp_path, store_dir, capsys):
    common = ["--model", str(tiny_dir), "--data", str(intent_file), "--batch-size", "4",
              "--no-progress", "--store", store_dir, "--eval-fraction", "0.25"]
    code, out, _ = run(capsys, "train", *common, "--max-steps", "2", "--output-dir",
                       str(tmp_path / "a"))
    assert code == 0 and "stored as v1" in out
    code, out, _ = run(capsys, "train", *common, "--max-steps", "6", "--lr", "0.01",
                       "--output-dir", str(tmp_path / "b"), "--parent", "v1", "--note", "longer")
    assert code == 0 and "stored as v2" in out
    assert run(capsys, "delta", "--store", store_dir, "tag", "v1", "prod")[1].strip() == \
        "prod: (new) -> v1"
    assert run(capsys, "delta", "--store", store_dir, "tag", "v2", "prod")[1].strip() == \
        "prod: v1 -> v2"
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
    code, out, _ = run(capsys, "ab", "--store", store_dir, "v1", "v2", "--model", str(tiny_dir),
                       "--data", str(intent_file), "--output", str(result))
    assert code == 0 and "winner:" in out and "McNemar" in out
    r = json.loads(result.read_text())
    assert r["task"] == "classification" and r["examples"] == 48
    assert r["winner"] in ("A", "B", "tie")
    assert r["A"]["ref"] == "v1" and r["B"]["ref"] == "v2"

    code, out, _ = run(capsys, "generate", "--store", store_dir, "--model", str(tiny_dir),
                       "--delta", "prod", "--max-new-tokens", "2", "hi")
    assert code == 0 and out.startswith("[prod (v1)] ")


def test_export_import_and_apply(tiny_dir, intent_file, tmp_path, store_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.delta import DeltaSwitcher
    from slimtune.models import load_model

    assert run(capsys, "train", "--model", str(tiny_dir), "--data", str(intent_file),
               "--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--no-progress",
               "--store", store_dir, "--output-dir", str(tmp_path / "r"))[0] == 0
    exported = tmp_path / "peft"
    assert run(capsys, "delta", "--store", store_dir, "export", "v1", str(exported))[0] == 0
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    store = DeltaStore(store_dir)
    loaded = load_model(str(tiny_dir))
    sw = DeltaSwitcher(loaded, store)
    with torch.no_grad():
        ours = sw.switch("v1").eval()(input_ids=ids).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                          str(exported)).eval()(input_ids=ids).logits
    torch.testing.assert_close(plain, ours)

    code, out, _ = run(capsys, "delta", "--store", store_dir, "import", str(exported),
                       "--model", str(tiny_dir))
    assert code == 0 and out.strip() == "v2"
    with torch.no_grad():
        imported = sw.switch("v2").eval()(input_ids=ids).logits
    torch.testing.assert_close(imported, ours)

    merged = tmp_path / "merged"
    assert run(capsys, "delta", "--store", store_dir, "apply", "v1", "--model", str(tiny_dir),
               "--out", str(merged))[0] == 0
    with torch.no_grad():
        standalone = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(standalone, ours, rtol=1e-4, atol=1e-4)
    assert json.loads((merged / "slimtune_delta.json").read_text())["version"] == "v1"

    code, _, err = run(capsys, "delta", "--store", store_dir, "import", str(tmp_path / "nothing"),
                       "--model", str(tiny_dir))
    assert code == 5 and "not a peft adapter folder" in err
    assert run(capsys, "delta", "--store", store_dir, "verify")[0] == 0


def test_ab_with_an_unknown_version_is_a_clear_error(tiny_dir, intent_file, store_dir, capsys):
    code, _, err = run(capsys, "ab", "--store", store_dir, "v1", "v7", "--model", str(tiny_dir),
                       "--data", str(intent_file))
    assert code == 5 and err.strip().splitlines()[-1].startswith(
        "slimtune: error: no version or tag 'v1' in the store")
