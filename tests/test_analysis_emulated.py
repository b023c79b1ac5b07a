"""The analysis against the emulated host's ground truth.

tests/fixtures/emulated_*.pkstrace are real traces of the QEMU guest (Debian 6.12
kernel, PKS via TCG, the pks_test module running one design of the global
update), recorded by `pkstrace emulate`. The module counts what it did (its
metadata ``ground_truth``): write_pkrs calls and cache hits, stale-cache hits,
updates, broadcasts, calls to isolated CPUs, the preempt-count drift of the v3
walk. The analysis, which sees only the events, must find the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pkstrace import tracefile
from pkstrace.analysis import analyse

FIX = Path(__file__).parent / "fixtures"
TRACES = sorted(FIX.glob("emulated_*.pkstrace"))


def _id(p: Path) -> str:
    return p.stem.removeprefix("emulated_")


@pytest.fixture(scope="module", params=TRACES, ids=_id)
def case(request):
    t = tracefile.read_trace(request.param)
    return t.meta.ground_truth, analyse(t), request.param


def test_fixtures_present():
    assert len(TRACES) >= 5, "emulated fixtures missing from tests/fixtures"


def test_write_pkrs_calls_and_cache_hits(case):
    truth, f, _ = case
    wp = f.write_pkrs
    assert int(wp["calls"].sum()) == truth["write_pkrs_calls"]
    assert int(wp["cache_hits"].sum()) == truth["cache_hits"]


def test_lost_updates(case):
    truth, f, _ = case
    lu = f.lost_updates
    assert int((lu["type"] == "stale_cache").sum()) == truth["stale_hits"]
    assert int((lu["type"] == "remote_overwrite").sum()) == truth["lost_remote"]


def test_stale_hits_are_credited_to_the_update_that_raced():
    """A stale hit falls inside the walk that stored the new value into the writer's cache
    and had not yet reached its CPU: that running episode raced, not the previous one."""
    f = analyse(tracefile.read_trace(FIX / "emulated_v3-race_8cpu.pkstrace"))
    lu = f.lost_updates[f.lost_updates["type"] == "stale_cache"]
    assert len(lu) >= 10 and len(f.episodes) == 10
    assert set(lu["episode"]) == set(range(10))  # every update raced with its writers
    eps = f.episodes.set_index("episode")
    assert (lu["episode"] >= 0).all()
    start = eps.loc[lu["episode"], "start_ns"].to_numpy()
    end = eps.loc[lu["episode"], "end_ns"].to_numpy()
    t = lu["time_ns"].to_numpy()
    assert ((start <= t) & (t <= end)).all()


def test_updates_are_episodes(case):
    truth, f, _ = case
    e = f.episodes
    if truth["scenario"] == "lazy":
        assert len(e) == 0  # the lazy design makes no remote calls at all
        return
    assert len(e) == truth["updates"]
    assert int((e["mode"] == "broadcast").sum()) == truth["broadcasts"]
    assert (e["targets"] >= 1).all() and (e["stall_ns"] > 0).all()


def test_isolated_cpus_hit_by_updates(case):
    truth, f, _ = case
    v = f.violations
    upd = v[(v["comm"] == "pks_updater") & (v["via"] == "csd")] if len(v) else v
    assert len(upd) == truth["isolated_hits"]


def test_drift_found_exactly_where_the_module_leaked(case, request):
    truth, f, path = case
    leaked = (truth.get("preempt_drift_min") or 0) < 0
    if leaked and truth["scenario"] == "v3-raw":
        # Known gap: with the count driven negative the ftrace flags turn to
        # garbage ("DNZff", "bpZe."): the 4-bit depth no longer steps by one.
        request.applymarker(pytest.mark.xfail(strict=True, reason="depth unreadable when "
                                              "the preempt count has gone negative"))
    assert len(f.drift) == (truth["updates"] if leaked else 0)
    if leaked:
        assert (f.drift["step"] == -1).all()
