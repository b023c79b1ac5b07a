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
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pkstrace import schema
from pkstrace.errors import PkstraceError


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


def _open_tmp(path: Path) -> tuple[int, str]:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise TraceFileError(f"cannot write {path}: {e.strerror or e}") from None
    return fd, tmp


def _finish_tmp(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)
    _chown_to_invoker(tmp)
    os.replace(tmp, path)


def _chown_to_invoker(p: str) -> None:
    """Under sudo, hand the file to the user who ran sudo (as perf does not, but should)."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() == 0 and uid and gid and uid.isdigit() and gid.isdigit():
        try:
            os.chown(p, int(uid), int(gid), follow_symlinks=False)
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
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
        _finish_tmp(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise TraceFileError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


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
        os.close(fd)
        self.rows = 0
        self._row_groups = 0
        self._broken = ""  # why an earlier write failed
        try:
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
                self._tmp, schema.arrow_schema(), compression="zstd")
        except OSError as e:
            _unlink_quietly(self._tmp)
            raise TraceFileError(f"cannot write {self.path}: {e.strerror or e}") from None

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
        self._check_space(table.nbytes, len(events))
        try:
            self._writer.write_table(table)
        except OSError as e:
            self._broken = _one_line(e)
            raise TraceFileError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.rows += len(events)
        self._row_groups += 1

    def _check_space(self, nbytes: int, n: int) -> None:
        try:
            st = os.statvfs(os.path.dirname(self._tmp) or ".")
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        need = nbytes + FOOTER_RESERVE_BYTES + FOOTER_BYTES_PER_ROW_GROUP * (self._row_groups + 1)
        if free < need:
            raise DiskFullError(
                f"output file system of {self.path} is nearly full ({free >> 10} KiB free, "
                f"{need >> 10} KiB needed for {n} more events and the footer): "
                f"stopped writing, {n} events not written")

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
            pq.ParquetFile(self._tmp)  # the footer is there: never rename a corrupt file
            _finish_tmp(self._tmp, self.path)
        except (OSError, pa.ArrowException) as e:
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
            # one column at a time: the peak is the DataFrame plus one column's
            # Arrow buffers, not two copies of everything
            parts = {}
            for c in cols:
                one = pf.read(columns=[c])
                parts[c] = one.to_pandas(ignore_metadata=True, self_destruct=True,
                                         split_blocks=True)[c]
                del one
                pa.default_memory_pool().release_unused()  # hand them back to the OS
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
