"""A versioned store of deltas: an SQLite index and the delta folders as files.

Layout under the store root (``--store``, ``$SLIMTUNE_STORE``, else
``$XDG_DATA_HOME/slimtune/store``)::

    index.sqlite        versions, tags, tag history, schema version, the id high-water mark
    objects/<id>/       one delta folder per version (manifest.json + tensors)
    staging/            folders being added (each locked by its adder); never versions
    quarantine/         folders ``gc`` found in objects/ that no version owns

Adding a version copies and verifies the delta in ``staging/``, then, inside one SQLite
``BEGIN IMMEDIATE`` transaction (which serialises writers across processes), takes the next
id, renames the folder to ``objects/<id>`` and inserts the row with the manifest's SHA-256.
A process killed before the commit leaves at most an unindexed folder, which no command
shows, ``verify`` reports and ``gc`` moves to ``quarantine/``. Ids are never reused: the
index keeps a high-water mark that ``rm`` does not lower, and no id is taken whose folder
name exists in ``objects/`` or ``quarantine/``. Tags move in a transaction too and keep
their history, which is what ``rollback`` walks back.

The index is the source of truth, so an index that is missing, empty or unreadable is never
taken for an empty store while ``objects/`` holds folders: opening refuses, and
``reindex`` rebuilds the index from the folders' manifests. A store that cannot be written
(read-only mount or permissions) opens read-only: reading works, writing is refused.
"""

from __future__ import annotations

import builtins  # DeltaStore.list shadows list in the annotations of methods below it
import errno
import json
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from ..errors import DeltaError, UserInputError
from ..fileio import LockHeld, file_lock, fsync_dir, sha256_file
from .format import MANIFEST, delta_bytes, read_manifest, verify_delta

SCHEMA_VERSION = 4
TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_TABLES = {"meta", "versions", "tags", "tag_history"}
_FOLDER_SEQ = re.compile(r"v(\d+)(?:\.\d+)?")  # objects/v7, quarantine/v7, quarantine/v7.2


def default_store_root() -> Path:
    env = os.environ.get("SLIMTUNE_STORE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "slimtune" / "store"


def is_folder_ref(ref: str) -> bool:
    """Whether a ``--delta`` reference names a folder rather than a store id or tag.

    Only a reference that looks like a path (holds a path separator, or starts with ``.``
    or ``~``) is a folder, so a local folder named ``v1`` or ``prod`` never shadows the
    store's; write ``./v1`` for the folder. Tags cannot start with ``.``.
    """
    seps = [s for s in (os.sep, os.altsep) if s]
    return any(s in ref for s in seps) or ref.startswith((".", "~"))


@dataclass
class Version:
    id: str
    seq: int
    parent: str | None
    method: str
    base_fingerprint: str
    dataset_fingerprint: str | None
    created: str
    bytes: int
    note: str | None
    path: Path
    manifest_sha256: str | None = None  # None only for rows whose folder failed the upgrade

    def manifest(self, *, method_files: bool = True) -> dict:
        return read_manifest(self.path, method_files=method_files)


@dataclass
class GcResult:
    quarantined: list[tuple[Path, Path]] = field(default_factory=list)  # (from, to)
    removed: list[Path] = field(default_factory=list)  # staging leftovers of dead adds
    in_use: list[Path] = field(default_factory=list)  # staging folders of adds in progress


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _insert_version(
    conn: sqlite3.Connection,
    vid: str,
    seq: int,
    manifest: dict,
    manifest_sha: str,
    *,
    parent: str | None,
    created: str,
    note: str | None,
) -> None:
    """The index row of a version, as ``add`` and ``reindex`` both write it."""
    conn.execute(
        "INSERT INTO versions (id, seq, parent, method, base_fingerprint, "
        "dataset_fingerprint, created, bytes, note, manifest_sha256) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            vid,
            seq,
            parent,
            manifest["method"],
            manifest["base"]["fingerprint"],
            (manifest.get("dataset") or {}).get("fingerprint"),
            created,
            delta_bytes(manifest),
            note,
            manifest_sha,
        ),
    )


