"""`fastserve-ray bench train ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/bench_train.py --out bench/train.json
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["bench", "train", *sys.argv[1:]]))
