import numpy as np
import pytest

from pkstrace import schema, tracefile


def _trace(n=10):
    ev = schema.normalize({
        "ts": np.arange(n) * 1000,
        "cpu": np.arange(n) % 2,
        "kind": ["msr_write"] * n,
        "msr": [0x6E1] * n,
        "value": np.arange(n, dtype=np.uint64),
        "comm": ["<img src=x>"] * n,
    })
    return schema.Trace(ev, schema.TraceMeta(host={"online_cpus": [0, 1]}, backend="test"))


def test_roundtrip(tmp_path):
    p = tmp_path / "t.pkstrace"
    tracefile.write_trace(p, _trace())
    t = tracefile.read_trace(p)
    assert len(t) == 10
    assert t.meta.backend == "test"
    assert list(t.events.columns) == list(schema.COLUMN_NAMES)
    assert t.events["value"].tolist() == list(range(10))
    assert schema.validate(t.events) == []


def test_existing_file_kept_without_force(tmp_path):
    p = tmp_path / "t.pkstrace"
    tracefile.write_trace(p, _trace())
    with pytest.raises(tracefile.TraceFileError, match="exists"):
        tracefile.write_trace(p, _trace(3))
    assert len(tracefile.read_trace(p)) == 10
    tracefile.write_trace(p, _trace(3), force=True)
    assert len(tracefile.read_trace(p)) == 3


def test_streaming_writer(tmp_path):
    p = tmp_path / "s.pkstrace"
    w = tracefile.TraceWriter(p)
    w.write(_trace(5).events)
    w.write(_trace(7).events)
    meta = schema.TraceMeta(lost_events={1: 3})
    w.close(meta)
    t = tracefile.read_trace(p)
    assert len(t) == 12 and t.meta.lost_events == {1: 3}


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: b"", "empty"),
    (lambda b: b"hello world", "not a pkstrace file"),
])
def test_bad_files_one_line_error(tmp_path, mutate, msg):
    p = tmp_path / "t.pkstrace"
    tracefile.write_trace(p, _trace())
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(tracefile.TraceFileError, match=msg) as e:
        tracefile.read_trace(p)
    assert "\n" not in str(e.value)


def test_newer_version_refused(tmp_path):
    t = _trace()
    t.meta.format_version = schema.FORMAT_VERSION + 1
    p = tmp_path / "t.pkstrace"
    tracefile.write_trace(p, t)
    with pytest.raises(tracefile.TraceFileError, match="newer"):
        tracefile.read_trace(p)


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown event kinds"):
        schema.normalize({"ts": [1], "kind": ["bogus"]})


def test_cpulist():
    assert schema.parse_cpulist("0-3,6") == [0, 1, 2, 3, 6]
    assert schema.format_cpulist([0, 1, 2, 3, 6]) == "0-3,6"
    assert schema.parse_cpulist("") == []
    with pytest.raises(ValueError):
        schema.parse_cpulist("3-1")
