"""A variant's status says what happened; a variant that did not complete is never the yardstick."""
from __future__ import annotations

from pathlib import Path

from balloonlab.analysis.compare import compare_runs
from balloonlab.analysis.summary import baseline_variant, run_status


def _v(**kw: object) -> dict:
    base = {"lost_pages": 0, "lost_pages_host": 0, "host": {"invariant_violations": 0}, "guests_lost": {},
            "guests_cut_off": {}, "audit_ok": True, "audit_problems": [], "refs_per_vsec": 100.0}
    return base | kw


def test_each_status_and_its_reasons() -> None:
    done = {"reason": "completed"}
    assert run_status(_v(), done) == ("completed", [])
    assert run_status(_v(), {}) == ("failed", ["the host logged no run_finished (it was killed, or crashed)"])
    assert run_status(_v(), {"reason": "signal SIGINT"})[0] == "interrupted"
    assert run_status(_v(), {"reason": "deadlock"})[0] == "deadlocked"
    assert run_status(_v(), {"reason": "all guests gone"}) == ("failed", ["the run ended early: all guests gone"])
    assert run_status(_v(lost_pages_host=3), done) == ("failed", ["the end-of-run audit found 3 pages lost"])
    status, why = run_status(_v(guests_lost={"2": "connection closed", "1": "cut off: held L_hostmem"},
                                guests_cut_off={"1": "held L_hostmem"}), done)
    assert status == "degraded" and why == ["guest 1 cut off: held L_hostmem", "guest 2 lost: connection closed"]
    status, why = run_status(_v(audit_ok=False, audit_problems=["guest 0: did not answer the audit"]), done)
    assert status == "degraded" and why == ["the end-of-run audit failed: guest 0: did not answer the audit"]


def test_a_degraded_variant_is_never_the_baseline() -> None:
    variants = {"a": _v(status="degraded", refs_per_vsec=1.0), "b": _v(status="completed", refs_per_vsec=2.0),
                "c": _v(status="completed", refs_per_vsec=4.0)}
    assert baseline_variant(list(variants), variants) == "b"
    assert baseline_variant(["a"], variants) is None
    text, data = compare_runs([Path("/nowhere/run")], [{"scenario": "s", "seed": 1, "variants": variants}])
    assert "against the first variant that completed, `b`" in text
    assert data["baselines"] == [1, None, 1]     # a and c against b; b against nothing
