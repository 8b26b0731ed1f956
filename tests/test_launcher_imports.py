"""The launcher checks a scenario and makes the run's credentials without the request path's modules.

It does that on the two cores where the host and the fork server are
importing those same modules; every ms of its own start-up delays the
moment the host gets its arguments.
"""
from __future__ import annotations

import pytest

from tests.procs import python_prints as _run


def test_checking_a_scenario_and_making_credentials_leaves_the_wire_messages_out() -> None:
    loaded = set(_run("import sys\nfrom balloonlab.launch import prepare\nprepare('scale')\n"
                      "from balloonlab.proto.handshake import guest_token, new_token\nguest_token(new_token(), 3)\n"
                      "print(*sorted(m for m in sys.modules if m.startswith('balloonlab.')))").split())
    assert {"balloonlab.hostd.memconfig", "balloonlab.hostd.discipline"} <= loaded     # the scenario was checked
    assert not {"balloonlab.proto.messages", "balloonlab.proto.rpc", "balloonlab.hostd.discipline.base"} & loaded


def test_the_discipline_registry_names_its_modes_and_imports_a_class_when_asked() -> None:
    from balloonlab.hostd import discipline
    assert discipline.REQUEST_ORDERS == ("deterministic", "arrival")
    assert discipline.DeterministicOrder.__name__ == "DeterministicOrder"
    assert discipline.MODES["arrival"].__name__ == "ArrivalOrder"
    with pytest.raises(AttributeError, match="NoSuchOrder"):
        discipline.NoSuchOrder   # noqa: B018


def test_the_launcher_starts_its_children_before_it_imports_numpy_or_an_event_loop() -> None:
    """What runs before the host and the fork server start -- the launcher's module and its argument
    parsing -- imports neither numpy nor asyncio: those are what the children import meanwhile."""
    out = _run("import sys\nfrom balloonlab.launch import parse_args\n"
               "a = parse_args(['--scenario', 'scale', '--format', 'png,svg', '--guest-start', 'fork'], 'x')\n"
               "import balloonlab.early\n"
               "print(sorted(m for m in ('numpy', 'asyncio', 'uvloop', 'structlog', 'balloonlab.runner', "
               "'balloonlab.forkclient') if m in sys.modules), a.formats)")
    assert out.split() == ["[]", "('png',", "'svg')"], out
