import errno
import os
import shutil

import pytest

from slimtune import fileio


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    fileio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == fileio.json.dumps({"v": 1}, indent=2) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_disk_full_keeps_what_was_stored(tmp_path, monkeypatch):
    target = tmp_path / "w.bin"
    fileio.write_bytes(target, b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError) as e:
        fileio.write_bytes(target, b"new" * 1000)
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_atomic_dir_replaces_whole_folders_and_recovers_old(tmp_path):
    target = tmp_path / "ckpt"
    with fileio.atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(FileExistsError), fileio.atomic_dir(target):
        pass
    with pytest.raises(RuntimeError), fileio.atomic_dir(target, replace=True) as d:
        (d / "a").write_text("2")
        raise RuntimeError
    assert (target / "a").read_text() == "1"
    with fileio.atomic_dir(target, replace=True) as d:
        (d / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # a crash between the two renames leaves only <target>.old: recover_dir finds it
    os.replace(target, tmp_path / "ckpt.old")
    assert fileio.recover_dir(target) == tmp_path / "ckpt.old"
    assert fileio.recover_dir(tmp_path / "none") is None


def test_a_new_folder_never_replaces_one_written_meanwhile(tmp_path):
    """Two writers of one new folder (two `delta apply --out X`): both pass the existence
    check; the second to finish must fail and leave the first one's folder, not swap it
    out and delete it."""
    from slimtune.errors import UserInputError

    target = tmp_path / "merged"
    for theirs in ("folder", "file"):
        with (
            pytest.raises(fileio.FolderExists, match="appeared while"),
            fileio.atomic_dir(target) as d,
        ):
            (d / "ours").write_text("2")
            if theirs == "folder":  # the other writer finishes first
                target.mkdir()
                (target / "theirs").write_text("1")
            else:
                target.write_text("1")
        if theirs == "folder":
            assert [p.name for p in target.iterdir()] == ["theirs"]
            shutil.rmtree(target)
        else:
            assert target.read_text() == "1"
            target.unlink()
        assert not list(tmp_path.iterdir())  # no temporary folder left behind
    # the CLI reports it as a user error (exit code 2), and it still is a FileExistsError
    assert issubclass(fileio.FolderExists, UserInputError)
    assert issubclass(fileio.FolderExists, FileExistsError)


def test_file_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from slimtune.fileio import file_lock\n"
            f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fileio.LockHeld), fileio.file_lock(lock, wait=False):
            pass
        with pytest.raises(fileio.LockHeld), fileio.file_lock(lock, shared=True, wait=False):
            pass
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, nothing stale is left
        holder.wait()
    with fileio.file_lock(lock, wait=False):
        pass
    with fileio.file_lock(lock, shared=True), fileio.file_lock(lock, shared=True, wait=False):
        pass  # shared locks coexist
