"""The versioned delta store, exact apply/remove for every method, and hot swap."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from slimtune.delta import DeltaStore, DeltaSwitcher, apply_delta
from slimtune.delta.store import _MIGRATIONS, SCHEMA_VERSION, diff
from slimtune.errors import DeltaError, UserInputError
from slimtune.model.loading import fingerprint, load_model

from .conftest import intent_rows, train_tiny, write_jsonl

METHODS = {
    "lora": {"r": 4},
    "full": {},
    "sparse": {"density": 0.05},
    "rosa": {"density": 0.05},
    "shira": {"density": 0.05},
}


@pytest.fixture(scope="module")
def deltas(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store-deltas")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return {
        m: train_tiny(
            tiny_dir, data, tmp / m, method=m, max_steps=3, freeze_below=1, method_options=o
        ).delta_dir
        for m, o in METHODS.items()
    }


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, tok):
    ids = torch.tensor([tok("Message: parcel tracking late\nIntent:")["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("merge", [False, True])
def test_apply_then_remove_restores_the_base_bit_for_bit(deltas, tiny_dir, method, merge):
    base = load_model(str(tiny_dir))
    before = _snapshot(base.model)
    logits_before = _logits(base.model, base.tokenizer)
    applied = apply_delta(base.model, deltas[method], fingerprint(base.model), merge=merge)
    assert not torch.allclose(_logits(applied.model, base.tokenizer), logits_before)
    restored = applied.remove()
    after = _snapshot(restored)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before), method
    assert fingerprint(restored) == fingerprint(load_model(str(tiny_dir)).model)


def test_a_second_delta_on_a_model_that_carries_one_is_refused(deltas, tiny_dir):
    """Stacked deltas do not come off exactly (sparse's undo took the later one off, experts
    lost their router): apply_delta takes one delta at a time, for every method."""
    base = load_model(str(tiny_dir))
    before = _snapshot(base.model)
    fp = fingerprint(base.model)
    for first in ("sparse", "lora"):
        applied = apply_delta(base.model, deltas[first], fp)
        with pytest.raises(DeltaError, match=r"already carries the delta .*do not stack"):
            apply_delta(applied.model, deltas["sparse"], fp)
        with pytest.raises(DeltaError, match="already carries"):
            apply_delta(base.model, deltas["full"], fp, merge=True)
        restored = applied.remove()
        assert all(torch.equal(before[n], p) for n, p in restored.named_parameters())
    again = apply_delta(base.model, deltas["sparse"], fp)  # taken off: a delta goes on again
    assert all(torch.equal(before[n], p) for n, p in again.remove().named_parameters())


def test_versions_tags_rollback_and_dependencies(deltas, tmp_path):
    store = DeltaStore(tmp_path / "store")
    v1 = store.add(deltas["lora"], note="first")
    v2 = store.add(deltas["sparse"], parent=v1.id)
    assert [v.id for v in store.list()] == ["v1", "v2"] and v2.parent == "v1"
    assert store.tag("prod", "v1") == (None, "v1")
    assert store.tag("prod", "v2") == ("v1", "v2")
    assert store.resolve("prod").id == "v2" and store.resolve("latest").id == "v2"
    assert store.rollback("prod") == ("v2", "v1")
    with pytest.raises(UserInputError, match="no earlier version"):
        store.rollback("prod")
    with pytest.raises(UserInputError, match="still used by tag prod, version v2"):
        store.remove("v1")
    with pytest.raises(UserInputError, match="invalid tag name"):
        store.tag("../evil", "v1")
    assert store.remove("v2") == "v2"  # no tag and no child: allowed
    assert store.remove("v1", force=True) == "v1"
    assert store.list() == [] and store.tags() == {}
    with pytest.raises(DeltaError, match="no version or tag 'prod'"):
        store.resolve("prod")


def test_a_rollback_to_a_damaged_version_is_refused_and_the_tag_stays(deltas, tmp_path):
    """Serving resolves a tag with the folder check: a rollback onto a version whose
    folder is gone or whose manifest changed would fail every request for that tag."""
    import shutil

    store = DeltaStore(tmp_path / "store")
    v1, v2 = store.add(deltas["lora"]), store.add(deltas["sparse"])
    store.tag("prod", v1.id)
    store.tag("prod", v2.id)
    manifest = v1.path / "manifest.json"
    kept = manifest.read_bytes()
    manifest.write_bytes(kept.replace(b'"lora"', b'"LoRA"', 1))
    with pytest.raises(DeltaError, match="changed since v1 was added"):
        store.rollback("prod")
    assert store.resolve("prod").id == "v2"
    shutil.rmtree(v1.path)
    with pytest.raises(DeltaError, match=r"its folder .* is missing"):
        store.rollback("prod")
    assert store.resolve("prod").id == "v2"
    shutil.copytree(deltas["lora"], v1.path)  # restored: the rollback goes through
    assert manifest.read_bytes() == kept
    assert store.rollback("prod") == ("v2", "v1")
    assert store.resolve("prod").id == "v1"


def test_verify_names_a_flipped_byte_and_diff_compares(deltas, tmp_path):
    store = DeltaStore(tmp_path / "store")
    a = store.add(deltas["lora"])
    b = store.add(deltas["rosa"])
    d = diff(a, b)
    assert d["fields"]["method"] == ("lora", "rosa") and d["same_base"]
    assert store.verify() == [("v1", None), ("v2", None)]
    target = a.path / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x40
    target.write_bytes(bytes(data))
    problems = dict(store.verify())
    assert "adapter_model.safetensors: checksum mismatch" in problems["v1"]
    assert problems["v2"] is None


def test_paths_in_a_manifest_cannot_escape(deltas, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(deltas["lora"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["../../outside"] = {"sha256": "0", "bytes": 1}
    (bad / "manifest.json").write_text(json.dumps(m))
    store = DeltaStore(tmp_path / "store")
    with pytest.raises(DeltaError, match="escapes the delta folder"):
        store.add(bad)
    assert store.list() == [] and list((tmp_path / "store" / "objects").iterdir()) == []


def test_names_and_files_the_os_refuses_are_named_not_tracebacks(deltas, tmp_path, monkeypatch):
    import shutil

    from slimtune.delta import format as delta_format

    bad = tmp_path / "bad"
    shutil.copytree(deltas["lora"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["x" * 300] = {"sha256": "0", "bytes": 1}  # longer than a file name can be
    (bad / "manifest.json").write_text(json.dumps(m))
    store = DeltaStore(tmp_path / "store")
    with pytest.raises(DeltaError, match=r"unreadable .*File name too long"):
        store.add(bad)
    # verify reports an unreadable file as that version's problem and checks the others
    v1, v2 = store.add(deltas["lora"]), store.add(deltas["sparse"])
    sha256 = delta_format.sha256_file

    def denied(path):
        if "v1" in str(path) and str(path).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return sha256(path)

    monkeypatch.setattr(delta_format, "sha256_file", denied)
    problems = dict(store.verify())
    assert "Permission denied" in problems[v1.id] and problems[v2.id] is None
    from slimtune.delta import store as store_module

    def denied_manifest(path):
        if "v1" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return sha256(path)

    monkeypatch.setattr(store_module, "sha256_file", denied_manifest)
    problems = dict(store.verify())  # the manifest's own checksum, read by the store
    assert "manifest.json: unreadable (Permission denied)" in problems[v1.id]
    assert problems[v2.id] is None
    # a store whose objects/ is a file is named as such
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "objects").write_text("")
    with pytest.raises(UserInputError, match="objects is a file, not the store's objects/"):
        DeltaStore(tmp_path / "odd")


ADD_MANY = textwrap.dedent("""
    import sys
    from slimtune.delta import DeltaStore
    store = DeltaStore(sys.argv[1])
    for _ in range(int(sys.argv[3])):
        print(store.add(sys.argv[2]).id, flush=True)
