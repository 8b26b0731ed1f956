"""``scripts/launch.py`` is ``balloonlab-launch``: host + N guests from a scenario (``balloonlab.launch``)."""
import sys

from balloonlab.launch import main

if __name__ == "__main__":
    sys.exit(main())
