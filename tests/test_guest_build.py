"""A guest built from the host's Welcome checks its workload once, as it builds it, with the config check's words."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.guestd import config as guest_config_module
from balloonlab.guestd.config import guest_config_from_mapping
from balloonlab.guestd.errors import GuestConfigError
from balloonlab.guestd.gate import VcpuGate
from balloonlab.guestd.session import build_guest
from balloonlab.proto.rpc import RpcConnection


def _config(**changes: Any) -> dict[str, Any]:
    cfg = {"ram_mib": 1, "kernel_mib": 0.25, "seed": 3, "policy": "clock", "batch_refs": 256,
           "regions": [{"name": "db", "kind": "file", "mib": 0.5}, {"name": "heap", "kind": "anon", "mib": 0.5}],
           "workload": [{"kind": "db", "region": "db", "weight": 2}, {"kind": "anon-hot", "region": "heap"}]}
    cfg.update(changes)
    return cfg


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = guest_config_module.build_workload

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(guest_config_module, "build_workload", counted)
    return calls


def test_a_guests_build_makes_its_workload_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_builds(monkeypatch)
    state = build_guest(3, _config(), RpcConnection(name="test"), VcpuGate())
    assert len(calls) == 1
    pages, _ = state.workload.next_batch(64)
    assert pages.size == 64
    guest_config_from_mapping(_config(), where="guest 3")    # a config check alone still builds one to check it
    assert len(calls) == 2


def test_the_workload_a_guest_builds_is_the_one_its_seed_gives() -> None:
    """The same references as a workload built apart from the same seed's stream (the build's second child)."""
    from balloonlab.guestd.workload import build_workload
    state = build_guest(3, _config(), RpcConnection(name="test"), VcpuGate())
    cfg = guest_config_from_mapping(_config(), where="guest 3")
    _, workload_seed = np.random.SeedSequence([3, 3]).spawn(2)
    apart = build_workload(cfg.workload, cfg.kernel.layout, np.random.default_rng(workload_seed))
    for _ in range(4):
        got, want = state.workload.next_batch(200), apart.next_batch(200)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("workload", [
    [{"kind": "db", "region": "nowhere"}],                               # a region the layout lacks
    [{"kind": "burst", "region": "db"}],                                 # a burst on a file region
    [{"kind": "db", "region": "db"}, {"kind": "anon-hot", "region": "heap", "hot_frac": 2.0}],   # out of bounds
])
def test_a_bad_workload_is_refused_in_the_config_checks_words(workload: list[dict[str, Any]]) -> None:
    bad = _config(workload=workload)
    with pytest.raises(GuestConfigError) as checked:
        guest_config_from_mapping(bad, where="guest 3")
    with pytest.raises(GuestConfigError) as built:
        build_guest(3, bad, RpcConnection(name="test"), VcpuGate())
    assert str(built.value) == str(checked.value)
    assert str(built.value).startswith("guest 3: guest.workload[")
