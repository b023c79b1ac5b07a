"""Read and write ``.pkstrace`` files: one Parquet file (zstd) plus JSON metadata.

Any Parquet reader (pandas, polars, DuckDB) opens the file without pkstrace; the
metadata document sits in the Parquet footer under the key ``pkstrace``.

Writes are atomic: rows go to a temporary file beside the target, which is
renamed over the target only when complete, so a crash never leaves half a file
under the real name. :class:`TraceWriter` streams row groups for the recorder,
so that what was recorded so far survives an error (see ``abort(keep=True)``).
"""

from __future__ import annotations

import json
import os
import resource
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pkstrace import schema
from pkstrace.errors import PkstraceError

# Columns decoded at once by read_trace(low_memory=True): one per core of a small host.
READ_THREADS = 2


class TraceFileError(PkstraceError):
    """A trace file cannot be read or written (message is one line)."""


def _table(events: pd.DataFrame) -> pa.Table:
    problems = schema.validate(events)
    if problems:
        raise TraceFileError("events table does not match the schema: " + "; ".join(problems[:3]))
    events = events[list(schema.COLUMN_NAMES)]
    table = pa.Table.from_pandas(events, preserve_index=False)
    # Drop pandas' own metadata: the schema module, not pandas, defines dtypes.
    return table.cast(schema.arrow_schema()).replace_schema_metadata(None)


def _meta_bytes(meta: schema.TraceMeta) -> bytes:
    return json.dumps(meta.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _check_target(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise TraceFileError(f"{path} exists (use --force to overwrite)")
    if path.is_dir():
        raise TraceFileError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TraceFileError(f"cannot write {path}: directory {parent} does not exist")
    check_invoker_may_write(path)


def _open_tmp(path: Path) -> tuple[int, str]:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        # O_EXCL under a random name: a symlink planted beside the target is never followed
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise TraceFileError(f"cannot write {path}: {e.strerror or e}") from None
    return fd, tmp


def _seal(fd: int) -> None:
    """Final mode and owner, through the open file (a path could be swapped meanwhile)."""
    os.fchmod(fd, 0o644)
    ids = invoker()
    if ids is not None:
        try:
            os.fchown(fd, *ids)
        except OSError:
            pass


def invoker() -> tuple[int, int] | None:
    """(uid, gid) of the user who ran ``sudo pkstrace ...``; None when not under sudo."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() == 0 and uid and gid and uid.isdigit() and gid.isdigit() and int(uid):
        return int(uid), int(gid)
    return None


def check_invoker_may_write(path: Path) -> None:
    """Under sudo, write only where the invoking user could have written: a symlinked
    directory (or a path) leading into /etc or another user's files is refused, as is
    replacing another user's file in a sticky directory such as /tmp."""
    ids = invoker()
    if ids is None:
        return
    uid, gid = ids
    parent = path.parent if str(path.parent) else Path(".")
    if not _user_can_write_dir(str(parent), uid, gid):
        raise TraceFileError(f"cannot write {path}: running under sudo, and the invoking user "
                             f"(uid {uid}) could not write in {os.path.realpath(parent)}")
    try:
        st_dir, st = os.stat(parent), os.lstat(path)
    except OSError:
        return
    if st_dir.st_mode & stat.S_ISVTX and uid not in (st.st_uid, st_dir.st_uid):
        raise TraceFileError(f"cannot write {path}: it belongs to uid {st.st_uid} in a sticky "
                             f"directory, and the invoking user is uid {uid}")


def _user_can_write_dir(directory: str, uid: int, gid: int) -> bool:
    """Ask the kernel, as that user (a forked child drops to uid/gid and its groups):
    search permission on every parent, write permission, ACLs all count."""
    import pwd

    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        groups = [gid]
    pid = os.fork()
    if pid == 0:  # the child only makes system calls, then _exit
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os._exit(0 if os.access(directory, os.W_OK | os.X_OK) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def create_output(path: str | os.PathLike[str], mode: str = "wb") -> tuple[IO[Any], str]:
    """Start writing an output file (report, export, bench): a new temporary file beside
    ``path``, opened; :func:`finish_output` moves it into place. Created with O_EXCL
    (never through a planted symlink) and, under sudo, only where the invoking user
    could write; finished with mode 0644, owned by that user."""
    path = Path(path)
    check_invoker_may_write(path)
    fd, tmp = _open_tmp(path)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})), tmp


