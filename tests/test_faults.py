"""Fault injection on the delta store: each case replays a fault from issue 12 and checks
that no version is lost and that the user gets a one-line error with the README's exit code.

Read-only stores and full disks are real where the machine allows it: as root with a working
``mount``, a small tmpfs (remounted read-only for the read-only cases). Elsewhere the same
tests simulate them: write permission denied through ``os.access`` (SQLite then opens the
index ``mode=ro``), and ENOSPC raised by the copy into the store.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune.cli.app import main
from slimtune.delta import DeltaStore, DeltaSwitcher, verify_delta
from slimtune.delta.store import _MIGRATIONS
from slimtune.errors import DeltaError, UserInputError
from slimtune.fileio import sha256_file
from slimtune.model.loading import load_model

from .conftest import intent_rows, train_tiny, write_jsonl


@pytest.fixture(scope="module")
def deltas(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fault-deltas")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    opts = {"lora": {"r": 4}, "sparse": {"density": 0.05}, "full": {}}
    return {
        m: train_tiny(
            tiny_dir, data, tmp / m, method=m, max_steps=2, freeze_below=2, method_options=o
        ).delta_dir
        for m, o in opts.items()
    }


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def delta_cli(capsys, root, *argv) -> tuple[int, str, str]:
    return run(capsys, "delta", "--store", root, *argv)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimtune: error: "), err
    return lines[0]


def store_with(deltas, root, *methods) -> DeltaStore:
    store = DeltaStore(root)
    for m in methods:
        store.add(deltas[m])
    return store


def fingerprints(root: Path) -> dict[str, str]:
    """Every file under objects/ and quarantine/ with its checksum: what must never be lost."""
    return {
        str(p.relative_to(root)).split("/", 1)[1]: sha256_file(p)
        for d in ("objects", "quarantine")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


# -- mounts ------------------------------------------------------------------------------


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, or None where this machine cannot mount one."""
    where = tmp_path / "fs"
    where.mkdir()
    ok = _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where))
    yield where if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path) -> None:
    with open(fs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture
def make_readonly(small_fs, monkeypatch):
    """(root to build the store in, a function that makes it read-only)."""
    if small_fs is not None:
        return small_fs / "store", lambda: _mount("-o", "remount,ro", str(small_fs))
    root = Path(os.environ["SLIMTUNE_STORE"]).parent / f"ro-{os.getpid()}-{id(monkeypatch)}"
    real = os.access

    def deny_writes():
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: (
                False if mode & os.W_OK and str(p).startswith(str(root)) else real(p, mode, **kw)
            ),
        )
        return True

    return root, deny_writes


# -- item 13: an empty, missing or corrupt index is not an empty store ---------------------


def _empty(index: Path) -> None:
    index.write_bytes(b"")


def _missing(index: Path) -> None:
    index.unlink()


def _corrupt(index: Path) -> None:
    index.write_bytes(b"not a database " * 64)


@pytest.mark.parametrize("damage", [_empty, _missing, _corrupt])
def test_a_lost_index_never_costs_a_version(deltas, tmp_path, capsys, damage):
    root = tmp_path / "store"
    store_with(deltas, root, "lora", "sparse").tag("prod", "v2")
    before = fingerprints(root)
    damage(root / "index.sqlite")
    for action in ("verify", "gc", "list"):
        code, _, err = delta_cli(capsys, root, action)
        assert code == 5, (action, err)
        assert "index.sqlite" in one_line_error(err) and "reindex" in err
    with pytest.raises(DeltaError, match="reindex"):
        DeltaStore(root)
    assert fingerprints(root) == before  # nothing deleted, nothing moved

    code, out, _ = delta_cli(capsys, root, "reindex")
    assert code == 0 and "v1, v2" in out and "set tags again" in out
    store = DeltaStore(root)
    assert [(v.id, v.method) for v in store.list()] == [("v1", "lora"), ("v2", "sparse")]
    assert store.verify() == [("v1", None), ("v2", None)]
    assert store.add(deltas["full"]).id == "v3"
    if damage is _corrupt:  # kept, in case it can be repaired by hand
        assert len(list(root.glob("index.sqlite.broken-*"))) == 1


