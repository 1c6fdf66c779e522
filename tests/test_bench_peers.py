"""`fastserve-ray bench peers`: the harness around the peers' own interpreter.

The real peers live in .venv-peers/ (scripts/setup_peers.sh), which CI does not build; here a
stand-in `vllm` package (the same LLM / SamplingParams calls, deterministic outputs, log lines
on stdout like the real one) isolates the protocol layer, and a missing peer must be reported
with its error while our side is still measured. bench/peers.json is the real comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fastserve_ray.bench import peers
from fastserve_ray.bench.peer_clients import PeerError, VLLMOffline
from fastserve_ray.bench.trace import TraceRequest

FAKE_VLLM = '''
import os
__version__ = "0.0-standin"
print("INFO a log line on stdout, as vLLM writes them", flush=True)

class SamplingParams:
    def __init__(self, max_tokens, temperature, ignore_eos, detokenize):
        self.max_tokens = max_tokens

class _Completion:
    def __init__(self, ids):
        self.token_ids = ids

class _Output:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]

class LLM:
    def __init__(self, **kwargs):
        if os.environ.get("STANDIN_FAIL"):
            raise RuntimeError("Unsupported CPU attention configuration: head_dim=16")
        self.kwargs = kwargs

    def generate(self, prompts, params, use_tqdm=False):
        print("INFO more log noise", flush=True)
        short = int(os.environ.get("STANDIN_SHORT", "0"))
        return [_Output(list(range(max(p.max_tokens - short, 0)))) for p in params]
'''


@pytest.fixture
def standin_venv(tmp_path, monkeypatch) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FASTSERVE_PEERS_VENV", str(venv))
    return venv


TRACE = [TraceRequest([5, 6, 7], 4), TraceRequest([8, 9], 7)]


def test_the_peer_process_answers_through_its_log_noise(standin_venv, tmp_path):
    peer = VLLMOffline(tmp_path / "hf", "float32", 256, threads=2)
    try:
        assert peer.version == "0.0-standin" and peer.load_s >= 0
        assert peer.run(TRACE) > 0
        assert peer.run(TRACE) > 0  # stays loaded between repetitions
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_wrong_output_lengths_are_an_error(standin_venv, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_SHORT", "1")
    peer = VLLMOffline(tmp_path / "hf", "float32", 256, threads=2)
    try:
        with pytest.raises(PeerError, match="other output lengths"):
            peer.run(TRACE)
    finally:
        peer.close()


def test_a_peer_that_fails_to_start_reports_its_own_error(standin_venv, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(PeerError, match="Unsupported CPU attention configuration: head_dim=16"):
        VLLMOffline(tmp_path / "hf", "float32", 256, threads=2)


def test_without_the_peers_venv_the_bench_says_so_and_measures_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSERVE_PEERS_VENV", str(tmp_path / "missing"))
    out = tmp_path / "peers.json"
    report = peers.run_peers_bench(out, quick=True)
    assert "scripts/setup_peers.sh" in report["peers"]["vllm"]["error"]
    assert report["offline"]["fastserve_ray_tok_s"]["median"] > 0
    assert "vllm_tok_s" not in report["offline"]
    # llama.cpp's GGUF files cannot be made either, and the batch-1 decode still measures ours
    assert all("scripts/setup_peers.sh" in report["peers"][f"gguf_{w}"]["error"]
               for w in (report["config"]["dtype"], "q8_0"))
    assert report["decode_b1"]["fastserve_ray_tok_s"]["median"] > 0
    assert report["decode_b1"]["fastserve_ray_int8_tok_s"]["mbu"] > 0
    assert set(report["ratios"].values()) == {None}
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.read_text())["config"]["dtype"] in ("float32", "bfloat16")
    printed = capsys.readouterr().out
    assert "vllm cannot run here" in printed and "no GGUF q8_0" in printed