def create_output_dir(path: str | os.PathLike[str]) -> None:
    """A directory for several outputs (export csv/parquet): under sudo, only where the
    invoking user could create it, and then owned by that user."""
    path = Path(path)
    if path.is_dir():
        check_invoker_may_write(path / "x")
        return
    check_invoker_may_write(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = invoker()
    if ids is not None:
        os.chown(path, *ids, follow_symlinks=False)


def finish_output(f: IO[Any], tmp: str, path: str | os.PathLike[str]) -> None:
    f.flush()
    _seal(f.fileno())
    f.close()
    os.replace(tmp, path)


def _finish_tmp(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)
    _chown_to_invoker(tmp)
    os.replace(tmp, path)


def _chown_to_invoker(p: str) -> None:
    """Under sudo, hand the file to the user who ran sudo (as perf does not, but should)."""
    ids = invoker()
    if ids is not None:
        try:
            os.chown(p, *ids, follow_symlinks=False)
        except OSError:
            pass


def write_trace(path: str | os.PathLike[str], trace: schema.Trace, force: bool = False,
                row_group_size: int = 1 << 20) -> Path:
    """Write a whole trace atomically. Returns the path written."""
    path = Path(path)
    _check_target(path, force)
    table = _table(trace.events)
    table = table.replace_schema_metadata({schema.META_KEY: _meta_bytes(trace.meta)})
    fd, tmp = _open_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)
            f.flush()
            _seal(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise TraceFileError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def _close_quietly(f: IO[Any]) -> None:
    try:
        f.close()
    except OSError:  # ENOSPC flushing what is buffered: the file is discarded anyway
        pass


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


class DiskFullError(TraceFileError):
    """The output file system is (nearly) full: the batch was not written, and the file
    so far is intact, with room kept for its footer (``close`` still works)."""


# Room kept free on the output file system for the footer (schema, row-group index,
# metadata document): a batch that would eat into it is refused before any byte of
# it is written, because a Parquet file cut short by ENOSPC has no footer and
# cannot be read at all.
FOOTER_RESERVE_BYTES = 1 << 20
FOOTER_BYTES_PER_ROW_GROUP = 8 << 10


class TraceWriter:
    """Streams events into a trace file, batch by batch (used by the recorder).

    The metadata is written when the file is closed (it holds figures such as
    lost events that are only known at the end). Before each batch the free space
    is checked (:class:`DiskFullError`); a write that fails anyway marks the file
    broken, and ``close`` then refuses to move an unreadable file into place.
    """

    def __init__(self, path: str | os.PathLike[str], force: bool = False) -> None:
        self.path = Path(path)
        _check_target(self.path, force)
        fd, self._tmp = _open_tmp(self.path)
        self._file = os.fdopen(fd, "wb")
        self.rows = 0
        self._row_groups = 0
        self._broken = ""  # why an earlier write failed
        writer = None
        try:
            writer = pq.ParquetWriter(self._file, schema.arrow_schema(), compression="zstd")
            self._file.flush()  # the header now: a full disk is found before attaching
        except OSError as e:
            if writer is not None:  # closed now, or its __del__ prints a traceback later
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the file is discarded
                    pass
            _close_quietly(self._file)
            _unlink_quietly(self._tmp)
            raise TraceFileError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._writer: pq.ParquetWriter | None = writer

    @property
    def tmp_path(self) -> str:
        return self._tmp

    def write(self, events: pd.DataFrame) -> None:
        if self._writer is None:
            raise TraceFileError("trace writer is closed")
        if self._broken:
            raise TraceFileError(f"cannot write {self.path}: {self._broken}")
        if len(events) == 0:
            return
        table = _table(events)
        total = len(table)
        for _ in range(16):  # each round writes a part that surely fits, then measures
            room, limit = self._room()
            if room is None or self._need(table) <= room:
                self._write_table(table)
                return
            k = int(len(table) * room / self._need(table)) if room > 0 else 0
            if k == 0:
                break
            self._write_table(table.slice(0, k))
            table = table.slice(k)
        where = (f"output file system of {self.path} is nearly full" if limit is None else
                 f"{self.path} is near the file size limit ({limit >> 10} KiB, ulimit -f)")
        raise DiskFullError(
            f"{where} ({max(room or 0, 0) >> 10} KiB left besides {self._reserve() >> 10} KiB "
            f"kept for the footer): stopped writing, {len(table)} of the last {total} events "
            "not written")

    def _need(self, table: pa.Table) -> int:
        """Bytes ``table`` may take in the file: Arrow's size (far above the compressed
        one) until rows were written, then twice the compressed bytes per row so far."""
        if not self.rows:
            return table.nbytes
        return min(table.nbytes, 2 * len(table) * self._file.tell() // self.rows + 4096)

    def _write_table(self, table: pa.Table) -> None:
        assert self._writer is not None
        try:
            self._writer.write_table(table)
        except OSError as e:
            self._broken = _one_line(e)
            raise TraceFileError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.rows += len(table)
        self._row_groups += 1

    def _reserve(self) -> int:
        return FOOTER_RESERVE_BYTES + FOOTER_BYTES_PER_ROW_GROUP * (self._row_groups + 1)

    def _room(self) -> tuple[int | None, int | None]:
        """Bytes that batches may still use (None: unknown), and the file size limit
        when that, not the file system's free space, is what bounds them."""
        room = None
        try:
            st = os.statvfs(os.path.dirname(self._tmp) or ".")
            room = st.f_bavail * st.f_frsize - self._reserve()
        except OSError:
            pass
        # RLIMIT_FSIZE: past it a write fails with EFBIG (Python ignores SIGXFSZ) in the
        # middle of a row group, which leaves a file without a footer: check it as free space.
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            left = limit - self._file.tell() - self._reserve()
            if room is None or left < room:
                return left, limit
        return room, None

    def close(self, meta: schema.TraceMeta) -> Path:
        """Finish the file with its metadata and move it into place."""
        if self._writer is None:
            raise TraceFileError("trace writer is closed")
        if self._broken:
            self.abort()
            raise TraceFileError(f"cannot write {self.path}: {self._broken}; the unfinished "
                                 "file had no footer (unreadable) and was removed")
        w, self._writer = self._writer, None
        try:
            w.add_key_value_metadata({schema.META_KEY: _meta_bytes(meta)})
            w.close()
            self._file.flush()
            _seal(self._file.fileno())
            self._file.close()
            pq.ParquetFile(self._tmp)  # the footer is there: never rename a corrupt file
            os.replace(self._tmp, self.path)
        except (OSError, pa.ArrowException) as e:
            _close_quietly(self._file)
            _unlink_quietly(self._tmp)
            raise TraceFileError(f"cannot write {self.path}: {_one_line(e)}") from None
        return self.path

    def abort(self) -> None:
        """Throw the partial file away."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        _close_quietly(self._file)
        _unlink_quietly(self._tmp)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self.abort()


def read_meta(path: str | os.PathLike[str]) -> schema.TraceMeta:
    """Read only the metadata (cheap: the footer)."""
    pf = _open_parquet(Path(path))
    return _meta_of(pf, Path(path))


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise TraceFileError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFileError(f"{path}: is a directory")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
    except OSError as e:
        raise TraceFileError(f"{path}: {e.strerror or e}") from None
    if size == 0:
        raise TraceFileError(f"{path}: empty file")
    if head != b"PAR1":
        raise TraceFileError(f"{path}: not a pkstrace file (no Parquet header)")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged footer
        raise TraceFileError(f"{path}: corrupt or truncated trace file ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _meta_of(pf: pq.ParquetFile, path: Path) -> schema.TraceMeta:
    kv = pf.schema_arrow.metadata or {}
    raw = kv.get(schema.META_KEY)
    if raw is None:
        kv2 = pf.metadata.metadata or {}
        raw = kv2.get(schema.META_KEY)
    if raw is None:
        raise TraceFileError(f"{path}: Parquet file without pkstrace metadata (not a trace)")
    try:
        meta = schema.TraceMeta.from_json(json.loads(raw))
        _check_host_cpus(meta.host)
    # OverflowError: 1e400 in a number field; RecursionError: JSON nested thousands deep
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise TraceFileError(f"{path}: corrupt trace metadata ({_one_line(e)})") from None
    if meta.format_version > schema.FORMAT_VERSION:
        raise TraceFileError(
            f"{path}: trace format version {meta.format_version} is newer than this "
            f"pkstrace understands ({schema.FORMAT_VERSION}); upgrade pkstrace")
    if meta.format_version < 1:
        raise TraceFileError(f"{path}: unknown trace format version {meta.format_version}")
    return meta


def _check_host_cpus(host: dict[str, Any]) -> None:
    """The host's CPU lists feed every analysis: refuse anything but lists of integers."""
    for key in ("online_cpus", "isolated_cpus", "nohz_full_cpus"):
        v = host.get(key)
        if v is not None and not (isinstance(v, list) and all(
                isinstance(c, int) and not isinstance(c, bool) for c in v)):
            raise ValueError(f"host.{key} is not a list of CPU numbers")


def read_trace(path: str | os.PathLike[str], columns: list[str] | None = None,
               low_memory: bool = False) -> schema.Trace:
    """Read a trace. Raises TraceFileError with a one-line message on bad input.

    ``low_memory``: free the Arrow buffers column by column while converting to
    pandas (peak memory about one copy of the columns instead of two; used by
    ``pkstrace replay`` on large traces).
    """
    path = Path(path)
    pf = _open_parquet(path)
    meta = _meta_of(pf, path)
    names = set(pf.schema_arrow.names)
    missing = [c for c in schema.COLUMN_NAMES if c not in names]
    if missing:
        raise TraceFileError(f"{path}: trace lacks columns {missing[:5]}")
    cols = list(columns) if columns is not None else list(schema.COLUMN_NAMES)
    try:
        if low_memory:
            # one column at a time per thread: the peak is the DataFrame plus the
            # Arrow buffers of the columns being converted, not two copies of
            # everything. Decoding one column is single-threaded in Arrow, so two
            # threads (each with its own reader) decode two columns at once.
            def one_column(c: str) -> pd.Series:
                one = (pf if len(cols) == 1 else pq.ParquetFile(path)).read(
                    columns=[c], use_threads=False)
                s = one.to_pandas(ignore_metadata=True, self_destruct=True,
                                  split_blocks=True)[c]
                del one
                pa.default_memory_pool().release_unused()  # hand them back to the OS
                return s

            with ThreadPoolExecutor(READ_THREADS) as pool:
                parts = dict(zip(cols, pool.map(one_column, cols), strict=True))
            df = pd.DataFrame(parts, copy=False)
            del parts
        else:
            table = pf.read(columns=cols)
            df = table.to_pandas(ignore_metadata=True)
            del table
    except Exception as e:
        raise TraceFileError(f"{path}: corrupt or truncated trace file ({_one_line(e)})") from None
    try:
        if columns is None:
            df = schema.normalize(df)
        else:
            _check_columns(df)
    except (ValueError, TypeError, OverflowError) as e:
        raise TraceFileError(f"{path}: {_one_line(e)}") from None
    return schema.Trace(events=df, meta=meta)


def _check_columns(df: pd.DataFrame) -> None:
    """A column subset gets the checks normalize() gives a whole table: known event
    kinds (an unknown one would otherwise be dropped silently by the analysis) and
    the schema's dtypes (a foreign Parquet file may store them differently)."""
    for name in df.columns:
        c = schema.column(name)
        if c.dtype == "kind":
            v = df[name]
            if isinstance(v.dtype, pd.CategoricalDtype):
                bad = sorted(set(map(str, v.cat.categories)) - set(schema.KINDS))
                if bad:
                    raise ValueError(f"unknown event kinds: {bad[:5]}")
                if v.dtype != schema.KIND_DTYPE:
                    # recode to the schema's categories (codes only: normalize() on
                    # this one column would build a whole NA-filled table first)
                    df[name] = pd.Categorical(v, dtype=schema.KIND_DTYPE)
            else:
                df[name] = schema.normalize({"kind": v})["kind"]
        elif c.dtype != "category" and df[name].dtype != c.dtype:
            df[name] = df[name].to_numpy().astype(c.dtype)