""")


def test_two_processes_saving_at_once_both_land(deltas, tmp_path):
    script = tmp_path / "add.py"
    script.write_text(ADD_MANY)
    root = tmp_path / "store"
    DeltaStore(root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), str(deltas["sparse"]), "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        ids += out.split()
    assert len(ids) == 10 and len(set(ids)) == 10
    store = DeltaStore(root)
    assert sorted(v.id for v in store.list()) == sorted(ids)
    assert all(problem is None for _, problem in store.verify())


KILL_DURING_ADD = textwrap.dedent("""
    import os, signal, sys
    import slimtune.delta.store as S
    real = S.os.rename
    def rename(src, dst):
        real(src, dst)
        if str(dst).endswith("objects/v2"):  # moved into place, not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
    S.os.rename = rename
    S.DeltaStore(sys.argv[1]).add(sys.argv[2])
""")


def test_a_kill_in_the_middle_of_a_save_leaves_no_half_visible_version(deltas, tmp_path):
    root = tmp_path / "store"
    store = DeltaStore(root)
    store.add(deltas["lora"])
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_ADD)
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(deltas["sparse"])],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL
    store = DeltaStore(root)
    assert [v.id for v in store.list()] == ["v1"]
    assert (root / "objects" / "v2").exists()  # the orphan: invisible, verify names it
    ((orphan, problem),) = store.verify()[1:]
    assert orphan == "objects/v2" and "the index does not know" in problem
    assert store.gc().quarantined == [(root / "objects" / "v2", root / "quarantine" / "v2")]
    assert store.add(deltas["sparse"]).id == "v3"  # v2's number stays used
    assert store.verify() == [("v1", None), ("v3", None)]


def test_the_index_upgrades_its_own_schema(deltas, tmp_path):
    root = tmp_path / "store"
    (root / "objects").mkdir(parents=True)
    conn = sqlite3.connect(root / "index.sqlite")
    for stmt in filter(str.strip, _MIGRATIONS[0].split(";")):
        conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO tags VALUES ('prod', 'v9', '2026-01-01')")
    conn.commit()
    conn.close()
    store = DeltaStore(root)
    assert store.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(root / "index.sqlite")
    assert conn.execute("SELECT name, version FROM tag_history").fetchall() == [("prod", "v9")]
    conn.close()
    conn = sqlite3.connect(root / "index.sqlite")
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(DeltaError, match="schema version 99 is newer"):
        DeltaStore(root)


def test_hot_swap_switches_deltas_on_one_base(deltas, tiny_dir, tmp_path):
    store = DeltaStore(tmp_path / "store")
    store.add(deltas["lora"])
    store.add(deltas["sparse"])
    store.tag("prod", "v2")
    loaded = load_model(str(tiny_dir))
    before = _snapshot(loaded.model)
    sw = DeltaSwitcher(loaded, store)
    base_logits = _logits(sw.model, loaded.tokenizer)
    outs = {}
    for ref in ("v1", "prod", "v1", None):
        sw.switch(ref)
        outs[str(ref)] = _logits(sw.model, loaded.tokenizer)
        label, _text = sw.generate(["hello"], max_new_tokens=2)[0]
        assert label == {"v1": "v1", "prod": "prod (v2)", "None": "base"}[str(ref)]
    assert not torch.allclose(outs["v1"], outs["prod"])
    torch.testing.assert_close(outs["None"], base_logits, rtol=0, atol=0)
    after = _snapshot(sw.base)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_splits_are_stored_listed_and_guard_their_versions(deltas, tmp_path):
    store = DeltaStore(tmp_path / "s")
    store.add(deltas["lora"])
    store.add(deltas["sparse"])
    store.tag("prod", "v1")
    assert store.set_split("exp", "prod=3,v2=1") == (None, "prod=75,v2=25")
    assert store.set_split("exp", "prod=1,v2=1") == ("prod=75,v2=25", "prod=50,v2=50")
    assert DeltaStore(tmp_path / "s").splits() == {"exp": "prod=50,v2=50"}
    with pytest.raises(DeltaError, match="v7"):
        store.set_split("bad", "prod=1,v7=1")
    with pytest.raises(UserInputError, match="split exp"):
        store.remove("v2")
    store.tag("cand", "v2")
    store.set_split("canary", "prod=9,cand=1")  # an arm that is a tag on v2
    store.remove("v2", force=True)  # as with tags: the splits go with it
    assert store.splits() == {}
    with pytest.raises(UserInputError, match="no split"):
        store.remove_split("exp")
