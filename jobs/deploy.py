"""Deploy models to the Ray cluster this job runs on, then return (the application keeps serving):

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"FASTSERVE_API_KEY": "..."}}' \
        -- python jobs/deploy.py --model runs/demo/model --port 8000
    ray job submit --working-dir . -- python jobs/deploy.py --config deployments/serve.yaml --host 127.0.0.1

Same flags as `fastserve-ray serve` (always --detach: a job should not block forever). On a
cluster the proxy binds 0.0.0.0 unless --host (or the config) says otherwise, and then an API
key is required (--api-key, http.api_key or FASTSERVE_API_KEY): Serve's proxy has no auth of
its own.
"""

import sys

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import main

sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
