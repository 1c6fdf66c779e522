"""`fastserve-ray bench compress ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/bench_compress.py --out bench/compress.json
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["bench", "compress", *sys.argv[1:]]))