# Each migration takes the index from version i to i + 1.
_MIGRATIONS = {
    0: """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE versions (
            id TEXT PRIMARY KEY, seq INTEGER UNIQUE NOT NULL, parent TEXT,
            method TEXT NOT NULL, base_fingerprint TEXT NOT NULL, dataset_fingerprint TEXT,
            created TEXT NOT NULL, bytes INTEGER NOT NULL);
        CREATE TABLE tags (name TEXT PRIMARY KEY, version TEXT NOT NULL, updated TEXT NOT NULL);
    """,
    1: """
        ALTER TABLE versions ADD COLUMN note TEXT;
        CREATE TABLE tag_history (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL,
            at TEXT NOT NULL);
        INSERT INTO tag_history (name, version, at) SELECT name, version, updated FROM tags;
    """,
    # the manifest's checksum (filled in for existing rows by _backfill_manifest_sums) and
    # the id high-water mark, so that ids freed by rm are never handed out again
    2: """
        ALTER TABLE versions ADD COLUMN manifest_sha256 TEXT;
        INSERT OR REPLACE INTO meta (key, value)
            SELECT 'max_seq', CAST(COALESCE(MAX(seq), 0) AS TEXT) FROM versions;
    """,
    # A/B splits that `slimtune serve` reads per request: name -> "arm=share,arm=share"
    3: """
        CREATE TABLE splits (name TEXT PRIMARY KEY, arms TEXT NOT NULL, updated TEXT NOT NULL);
    """,
}


class DeltaStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self._locate(root)
        self._open()

    def _locate(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root else default_store_root()
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.quarantine = self.root / "quarantine"
        self.index = self.root / "index.sqlite"
        if self.root.exists() and not self.root.is_dir():
            raise UserInputError(
                f"store {self.root}: is a file, not a store folder; choose another --store"
            )
        if not self.root.exists():
            try:
                self.root.mkdir(parents=True, exist_ok=True)  # another process may race us
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise UserInputError(
                        f"store {self.root}: cannot create it ({e.strerror})"
                    ) from e
        self.readonly = (
            not self.root.is_dir()
            or not os.access(self.root, os.W_OK)
            or (self.index.exists() and not os.access(self.index, os.W_OK))
        )
        for d in (self.objects, self.staging, self.quarantine):
            if d.exists() and not d.is_dir():
                raise UserInputError(
                    f"store {self.root}: {d.name} is a file, not the store's {d.name}/ folder; "
                    "move it away or choose another --store"
                )
        if not self.readonly:
            for d in (self.objects, self.staging):
                d.mkdir(exist_ok=True)

    def _open(self, *, rebuilding: bool = False) -> None:
        """Check the index is this store's and healthy; upgrade its schema if writable."""
        fresh = not self._has_index()
        if fresh and not rebuilding:
            held = self._folders(self.objects)
            if held:
                raise DeltaError(
                    f"{self.index}: missing or empty, but {self.objects} holds {len(held)} "
                    f"folder(s) ({', '.join(d.name for d in held[:3])}{'...' * (len(held) > 3)})"
                    "; refusing to start an empty index that would hide them. Rebuild the index "
                    f"from their manifests with `slimtune delta --store {self.root} reindex`, "
                    "or restore index.sqlite from a backup"
                )
        if not self.readonly:
            if 0 < self._upgrade(fresh) < 3:  # rows from before schema 3 had no manifest sums
                self._backfill_manifest_sums()
        elif not fresh:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise DeltaError(
                    f"{self.index}: schema version {current} is newer than this "
                    f"slimtune knows ({SCHEMA_VERSION}); upgrade slimtune"
                )
            self._check_tables()

    def _has_index(self) -> bool:
        """Whether index.sqlite holds any table (raises DeltaError if it is not SQLite)."""
        if not self.index.exists() or self.index.stat().st_size == 0:
            return False
        with self._read() as conn:
            return (
                conn.execute("SELECT 1 FROM sqlite_master WHERE type='table'").fetchone()
                is not None
            )

    def _check_tables(self) -> None:
        with self._read() as conn:
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        if not names >= _TABLES:
            raise DeltaError(
                f"{self.index}: not a slimtune store index (tables "
                f"{', '.join(sorted(_TABLES - names))} are missing)"
            )

    @staticmethod
    def _folders(d: Path) -> list[Path]:
        return sorted(d.iterdir()) if d.is_dir() else []

    # -- the index -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.index.exists():  # a store never written to: empty, in memory
                conn = sqlite3.connect(":memory:", isolation_level=None)
                for v in range(SCHEMA_VERSION):
                    conn.executescript(_MIGRATIONS[v])
            else:
                uri = "file:" + quote(str(self.index.resolve()))
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
                try:
                    conn.execute("SELECT 1 FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    # a WAL index on a read-only file system: its -shm file cannot be made;
                    # nobody can write there either, so reading it as immutable is safe
                    conn.close()
                    conn = self._read_wal_copy() or sqlite3.connect(
                        f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None
                    )
            conn.row_factory = sqlite3.Row
            return conn
        conn = sqlite3.connect(self.index, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _read_wal_copy(self) -> sqlite3.Connection | None:
        """The index with the commits still in its -wal file (a writer killed before its
        checkpoint), read from a copy, in memory: read as immutable, those would be missing."""
        wal = self.index.with_name(self.index.name + "-wal")
        if not wal.is_file() or wal.stat().st_size == 0:
            return None
        with tempfile.TemporaryDirectory(prefix="slimtune-index-") as tmp:
            copy = Path(tmp) / self.index.name
            shutil.copyfile(self.index, copy)
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            src = sqlite3.connect(copy)
            try:
                mem = sqlite3.connect(":memory:", isolation_level=None)
                src.backup(mem)
            finally:
                src.close()
        return mem

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as the user's: a full disk (OSError ENOSPC, exit 2) or a bad index."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            name = getattr(e, "sqlite_errorname", "") or ""
            # SQLite says "disk I/O error" when its -wal/-shm files cannot grow on a full disk
            if name == "SQLITE_FULL" or (
                name.startswith("SQLITE_IOERR") and shutil.disk_usage(self.root).free < 2**20
            ):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.index)) from e
            if name.startswith("SQLITE_READONLY"):
                raise DeltaError(f"store {self.root} is read-only ({e})") from e
            if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "no such" in str(e):
                raise DeltaError(
                    f"{self.index}: unreadable store index ({e}); restore it from "
                    "a backup, or move it away and run `slimtune delta --store "
                    f"{self.root} reindex`"
                ) from e
            raise DeltaError(f"{self.index}: {e}") from e

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            conn = self._connect()
            try:
                yield conn
            finally:
                conn.close()

    def require_writable(self, what: str = "this command") -> None:
        """Refuse early, with a clear message, what cannot work in a read-only store."""
        if self.readonly:
            raise DeltaError(
                f"store {self.root} is read-only (a read-only mount or no write "
                f"permission); {what} needs to write to it"
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction (across processes)."""
        self.require_writable()
        with self._errors():
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT may have rolled back already
                    with suppress(sqlite3.Error):  # the original error is the one to report
                        conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()

    def schema_version(self) -> int:
        with self._read() as conn:
            return self._schema_version(conn)

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if not has_meta:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row["value"]) if row else 0

    def _upgrade(self, fresh: bool) -> int:
        """Migrate the index to SCHEMA_VERSION; return the version it had."""
        if not fresh and self.schema_version() == SCHEMA_VERSION:
            # the common case reads only: no write transaction to wait for behind a writer
            self._check_tables()
            return SCHEMA_VERSION
        with self._write() as conn:
            current = self._schema_version(conn)
            if current > SCHEMA_VERSION:
                raise DeltaError(
                    f"{self.index}: schema version {current} is newer than this "
                    f"slimtune knows ({SCHEMA_VERSION}); upgrade slimtune"
                )
            if current == 0 and conn.execute("SELECT 1 FROM sqlite_master").fetchone():
                raise DeltaError(f"{self.index}: an SQLite file, but not a slimtune store index")
            for v in range(current, SCHEMA_VERSION):
                for stmt in filter(str.strip, _MIGRATIONS[v].split(";")):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(v + 1),),
                )
        self._check_tables()
        return current

    def _backfill_manifest_sums(self) -> None:
        """Rows from before schema 3 get their manifest's checksum, if the folder verifies."""
        with self._read() as conn:
            rows = [
                self._row(r)
                for r in conn.execute("SELECT * FROM versions WHERE manifest_sha256 IS NULL")
            ]
        for v in rows:
            try:
                self._check(v)
            except DeltaError:
                continue  # verify keeps reporting it
            with self._write() as conn:
                conn.execute(
                    "UPDATE versions SET manifest_sha256=? WHERE id=?",
                    (sha256_file(v.path / MANIFEST), v.id),
                )

    def _row(self, row: sqlite3.Row) -> Version:
        keys = row.keys()  # a read-only store may have an older schema
        return Version(
            row["id"],
            row["seq"],
            row["parent"],
            row["method"],
            row["base_fingerprint"],
            row["dataset_fingerprint"],
            row["created"],
            row["bytes"],
            row["note"] if "note" in keys else None,
            self.objects / row["id"],
            row["manifest_sha256"] if "manifest_sha256" in keys else None,
        )

    def _next_seq(self, conn: sqlite3.Connection) -> int:
        """One above every id ever used: in the index, its high-water mark, tag histories
        (an index from before schema 3 may name ids that rm freed) and folder names."""
        row = conn.execute("SELECT value FROM meta WHERE key='max_seq'").fetchone()
        used = [
            int(row["value"]) if row else 0,
            conn.execute("SELECT COALESCE(MAX(seq), 0) FROM versions").fetchone()[0],
        ]
        for r in conn.execute("SELECT version FROM tag_history UNION SELECT version FROM tags"):
            m = _FOLDER_SEQ.fullmatch(str(r[0]))
            if m and "." not in str(r[0]):
                used.append(int(m.group(1)))
        for d in (self.objects, self.quarantine):
            for f in self._folders(d):
                m = _FOLDER_SEQ.fullmatch(f.name)
                if m:
                    used.append(int(m.group(1)))
        return max(used) + 1

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[Version]:
        with self._read() as conn:
            return [self._row(r) for r in conn.execute("SELECT * FROM versions ORDER BY seq")]

    def tags(self) -> dict[str, str]:
        with self._read() as conn:
            return {r["name"]: r["version"] for r in conn.execute("SELECT * FROM tags")}

    def tag_history(self) -> dict[str, builtins.list[dict[str, str]]]:
        """Each tag's moves, oldest first: [{"version", "at"}] (rollbacks drop the entry
        they undo, as ``rollback`` walks this history back)."""
        out: dict[str, builtins.list[dict[str, str]]] = {}
        with self._read() as conn:
            for r in conn.execute("SELECT name, version, at FROM tag_history ORDER BY seq"):
                out.setdefault(r["name"], []).append({"version": r["version"], "at": r["at"]})
        return out

    def splits(self) -> dict[str, str]:
        """A/B splits by name: their arms as ``arm=share,...`` (see ``serve.traffic``)."""
        with self._read() as conn:
            try:
                rows = conn.execute("SELECT name, arms FROM splits ORDER BY name").fetchall()
            except sqlite3.OperationalError:  # a read-only index from before schema 4
                return {}
        return {r["name"]: r["arms"] for r in rows}

    def set_split(self, name: str, arms: str) -> tuple[str | None, str]:
        """Set split ``name`` (``[name:]``-less ``arm=weight,...``; every arm must resolve
        now); return (previous arms, new arms), the weights written as shares."""
        from ..serve.traffic import Split

        split = Split.parse(f"{name}:{arms}")
        self.require_writable("setting a split")
        for arm, _ in split.arms:
            if arm != "base":
                self.resolve(arm)  # a typo is refused here, not a 404 on live traffic
        spec = str(split).split(":", 1)[1]
        with self._write() as conn:
            old = conn.execute("SELECT arms FROM splits WHERE name=?", (name,)).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO splits (name, arms, updated) VALUES (?,?,?)",
                (name, spec, _now()),
            )
        return (old["arms"] if old else None), spec

    def remove_split(self, name: str) -> str:
        self.require_writable("removing a split")
        with self._write() as conn:
            old = conn.execute("SELECT arms FROM splits WHERE name=?", (name,)).fetchone()
            if old is None:
                raise UserInputError(f"no split {name!r} in the store {self.root}")
            conn.execute("DELETE FROM splits WHERE name=?", (name,))
        return old["arms"]

    def resolve(self, ref: str, *, check: bool = True) -> Version:
        """A version by id (``v3``), by tag (``prod``), or ``latest``.

        With ``check`` (the default, for anything that uses the delta) its folder must exist
        and its manifest must be the one added; ``rm`` and ``verify`` pass ``check=False``.
        """
        with self._read() as conn:
            if ref == "latest":
                row = conn.execute("SELECT * FROM versions ORDER BY seq DESC LIMIT 1").fetchone()
            else:
                tag = conn.execute("SELECT version FROM tags WHERE name=?", (ref,)).fetchone()
                vid = tag["version"] if tag else ref
                row = conn.execute("SELECT * FROM versions WHERE id=?", (vid,)).fetchone()
        if row is None:
            raise DeltaError(f"no version or tag {ref!r} in the store {self.root}")
        v = self._row(row)
        if check:
            self._check_manifest(v)
        return v

    def _check_manifest(self, v: Version) -> None:
        """The folder is there and its manifest is byte for byte the one that was added."""
        if not v.path.is_dir():
            raise DeltaError(f"{v.id}: in the index, but its folder {v.path} is missing")
        path = v.path / MANIFEST
        if (
            v.manifest_sha256 is not None
            and path.is_file()
            and not path.is_symlink()
            and sha256_file(path) != v.manifest_sha256
        ):
            raise DeltaError(
                f"{path}: changed since {v.id} was added (its SHA-256 differs "
                "from the one in the index)"
            )

    def _check(self, v: Version) -> dict:
        """Everything verify checks for one version; return its manifest."""
        self._check_manifest(v)
        manifest = verify_delta(v.path)
        if manifest["base"]["fingerprint"] != v.base_fingerprint:
            raise DeltaError(f"{v.path / MANIFEST}: base fingerprint differs from the index")
        return manifest

    # -- writing -------------------------------------------------------------------------

    @contextmanager
    def staging_dir(self, prefix: str = "add") -> Iterator[Path]:
        """A new folder under ``staging/``, locked so that ``gc`` leaves it alone; removed
        at the end of the block."""
        self.require_writable()
        name = f"{prefix}-{uuid.uuid4().hex}"
        lock = self.staging / f"{name}.lock"
        tmp = self.staging / name
        with file_lock(lock):
            try:
                tmp.mkdir()
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                lock.unlink(missing_ok=True)

    def add(
        self, folder: str | Path, *, parent: str | None = None, note: str | None = None
    ) -> Version:
        """Copy a delta folder into the store as a new version; return it."""
        self.require_writable("adding a version")
        folder = Path(folder)
        manifest = verify_delta(folder)
        if parent is not None:
            parent = self.resolve(parent, check=False).id
        with self.staging_dir() as tmp:
            for name in [*manifest["files"], MANIFEST]:  # copyfile: new files, umask's mode
                shutil.copyfile(folder / name, tmp / name)
            manifest = verify_delta(tmp)  # what landed on disk, not what we meant to copy
            manifest_sha = sha256_file(tmp / MANIFEST)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            target = None
            try:
                with self._write() as conn:
                    if (
                        parent is not None
                        and conn.execute("SELECT 1 FROM versions WHERE id=?", (parent,)).fetchone()
                        is None
                    ):
                        raise DeltaError(
                            f"parent {parent} was removed from the store {self.root} meanwhile"
                        )
                    seq = self._next_seq(conn)
                    vid = f"v{seq}"
                    os.rename(tmp, self.objects / vid)  # no such folder (_next_seq): no clobber
                    target = self.objects / vid
                    fsync_dir(self.objects)
                    conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('max_seq', ?)",
                        (str(seq),),
                    )
                    _insert_version(
                        conn,
                        vid,
                        seq,
                        manifest,
                        manifest_sha,
                        parent=parent,
                        created=_now(),
                        note=note,
                    )
            except BaseException:
                if target is not None and not self._indexed(vid):
                    shutil.rmtree(target, ignore_errors=True)  # ours, and never committed
                raise
        return self.resolve(vid)

    def _indexed(self, vid: str) -> bool:
        try:
            with self._read() as conn:
                return (
                    conn.execute("SELECT 1 FROM versions WHERE id=?", (vid,)).fetchone() is not None
                )
        except (DeltaError, OSError):
            return True  # cannot tell: keep the folder (at worst an orphan for gc)

    def tag(self, name: str, ref: str) -> tuple[str | None, str]:
        """Point tag ``name`` at ``ref`` atomically; return (previous version, new version)."""
        looks_like_id = name.startswith("v") and name[1:].isdigit()
        if (
            not name
            or set(name) - TAG_CHARS
            or not name[0].isalnum()
            or name == "latest"
            or looks_like_id
        ):
            raise UserInputError(
                f"invalid tag name {name!r}: letters, digits, - _ . only, "
                "starting with a letter or digit, and not 'latest' or a "
                "version id"
            )
        self.require_writable("tagging")
        vid = self.resolve(ref).id
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM versions WHERE id=?", (vid,)).fetchone() is None:
                raise DeltaError(f"{vid} was removed from the store {self.root} meanwhile")
            old = conn.execute("SELECT version FROM tags WHERE name=?", (name,)).fetchone()
            if old is not None and old["version"] == vid:
                return vid, vid
            now = _now()
            conn.execute(
                "INSERT OR REPLACE INTO tags (name, version, updated) VALUES (?,?,?)",
                (name, vid, now),
            )
            conn.execute(
                "INSERT INTO tag_history (name, version, at) VALUES (?,?,?)", (name, vid, now)
            )
        return (old["version"] if old else None), vid

    def rollback(self, name: str) -> tuple[str, str]:
        """Move tag ``name`` back to the version it pointed at before; return (from, to)."""
        with self._write() as conn:
            cur = conn.execute("SELECT version FROM tags WHERE name=?", (name,)).fetchone()
            if cur is None:
                raise UserInputError(f"no tag {name!r} in the store {self.root}")
            hist = [
                r["version"]
                for r in conn.execute(
                    "SELECT version FROM tag_history WHERE name=? ORDER BY seq", (name,)
                )
            ]
            # the history ends with the current version; walk back past repeats of it
            prev = next((v for v in reversed(hist[:-1]) if v != cur["version"]), None)
            if prev is None:
                raise UserInputError(f"tag {name!r} has no earlier version to roll back to")
            row = conn.execute("SELECT * FROM versions WHERE id=?", (prev,)).fetchone()
            if not row:
                raise DeltaError(f"tag {name!r} pointed at {prev}, which has been removed")
            # as `tag` does: a tag must not move to a version every request would fail on
            # (its folder gone or its manifest changed); the tag stays where it is
            self._check_manifest(self._row(row))
            conn.execute("UPDATE tags SET version=?, updated=? WHERE name=?", (prev, _now(), name))
            # forget the rolled-back entry so a second rollback goes further back
            last = conn.execute("SELECT MAX(seq) FROM tag_history WHERE name=?", (name,)).fetchone()
            conn.execute("DELETE FROM tag_history WHERE seq=?", (last[0],))
        return cur["version"], prev

    def remove(self, ref: str, *, force: bool = False) -> str:
        self.require_writable("rm")
        v = self.resolve(ref, check=False)
        with self._write() as conn:
            tags = [
                r["name"] for r in conn.execute("SELECT name FROM tags WHERE version=?", (v.id,))
            ]
            children = [
                r["id"] for r in conn.execute("SELECT id FROM versions WHERE parent=?", (v.id,))
            ]
            names = {v.id, *tags}  # an arm names the version or a tag on it
            splits = [
                r["name"]
                for r in conn.execute("SELECT name, arms FROM splits")
                if names & {a.split("=")[0] for a in r["arms"].split(",")}
            ]
            if (tags or children or splits) and not force:
                deps = [f"tag {t}" for t in tags] + [f"version {c} (its parent)" for c in children]
                deps += [f"split {s}" for s in splits]
                raise UserInputError(
                    f"{v.id} is still used by {', '.join(deps)}; pass --force to remove it anyway"
                )
            conn.execute("DELETE FROM tags WHERE version=?", (v.id,))
            for name in splits:  # as its tags: a split that would answer 404s goes too
                conn.execute("DELETE FROM splits WHERE name=?", (name,))
            conn.execute("UPDATE versions SET parent=NULL WHERE parent=?", (v.id,))
            conn.execute("DELETE FROM versions WHERE id=?", (v.id,))
        shutil.rmtree(v.path, ignore_errors=True)  # after the commit: at worst an orphan
        return v.id

    def gc(self) -> GcResult:
        """Move folders no version owns (killed adds, removals cut short) to ``quarantine/``
        and remove staging leftovers of adds that are no longer running.

        Nothing under ``objects/`` is deleted: an index that lost rows must not cost the
        folders. The write transaction keeps adds from moving a folder in meanwhile; the
        per-add locks keep the staging folders of running adds.
        """
        out = GcResult()
        with self._write() as conn:
            known = {r["id"] for r in conn.execute("SELECT id FROM versions")}
            for d in self._folders(self.objects):
                if d.name not in known:
                    out.quarantined.append((d, self._quarantine(d)))
        for d in self._folders(self.staging):
            if d.name.endswith(".lock") and (self.staging / d.name[:-5]).exists():
                continue  # goes with its folder
            lock = d if d.name.endswith(".lock") else d.with_name(d.name + ".lock")
            try:
                with file_lock(lock, wait=False):
                    there = d != lock and os.path.lexists(d)  # its add may have just ended
                    if d.is_dir() and not d.is_symlink():
                        shutil.rmtree(d)
                    elif there:
                        d.unlink()
                    lock.unlink(missing_ok=True)
            except LockHeld:
                out.in_use.append(d)
                continue
            if there:
                out.removed.append(d)
        return out

    def _quarantine(self, d: Path) -> Path:
        self.quarantine.mkdir(exist_ok=True)
        dest, n = self.quarantine / d.name, 1
        while dest.exists():
            n += 1
            dest = self.quarantine / f"{d.name}.{n}"
        os.rename(d, dest)
        fsync_dir(self.quarantine)
        return dest

    def verify(self, ref: str | None = None) -> builtins.list[tuple[str, str | None]]:
        """(id, problem or None) for one version or all: checksums of every file and of the
        manifest; for all, also folders in ``objects/`` that the index does not know."""
        versions = [self.resolve(ref, check=False)] if ref else self.list()
        out: list[tuple[str, str | None]] = []
        for v in versions:
            try:
                self._check(v)
                out.append((v.id, None))
            except DeltaError as e:
                out.append((v.id, str(e)))
            except OSError as e:  # an unreadable file: that version's problem, not the run's
                out.append((v.id, f"{e.filename}: unreadable ({e.strerror})"))
        if ref is None:
            known = {v.id for v in versions}
            for d in self._folders(self.objects):
                if d.name not in known:
                    out.append(
                        (
                            f"objects/{d.name}",
                            f"{d}: a folder the index does not know "
                            "(a killed add, or rows lost from the index): `slimtune delta "
                            "reindex` adopts it, `slimtune delta gc` moves it to "
                            "quarantine/",
                        )
                    )
        return out

    @classmethod
    def reindex(
        cls, root: str | Path | None = None
    ) -> tuple[DeltaStore, builtins.list[str], builtins.list[tuple[str, str]], Path | None]:
        """Rebuild the index from the manifests in ``objects/``: every folder named ``v<N>``
        that verifies and that the index does not hold becomes version ``v<N>``.

        An unreadable or empty index is first moved aside (to ``index.sqlite.broken-<time>``).
        Tags, notes and parents cannot be recovered from the folders. Returns (store, ids
        added, (folder, why skipped), where the old index went or None).
        """
        store = cls.__new__(cls)
        store._locate(root)
        store.require_writable("reindex")
        aside = None
        try:
            healthy = store._has_index()
            if healthy:
                store._open()
        except DeltaError as e:
            cause = getattr(e.__cause__, "sqlite_errorname", "") or ""
            if "is newer than this slimtune" in str(e) or cause.startswith(
                ("SQLITE_BUSY", "SQLITE_LOCKED")
            ):
                raise  # a later slimtune's index, or one another process is writing, is not broken
            healthy = False
        if not healthy and store.index.exists():
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            aside = store.index.with_name(f"index.sqlite.broken-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                side = store.index.with_name(store.index.name + suffix)
                if side.exists():
                    os.rename(side, aside.with_name(aside.name + suffix))
        store._open(rebuilding=True)
        added: list[str] = []
        skipped: list[tuple[str, str]] = []
        with store._write() as conn:
            known = {r["id"] for r in conn.execute("SELECT id FROM versions")}
            top = store._next_seq(conn) - 1
            for d in store._folders(store.objects):
                m = _FOLDER_SEQ.fullmatch(d.name)
                if d.name in known:
                    continue
                if m is None or "." in d.name:
                    skipped.append((str(d), "not named like a version id (v<N>)"))
                    continue
                try:
                    manifest = verify_delta(d)
                except DeltaError as e:
                    skipped.append((str(d), str(e)))
                    continue
                created = manifest.get("created")
                _insert_version(
                    conn,
                    d.name,
                    int(m.group(1)),
                    manifest,
                    sha256_file(d / MANIFEST),
                    parent=None,
                    created=created if isinstance(created, str) else _now(),
                    note="reindexed",
                )
                added.append(d.name)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('max_seq', ?)", (str(top),)
            )
        return store, added, skipped, aside

    def describe(self, v: Version) -> dict:
        """What ``delta show`` prints. The manifest is read without its method-files check
        (that needs the method registry, so torch: `verify` and applying keep it)."""
        m = v.manifest(method_files=False)
        tags = [t for t, vid in self.tags().items() if vid == v.id]
        return {
            "id": v.id,
            "parent": v.parent,
            "tags": tags,
            "method": v.method,
            "method_config": m.get("method_config"),
            "layers": m.get("layers"),
            "base": m.get("base"),
            # how the base's weights were stored while training (the delta is the
            # full-precision base's either way)
            "quantize": (m.get("training") or {}).get("quantize") or "none",
            "dataset": m.get("dataset"),
            "metrics": m.get("metrics"),
            "created": v.created,
            "bytes": v.bytes,
            "note": v.note,
            "path": str(v.path),
        }

    def add_once(
        self, folder: str | Path, *, parent: str | None = None, note: str | None = None
    ) -> tuple[Version, bool]:
        """Add a delta folder unless a version already holds its manifest byte for byte (an
        add that completed before a kill), so a resumed run is stored once. Returns the
        version and whether it was added now."""
        digest = sha256_file(Path(folder) / MANIFEST)
        for v in self.list():  # the index holds each manifest's SHA-256: no file is re-read
            if v.manifest_sha256 == digest:
                return v, False
        return self.add(folder, parent=parent, note=note), True