def test_reindex_never_moves_aside_an_index_that_is_only_in_use(deltas, tmp_path, monkeypatch):
    """A writer holding the index (another reindex hashing large folders, say) makes it busy,
    not broken: reindex must not swap in a new index and drop the tags."""
    root = tmp_path / "store"
    store_with(deltas, root, "lora").tag("prod", "v1")
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real(*a, **{**kw, "timeout": 0.1}))
    writer = real(root / "index.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DeltaError, match="locked"):
            DeltaStore.reindex(root)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert not list(root.glob("index.sqlite.broken-*"))
    assert DeltaStore(root).resolve("prod").id == "v1"


def test_a_folder_that_merely_holds_objects_is_not_taken_for_a_store(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "objects" / "ab").mkdir(parents=True)  # e.g. a .git folder
    (repo / "objects" / "ab" / "cdef").write_text("keep me")
    code, _, err = delta_cli(capsys, repo, "gc")
    assert code == 5 and "holds 1 folder(s) (ab)" in one_line_error(err)
    assert (repo / "objects" / "ab" / "cdef").read_text() == "keep me"
    assert not (repo / "index.sqlite").exists() and not (repo / "quarantine").exists()


def test_gc_quarantines_and_verify_checks_both_ways(deltas, tmp_path, capsys):
    root = tmp_path / "store"
    store_with(deltas, root, "lora", "sparse")
    shutil.copytree(deltas["full"], root / "objects" / "v7")  # an unindexed folder
    code, out, _ = delta_cli(capsys, root, "verify")
    assert code == 5 and "objects/v7: " in out and "the index does not know" in out
    code, out, _ = delta_cli(capsys, root, "gc")
    assert code == 0 and f"{root / 'objects' / 'v7'} -> {root / 'quarantine' / 'v7'}" in out
    assert verify_delta(root / "quarantine" / "v7")  # moved whole, not deleted
    shutil.rmtree(root / "objects" / "v2")  # an indexed version without its folder
    code, out, _ = delta_cli(capsys, root, "verify")
    assert code == 5 and "v1: ok" in out and "v2: " in out and "missing" in out
    assert DeltaStore(root).add(deltas["lora"]).id == "v8"  # past the quarantined v7


# -- item 14: ids are never reused -------------------------------------------------------------


def test_an_id_freed_by_rm_is_never_handed_out_again(deltas, tmp_path, capsys):
    root = tmp_path / "store"
    store = store_with(deltas, root, "lora", "sparse")
    for v in ("v1", "v2", "v1"):
        store.tag("prod", v)
    assert store.remove("v2") == "v2"
    assert store.add(deltas["full"]).id == "v3"
    assert DeltaStore(root).add(deltas["full"]).id == "v4"  # the mark survives reopening
    with pytest.raises(DeltaError, match="pointed at v2, which has been removed"):
        store.rollback("prod")  # never to v3, an unrelated delta
    assert store.resolve("prod").id == "v1"


def _schema2_store(root: Path, delta: Path, vid: str) -> sqlite3.Connection:
    """A store as slimtune wrote it before schema 3, holding ``delta`` as version ``vid``;
    returns the open index connection for the caller to add rows and commit."""
    shutil.copytree(delta, root / "objects" / vid)
    conn = sqlite3.connect(root / "index.sqlite")
    for v in (0, 1):
        conn.executescript(_MIGRATIONS[v])
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    m = json.loads((root / "objects" / vid / "manifest.json").read_text())
    conn.execute(
        "INSERT INTO versions (id, seq, method, base_fingerprint, created, bytes) "
        "VALUES (?, ?, 'lora', ?, 'then', 1)",
        (vid, int(vid[1:]), m["base"]["fingerprint"]),
    )
    return conn


def test_an_old_index_is_migrated_with_its_high_water_mark_and_manifest_sums(deltas, tmp_path):
    root = tmp_path / "store"
    conn = _schema2_store(root, deltas["lora"], "v2")
    conn.commit()
    conn.close()
    store = DeltaStore(root)
    (v2,) = store.list()
    assert v2.manifest_sha256 == sha256_file(root / "objects" / "v2" / "manifest.json")
    store.remove("v2")
    assert store.add(deltas["sparse"]).id == "v3"


def test_an_old_index_never_reuses_an_id_its_tag_history_names(deltas, tmp_path):
    """Before schema 3, rm of the newest version freed its id; a tag's history may still
    name it, so the upgraded store must not hand that id out (rollback would deploy it)."""
    root = tmp_path / "store"
    conn = _schema2_store(root, deltas["lora"], "v1")
    # prod: v1 -> v2 -> v1, then v2 was removed (rm --force) by the old slimtune
    conn.executemany(
        "INSERT INTO tag_history (name, version, at) VALUES ('prod', ?, 'then')",
        [("v1",), ("v2",), ("v1",)],
    )
    conn.execute("INSERT INTO tags VALUES ('prod', 'v1', 'then')")
    conn.commit()
    conn.close()
    store = DeltaStore(root)
    assert store.add(deltas["sparse"]).id == "v3"
    with pytest.raises(DeltaError, match="pointed at v2, which has been removed"):
        store.rollback("prod")


def test_a_tag_never_points_at_a_version_removed_meanwhile(deltas, tmp_path, monkeypatch):
    """tag looks the version up, then moves the tag; an rm in between (another process) must
    not leave the tag naming nothing."""
    root = tmp_path / "store"
    store = store_with(deltas, root, "lora", "sparse")
    store.tag("prod", "v1")
    real, done = DeltaStore.resolve, []

    def resolve_then_rm(self, ref, **kw):
        v = real(self, ref, **kw)
        if not done:
            done.append(v.id)
            DeltaStore(root).remove(v.id)
        return v

    monkeypatch.setattr(DeltaStore, "resolve", resolve_then_rm)
    with pytest.raises(DeltaError, match="v2"):
        store.tag("prod", "v2")
    monkeypatch.setattr(DeltaStore, "resolve", real)
    assert store.resolve("prod").id == "v1"


def test_an_add_never_names_a_parent_removed_meanwhile(deltas, tmp_path, monkeypatch):
    root = tmp_path / "store"
    store = store_with(deltas, root, "lora")
    real, done = DeltaStore.resolve, []

    def resolve_then_rm(self, ref, **kw):
        v = real(self, ref, **kw)
        if not done:
            done.append(v.id)
            DeltaStore(root).remove(v.id)  # another process, between the lookup and the add
        return v

    monkeypatch.setattr(DeltaStore, "resolve", resolve_then_rm)
    with pytest.raises(DeltaError, match="v1"):
        store.add(deltas["sparse"], parent="v1")
    monkeypatch.setattr(DeltaStore, "resolve", real)
    assert store.list() == [] and list(store.objects.iterdir()) == []


# -- item 20: the manifest is covered by a checksum ---------------------------------------------


def test_a_flipped_manifest_value_is_caught(deltas, tiny_dir, tmp_path, capsys):
    root = tmp_path / "store"
    store = store_with(deltas, root, "lora", "sparse")
    edit_manifest(
        root / "objects" / "v1", lambda m: m["method_config"].update(r=m["method_config"]["r"] + 1)
    )
    code, out, _ = delta_cli(capsys, root, "verify")
    assert code == 5 and "v1: " in out and "changed since v1 was added" in out
    assert "v2: ok" in out
    with pytest.raises(DeltaError, match="changed since v1 was added"):
        DeltaSwitcher(load_model(str(tiny_dir)), store).switch("v1")
    code, _, err = delta_cli(capsys, root, "tag", "v1", "prod")
    assert code == 5 and "manifest.json: changed since" in one_line_error(err)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(files={}), "'files' is not a non-empty object"),
        (
            lambda m: m["files"].pop("adapter_model.safetensors"),
            "needs adapter_model.safetensors or adapter_model.bin",
        ),
    ],
)
def test_a_manifest_without_the_methods_files_is_refused(deltas, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(deltas["lora"], bad)
    edit_manifest(bad, change)
    with pytest.raises(DeltaError, match="malformed manifest"):
        verify_delta(bad)
    code, _, err = delta_cli(capsys, tmp_path / "store", "add", bad)
    assert code == 5 and message in one_line_error(err) and str(bad) in err
    assert DeltaStore(tmp_path / "store").list() == []


# -- item 21: a read-only store can be read ------------------------------------------------------


def test_a_read_only_store_reads_and_refuses_writes_clearly(
    deltas, tiny_dir, intent_file, tmp_path, capsys, make_readonly
):
    root, make_ro = make_readonly
    store_with(deltas, root, "lora").tag("prod", "v1")
    before = fingerprints(root)
    assert make_ro()
    assert DeltaStore(root).readonly
    code, out, _ = delta_cli(capsys, root, "list")
    assert code == 0 and "v1" in out and "prod" in out
    code, out, _ = delta_cli(capsys, root, "verify")
    assert code == 0 and out.strip() == "v1: ok"
    code, out, _ = run(
        capsys,
        "generate",
        "--store",
        root,
        "--model",
        tiny_dir,
        "--delta",
        "prod",
        "--max-new-tokens",
        "2",
        "hi",
    )
    assert code == 0 and out.startswith("[prod (v1)] ")
    for argv in (("tag", "v1", "stable"), ("gc",), ("rm", "v1", "--force")):
        code, _, err = delta_cli(capsys, root, *argv)
        assert code == 5 and "is read-only" in one_line_error(err), argv
    out_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--model",
        tiny_dir,
        "--data",
        intent_file,
        "--max-steps",
        "2",
        "--no-progress",
        "--store",
        root,
        "--output-dir",
        out_dir,
    )
    assert code == 5 and "train (to store its result) needs to write" in one_line_error(err)
    assert not out_dir.exists()  # refused before training, not after
    assert fingerprints(root) == before


