"""Serving layers without Ray: config, CLI checks, the autoscaling policy, the LLM server in-process."""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fastserve_ray.engine import AsyncLLMEngine, LLMEngine, SamplingParams
from fastserve_ray.errors import ConfigError
from fastserve_ray.serve import builder
from fastserve_ray.serve.autoscaling import LLMAutoscalingPolicy, desired_replicas
from fastserve_ray.serve.command import check_port_free, config_from_args, run_serve_command
from fastserve_ray.serve.config import ServeConfig, check_model_dirs
from fastserve_ray.serve.deployment import LLMServerDeployment
from fastserve_ray.serve.server import LLMServer, chat_messages

REPO = Path(__file__).resolve().parents[2]


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.autoscaling\.max_replica"):
        ServeConfig.from_dict({"models": [{"path": "x", "autoscaling": {"max_replica": 3}}]})
    with pytest.raises(ConfigError, match="max_replicas"):
        ServeConfig.from_dict({"models": [{"path": "x",
                                           "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]})
    with pytest.raises(ConfigError, match="'a' appears twice"):
        ServeConfig.from_dict({"models": [{"path": "x/a"}, {"path": "y/a"}]})
    with pytest.raises(ConfigError, match=r"http\.port"):
        ServeConfig.from_dict({"models": [{"path": "x"}], "http": {"port": "80"}})
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_dirs(ServeConfig.from_dict({"models": [{"path": str(tmp_path / "missing")}]}))


def test_engine_options_checked_before_deploying(tiny_model_dir: Path) -> None:
    cfg = ServeConfig.from_dict({"models": [{"path": str(tiny_model_dir), "engine": {"polcy": "mlfq"}}]})
    with pytest.raises(ConfigError, match="polcy"):
        check_model_dirs(cfg)
    opts = builder.deployment_options(ServeConfig.from_dict(
        {"models": [{"path": str(tiny_model_dir), "engine": {"max_num_seqs": 8}}]}).models[0])
    assert opts["max_ongoing_requests"] == 8 and opts["graceful_shutdown_timeout_s"] == 120.0
    assert opts["autoscaling_config"]["policy"]["policy_kwargs"]["target_running_per_replica"] == 4
    assert opts["autoscaling_config"]["max_replicas"] > opts["autoscaling_config"]["min_replicas"]


def test_shipped_serve_yaml_is_valid() -> None:
    doc = yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "fastserve_ray.serve.builder:build_app"
    cfg = ServeConfig.from_dict(app["args"])
    assert cfg.http.port == doc["http_options"]["port"] and cfg.models[0].served_name == "demo"
    # `fastserve-ray serve --config deployments/serve.yaml` reads the same args, flags on top.
    cli = config_from_args(_args(config=REPO / "deployments" / "serve.yaml", port=9001))
    assert cli.models == cfg.models and cli.http.port == 9001
    service = yaml.safe_load((REPO / "deployments" / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    k8s = ServeConfig.from_dict(serve_cfg["applications"][0]["args"])
    assert k8s.http.port == serve_cfg["http_options"]["port"] and k8s.ingress_replicas == 2


def _args(**kw: object) -> argparse.Namespace:
    base = dict(model=[], config=None, host=None, port=None, api_key=None, min_replicas=None,
                max_replicas=None, address=None, detach=False)
    return argparse.Namespace(**{**base, **kw})


def test_cli_config_and_early_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_args(_args(model=[f"a={tiny_model_dir}", str(tiny_model_dir)], port=0, min_replicas=2,
                                 max_replicas=3))
    assert [m.served_name for m in cfg.models] == ["a", "tiny"]
    assert cfg.models[1].autoscaling.min_replicas == 2 and cfg.models[1].autoscaling.max_replicas == 3
    with pytest.raises(ConfigError, match="NAME=DIR"):
        config_from_args(_args(model=["=x"]))
    with pytest.raises(ConfigError, match="does not exist"):
        run_serve_command(_args(model=[str(tmp_path / "nope")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is not available"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(ConfigError, match="not available"):
            run_serve_command(_args(model=[str(tiny_model_dir)], port=port))


POLICY = dict(target_running_per_replica=2, max_waiting_per_replica=1, kv_cache_high=0.9, kv_cache_low=0.5)


def test_autoscaling_signal() -> None:
    # Idle: wants fewer; busy batch: proportional; engine queueing or a full cache: at least one more.
    assert desired_replicas(current=2, running=0, waiting=0, kv_max=0.0, ongoing=0, **POLICY) == 0
    assert desired_replicas(current=1, running=6, waiting=0, kv_max=0.1, ongoing=6, **POLICY) == 3
    assert desired_replicas(current=2, running=2, waiting=3, kv_max=0.1, ongoing=2, **POLICY) == 3
    assert desired_replicas(current=1, running=1, waiting=0, kv_max=0.95, ongoing=1, **POLICY) == 2
    # Requests Serve has not handed to an engine yet still count.
    assert desired_replicas(current=1, running=0, waiting=0, kv_max=None, ongoing=8, **POLICY) == 4
    # A busy cache blocks scale-down.
    assert desired_replicas(current=2, running=1, waiting=0, kv_max=0.7, ongoing=1, **POLICY) == 2
    policy = LLMAutoscalingPolicy(**POLICY)
    ctx = SimpleNamespace(current_num_replicas=2, target_num_replicas=2, total_num_requests=3.0,
                          aggregated_metrics={"num_running": {"r1": 4.0, "r2": 3.0},
                                              "num_waiting": {"r1": 2.0},
                                              "kv_cache_usage": {"r1": 0.2, "r2": 0.3}})
    desired, state = policy(ctx)
    assert desired == 4.5 and state["last_demand"] == 9.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> LLMServer:
    srv = LLMServer(str(tiny_model_dir), "tiny", {"max_num_seqs": 4})
    yield srv
    srv.engine.shutdown()


def test_server_in_process_matches_engine(server: LLMServer, tiny_model_dir: Path) -> None:
    async def run() -> tuple[dict, list[dict]]:
        body = {"model": "tiny", "prompt": ["one", "two"], "max_tokens": 5, "temperature": 0}
        whole = await server.generate("completion", body)
        chunks = [c async for c in server.generate_stream("completion", {**body, "stream": True})]
        return whole, chunks

    whole, chunks = asyncio.run(run())
    ref = LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=2).generate(
        ["one", "two"], SamplingParams(max_tokens=5, temperature=0))
    assert [c["text"] for c in whole["choices"]] == [o.text for o in ref]
    for i in range(2):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
        assert text == ref[i].text


def test_server_refuses_what_it_cannot_do(server: LLMServer) -> None:
    def err(body: dict) -> dict:
        out = asyncio.run(server.generate("completion", {"model": "tiny", "prompt": "x", **body}))
        return out["error"] | {"status": out["status_code"]}

    assert err({"n": 0})["param"] == "n"
    assert err({"n": 10_000})["param"] == "n"
    assert err({"max_tokens": 0})["param"] == "max_tokens"  # 0 only scores an echoed prompt
    assert err({"model": "other"})["status"] == 404
    # The second prompt is over the context: nothing of the request stays in the engine.
    assert err({"prompt": [[5] * 4, [5] * 300], "max_tokens": 4})["param"] == "prompt"
    assert server.load()["num_unfinished_requests"] == 0


def test_chat_messages_become_plain_dicts_for_the_template() -> None:
    from fastserve_ray.serve.protocol import ChatMessage

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    msgs = [ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", name="ann",
                        content=[{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]),
            ChatMessage(role="assistant", refusal="no"),
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content="2", tool_call_id="call_1")]
    assert chat_messages(msgs) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there", "name": "ann"},
        {"role": "assistant", "content": "no"},
        # templates write arguments out as JSON themselves: they get the object
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "2", "tool_call_id": "call_1"}]


def test_check_health_fails_when_the_engine_loop_is_dead(tiny_model_dir: Path) -> None:
    engine = AsyncLLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=1)
    fake = SimpleNamespace(engine=engine, served_name="tiny")
    LLMServerDeployment.check_health(fake)  # alive: no error
    engine.shutdown()
    with pytest.raises(RuntimeError, match="not running"):
        LLMServerDeployment.check_health(fake)


def test_stream_interval_merges_tokens_into_fewer_chunks(server: LLMServer) -> None:
    body = {"model": "tiny", "prompt": "one", "max_tokens": 12, "min_tokens": 12, "temperature": 0,
            "stream": True, "logprobs": 1}

    async def chunks(interval_s: float) -> list[dict]:
        server.stream_interval_s = interval_s
        try:
            return [c async for c in server.generate_stream("completion", body)]
        finally:
            server.stream_interval_s = 0.0

    every, merged = asyncio.run(chunks(0.0)), asyncio.run(chunks(60.0))
    texts = ["".join(c["choices"][0]["text"] for c in cs) for cs in (every, merged)]
    assert texts[0] == texts[1] and texts[0]
    # A long interval: the first chunk goes at once, everything else waits for the end.
    assert len(merged) == 2 < len(every)
    assert merged[0]["choices"][0]["finish_reason"] is None
    assert merged[1]["choices"][0]["finish_reason"] == "length"
    # Nothing is lost in merging: one logprob per token, in order.
    tokens = [[t for c in cs for t in c["choices"][0]["logprobs"]["tokens"]] for cs in (every, merged)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12


def test_n_samples_per_prompt_become_choices_in_order(server: LLMServer) -> None:
    body = {"model": "tiny", "prompt": ["one", "two"], "max_tokens": 6, "temperature": 1.0, "seed": 7,
            "n": 2, "logprobs": 0, "ignore_eos": True}

    async def run() -> tuple[dict, list[dict], list[dict]]:
        whole = await server.generate("completion", body)
        chunks = [c async for c in server.generate_stream("completion", {**body, "stream": True})]
        chat = [c async for c in server.generate_stream("chat", {
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 3,
            "seed": 1, "stream": True})]
        return whole, chunks, chat

    whole, chunks, chat = asyncio.run(run())
    # Choice i * n + j is prompt i's sample j; seeded samples differ and are reproducible.
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in whole["choices"]]
    assert texts[0] != texts[1] or texts[2] != texts[3]
    for i, text in enumerate(texts):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) == text
    assert whole["usage"]["completion_tokens"] == 4 * 6
    ends = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(ends) == [0, 1, 2, 3]
    # Chat: one role chunk opens each of the n choices.
    assert [ch["index"] for ch in chat[0]["choices"]] == [0, 1, 2]
    assert sorted(c["choices"][0]["index"] for c in chat[1:] if c["choices"][0]["finish_reason"]) == [0, 1, 2]


def test_the_shipped_grafana_panels_query_only_metrics_we_export() -> None:
    import json
    import re

    from fastserve_ray.serve.metrics import METRIC_NAMES, exported_name

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "deployments" / "grafana" / "fastserve_extra_panels.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = [m for e in exprs for m in re.findall(r"ray_[a-z0-9_]+", e)]
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for m in names}
    exported = {exported_name(n) for n in METRIC_NAMES}
    assert queried and queried <= exported, queried - exported
    assert all('model_name=~"$model_name"' in e for e in exprs)


def test_deploying_to_a_cluster_binds_every_interface_and_then_needs_a_key(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastserve_ray.errors import ConfigError
    from fastserve_ray.serve.command import require_key_off_loopback, run_serve_command

    monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = [str(tiny_model_dir)]
    assert config_from_args(_args(model=model)).http.host == "127.0.0.1"  # local: loopback
    cluster = config_from_args(_args(model=model), joining=True)
    assert cluster.http.host == "0.0.0.0"  # on a cluster: reachable from other pods and machines
    assert config_from_args(_args(model=model, host="10.0.0.5"), joining=True).http.host == "10.0.0.5"
    with pytest.raises(ConfigError, match="API key"):
        require_key_off_loopback(cluster)
    require_key_off_loopback(config_from_args(_args(model=model, api_key="k"), joining=True))
    monkeypatch.setenv("FASTSERVE_API_KEY", "from-env")
    require_key_off_loopback(cluster)
    monkeypatch.delenv("FASTSERVE_API_KEY")
    # `jobs/deploy.py` (serve --detach on the cluster) refuses before connecting to anything.
    with pytest.raises(ConfigError, match="API key"):
        run_serve_command(_args(model=model, address="ray://nowhere:10001", detach=True))
