"""``scripts/analyze.py`` is ``balloonlab-analyze``: a run directory to a report (``balloonlab.analyze``)."""
import sys

from balloonlab.analyze import main

if __name__ == "__main__":
    sys.exit(main())