CRASH_AFTER_TAG = (  # a writer killed after its commit: the tag move is only in index.sqlite-wal
    "import os, sqlite3, sys; from slimtune.delta import DeltaStore; "
    "hold = sqlite3.connect(sys.argv[1] + '/index.sqlite'); hold.execute('SELECT count(*) FROM sqlite_master').fetchone(); "
    "DeltaStore(sys.argv[1]).tag('prod', 'v2'); os._exit(0)"
)


def test_a_read_only_store_sees_what_a_killed_writer_committed(deltas, tmp_path, small_fs):
    """On a read-only mount without index.sqlite-shm, SQLite cannot replay the WAL in place;
    reading the index as immutable would show the store as it was before the last commits
    (here: prod still at v1, so the wrong delta is deployed)."""
    if small_fs is None:
        pytest.skip("needs a tmpfs mount")
    root = small_fs / "store"
    store_with(deltas, root, "lora", "lora").tag("prod", "v1")
    subprocess.run([sys.executable, "-c", CRASH_AFTER_TAG, str(root)], check=True)
    assert (root / "index.sqlite-wal").stat().st_size > 0
    (root / "index.sqlite-shm").unlink(missing_ok=True)  # e.g. a copy that left it out
    assert _mount("-o", "remount,ro", str(small_fs))
    store = DeltaStore(root)
    assert store.readonly and store.resolve("prod").id == "v2"


