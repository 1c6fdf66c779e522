"""Deploy models to the Ray cluster this job runs on, then return (the application keeps serving):

    ray job submit --working-dir . -- python jobs/deploy.py --model runs/demo/model --port 8000
    ray job submit --working-dir . -- python jobs/deploy.py --config deployments/serve.yaml

Same flags as `fastserve-ray serve` (always --detach: a job should not block forever).
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
