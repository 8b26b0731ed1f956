"""The launcher checks a scenario and makes the run's credentials without the request path's modules.

It does that on the two cores where the host and the fork server are
importing those same modules; every ms of its own start-up delays the
moment the host gets its arguments.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import REPO


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_checking_a_scenario_and_making_credentials_leaves_the_wire_messages_out() -> None:
    out = _run("import sys\nfrom balloonlab.launch import prepare\nprepare('scale')\n"
               "from balloonlab.proto.handshake import guest_token, new_token\nguest_token(new_token(), 3)\n"
               "print('balloonlab.proto.messages' in sys.modules, 'balloonlab.hostd.discipline.base' in sys.modules)")
    assert out == "False False"


def test_the_discipline_registry_names_its_modes_and_imports_a_class_when_asked() -> None:
    from balloonlab.hostd import discipline
    assert discipline.REQUEST_ORDERS == ("deterministic", "arrival")
    assert discipline.DeterministicOrder.__name__ == "DeterministicOrder"
    assert discipline.MODES["arrival"].__name__ == "ArrivalOrder"
    with pytest.raises(AttributeError, match="NoSuchOrder"):
        discipline.NoSuchOrder   # noqa: B018
