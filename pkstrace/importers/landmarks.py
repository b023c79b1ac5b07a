"""The fast path: cut well-formed trace lines into fields with numpy, no regex.

Every ftrace / perf script event line has fixed landmarks: the ``[cpu]`` field,
the ``": "`` that ends the timestamp and the ``": "`` that ends the event name.
Their byte positions are found for all lines at once (``np.searchsorted`` over
the positions of each landmark in the whole chunk), numbers are read from
fixed-width windows, and every row is checked against the layout it must have.
A row that does not pass every check is *not* guessed at: it is handed to the
RE2 path (and, failing that, classified as a non-event line). So this module
only has to be fast and strict, never clever.

The kernel's own widths help: ftrace prints ``%16s-%-7d [%03d] `` and perf
``%16s %5d [%03d] ``, so windows of a few dozen bytes hold every field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema
from pkstrace.importers.common import HeaderFields

SP, COLON, LBR, RBR, DASH, DOT, SLASH = (ord(c) for c in " :[]-./")
LPAREN, RPAREN, GT = ord("("), ord(")"), ord(">")
PAD = 64  # zero bytes after the chunk so windows never read past it


@dataclass
class FastFields(HeaderFields):
    """The header fields of the rows the fast path accepted, and ``rows``: their line
    numbers in the chunk."""

    rows: np.ndarray


def _lut(chars: bytes, values: list[int] | None = None, default: int = -1) -> np.ndarray:
    t = np.full(256, default, np.int16)
    for i, c in enumerate(chars):
        t[c] = i if values is None else values[i]
    return t


_IS_DIGIT = np.zeros(256, bool)
_IS_DIGIT[ord("0"):ord("9") + 1] = True
# flags column, position by position (Documentation/trace/ftrace.rst)
_F0 = _lut(b".dDbX", [0, 1, 1, 0, -1], default=-2)  # irqs off; -2 = not a flag char
_F1 = _lut(b".NnpBbLl", [0] * 8, default=-2)  # need-resched (not kept)
_F2 = _lut(b".shHzZ", [schema.IrqCtx.TASK, schema.IrqCtx.SOFTIRQ, schema.IrqCtx.HARDIRQ,
                       schema.IrqCtx.HARDIRQ, schema.IrqCtx.NMI, schema.IrqCtx.NMI], default=-2)
_F3 = _lut(b".0123456789abcdefABCDEF",
           [0, *range(10), *range(10, 16), *range(10, 16)], default=-2)  # preempt depth
_F4 = _lut(b".0123456789abcdefABCDEF", [0] * 23, default=-2)  # migrate-disable


def _window(buf: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """(n, width) bytes starting at each ``start`` (buf is zero-padded at both ends).

    Indexing a sliding-window view copies one row per start (memcpy-like); building
    an (n, width) index matrix instead would cost ten times as much.
    """
    view = np.lib.stride_tricks.sliding_window_view(buf, width)
    idx = np.minimum(start, np.int64(len(view) - 1))
    np.maximum(idx, np.int64(0), out=idx)
    return view[idx]


_POW10 = 10 ** np.arange(19, dtype=np.int64)
_MAX_TS_SECONDS = (2**63 - 1) // 1_000_000_000 - 1


def _first_at_or_after(positions: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each ``at``: the first landmark position >= at (or a huge sentinel)."""
    k = np.searchsorted(positions, at)
    ext = np.append(positions, np.iinfo(np.int64).max // 2)
    return ext[k]


def _last_before(positions: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each ``at``: the last landmark position < at (or -1)."""
    if not len(positions):
        return np.full(len(at), -1, np.int64)
    k = np.searchsorted(positions, at) - 1
    return np.where(k >= 0, positions[np.maximum(k, 0)], -1)


def _marks(buf: np.ndarray, char: int) -> np.ndarray:
    """Positions of one byte value (only the padded middle of buf is searched)."""
    return np.flatnonzero(buf[PAD:-PAD] == char) + PAD


def _uint_from(buf: np.ndarray, start: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The run of digits starting at ``start`` (at most width-1 long): (value, length).

    One window serves both the length and the value: the digits read as a
    width-digit number (a matrix-vector product), divided by 10**(width - length).
    length == 0: no digits; length == width: too long (callers reject it).
    """
    win = _window(buf, start, width)
    dig = _IS_DIGIT[win]
    length = np.where(dig.all(axis=1), width, np.argmin(dig, axis=1))
    inside = np.arange(width)[None, :] < length[:, None]
    d = np.where(inside, win, 48).astype(np.int64) - 48
    return (d @ _POW10[width - 1::-1]) // _POW10[width - length], length


def _uint_ending_at(buf: np.ndarray, end: np.ndarray, width: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """The run of digits ending just before ``end``: (value, length), as _uint_from."""
    win = _window(buf, end - width, width)
    rev = _IS_DIGIT[win[:, ::-1]]
    length = np.where(rev.all(axis=1), width, np.argmin(rev, axis=1))
    inside = np.arange(width)[None, :] >= (width - length)[:, None]
    d = np.where(inside, win, 48).astype(np.int64) - 48
    return d @ _POW10[width - 1::-1], length


def _skip_spaces(buf: np.ndarray, pos: np.ndarray, limit: int) -> np.ndarray:
    """Number of spaces at pos (``limit`` means limit or more).

    Only rows that start with a space get a window, and a short one first: most
    runs of padding are short.
    """
    out = np.zeros(len(pos), np.int64)
    need = np.flatnonzero(buf[pos] == SP)
    for width, base in ((8, 0), (limit, 8)):
        if not len(need) or width <= base:
            break
        win = _window(buf, pos[need] + base, width - base) != SP
        found = win.any(axis=1)
        out[need] = base + np.where(found, np.argmax(win, axis=1), width - base)
        need = need[~found]
    return out


def substrings(data: pa.Buffer, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """String array of data[starts[i]:ends[i]] (ordered, non-overlapping pieces)."""
    n = len(starts)
    if n == 0:
        return pa.array([], pa.string())
    offs = np.empty(2 * n + 1, np.int64)
    offs[0:2 * n:2] = starts
    offs[1:2 * n:2] = ends
    offs[2 * n] = ends[-1]
    big = offs[-1] >= 2**31 - 1
    typ = pa.large_string() if big else pa.string()
    arr = pa.Array.from_buffers(typ, 2 * n, [None, pa.py_buffer(
        offs.astype(np.int64 if big else np.int32)), data])
    return arr.take(pa.array(np.arange(0, 2 * n, 2)))


def parse_parts(raw: np.ndarray, line_start: np.ndarray, line_end: np.ndarray,
                style: str) -> list[FastFields]:
    """Fast-path fields for the lines [line_start, line_end) of ``raw`` (bytes, uint8).

    Lines in the kernel's usual column layout are read at fixed offsets
    (:func:`_fixed_layout`: one window per line, no search); the others go through
    the landmark search (:func:`parse`). Returns the parts that have rows (each
    with its own line numbers); rows in neither are left to the RE2 path.
    """
    n = len(line_start)
    buf = np.concatenate([np.zeros(PAD, np.uint8), raw, np.zeros(PAD, np.uint8)])
    ls = line_start.astype(np.int64) + PAD
    le = line_end.astype(np.int64) + PAD
    fixed = _fixed_layout(buf, ls, le, style)
    parts = [fixed] if len(fixed.rows) else []
    if len(fixed.rows) < n:
        rest = np.ones(n, bool)
        rest[fixed.rows] = False
        rest_rows = np.flatnonzero(rest)
        general = parse(raw, line_start[rest_rows], line_end[rest_rows], style, buf=buf)
        if len(general.rows):
            general.rows = rest_rows[general.rows]
            parts.append(general)
    return parts


# The usual layouts (kernel/trace/trace_output.c, perf's builtin-script.c):
#   ftrace "%16s-%-7d [%03d] %5s %5lu.%06lu: "  -> event name at column 51
#   perf   "%16s %5d [%03d] %5lu.%06lu: "       -> (padded) event name from column 42
# ``extra``: digits the seconds have beyond five (an uptime of a day or more).
_FTRACE_EV, _PERF_EV = 51, 42


def _fixed_layout(buf: np.ndarray, ls: np.ndarray, le: np.ndarray, style: str) -> FastFields:
    """Rows in the usual layout, read at fixed columns (with each seconds width seen)."""
    n = len(ls)
    dot_col = 42 if style == "ftrace" else 34
    todo = np.arange(n)
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for extra in range(4):  # seconds up to 99999999: more take the search path
        if not len(todo):
            break
        cand = todo[buf[ls[todo] + dot_col + extra] == DOT]
        if not len(cand):
            continue
        ok, f = _fixed_header(buf, ls[cand], le[cand], style, extra)
        parts.append((cand[ok], {k: v[ok] for k, v in f.items()}))
        accepted = np.zeros(n, bool)
        accepted[cand[ok]] = True
        todo = todo[~accepted[todo]]
    if not parts:
        return _empty_fields()
    rows = np.concatenate([r for r, _ in parts])
    f = {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]}
    if len(parts) > 1:
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        f = {k: v[order] for k, v in f.items()}
    ev_start = f["ev_start"]
    ev_end = _event_colons(buf, ev_start, le[rows])
    found = ev_end > ev_start
    return _finish(buf, rows[found], ls[rows[found]], f["comm_end"][found], ev_start[found],
                   ev_end[found], le[rows[found]], f["pid"][found], f["cpu"][found],
                   f["ts"][found], f["irqs_off"][found], f["irq_ctx"][found],
                   f["depth"][found])


# SWAR ("SIMD within a register"): 8 bytes of a line read as one little-endian
# uint64 (the line's first byte in the lowest 8 bits), so that one integer
# operation checks or converts 8 characters; whole rows of bytes, no (n, k) matrices.
_U = np.uint64
_B30, _B10, _B0F = _U(0x3030303030303030), _U(0x1010101010101010), _U(0x0F0F0F0F0F0F0F0F)
_BF0, _B06, _BFF = _U(0xF0F0F0F0F0F0F0F0), _U(0x0606060606060606), _U(0xFFFFFFFFFFFFFFFF)


def _words(buf: np.ndarray) -> np.ndarray:
    """Every byte offset of buf as the start of an (unaligned) uint64: words[i] = buf[i:i+8]."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _byte_mask(*idx: int) -> np.uint64:
    return _U(sum(0xFF << (8 * i) for i in idx))


def _literal(word: np.ndarray, chars: dict[int, int]) -> np.ndarray:
    """Rows whose bytes at the given indices (0-7 within the word) are the given chars."""
    mask = _byte_mask(*chars)
    value = _U(sum(c << (8 * i) for i, c in chars.items()))
    return (word & mask) == value


def _all_digits(word: np.ndarray, mask: np.uint64 | np.ndarray) -> np.ndarray:
    """Rows whose bytes under ``mask`` (0xFF per byte) are all ASCII digits."""
    z = _B30 & mask
    return ((word & (_BF0 & mask)) == z) & ((((word & mask) + (_B06 & mask)) & _BF0 & mask) == z)


def _swar_value(word: np.ndarray) -> np.ndarray:
    """8 ASCII digits (first byte most significant) -> their value."""
    x = (word & _B0F) * _U(2561) >> _U(8)
    x = (x & _U(0x00FF00FF00FF00FF)) * _U(6553601) >> _U(16)
    return ((x & _U(0x0000FFFF0000FFFF)) * _U(42949672960001) >> _U(32)).astype(np.int64)


def _right_aligned(word: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A right-aligned number (``%5d``) in the top ``width`` bytes: (ok, value).

    ok: the field is spaces, then at least one digit, and nothing else.
    """
    low = 8 - width
    field = _BFF << _U(8 * low)
    spaces = (~word) & _B10 & field  # bit 4 of each space byte (digits have it set)
    run = (spaces >> _U(8 * low + 4)) * _U(255)  # 0xFF per space byte, from the field's start
    ok = ((run & (run + _U(1))) == 0) & ((spaces >> _U(60)) == 0)  # spaces a prefix; digit last
    run_mask = run << _U(8 * low)
    ok &= ((word & run_mask) == (_U(0x2020202020202020) & run_mask)) \
        & _all_digits(word, field & ~run_mask)
    value = _swar_value((word & field) | (_B30 & ~field) | (_B10 & run_mask))
    return ok, value


def _left_aligned(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A left-aligned number (``%-7d``) filling the word up to trailing spaces: (ok, value).

    ok: at least one digit, then only spaces (at least one: the last byte is the separator).
    """
    spaces = ((~word) & _B10) >> _U(4)
    run = spaces * _U(255)  # 0xFF per space byte
    digits = ~run
    ok = ((digits & (digits + _U(1))) == 0) & ((spaces & _U(1)) == 0) & ((spaces >> _U(56)) == 1)
    ok &= ((word & run) == (_U(0x2020202020202020) & run)) & _all_digits(word, digits)
    n_digits = np.clip(np.bitwise_count(digits) // 8, 1, 7).astype(np.uint64)
    shift = _U(8) * (_U(8) - n_digits)  # 8..56: the digits move to the top bytes
    value = _swar_value(((word & digits) << shift) | (_B30 >> (_U(64) - shift)))
    return ok, value


def _fixed_header(buf: np.ndarray, ls: np.ndarray, le: np.ndarray, style: str,
                  extra: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    words = _words(buf)
    n = len(ls)
    if style == "ftrace":
        ev = _FTRACE_EV + extra
        w16, w24 = words[ls + 16], words[ls + 24]
        ok = (le - ls > ev) & _literal(w16, {0: DASH}) \
            & _literal(w24, {0: SP, 1: LBR, 5: RBR, 6: SP})
        pid_ok, pid = _left_aligned(words[ls + 17])  # "%-7d" and the space after it
        cpu_word = words[ls + 21]  # cpu in bytes 5-7 ("%03d")
        fl = words[ls + 29]  # "] " + 5 flag characters + " "
        f0, f1 = _F0[(fl >> _U(16)) & _U(255)], _F1[(fl >> _U(24)) & _U(255)]
        f2, f3 = _F2[(fl >> _U(32)) & _U(255)], _F3[(fl >> _U(40)) & _U(255)]
        f4 = _F4[(fl >> _U(48)) & _U(255)]
        ok &= pid_ok & (f0 > -2) & (f1 > -2) & (f2 > -2) & (f3 > -2) & (f4 > -2) \
            & ((fl >> _U(56)) == SP)
        irqs_off, irq_ctx, depth = f0.astype(np.int8), f2.astype(np.int8), f3.astype(np.int8)
        sec_word = words[ls + 34 + extra]  # "%5lu" in the top 5 + extra bytes
        dot = 42 + extra
        ok &= buf[ls + dot + 8] == SP
    else:
        ev = _PERF_EV + extra
        w16 = words[ls + 16]
        ok = (le - ls > ev) & _literal(w16, {0: SP, 6: SP, 7: LBR}) \
            & _literal(words[ls + 27], {0: RBR, 1: SP}) & (buf[ls + ev] == SP)
        pid_ok, pid = _right_aligned(words[ls + 14], 5)  # "%5d"
        ok &= pid_ok
        cpu_word = words[ls + 19]
        irqs_off = irq_ctx = depth = np.full(n, -1, np.int8)
        sec_word = words[ls + 26 + extra]
        dot = 34 + extra
    ok &= _all_digits(cpu_word, _byte_mask(5, 6, 7))
    cpu = _swar_value((cpu_word & _byte_mask(5, 6, 7)) | (_B30 & ~_byte_mask(5, 6, 7)))
    sec_ok, sec = _right_aligned(sec_word, 5 + extra)
    frac_word = words[ls + dot + 1]  # 6 digits, ":", " "/anything
    ok &= sec_ok & (buf[ls + dot] == DOT) & _literal(frac_word, {6: COLON}) \
        & _all_digits(frac_word, _byte_mask(0, 1, 2, 3, 4, 5))
    frac = _swar_value((frac_word << _U(16)) | _U(0x3030))
    ts = sec * 1_000_000_000 + frac * 1000
    return ok, {"pid": pid, "cpu": cpu, "ts": ts, "irqs_off": irqs_off,
                "irq_ctx": irq_ctx, "depth": depth, "comm_end": ls + 16,
                "ev_start": ls + ev}


def _event_colons(buf: np.ndarray, ev_start: np.ndarray, le: np.ndarray) -> np.ndarray:
    """Position of the ": " that ends each row's event name (-1: not found here).

    Names are few, so the offset of the first unresolved row's ": " is tried on all
    unresolved rows at once; a wrong hit (a ": " later in the line) leaves a name
    that is no identifier, which the name check in :func:`_finish` rejects.
    """
    out = np.full(len(ev_start), -1, np.int64)
    todo = np.arange(len(ev_start))
    for _ in range(32):
        if not len(todo):
            break
        first = todo[0]
        off = bytes(buf[ev_start[first]:le[first]]).find(b": ")
        if off <= 0:
            todo = todo[1:]  # no ": " (an event without arguments): the search path
            continue
        # clipped: another row's line may end (with the buffer) before this offset
        at = np.minimum(ev_start[todo] + off, len(buf) - 2)
        hit = (buf[at] == COLON) & (buf[at + 1] == SP) & (at + 1 < le[todo])
        out[todo[hit]] = at[hit]
        todo = todo[~hit]
    return out


def _empty_fields() -> FastFields:
    e = pa.array([], pa.string())
    z = np.zeros(0, np.int64)
    i8 = np.zeros(0, np.int8)
    return FastFields(rows=z, comm=e, pid=z.astype(np.int32), cpu=z.astype(np.int32), ts=z,
                      irqs_off=i8, irq_ctx=i8, preempt_depth=i8, event=e, args=e)


def parse(raw: np.ndarray, line_start: np.ndarray, line_end: np.ndarray,
          style: str, buf: np.ndarray | None = None) -> FastFields:
    """Fast-path fields for the lines [line_start, line_end) of ``raw`` (bytes, uint8).

    ``style`` is ``"ftrace"`` (``comm-pid [(tgid)] [cpu] [flags] ts: event: args``)
    or ``"perf"`` (``comm pid[/tid] [cpu] ts: group:event: args``). ``buf``: ``raw``
    already padded with PAD zero bytes on both sides.
    """
    n = len(line_start)
    # zero padding on both sides: windows near the ends read zeros, not wrap around
    if buf is None:
        buf = np.concatenate([np.zeros(PAD, np.uint8), raw, np.zeros(PAD, np.uint8)])
    ls = line_start.astype(np.int64) + PAD
    le = line_end.astype(np.int64) + PAD

    # --- [cpu]: the first " [<digit>" in the line, then digits and "] "
    lbr = _marks(buf, LBR)
    lbr = lbr[(buf[lbr - 1] == SP) & _IS_DIGIT[buf[lbr + 1]]]
    lb = _first_at_or_after(lbr, ls)
    ok = lb < le
    lb = np.where(ok, lb, ls)
    cpu, ndig = _uint_from(buf, lb + 1, 6)
    ok &= (ndig >= 1) & (ndig < 6) & (buf[lb + 1 + ndig] == RBR) & (buf[lb + 2 + ndig] == SP)
    after = lb + 3 + ndig  # first byte after "] "

    # --- flags (ftrace only): 5 or 4 characters then a space
    irqs_off = irq_ctx = depth = np.full(n, -1, np.int8)
    flags_end = after
    if style == "ftrace":
        w = _window(buf, after, 6)
        f0, f1, f2, f3, f4 = _F0[w[:, 0]], _F1[w[:, 1]], _F2[w[:, 2]], _F3[w[:, 3]], _F4[w[:, 4]]
        four = (f0 > -2) & (f1 > -2) & (f2 > -2) & (f3 > -2)
        has5 = four & (f4 > -2) & (w[:, 5] == SP)
        has4 = four & ~has5 & (w[:, 4] == SP)
        has = has5 | has4
        # a field after "] " that starts like flags but is not: leave to RE2
        ok &= has | (f0 == -2)
        irqs_off = np.where(has, f0, -1).astype(np.int8)
        irq_ctx = np.where(has, f2, -1).astype(np.int8)
        depth = np.where(has, f3, -1).astype(np.int8)
        flags_end = after + np.where(has5, 5, np.where(has4, 4, 0))

    # --- timestamp: spaces, then "sec.frac: " (or "sec: " for counter clocks)
    cs = _marks(buf, COLON)
    cs = cs[buf[cs + 1] == SP]
    ts_colon = _first_at_or_after(cs, flags_end)
    ok &= ts_colon < le
    ts_colon = np.where(ok, ts_colon, after + 1)
    frac, frac_len = _uint_ending_at(buf, ts_colon, 10)
    has_dot = (frac_len >= 1) & (buf[ts_colon - frac_len - 1] == DOT)
    sec_end = np.where(has_dot, ts_colon - frac_len - 1, ts_colon)
    sec, sec_len = _uint_ending_at(buf, sec_end, 13)
    # seconds * 1e9 must fit int64 (a counter clock's raw ticks do not): RE2 path
    ok &= (sec_len >= 1) & (sec_len < 13) & (frac_len < 10) & (sec <= _MAX_TS_SECONDS)
    ts_start = sec_end - sec_len
    ok &= (ts_start > flags_end) & (flags_end + _skip_spaces(buf, flags_end, 24) == ts_start)
    frac = np.where(has_dot, frac * _POW10[np.clip(9 - frac_len, 0, 9)], 0)
    ts = sec * 1_000_000_000 + frac

    # --- event name: from "ts: " to the next ": " (its padding is stripped per
    # distinct name below, not per line)
    ev_start = ts_colon + 2
    ev_colon = _first_at_or_after(cs, ev_start)
    line_ends_colon = buf[np.maximum(le - 1, 0)] == COLON  # "event:" with no arguments
    ev_end = np.where(ev_colon < le, ev_colon, np.where(line_ends_colon, le - 1, -1))
    ok &= ev_end > ev_start

    # --- comm and pid, before the "[cpu]"
    if style == "ftrace":
        dd = _marks(buf, DASH)
        dd = dd[_IS_DIGIT[buf[dd + 1]]]
        dash = _last_before(dd, lb)
        ok &= dash >= ls
        dash = np.where(ok, dash, lb)
        pid, plen = _uint_from(buf, dash + 1, 10)
        ok &= (plen >= 1) & (plen < 10)
        pid_end = dash + 1 + plen
        # "pid<spaces>[" or "pid<spaces>(<tgid>) ["
        nxt = pid_end + _skip_spaces(buf, pid_end, 24)
        plain = (nxt == lb) & (nxt > pid_end)
        tgid = (nxt > pid_end) & (buf[nxt] == LPAREN) & (buf[lb - 2] == RPAREN) \
            & (buf[lb - 1] == SP) & (lb - nxt <= 14)
        ok &= plain | tgid
        comm_end = dash
    else:
        # "comm<spaces>pid[/tid] [": a token of digits (and at most one '/')
        ok &= buf[lb - 1] == SP
        pid, r1 = _uint_ending_at(buf, lb - 1, 11)  # the kernel's pid is perf's tid
        ok &= (r1 >= 1) & (r1 < 10)  # 9 digits at most: a pid fits int32 (RE2 path: same)
        tid_start = lb - 1 - r1
        slash = buf[tid_start - 1] == SLASH  # "pid/tid": rare, so only those rows
        r2 = np.zeros(n, np.int64)
        si = np.flatnonzero(slash)
        if len(si):
            r2[si] = _uint_ending_at(buf, tid_start[si] - 1, 11)[1]
        tok_start = np.where(slash, tid_start - 1 - r2, tid_start)
        ok &= ~slash | ((r2 >= 1) & (r2 < 11))
        ok &= (buf[tok_start - 1] == SP) & (tok_start - 1 > ls)
        comm_end = tok_start  # trailing spaces: stripped per distinct comm below

    rows = np.flatnonzero(ok)
    return _finish(buf, rows, ls[rows], comm_end[rows], ev_start[rows], ev_end[rows],
                   le[rows], pid[rows], cpu[rows], ts[rows], irqs_off[rows], irq_ctx[rows],
                   depth[rows])


def _finish(buf: np.ndarray, rows: np.ndarray, ls: np.ndarray, comm_end: np.ndarray,
            ev_start: np.ndarray, ev_end: np.ndarray, le: np.ndarray, pid: np.ndarray,
            cpu: np.ndarray, ts: np.ndarray, irqs_off: np.ndarray, irq_ctx: np.ndarray,
            depth: np.ndarray) -> FastFields:
    """Check comm and event names (per distinct value) and cut the strings (per row)."""
    data = pa.py_buffer(buf)
    args_start = np.minimum(ev_end + 2, le)  # ev_end == le - 1: "event:" and no arguments
    # trace-cmd pads after the event's colon
    args_start = np.minimum(args_start + _skip_spaces(buf, args_start, 40), le)
    comm = substrings(data, ls, comm_end)
    event = substrings(data, ev_start, ev_end)
    # Per distinct comm / event name (a few hundred at most, not per line):
    # strip padding; reject names that are not identifiers and comms that carry
    # junk in front (console timestamp, mail quote, trace-cmd instance) or ": ".
    comm_d = pc.dictionary_encode(comm)
    comm_vals = pc.utf8_trim_whitespace(comm_d.dictionary)
    bad_comm = pc.or_(pc.or_(pc.starts_with(comm_vals, ">"), pc.starts_with(comm_vals, "[")),
                      pc.match_substring(comm_vals, ": "))
    bad_comm = pc.or_(bad_comm, pc.equal(pc.binary_length(comm_vals), 0))
    ev_d = pc.dictionary_encode(event)
    ev_vals = pc.utf8_trim_whitespace(ev_d.dictionary)
    good_ev = pc.match_substring_regex(ev_vals, r"^[A-Za-z_][\w.]*(?::[\w.]+)*$")
    comm_idx = np.asarray(comm_d.indices)
    ev_idx = np.asarray(ev_d.indices)
    good = ~np.asarray(bad_comm.fill_null(True))[comm_idx] \
        & np.asarray(good_ev.fill_null(False))[ev_idx] if len(rows) else np.zeros(0, bool)
    comm = pa.DictionaryArray.from_arrays(pa.array(comm_idx.astype(np.int32)), comm_vals)
    event = pa.DictionaryArray.from_arrays(pa.array(ev_idx.astype(np.int32)), ev_vals)
    if not good.all():
        rows, args_start, le = rows[good], args_start[good], le[good]
        pid, cpu, ts = pid[good], cpu[good], ts[good]
        irqs_off, irq_ctx, depth = irqs_off[good], irq_ctx[good], depth[good]
        keep = pa.array(good)
        comm, event = comm.filter(keep), event.filter(keep)
    args = substrings(data, args_start, le)
    return FastFields(rows=rows, comm=comm, pid=pid.astype(np.int32),
                      cpu=cpu.astype(np.int32), ts=ts, irqs_off=irqs_off,
                      irq_ctx=irq_ctx, preempt_depth=depth, event=event, args=args)
