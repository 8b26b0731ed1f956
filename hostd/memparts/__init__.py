"""Host memory's parts, one concern a module; ``hostd.memory.HostMemory`` is made of them.

See ``hostd/memory.py`` for the map and docs/internals.md, "hostd: the host core".
"""
