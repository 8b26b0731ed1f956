"""The host, guest and fork-server processes import structlog without rich (0.1 s or more of every host start)."""
from __future__ import annotations

import pytest

from tests.procs import python_prints as _run

pytest.importorskip("rich")


def test_the_host_entry_point_and_what_it_preimports_leave_rich_out() -> None:
    out = _run("import sys, importlib, balloonlab.hostd.__main__ as m\n"
               "for name in m.PRESTART_IMPORTS: importlib.import_module(name)\n"
               "print('structlog' in sys.modules, 'rich' in sys.modules)")
    assert out == "True False"


def test_the_fork_servers_preload_leaves_rich_out() -> None:
    out = _run("import sys\nfrom balloonlab.forkserver import _preload\n_preload()\n"
               "print('structlog' in sys.modules, 'rich' in sys.modules)")
    assert out == "True False"


def test_rich_still_imports_afterwards_and_an_exception_is_still_logged_as_a_dict() -> None:
    out = _run("import io, json, sys\nfrom balloonlab.proto.plainlog import import_structlog\nimport_structlog()\n"
               "import structlog, rich.console\n"
               "buf = io.StringIO()\n"
               "structlog.configure(processors=[structlog.processors.dict_tracebacks, "
               "structlog.processors.JSONRenderer()], logger_factory=structlog.WriteLoggerFactory(file=buf))\n"
               "try:\n    x = {'a': 1}\n    raise KeyError('b')\n"
               "except KeyError:\n    structlog.get_logger().exception('failed')\n"
               "rec = json.loads(buf.getvalue())\n"
               "print(rec['exception'][0]['exc_type'], 'rich.console' in sys.modules)")
    assert out == "KeyError True"
