"""Run storage: where a run's files live, named by a local path or a URI.

A run's config, metrics tables, checkpoints, summary, plots, per-site and adapted models live
in one folder of *run storage*: a local folder by default, or an object store when the nodes of
a cluster share no disk (``s3://bucket/prefix``, ``gs://bucket/prefix``: whatever
``pyarrow.fs.FileSystem.from_uri`` opens, the layer Ray Train's ``storage_path`` uses). A
serving replica on a site's node and a resumed driver then find what they need by one name.

Why write through the file-system API rather than keep a local copy and sync it: every file of
a run is small and made in memory (``torch.save``, parquet, YAML, JSON and PNG all go to bytes
first), so one upload per file is the whole cost, and there is no second copy that could
disagree with storage after a crash.

Every write is whole-or-nothing for readers. A local file is written to a temporary file,
fsynced (unless ``durable=False``) and ``os.replace``d; an object is uploaded from bytes in
memory in one stream, and the store shows it only once complete (S3 reads are strongly
consistent after writes, so the ``latest`` pointer written after its checkpoint never names a
missing object).

Credentials and endpoints come from the store's usual settings, never from the project's
config: for S3 the AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``; ``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), ``~/.aws``,
or the instance's role; or pyarrow's options in the URI's query
(``s3://bucket/runs?endpoint_override=host:9000&scheme=http``).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """Run storage that cannot be opened or used; the message names the location."""


def is_uri(where: str | os.PathLike[str]) -> bool:
    """Whether ``where`` names object storage (a ``scheme://`` other than ``file://``)."""
    if isinstance(where, Location):
        return not where.is_local
    m = _SCHEME.match(os.fspath(where))
    return m is not None and m.group(1).lower() != "file"


@dataclass(frozen=True)
class FileEntry:
    """A file in a folder listing: its name, size in bytes and modification time (epoch s)."""

    name: str
    size: int
    mtime: float


class Location:
    """A file or folder in run storage: a local path, or a path in an object store.

    It reads like :class:`pathlib.Path` where the two agree (``/``, ``name``, ``parent``,
    ``exists``, ``read_bytes``, ...). A local location is also ``os.PathLike``, so pandas,
    numpy and ``open`` take it; an object-store one refuses to pose as a local file. Naming
    touches no network: the store's file system is opened on first I/O (once per process and
    store, :func:`_filesystem`), and a pickled location carries its URI, never credentials.
    """

    __slots__ = ("_key", "_local", "_query", "_store")

    def __init__(self, where: PathLike) -> None:
        if isinstance(where, Location):
            self._local, self._store = where._local, where._store
            self._key, self._query = where._key, where._query
            return
        text = os.fspath(where)
        m = _SCHEME.match(text)
        if m is None or m.group(1).lower() == "file":
            self._store, self._key, self._query = "", "", ""
            self._local: Path | None = Path(text[m.end():] if m else text).expanduser()
            return
        parts = urlsplit(text)
        if not parts.netloc:
            raise StorageError(f"run storage {text!r} names no bucket or host")
        self._local = None
        self._store = f"{parts.scheme.lower()}://{parts.netloc}"
        self._key, self._query = parts.path.rstrip("/"), parts.query

    def _child(self, key: str) -> Location:
        loc = Location.__new__(Location)
        loc._local, loc._store, loc._query, loc._key = None, self._store, self._query, key
        return loc

    def _open(self) -> tuple[Any, str]:
        """The store's pyarrow file system and this location's path in it."""
        root = self._store + (f"?{self._query}" if self._query else "")
        fs, base = _filesystem(root, _store_environment())
        return fs, (base.rstrip("/") + self._key) if base else (self._key or "/")

    # ------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        return self._local is not None

    @property
    def path(self) -> Path:
        """The local path (an object-store location has none: :class:`StorageError`)."""
        if self._local is None:
            raise StorageError(f"{self} is in object storage, not on a local disk")
        return self._local

    def __fspath__(self) -> str:
        if self._local is None:
            raise TypeError(f"{self} is in object storage, not a local file: read it through "
                            "metalearn.storage.Location")
        return str(self._local)

    def __truediv__(self, name: str | os.PathLike[str]) -> Location:
        name = os.fspath(name)
        if self._local is not None:
            return Location(self._local / name)
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"{name!r} is not a relative name inside {self}")
        return self._child(f"{self._key}/{name.strip('/')}")

    @property
    def name(self) -> str:
        return self._local.name if self._local is not None else posixpath.basename(self._key)

    @property
    def parent(self) -> Location:
        if self._local is not None:
            return Location(self._local.parent)
        return self._child(posixpath.dirname(self._key).rstrip("/"))

    def resolve(self) -> Location:
        """An absolute location (a local path made absolute; a URI is already)."""
        return Location(self._local.resolve()) if self._local is not None else self

    def __str__(self) -> str:
        if self._local is not None:
            return str(self._local)
        return self._store + self._key + (f"?{self._query}" if self._query else "")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return str(self) == str(other) and self.is_local == other.is_local
        if isinstance(other, os.PathLike) and self._local is not None:
            return self._local == Path(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Location, (str(self),))

    # ------------------------------------------------------------------ reading

    def _info(self) -> Any:
        fs, path = self._open()
        return fs.get_file_info(path)

    def exists(self) -> bool:
        if self._local is not None:
            return self._local.exists()
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        if self._local is not None:
            return self._local.is_file()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self._local is not None:
            return self._local.is_dir()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        """The whole file; :class:`FileNotFoundError` when there is none."""
        if self._local is not None:
            return self._local.read_bytes()
        fs, path = self._open()
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no file {self}") from None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                raise FileNotFoundError(f"no file {self}") from None
            raise

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def files(self) -> list[FileEntry]:
        """The files directly in this folder, with size and modification time (none: [])."""
        if self._local is not None:
            if not self._local.is_dir():
                return []
            out = []
            for entry in os.scandir(self._local):
                if entry.is_file():
                    st = entry.stat()
                    out.append(FileEntry(entry.name, st.st_size, st.st_mtime))
            return out
        import pyarrow.fs as pafs

        fs, path = self._open()
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [FileEntry(i.base_name, int(i.size or 0),
                          i.mtime.timestamp() if i.mtime is not None else 0.0)
                for i in infos if i.type == pafs.FileType.File]

    def iterdir(self) -> list[Location]:
        """Everything directly in this folder (files and folders)."""
        if self._local is not None:
            return [Location(p) for p in self._local.iterdir()]
        import pyarrow.fs as pafs

        fs, path = self._open()
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [self / i.base_name for i in infos]

    def change_marker(self) -> tuple[int, int, int] | None:
        """What changes whenever a local file is replaced (inode, mtime, size), so a poller
        can skip re-reading it; None in an object store, whose modification times are too
        coarse for that: re-read the (small) file instead. FileNotFoundError if missing."""
        if self._local is None:
            return None
        st = os.stat(self._local)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    # ------------------------------------------------------------------ writing

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Make the local folder (and parents); object stores have no folders to make."""
        if self._local is not None:
            self._local.mkdir(parents=parents, exist_ok=exist_ok)

    def write_bytes(self, data: bytes, *, durable: bool = True) -> None:
        """Replace the file with ``data``: readers see the old file or the new one, never half.

        ``durable`` fsyncs a local file before it replaces the old one (checkpoints); an
        object store's upload is durable once it returns.
        """
        if self._local is not None:
            _replace_local(self._local, data, durable)
            return
        fs, path = self._open()
        try:
            with fs.open_output_stream(path) as out:
                out.write(data)
        except OSError as err:
            raise StorageError(f"cannot write {self}: {err}") from None

    def write_text(self, text: str, *, durable: bool = True) -> None:
        self.write_bytes(text.encode(), durable=durable)

    def unlink(self, missing_ok: bool = True) -> None:
        if self._local is not None:
            self._local.unlink(missing_ok=missing_ok)
            return
        fs, path = self._open()
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise


PathLike: TypeAlias = "str | os.PathLike[str] | Location"


def _replace_local(path: Path, data: bytes, durable: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store_environment() -> tuple[tuple[str, str], ...]:
    """The settings object-store clients read from the environment (a file system opened
    under other settings, e.g. another endpoint, is not reused)."""
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.startswith(("AWS_", "GOOGLE_", "AZURE_", "ARROW_"))))


@functools.lru_cache(maxsize=16)
def _filesystem(root: str, environment: tuple[tuple[str, str], ...]) -> tuple[Any, str]:
    """pyarrow's file system for a store's root URI, opened once per process and settings
    (opening one may cost a request: S3 looks up the bucket's region)."""
    import pyarrow.fs as pafs  # the object-store layer, only where one is named

    try:
        return pafs.FileSystem.from_uri(root)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise StorageError(f"cannot open run storage {root!r}: {err}") from None


def location(where: PathLike) -> Location:
    """``where`` as a :class:`Location` (a Location is returned as is)."""
    return where if isinstance(where, Location) else Location(where)
