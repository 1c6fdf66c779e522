"""`fastserve-ray bench engine ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/bench_engine.py --out bench/engine.json
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["bench", "engine", *sys.argv[1:]]))
