"""`fastserve-ray bench serve ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/bench_serve.py --out bench/serve.json
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["bench", "serve", *sys.argv[1:]]))
