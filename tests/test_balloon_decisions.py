"""Every balloon-controller decision has a reason and its numbers; the host logs and counts them."""
from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from balloonlab.hostd.balloon import BALLOON_POLICIES, Decision, DecisionLog, make_controller
from balloonlab.proto import events as ev
from tests.test_host_balloon import guest, view


def _decisions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == ev.BALLOON_DECISION]


@pytest.mark.parametrize("name", sorted(BALLOON_POLICIES))
def test_every_builtin_gives_each_guest_a_reason(name: str) -> None:
    ctl = make_controller(name, {"fraction": 0.3} if name == "static" else {})
    gs = [guest(1, working_set_pages=300, pff=10.0, free=400), guest(2, target=100, working_set_pages=900, free=20)]
    for tick in range(0, 40):
        got = ctl.decide(view(*gs, free=100 if tick < 20 else 3000, tick=tick))
        if got is None:   # not due this tick
            continue
        assert sorted(got) == [1, 2]
        for d in got.values():
            assert isinstance(d, Decision) and d.code and d.reason and d.code.replace("_", "").isalnum()


def test_working_set_declines_a_thrashing_guest_and_says_why() -> None:
    """The issue's case: every guest's PFF is above pff_high, so nothing is inflated; the log says exactly that."""
    ctl = make_controller("working-set", {"pff_high": 1000.0})
    log = DecisionLog("working-set")
    gs = [guest(i, working_set_pages=200, pff=5000.0 + i) for i in (1, 2)]
    with capture_logs() as logs:
        for tick in range(5):
            targets = log.decide(ctl, view(*gs, free=0, total=4000, tick=tick))   # the host is short
            assert targets == {1: 0, 2: 0}
    lines = _decisions(logs)
    # One line per guest for the whole streak (the reason did not change), every decision counted.
    assert [(e["guest"], e["code"], e["decision"]) for e in lines] == [(1, "pff_above_high", "hold"),
                                                                      (2, "pff_above_high", "hold")]
    assert lines[0]["inputs"]["pff"] == 5001.0 and lines[0]["inputs"]["pff_high"] == 1000.0
    assert "PFF 5001/s above pff_high 1000/s: not inflated" in lines[0]["reason"]
    m = log.metrics()
    assert m["1"]["counts"] == {"pff_above_high": 5} and m["1"]["decisions"] == 5
    assert m["2"]["last"]["code"] == "pff_above_high" and m["2"]["last"]["tick"] == 4


def test_a_change_of_reason_or_target_is_logged_every_time() -> None:
    ctl = make_controller("working-set", {"pff_high": 1000.0, "max_step_pages": 50})
    log = DecisionLog("working-set")
    calm = guest(1, ram=1000, working_set_pages=100, pff=10.0)
    with capture_logs() as logs:
        log.decide(ctl, view(calm, free=0, total=4000, tick=0))          # short: inflates by 50
        log.decide(ctl, view(guest(1, ram=1000, target=50, working_set_pages=100, pff=10.0), free=0, tick=1))
        log.decide(ctl, view(guest(1, ram=1000, target=100, working_set_pages=100, pff=9000.0), free=0, tick=2))
    lines = _decisions(logs)
    assert [(e["decision"], e["code"], e["target_pages"]) for e in lines] == [
        ("inflate", "host_short", 50), ("inflate", "host_short", 100), ("deflate", "pff_above_high", 50)]
    assert lines[0]["inputs"]["added_pages"] == 50 and lines[0]["previous_pages"] == 0


def test_log_all_logs_every_decision() -> None:
    log = DecisionLog("none", mode="all")
    ctl = make_controller("none")
    with capture_logs() as logs:
        for tick in range(3):
            log.decide(ctl, view(guest(1), free=100, tick=tick))
    assert [e["code"] for e in _decisions(logs)] == ["never_balloons"] * 3
    with pytest.raises(ValueError, match="log_decisions must be one of"):
        DecisionLog("none", mode="some")


def test_the_host_limits_and_says_so() -> None:
    """Past the guest's max balloon: clamped; an uncooperative guest: not asked for more than it holds."""
    class Greedy:
        name = "greedy"

        def decide(self, view: Any) -> dict[int, Decision]:
            return {g.guest_id: Decision(10_000, "want_all", "wants everything") for g in view.guests}

    log = DecisionLog("greedy")
    with capture_logs() as logs:
        out = log.decide(Greedy(), view(guest(1, ram=1000), guest(2, ram=1000, target=100, actual=40), free=0),
                         uncooperative={2})
    assert out == {1: 650, 2: 40}
    one, two = _decisions(logs)
    assert one["code"] == "want_all" and "limited to [0, 650] pages" in one["reason"]
    assert two["code"] == "guest_uncooperative" and "not asked for more than the 40 pages" in two["reason"]


def test_a_controller_that_is_not_due_decides_nothing() -> None:
    ctl = make_controller("working-set", {"period_ticks": 5})
    log = DecisionLog("working-set")
    g = guest(1, target=30, working_set_pages=100)
    with capture_logs() as logs:
        assert log.decide(ctl, view(g, free=3000, tick=3)) == {1: 30}
    assert not _decisions(logs) and log.metrics() == {}


def test_targets_is_decide_without_the_reasons() -> None:
    ctl = make_controller("aggressive", {"start_tick": 2})
    gs = [guest(1), guest(2)]
    assert ctl.targets(view(*gs, free=0, tick=1)) == {1: 0, 2: 0}
    d = ctl.decide(view(*gs, free=0, tick=1))
    assert d is not None and d[1].code == "before_start"
    d = ctl.decide(view(*gs, free=0, tick=2))
    assert d is not None and d[1].code == "deficit_split_evenly" and d[1].inputs["share_pages"] == 200
    assert ctl.targets(view(*gs, free=0, tick=2)) == {1: 200, 2: 200}