def diff(a: Version, b: Version) -> dict:
    """What differs between two versions: config, base, data, metrics, and the tensors."""
    ma, mb = verify_delta(a.path), verify_delta(b.path)  # a damaged file is named, not read

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fields = {}
    for section in ("method_config", "training", "metrics", "base", "dataset"):
        fa, fb = flat(ma.get(section) or {}), flat(mb.get(section) or {})
        for k in sorted(set(fa) | set(fb)):
            if fa.get(k) != fb.get(k):
                fields[f"{section}.{k}"] = (fa.get(k), fb.get(k))
    if ma["method"] != mb["method"]:
        fields["method"] = (ma["method"], mb["method"])
    tensors = _tensor_diff(a.path, b.path, ma, mb)
    return {
        "a": a.id,
        "b": b.id,
        "fields": fields,
        "tensors": tensors,
        "same_base": ma["base"]["fingerprint"] == mb["base"]["fingerprint"],
    }


def _tensor_diff(pa: Path, pb: Path, ma: dict, mb: dict) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(set(ma["files"]) & set(mb["files"])):
        if not name.endswith(".safetensors"):
            continue
        ta, tb = load_file(str(pa / name)), load_file(str(pb / name))
        common = sorted(set(ta) & set(tb))
        changed = 0
        rel = []
        for k in common:
            x, y = ta[k], tb[k]
            if x.shape != y.shape or not (x == y).all():
                changed += 1
                if x.shape == y.shape and x.is_floating_point():
                    d = (x.float() - y.float()).norm() / (x.float().norm() + 1e-12)
                    rel.append(float(d))
        out[name] = {
            "tensors_only_in_a": len(set(ta) - set(tb)),
            "tensors_only_in_b": len(set(tb) - set(ta)),
            "tensors_changed": changed,
            "tensors_same": len(common) - changed,
            "mean_relative_change": (sum(rel) / len(rel)) if rel else 0.0,
        }
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
