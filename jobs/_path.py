"""Put the repository root on sys.path so `python jobs/X.py` works from a `ray job submit --working-dir .`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
