"""The shipped scenarios (``*.toml``); installed as ``balloonlab.scenarios``."""