def test_a_store_path_that_is_a_file_fails_before_training(tiny_dir, intent_file, tmp_path, capsys):
    not_a_store = tmp_path / "store.txt"
    not_a_store.write_text("x")
    out_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--model",
        tiny_dir,
        "--data",
        intent_file,
        "--max-steps",
        "2",
        "--no-progress",
        "--store",
        not_a_store,
        "--output-dir",
        out_dir,
    )
    assert code == 2 and "is a file, not a store folder" in one_line_error(err)
    assert not out_dir.exists()
    with pytest.raises(UserInputError, match="is a file"):
        DeltaStore(not_a_store)


# -- item 22: a full disk is exit 2, one line, nothing lost --------------------------------------


def test_a_full_disk_is_one_line_with_exit_2_and_loses_nothing(
    deltas, tmp_path, capsys, small_fs, monkeypatch
):
    root = (small_fs or tmp_path) / "store"
    store_with(deltas, root, "lora").tag("prod", "v1")
    before = fingerprints(root)
    if small_fs is not None:
        fill(small_fs)
    else:
        import slimtune.delta.store as S

        def full(src, dst, **kw):
            raise OSError(28, "No space left on device", str(src), None, str(dst))

        monkeypatch.setattr(S.shutil, "copyfile", full)
    code, _, err = delta_cli(capsys, root, "add", deltas["full"])
    line = one_line_error(err)
    assert code == 2 and "disk full while writing" in line and str(root) in line
    if small_fs is not None:  # SQLite's own write: its error, not "cannot rollback"
        code, _, err = delta_cli(capsys, root, "tag", "v1", "stable")
        line = one_line_error(err)
        assert code == 2 and "disk full while writing" in line and "index.sqlite" in line
        (small_fs / "filler").unlink()
    monkeypatch.undo()  # room again
    store = DeltaStore(root)
    assert fingerprints(root) == before and [v.id for v in store.list()] == ["v1"]
    assert store.verify() == [("v1", None)] and store.tags() == {"prod": "v1"}
    assert list(store.staging.iterdir()) == []
    assert store.add(deltas["full"]).id == "v2"


