"""Call a deployed model from another Ray job through a DeploymentHandle (no HTTP on the way).

Deploy first (`fastserve-ray serve --model runs/demo/model` in another terminal, which prints the
Ray address it uses, or `ray job submit -- python jobs/deploy.py ...` on a cluster), then:

    RAY_ADDRESS=127.0.0.1:6379 python examples/handle_client.py --model model --prompt "Once upon"
"""

from __future__ import annotations

import argparse

import ray

from fastserve_ray.serve.client import complete_sync, get_model_handle, stream


@ray.remote(num_cpus=0)
def summarize(model: str, prompt: str) -> str:
    """A Ray task calling the model: the same request/response dicts as the HTTP API."""
    out = complete_sync(get_model_handle(model), {"model": model, "prompt": prompt, "max_tokens": 24})
    return out["choices"][0]["text"]


async def stream_tokens(model: str, prompt: str) -> None:
    """Streaming through the handle: OpenAI chunks as they are generated."""
    async for chunk in stream(get_model_handle(model), {"model": model, "prompt": prompt, "max_tokens": 24,
                                                        "stream": True}):
        print(chunk["choices"][0]["text"], end="", flush=True)
    print()


def main() -> None:
    """Join the cluster, call the model from a task, then stream from this driver."""
    import asyncio

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--prompt", default="Once upon a time")
    args = p.parse_args()
    ray.init(address="auto")  # the cluster the model is deployed on (RAY_ADDRESS)
    print("from a Ray task:", ray.get(summarize.remote(args.model, args.prompt)))
    print("streamed:", end=" ")
    asyncio.run(stream_tokens(args.model, args.prompt))


if __name__ == "__main__":
    main()
