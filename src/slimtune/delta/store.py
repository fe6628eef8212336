"""A versioned store of deltas: an SQLite index and the delta folders as files.

Layout under the store root (``--store``, ``$SLIMTUNE_STORE``, else
``$XDG_DATA_HOME/slimtune/store``)::

    index.sqlite        versions, tags, tag history, schema version
    objects/<id>/       one delta folder per version (manifest.json + tensors)
    staging/            folders being added; never visible as versions

Adding a version copies and verifies the delta in ``staging/``, then, inside one SQLite
``BEGIN IMMEDIATE`` transaction (which serialises writers across processes), takes the next
id, renames the folder to ``objects/<id>`` and inserts the row. A process killed before the
commit leaves at most an unindexed folder, which no command shows and ``gc`` removes; the
index is the only source of truth. Tags move in a transaction too and keep their history,
which is what ``rollback`` walks back.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DeltaError, UserInputError
from ..fileio import fsync_dir
from .format import MANIFEST, delta_bytes, read_manifest, verify_delta

SCHEMA_VERSION = 2
TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def default_store_root() -> Path:
    env = os.environ.get("SLIMTUNE_STORE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "slimtune" / "store"


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

    def manifest(self) -> dict:
        return read_manifest(self.path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
}


class DeltaStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_store_root()
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        for d in (self.objects, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.index = self.root / "index.sqlite"
        self._upgrade()

    # -- the index -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.index, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction (across processes)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def schema_version(self) -> int:
        conn = self._connect()
        try:
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            if not has_meta:
                return 0
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            return int(row["value"]) if row else 0
        finally:
            conn.close()

    def _upgrade(self) -> None:
        with self._write() as conn:
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            current = 0
            if has_meta:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                current = int(row["value"]) if row else 0
            if current > SCHEMA_VERSION:
                raise DeltaError(f"{self.index}: schema version {current} is newer than this "
                                 f"slimtune knows ({SCHEMA_VERSION}); upgrade slimtune")
            for v in range(current, SCHEMA_VERSION):
                for stmt in filter(str.strip, _MIGRATIONS[v].split(";")):
                    conn.execute(stmt)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                             "('schema_version', ?)", (str(v + 1),))

    def _row(self, row: sqlite3.Row) -> Version:
        return Version(row["id"], row["seq"], row["parent"], row["method"],
                       row["base_fingerprint"], row["dataset_fingerprint"], row["created"],
                       row["bytes"], row["note"], self.objects / row["id"])

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[Version]:
        conn = self._connect()
        try:
            return [self._row(r) for r in conn.execute("SELECT * FROM versions ORDER BY seq")]
        finally:
            conn.close()

    def tags(self) -> dict[str, str]:
        conn = self._connect()
        try:
            return {r["name"]: r["version"] for r in conn.execute("SELECT * FROM tags")}
        finally:
            conn.close()

    def resolve(self, ref: str) -> Version:
        """A version by id (``v3``), by tag (``prod``), or ``latest``."""
        conn = self._connect()
        try:
            if ref == "latest":
                row = conn.execute("SELECT * FROM versions ORDER BY seq DESC LIMIT 1").fetchone()
            else:
                tag = conn.execute("SELECT version FROM tags WHERE name=?", (ref,)).fetchone()
                vid = tag["version"] if tag else ref
                row = conn.execute("SELECT * FROM versions WHERE id=?", (vid,)).fetchone()
        finally:
            conn.close()
        if row is None:
            raise DeltaError(f"no version or tag {ref!r} in the store {self.root}")
        return self._row(row)

    # -- writing -------------------------------------------------------------------------

    def add(self, folder: str | Path, *, parent: str | None = None, note: str | None = None
            ) -> Version:
        """Copy a delta folder into the store as a new version; return it."""
        folder = Path(folder)
        manifest = verify_delta(folder)
        if parent is not None:
            parent = self.resolve(parent).id
        tmp = self.staging / f"{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for name in manifest["files"]:
                shutil.copy2(folder / name, tmp / name)
            shutil.copy2(folder / MANIFEST, tmp / MANIFEST)
            verify_delta(tmp)  # what landed on disk, not what we meant to copy
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            with self._write() as conn:
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions").fetchone()[0]
                vid = f"v{seq}"
                target = self.objects / vid
                if target.exists():  # an orphan of a killed add: never indexed, safe to drop
                    shutil.rmtree(target)
                os.replace(tmp, target)
                fsync_dir(self.objects)
                try:
                    conn.execute(
                        "INSERT INTO versions (id, seq, parent, method, base_fingerprint, "
                        "dataset_fingerprint, created, bytes, note) VALUES (?,?,?,?,?,?,?,?,?)",
                        (vid, seq, parent, manifest["method"], manifest["base"]["fingerprint"],
                         (manifest.get("dataset") or {}).get("fingerprint"), _now(),
                         delta_bytes(manifest), note))
                except BaseException:
                    shutil.rmtree(target, ignore_errors=True)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.resolve(vid)

    def tag(self, name: str, ref: str) -> tuple[str | None, str]:
        """Point tag ``name`` at ``ref`` atomically; return (previous version, new version)."""
        looks_like_id = name.startswith("v") and name[1:].isdigit()
        if not name or set(name) - TAG_CHARS or name == "latest" or looks_like_id:
            raise UserInputError(f"invalid tag name {name!r}: letters, digits, - _ . only, and "
                                 "not 'latest' or a version id")
        vid = self.resolve(ref).id
        with self._write() as conn:
            old = conn.execute("SELECT version FROM tags WHERE name=?", (name,)).fetchone()
            if old is not None and old["version"] == vid:
                return vid, vid
            now = _now()
            conn.execute("INSERT OR REPLACE INTO tags (name, version, updated) VALUES (?,?,?)",
                         (name, vid, now))
            conn.execute("INSERT INTO tag_history (name, version, at) VALUES (?,?,?)",
                         (name, vid, now))
        return (old["version"] if old else None), vid

    def rollback(self, name: str) -> tuple[str, str]:
        """Move tag ``name`` back to the version it pointed at before; return (from, to)."""
        with self._write() as conn:
            cur = conn.execute("SELECT version FROM tags WHERE name=?", (name,)).fetchone()
            if cur is None:
                raise UserInputError(f"no tag {name!r} in the store {self.root}")
            hist = [r["version"] for r in conn.execute(
                "SELECT version FROM tag_history WHERE name=? ORDER BY seq", (name,))]
            # the history ends with the current version; walk back past repeats of it
            prev = next((v for v in reversed(hist[:-1]) if v != cur["version"]), None)
            if prev is None:
                raise UserInputError(f"tag {name!r} has no earlier version to roll back to")
            exists = conn.execute("SELECT 1 FROM versions WHERE id=?", (prev,)).fetchone()
            if not exists:
                raise DeltaError(f"tag {name!r} pointed at {prev}, which has been removed")
            conn.execute("UPDATE tags SET version=?, updated=? WHERE name=?", (prev, _now(), name))
            # forget the rolled-back entry so a second rollback goes further back
            last = conn.execute("SELECT MAX(seq) FROM tag_history WHERE name=?", (name,)).fetchone()
            conn.execute("DELETE FROM tag_history WHERE seq=?", (last[0],))
        return cur["version"], prev

    def remove(self, ref: str, *, force: bool = False) -> str:
        v = self.resolve(ref)
        with self._write() as conn:
            tags = [r["name"] for r in conn.execute("SELECT name FROM tags WHERE version=?",
                                                    (v.id,))]
            children = [r["id"] for r in conn.execute("SELECT id FROM versions WHERE parent=?",
                                                      (v.id,))]
            if (tags or children) and not force:
                deps = ([f"tag {t}" for t in tags] + [f"version {c} (its parent)" for c in children])
                raise UserInputError(f"{v.id} is still used by {', '.join(deps)}; "
                                     "pass --force to remove it anyway")
            conn.execute("DELETE FROM tags WHERE version=?", (v.id,))
            conn.execute("UPDATE versions SET parent=NULL WHERE parent=?", (v.id,))
            conn.execute("DELETE FROM versions WHERE id=?", (v.id,))
        shutil.rmtree(v.path, ignore_errors=True)  # after the commit: at worst an orphan
        return v.id

    def gc(self) -> list[str]:
        """Remove folders no version owns (killed adds, removals cut short) and staging."""
        known = {v.id for v in self.list()}
        removed = []
        for d in self.objects.iterdir():
            if d.name not in known:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
        for d in self.staging.iterdir():
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()
            removed.append(str(d))
        return removed

    def verify(self, ref: str | None = None) -> list[tuple[str, str | None]]:
        """(id, problem or None) for one version or all; checksums of every file."""
        versions = [self.resolve(ref)] if ref else self.list()
        out = []
        for v in versions:
            try:
                manifest = verify_delta(v.path)
                if manifest["base"]["fingerprint"] != v.base_fingerprint:
                    raise DeltaError(f"{v.path / MANIFEST}: base fingerprint differs from the "
                                     "index")
                out.append((v.id, None))
            except DeltaError as e:
                out.append((v.id, str(e)))
        return out

    def describe(self, v: Version) -> dict:
        m = v.manifest()
        tags = [t for t, vid in self.tags().items() if vid == v.id]
        return {"id": v.id, "parent": v.parent, "tags": tags, "method": v.method,
                "method_config": m.get("method_config"), "layers": m.get("layers"),
                "base": m.get("base"), "dataset": m.get("dataset"), "metrics": m.get("metrics"),
                "created": v.created, "bytes": v.bytes, "note": v.note, "path": str(v.path)}


def diff(a: Version, b: Version) -> dict:
    """What differs between two versions: config, base, data, metrics, and the tensors."""
    ma, mb = a.manifest(), b.manifest()

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
    return {"a": a.id, "b": b.id, "fields": fields, "tensors": tensors,
            "same_base": ma["base"]["fingerprint"] == mb["base"]["fingerprint"]}


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
        out[name] = {"tensors_only_in_a": len(set(ta) - set(tb)),
                     "tensors_only_in_b": len(set(tb) - set(ta)), "tensors_changed": changed,
                     "tensors_same": len(common) - changed,
                     "mean_relative_change": (sum(rel) / len(rel)) if rel else 0.0}
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