def test_a_full_disk_under_safetensors_names_the_file_being_written(
    small_fs, tmp_path, monkeypatch
):
    import torch

    from slimtune import fileio

    target = (small_fs or tmp_path / "plain") / "weights.safetensors"
    target.parent.mkdir(exist_ok=True)
    if small_fs is not None:
        fill(small_fs)
    else:

        def full(*a, **kw):
            raise RuntimeError(
                "Error while serializing: IoError(Os { code: 28, kind: "
                'StorageFull, message: "No space left on device" })'
            )

        monkeypatch.setattr(fileio, "save_file", full)
    with pytest.raises(OSError) as info:
        fileio.write_safetensors(target, {"w": torch.zeros(256, 256)})
    assert info.value.errno == 28 and info.value.filename == str(target)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] in ([], ["filler"])


# -- item 24: bad index or manifest contents are exit 5 naming the file ---------------------------


def test_a_wrong_schema_index_is_named(deltas, tmp_path, capsys):
    root = tmp_path / "store"
    store_with(deltas, root, "lora")
    conn = sqlite3.connect(root / "index.sqlite")
    conn.execute("DROP TABLE versions")
    conn.commit()
    conn.close()
    code, _, err = delta_cli(capsys, root, "list")
    assert code == 5 and "index.sqlite: " in one_line_error(err) and "versions" in err
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "index.sqlite").execute("CREATE TABLE notes (x)").connection.commit()
    code, _, err = delta_cli(capsys, other, "list")
    assert code == 5 and "not a slimtune store index" in one_line_error(err)


