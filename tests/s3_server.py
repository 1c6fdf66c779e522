"""A local S3 endpoint for tests: moto's server on 127.0.0.1, found through the standard AWS variables.

The variables are set in this process before any Ray node starts, so Ray's workers inherit them.
Moto keeps its buckets in process-global state that outlives one server, so each server starts and
ends with moto's reset call: one module's objects never show up in the next module's bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import Iterator


def _reset_moto(endpoint: str) -> None:
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=30).close()


@contextlib.contextmanager
def local_s3(bucket: str | None = "fsr") -> Iterator[dict[str, str]]:
    """Start moto's S3 server, point AWS_* at it (and create ``bucket``); restore everything after."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _reset_moto(env["AWS_ENDPOINT_URL"])
        if bucket:
            boto3.client("s3").create_bucket(Bucket=bucket)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_moto(env["AWS_ENDPOINT_URL"])
        server.stop()
