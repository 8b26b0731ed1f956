"""The live dashboard and its replay: a web page over a run directory's own logs.

``Dashboard`` (server.py) serves one run directory; ``RunModel`` (model.py)
reads it as it grows. The launcher starts one with ``--dashboard``
(``with_dashboard``); ``balloonlab-dashboard RUN_DIR`` replays a finished run.
"""
from __future__ import annotations

__all__ = ["Dashboard", "RunModel", "with_dashboard", "serve"]


def __getattr__(name: str):   # aiohttp is imported only when a dashboard is asked for
    if name in ("Dashboard", "with_dashboard", "serve"):
        from . import cli, server
        return {"Dashboard": server.Dashboard, "with_dashboard": cli.with_dashboard, "serve": cli.serve}[name]
    if name == "RunModel":
        from .model import RunModel
        return RunModel
    raise AttributeError(name)