@pytest.mark.parametrize(
    "what, change, message",
    [
        (
            "files not a dict",
            lambda p: edit_manifest(p, lambda m: m.update(files=["a"])),
            "'files' is not a non-empty object",
        ),
        (
            "entry without bytes",
            lambda p: edit_manifest(
                p, lambda m: m["files"]["adapter_model.safetensors"].pop("bytes")
            ),
            "needs 'sha256' (a string) and 'bytes'",
        ),
        (
            "base not a dict",
            lambda p: edit_manifest(p, lambda m: m.update(base="x")),
            "'base' is not an object",
        ),
        (
            "base key of the wrong type",
            lambda p: edit_manifest(p, lambda m: m["base"].update(num_layers="4")),
            "'base.num_layers' is not an integer",
        ),
        (
            "deeply nested",
            lambda p: (p / "manifest.json").write_text(
                '{"format": "slimtune-delta", "x": ' + "[" * 200000 + "]" * 200000 + "}"
            ),
            "nested too deeply",
        ),
    ],
)
def test_malformed_manifests_are_named(deltas, tmp_path, capsys, what, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(deltas["lora"], bad)
    change(bad)
    code, _, err = delta_cli(capsys, tmp_path / "store", "add", bad)
    line = one_line_error(err)
    assert code == 5 and message in line and str(bad / "manifest.json") in line, what


def test_export_refuses_a_corrupted_version(deltas, tmp_path, capsys):
    """export hands the adapter to code that checks nothing: a flipped byte is named first."""
    root = tmp_path / "store"
    store_with(deltas, root, "lora")
    weights = root / "objects" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    code, _, err = delta_cli(capsys, root, "export", "v1", tmp_path / "out")
    assert code == 5 and "checksum mismatch" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_diff_names_a_corrupted_version(deltas, tmp_path, capsys):
    root = tmp_path / "store"
    store_with(deltas, root, "lora", "lora")
    weights = root / "objects" / "v2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = delta_cli(capsys, root, "diff", "v1", "v2")
    assert code == 5 and str(weights) in one_line_error(err)


def test_an_invalid_safetensors_file_with_a_matching_checksum_is_named(deltas, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(deltas["sparse"], bad)
    junk = bad / "sparse.safetensors"
    junk.write_bytes(b"\xff" * 64)
    edit_manifest(
        bad, lambda m: m["files"]["sparse.safetensors"].update(bytes=64, sha256=sha256_file(junk))
    )
    code, _, err = delta_cli(capsys, tmp_path / "store", "add", bad)
    assert code == 5 and f"{junk}: not a valid safetensors file" in one_line_error(err)


# -- item 25: gc during an add in progress ------------------------------------------------------


GC = (
    "import sys; from slimtune.delta import DeltaStore; r = DeltaStore(sys.argv[1]).gc(); "
    "print(len(r.in_use), len(r.removed))"
)


def test_gc_leaves_the_staging_folder_of_a_running_add(deltas, tmp_path, monkeypatch):
    import slimtune.delta.store as S

    root = tmp_path / "store"
    store = DeltaStore(root)
    dead = store.staging / "add-0123"  # a killed add's leftover: its lock is not held
    dead.mkdir()
    seen = []
    real = S.fsync_dir

    def gc_now(path):  # called on the staging folder once the copy is complete
        if Path(path).parent == store.staging and not seen:
            seen.append(
                subprocess.run(
                    [sys.executable, "-c", GC, str(root)],
                    text=True,
                    capture_output=True,
                    check=True,
                ).stdout.split()
            )
        real(path)

    monkeypatch.setattr(S, "fsync_dir", gc_now)
    v = store.add(deltas["lora"])
    assert seen == [["1", "1"]]  # ours in use, the dead one removed
    assert not dead.exists() and store.verify() == [(v.id, None)]
    assert list(store.staging.iterdir()) == []


def test_an_adds_lock_unlinked_by_gc_before_it_was_taken_still_guards_it(tmp_path, monkeypatch):
    """gc unlinks a lock file it finds without a folder; an add that had opened that file but
    not yet locked it must end up holding the lock at the path, or a later gc (which finds
    the folder and no lock held) deletes the staging folder of the running add."""
    import fcntl

    from slimtune.fileio import LockHeld, file_lock

    lock = tmp_path / "add-0123.lock"
    real = fcntl.flock

    def gc_first(fd, op):
        monkeypatch.setattr(fcntl, "flock", real)
        with file_lock(lock, wait=False):  # gc: a lone lock, not held, so it goes
            lock.unlink()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", gc_first)
    with file_lock(lock), pytest.raises(LockHeld), file_lock(lock, wait=False):
        pass  # the next gc finds it held


def test_gc_passes_over_a_staging_folder_its_add_removed_meanwhile(tmp_path, monkeypatch):
    """An add that finishes between gc listing staging/ and gc taking its lock has removed
    its folder and lock already: nothing to do, not a traceback."""
    store = DeltaStore(tmp_path / "store")
    real = DeltaStore._folders
    gone = store.staging / "add-0123"  # listed by gc, then removed by its finished add
    monkeypatch.setattr(
        DeltaStore,
        "_folders",
        staticmethod(lambda d: [*real(d), gone] if d == store.staging else real(d)),
    )
    store.gc()
    assert list(store.staging.iterdir()) == []


# -- item 26: symlinks, path-like tags, shadowing folders, one bad manifest ----------------------


def test_a_symlink_in_a_delta_is_refused_unread(deltas, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(deltas["lora"], bad)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 12345)
    (bad / "adapter_config.json").unlink()
    (bad / "adapter_config.json").symlink_to(secret)
    code, _, err = delta_cli(capsys, tmp_path / "store", "add", bad)
    line = one_line_error(err)
    assert code == 5 and "symbolic link" in line and "12345" not in line


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x"])
def test_path_like_tag_names_are_refused(deltas, tmp_path, name):
    store = store_with(deltas, tmp_path / "store", "lora")
    with pytest.raises(UserInputError, match="invalid tag name"):
        store.tag(name, "v1")


def test_a_local_folder_named_like_a_version_does_not_shadow_it(
    deltas, tiny_dir, tmp_path, monkeypatch
):
    store = store_with(deltas, tmp_path / "store", "lora")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(deltas["sparse"], tmp_path / "v1")
    shutil.copytree(deltas["sparse"], tmp_path / "mine")
    sw = DeltaSwitcher(load_model(str(tiny_dir)), store)
    assert sw.resolve("v1") == (store.objects / "v1", "v1")
    assert sw.resolve("./v1") == (Path("./v1"), "./v1")
    with pytest.raises(DeltaError, match=r"for the folder mine here, write \./mine"):
        sw.resolve("mine")
    assert sw.switch("./v1") is not None and sw.current.manifest["method"] == "sparse"


def test_one_bad_manifest_does_not_break_list(deltas, tmp_path, capsys):
    root = tmp_path / "store"
    store_with(deltas, root, "lora", "sparse")
    (root / "objects" / "v1" / "manifest.json").write_text("{not json")
    code, out, _ = delta_cli(capsys, root, "list")
    assert code == 0 and "(manifest unreadable" in out and "sparse" in out
