"""``scripts/launch.py`` is ``balloonlab-launch``: host + N guests from a scenario (``balloonlab.launch``)."""
from balloonlab.cli import exit_now
from balloonlab.launch import main

if __name__ == "__main__":
    exit_now(main())
