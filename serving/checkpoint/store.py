"""Where session logs live: a directory, local or shared, reached through fsspec.

Layout::

    <root>/longllava-sessions.json       marks the directory as a session store
    <root>/sessions/<session id>/        one directory per session, holding
        owner-<generation>               one file per owner that took the session
        log-<generation>-<seq>           records, appended as steps happen
        snap-<seq>-<generation>.segment  a snapshot's K/V rows, tokens and step table
        snap-<seq>-<generation>.point    its Mamba states: a rollback target

What a store must guarantee (a local disk and NFS do; a bucket mounted through a FUSE
layer that lacks any of these does not qualify):

- **Append** to an open file, and a flush that makes the bytes readable by others.
- **Atomic rename** within a directory: a snapshot is written under a temporary name and
  renamed, so a reader sees all of it or none.
- **Exclusive create** (``O_EXCL``): two engines claiming the same owner generation
  cannot both succeed. This is the fence that keeps a session to one writer.
- **Read-after-write** across machines once a file is closed or flushed.

``fsync`` is called on local filesystems so that a durable step survives a power cut;
other fsspec filesystems are trusted to make a closed file durable.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import SessionLogError, StoreUnavailableError, UnknownSessionError

MARKER = "longllava-sessions.json"
FORMAT = {"format": "longllava.session_store", "version": 1}
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_TMP = ".tmp-"


def check_session_id(session: object) -> str:
    """A session id is URL-safe base64 of 8 to 64 characters; anything else (a path, a
    huge string, not a string) never reaches the filesystem."""
    if not isinstance(session, str) or not _SESSION_ID.match(session):
        raise UnknownSessionError(f"unknown session {str(session)[:64]!r}")
    return session


class DirectoryStore:
    """Session logs under one directory or fsspec URL (``/data/sessions``, ``file:///...``,
    ``memory://...``). ``key`` (bytes) turns on HMAC-SHA256 authentication of every record;
    every engine sharing the directory must use the same key.
    """

    def __init__(self, url: str | Path, key: bytes | None = None, *, fs: fsspec.AbstractFileSystem | None = None):
        if fs is None:
            fs, url = fsspec.core.url_to_fs(str(url))
        self.fs, self.root, self.key = fs, str(url).rstrip("/"), key
        self.local = isinstance(fs, LocalFileSystem)
        self._open_marker()

    def __repr__(self) -> str:
        return f"DirectoryStore({self.root!r}, authenticated={self.key is not None})"

    def _open_marker(self) -> None:
        marker = f"{self.root}/{MARKER}"
        try:
            if self.fs.exists(marker):
                found = json.loads(self.fs.cat_file(marker))
                if found != FORMAT:
                    raise SessionLogError(f"{self.root} is a session store of another format or version: {found}")
                return
            if self.fs.exists(self.root) and self.fs.ls(self.root, detail=False):
                raise SessionLogError(f"{self.root} is not empty and is not a session store (no {MARKER})")
            self.fs.makedirs(f"{self.root}/sessions", exist_ok=True)
            self._write_atomic(self.root, MARKER, json.dumps(FORMAT).encode())
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, SessionLogError):
                raise
            raise SessionLogError(f"{marker} is not a valid store marker: {exc}") from None
        except OSError as exc:
            raise StoreUnavailableError(f"cannot use {self.root} as a session store: {exc}") from None

    # ------------------------------------------------------------------ paths
    def _dir(self, session: str) -> str:
        return f"{self.root}/sessions/{check_session_id(session)}"

    def path(self, session: str, name: str) -> str:
        return f"{self._dir(session)}/{name}"

    # ------------------------------------------------------------------ reading
    def has(self, session: str) -> bool:
        return self.fs.exists(self._dir(session))

    def sessions(self) -> list[str]:
        return sorted(Path(p).name for p in self.fs.ls(f"{self.root}/sessions", detail=False))

    def files(self, session: str) -> dict[str, int]:
        """The session's files (temporary ones left by a crash excluded) and their sizes."""
        try:
            entries = self.fs.ls(self._dir(session), detail=True)
        except FileNotFoundError:
            return {}
        return {Path(e["name"]).name: int(e["size"]) for e in entries if not Path(e["name"]).name.startswith(_TMP)}

    def exists(self, session: str, name: str) -> bool:
        return self.fs.exists(self.path(session, name))

    def open_read(self, session: str, name: str) -> IO[bytes]:
        return self.fs.open(self.path(session, name), "rb")

    # ------------------------------------------------------------------ writing
    def create_session(self, session: str) -> None:
        self.fs.makedirs(self._dir(session), exist_ok=True)

    def create_exclusive(self, session: str, name: str, data: bytes) -> bool:
        """Create ``name`` unless it exists; False if another writer got there first."""
        try:
            with self.fs.open(self.path(session, name), "xb") as f:
                f.write(data)
                self._fsync(f)
        except FileExistsError:
            return False
        self._fsync_dir(self._dir(session))
        return True

    def write_atomic(self, session: str, name: str, data: bytes) -> None:
        self._write_atomic(self._dir(session), name, data)

    def _write_atomic(self, directory: str, name: str, data: bytes) -> None:
        tmp = f"{directory}/{_TMP}{secrets.token_hex(8)}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            self._fsync(f)
        self.fs.mv(tmp, f"{directory}/{name}")
        self._fsync_dir(directory)

    def open_append(self, session: str, name: str) -> IO[bytes]:
        return self.fs.open(self.path(session, name), "ab")

    def sync(self, f: IO[bytes]) -> None:
        """Make what was appended to ``f`` durable and visible to other readers."""
        f.flush()
        self._fsync(f)

    def truncate(self, session: str, name: str, size: int) -> None:
        """Cut a file back to ``size`` bytes (what a failed append left after it goes)."""
        with self.fs.open(self.path(session, name), "r+b") as f:
            f.truncate(size)
            self._fsync(f)

    def link(self, source: str, name: str, target: str) -> None:
        """Give ``target`` an immutable file of ``source``: a hard link on a local disk, a copy elsewhere."""
        src, dst = self.path(source, name), self.path(target, name)
        if self.local:
            os.link(src, dst)
        else:
            self.fs.cp_file(src, dst)

    def delete(self, session: str, names: list[str]) -> None:
        for name in names:
            try:
                self.fs.rm_file(self.path(session, name))
            except FileNotFoundError:
                pass

    def delete_session(self, session: str) -> None:
        try:
            self.fs.rm(self._dir(session), recursive=True)
        except FileNotFoundError:
            pass

    def _fsync(self, f: IO[bytes]) -> None:
        if self.local:
            f.flush()
            os.fsync(f.fileno())

    def _fsync_dir(self, directory: str) -> None:
        if self.local:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
