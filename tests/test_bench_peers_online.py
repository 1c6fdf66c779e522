"""`bench peers --only online`: the client harness and the shared trace, against a stand-in server.

The real servers (ours, `vllm serve`, `llama_cpp.server`) are what the bench measures
(bench/peers_online.json); here a stand-in OpenAI streaming endpoint on 127.0.0.1 isolates the
client: token counting from usage or chunks, the prompt-length check, failures counted, arrivals.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastserve_ray.bench import peers_online
from fastserve_ray.bench.trace import TraceRequest
from fastserve_ray.data import builtin_documents
from fastserve_ray.tokenizer import Tokenizer


class _Standin(BaseHTTPRequestHandler):
    short = 0  # tokens the stand-in leaves out of every answer
    usage = True  # report usage in a last chunk (vLLM, ours) or not (llama_cpp.server)

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad prompt"}')
            return
        n = body["max_tokens"] - self.short
        prompt_len = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': f't{i}'}]})}\n\n".encode())
        last = {"choices": [{"text": "", "finish_reason": "length"}]}  # llama_cpp.server's last chunk
        self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
        if self.usage:
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def standin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Standin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    _Standin.short, _Standin.usage = 0, True


REQS = [(TraceRequest([5, 6, 7], 4, arrival=0.0), "a b c"), (TraceRequest([8, 9], 6, arrival=0.2), "d e")]


def test_exact_lengths_pass_with_or_without_usage(standin):
    s = peers_online.stream_completions(standin, peers_online.token_body, REQS, 2)
    assert s["completed"] == 2 and s["failed"] == 0 and s["jct_s"]["mean"] > 0 and s["tpot_s"]["mean"] >= 0
    _Standin.usage = False  # llama_cpp.server: one chunk per token
    s = peers_online.stream_completions(standin, peers_online.text_body, REQS, None)
    assert s["completed"] == 2 and s["wall_s"] >= 0.2  # the second request waited for its arrival


def test_short_answers_bad_prompts_and_wrong_prompt_lengths_are_failures(standin):
    _Standin.short = 1
    s = peers_online.stream_completions(standin, peers_online.token_body, REQS, 2)
    assert s["failed"] == 2 and "3 tokens for 4" in s["errors"]
    _Standin.short = 0
    s = peers_online.stream_completions(standin, peers_online.text_body, [(TraceRequest([1], 2), "bad")], 1)
    assert s["failed"] == 1 and s["errors"][0].startswith("HTTP 400")
    # the stand-in counts a text prompt's words as its tokens: 3 words for a 2-token request
    wrong = [(TraceRequest([1, 2], 2), "a b c")]
    s = peers_online.stream_completions(standin, peers_online.text_body, wrong, 1)
    assert s["failed"] == 1 and s["errors"] == ["prompt 3 tokens for 2"]
    body = peers_online.token_body(TraceRequest([1, 2], 2), "x")
    assert body["ignore_eos"] is True and body["prompt"] == [1, 2]
    text = peers_online.text_body(TraceRequest([1, 2], 5), "x y")
    assert text["min_tokens"] == text["max_tokens"] == 5 and text["prompt"] == "x y"


def test_the_trace_is_corpus_text_that_tokenizes_back_to_its_length(tiny_model_dir):
    tok = Tokenizer.load(tiny_model_dir / "tokenizer.json")
    texts = [d.text for d in builtin_documents("docs")]
    reqs = peers_online.corpus_trace(tok, texts, [(40, 8), (17, 3), (64, 5)])
    assert [len(r.prompt) for r, _ in reqs] == [40, 17, 64] and [r.output_len for r, _ in reqs] == [8, 3, 5]
    for r, text in reqs:
        assert tok.encode(text) == r.prompt and tok.decode(r.prompt) == text
    assert reqs[0][1] != reqs[1][1]


def test_loads_summarize_to_medians_and_ratios():
    run = {"ttft_s": {"mean": 0.1, "p99": 0.3}, "tpot_s": {"mean": 0.01, "p99": 0.02},
           "jct_s": {"mean": 1.0, "p99": 2.0}, "failed": 0}
    slow = {**run, "jct_s": {"mean": 2.0, "p99": 3.0}, "ttft_s": {"mean": 0.4, "p99": 0.5}, "failed": 1}
    by_load = peers_online.summarize_loads({"ours": {"passes": {"1.0": [run, run, slow]}},
                                            "vllm": {"passes": {"1.0": [slow, slow, slow]}},
                                            "broken": {"error": "no"}})
    assert by_load["1.0"]["ours"]["jct_s"] == 1.0 and by_load["1.0"]["ours"]["failed"] == 1
    assert "broken" not in by_load["1.0"]
    r = peers_online.ratios_to(by_load, "ours", "vllm")
    assert r["1.0"]["jct_mean"] == pytest.approx(0.5) and r["1.0"]["ttft_mean"] == pytest.approx(0.25)
