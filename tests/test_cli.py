"""The CLI as a user runs it: argument handling, exit codes and messages in this process through
`cli.main` (a subprocess costs ~2.5 s of imports each), and the console entry point, a jobs/*.py
file and the whole demo in real subprocesses."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve_ray import cli as cli_module

ROOT = Path(__file__).resolve().parent.parent


def _checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_subprocess(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m fastserve_ray.cli ARGS` in a fresh interpreter, exactly as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve_ray.cli", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    return _checked(proc, check)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`cli.main(ARGS)` in this process, with its exit status (argparse's too) and both streams."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_module.main([str(a) for a in args])
        except SystemExit as e:  # argparse rejects bad arguments with exit 2
            code = e.code if isinstance(e.code, int) else 1
    return _checked(subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue()), check)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The built-in corpus encoded with the tiny model's tokenizer."""
    out = tmp_path_factory.mktemp("cli") / "data"
    proc = cli("prepare-data", "--out", out, "--tokenizer", tiny_model_dir / "tokenizer.json",
               "--seq-len", "32", "--rows-per-shard", "1000")
    assert "train" in proc.stdout and (out / "data_manifest.json").is_file()
    return out


def test_generate_greedy_is_deterministic(tiny_model_dir):
    """Once as a user runs it (a fresh interpreter), once in-process: the same text."""
    args = ("generate", "--model", tiny_model_dir, "--prompt", "The for", "--max-tokens", "8")
    a, b = cli_subprocess(*args).stdout, cli(*args).stdout
    assert a == b and a.startswith("The for") and len(a.strip()) > len("The for")


def test_generate_seed_makes_sampling_reproducible(tiny_model_dir):
    def sample(seed: int) -> str:
        return cli("generate", "--model", tiny_model_dir, "--prompt", "x", "--max-tokens", "24",
                   "--temperature", "1.5", "--seed", str(seed)).stdout

    first = sample(1)
    assert sample(1) == first
    assert any(sample(s) != first for s in (2, 3, 4))  # 24 high-temperature draws: differ


def test_generate_bad_input_is_exit_2_with_a_named_problem(tiny_model_dir, tmp_path):
    proc = cli_subprocess("generate", "--model", tmp_path / "nope", "--prompt", "x", check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("generate", "--model", tiny_model_dir, "--prompt", "x", "--temperature", "3", check=False)
    assert proc.returncode == 2 and "temperature must be a finite number in [0, 2], got 3.0" in proc.stderr
    proc = cli("generate", "--model", tiny_model_dir, "--prompt", "x", "--max-tokens", "100000",
               check=False)
    assert proc.returncode == 2 and "max_tokens (100000)" in proc.stderr
    assert "exceeds the model's maximum context length max_model_len=256" in proc.stderr


def test_eval_prints_perplexity_json(tiny_model_dir, data_dir):
    proc = cli("eval", "--model", tiny_model_dir, "--data", data_dir, "--max-rows", "8")
    result = json.loads(proc.stdout)
    assert result["split"] == "validation" and result["num_tokens"] == 8 * 32
    assert 100 < result["perplexity"] < 2000  # random init on a 400-token vocabulary: ~uniform


def test_eval_rejects_a_different_tokenizer(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    cli("prepare-data", "--out", other, "--vocab-size", "300", "--seq-len", "16")
    proc = cli("eval", "--model", tiny_model_dir, "--data", other, check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr


def test_eval_rejects_data_longer_than_the_model(tmp_path, tiny_tokenizer, data_dir):
    from fastserve_ray.models import build_model, get_preset, save_model_dir

    short = save_model_dir(tmp_path / "m", build_model(get_preset("tiny", max_seq_len=16)), tiny_tokenizer)
    proc = cli("eval", "--model", short, "--data", data_dir, check=False)
    assert proc.returncode == 2 and "seq_len" in proc.stderr and "16" in proc.stderr


def test_prepare_data_bad_input(tmp_path):
    proc = cli("prepare-data", "--out", tmp_path / "d", "--input", tmp_path / "missing.txt", check=False)
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "does not exist" in proc.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = cli("prepare-data", "--out", tmp_path / "d", "--input", empty, check=False)
    assert proc.returncode == 2 and "empty" in proc.stderr.lower()
    assert not (tmp_path / "d").exists()


def test_bench_only_names_a_part_of_its_target():
    proc = cli("bench", "engine", "--only", "online", check=False)
    assert proc.returncode == 2 and "--only online is not a part of `bench engine`" in proc.stderr
    proc = cli("bench", "peers", "--only", "prefix", check=False)
    assert proc.returncode == 2 and "peers: online" in proc.stderr
    proc = cli("bench", "serve", "--only", "sim", check=False)
    assert proc.returncode == 2 and "engine: sim" in proc.stderr


def test_bench_engine_sim_needs_an_existing_report(tmp_path):
    proc = cli("bench", "engine", "--only", "sim", "--out", tmp_path / "none.json", check=False)
    assert proc.returncode == 2 and "none.json" in proc.stderr and "existing report" in proc.stderr


def test_hf_round_trip_through_the_cli(tiny_model_dir, tmp_path):
    cli("export-hf", tiny_model_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    cli("import-hf", tmp_path / "hf", tmp_path / "back")
    a = cli("generate", "--model", tiny_model_dir, "--prompt", "def", "--max-tokens", "6").stdout
    b = cli("generate", "--model", tmp_path / "back", "--prompt", "def", "--max-tokens", "6").stdout
    assert a == b
    proc = cli("import-hf", tmp_path / "hf", tmp_path / "back", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_jobs_entrypoint_runs_outside_the_package(tiny_model_dir, tmp_path):
    """jobs/*.py is what `ray job submit` runs: it must import the package from the repo root."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "--model", str(tiny_model_dir),
         "--prompt", "if", "--max-tokens", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("if")


def test_demo_quick_runs_every_stage(tmp_path):
    proc = cli_subprocess("demo", "--quick", "--out", tmp_path / "demo")
    steps = ("1/6 prepare data", "2/6 train", "3/6 evaluate", "4/6 compress", "5/6 generate", "6/6 serve")
    for step in steps:
        assert step in proc.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["data"]["num_documents"] == 79  # the bundled pydoc topics
    assert summary["train"]["steps"] == 6
    assert summary["train"]["final_loss"] < summary["train"]["first_loss"]
    assert summary["eval"]["perplexity"] > 1
    assert len(summary["samples"]) == 2
    assert summary["compress"]["linear_weight_ratio"] > 3.5  # int8 of fp32 linear weights
    assert summary["compress"]["perplexity_after"] > 1
    # The served model answers the same greedy completion over HTTP and through a handle.
    assert summary["serve"]["http_text"] == summary["serve"]["handle_text"] != ""
    from fastserve_ray.models import read_manifest

    manifest = read_manifest(tmp_path / "demo" / "run" / "model")
    assert len(manifest["lineage"]["data"]["manifest_sha256"]) == 64
