"""`fastserve-ray <subcommand>`: a thin layer over the same functions jobs/*.py call.

User mistakes (FastServeError) print one line naming the problem and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fastserve_ray.errors import FastServeError


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from fastserve_ray.data import prepare_data

    manifest = prepare_data(
        args.out,
        inputs=args.input or None,
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        tokenizer_path=args.tokenizer,
        rows_per_shard=args.rows_per_shard,
        val_fraction=args.val_fraction,
        builtin_flavour=args.builtin,
        overwrite=args.overwrite,
    )
    d = manifest.to_dict()
    print(
        f"wrote {args.out}: {d['num_documents']} documents, {d['num_tokens']} tokens, "
        f"{d['splits']['train']['num_rows']} train / {d['splits']['validation']['num_rows']} "
        f"validation rows of {d['seq_len']} tokens"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fastserve_ray.config import TrainConfig, load_yaml, parse_num_workers
    from fastserve_ray.train.trainer import run_training

    values = load_yaml(args.config) if args.config else {}
    if args.preset:
        values["preset"] = args.preset
    if args.num_workers:
        values["num_workers"], values["min_workers"] = parse_num_workers(args.num_workers)
    for flag in ("max_steps", "global_batch_size", "micro_batch_size", "lr", "seed"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.run_name:
        values["run_name"] = args.run_name
    if args.use_gpu:
        values["use_gpu"] = args.use_gpu
    if args.storage_path:
        values["storage_path"] = str(args.storage_path)
    cfg = TrainConfig.from_dict(values, where=str(args.config) if args.config else "train")
    result = run_training(args.data, args.out, cfg)
    m = result.metrics
    val = f", val perplexity {m['val_perplexity']:.2f}" if "val_perplexity" in m else ""
    print(f"trained {m.get('step')} steps: loss {m.get('loss', float('nan')):.4f}{val}; "
          f"model -> {result.model_dir}, metrics -> {result.run_dir}/metrics.jsonl")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fastserve_ray.data import check_data_fits_model, load_data_manifest, read_split
    from fastserve_ray.device import default_device
    from fastserve_ray.models.evaluate import evaluate_rows
    from fastserve_ray.quantized.loader import load_model  # plain and compressed directories

    # fp32 even on GPUs: perplexity is a measurement, not a throughput path.
    loaded = load_model(args.model, device=default_device())
    manifest = load_data_manifest(args.data)
    check_data_fits_model(manifest, loaded.config, loaded.tokenizer)
    rows = read_split(args.data, args.split)
    if args.max_rows:
        rows = rows[: args.max_rows]
    if len(rows) == 0:
        raise FastServeError(f"{args.data}: split {args.split!r} has no rows to evaluate")
    result = evaluate_rows(loaded.model, rows)
    print(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split, **result}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fastserve_ray.engine import LLMEngine, SamplingParams

    # Parameters first: a bad flag is reported before paying for the model load.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    # One request: a one-sequence batch keeps the KV cache to a single full-length sequence.
    engine = LLMEngine.from_model_dir(args.model, max_num_seqs=1)
    output = engine.generate(args.prompt, params)[0]
    print(args.prompt + output.text)
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from fastserve_ray.quantized.hf_compressed import import_hf  # plain or compressed-tensors

    out = import_hf(args.hf_dir, args.model_dir, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} -> {out}")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from fastserve_ray.quantized.hf_compressed import export_hf  # plain or compressed-tensors

    out = export_hf(args.model_dir, args.hf_dir, overwrite=args.overwrite)
    print(f"exported {args.model_dir} -> {out}")
    return 0


ONLY_PARTS = {"serve": ("structured", "prefix", "cold-start"), "peers": ("online",), "engine": ("sim",)}


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.only is not None and args.only not in ONLY_PARTS.get(args.target, ()):
        parts = "; ".join(f"{t}: {', '.join(p)}" for t, p in ONLY_PARTS.items())
        raise FastServeError(f"--only {args.only} is not a part of `bench {args.target}` (parts: {parts})")
    if args.target == "train":
        from fastserve_ray.bench.train import run_train_bench

        run_train_bench(args.out, preset=args.preset or "bench", steps=args.steps)
    elif args.target == "engine":
        from fastserve_ray.bench.engine import run_engine_bench

        if args.only == "sim":
            from fastserve_ray.bench.engine import resimulate

            if args.out is None or not args.out.is_file():
                raise FastServeError("bench engine --only sim recomputes the scheduling simulator of an "
                                     f"existing report: --out must name its JSON file (got {args.out})")
            resimulate(args.out)
            return 0
        kw = {} if args.requests is None else {"num_requests": args.requests}
        run_engine_bench(args.out, preset=args.preset or "bench", quick=args.quick,
                         compile=args.compile, device=args.device, **kw)
    elif args.target == "serve":
        from fastserve_ray.bench.serve import run_serve_bench_from_args

        if args.requests is None:
            args.requests = 32  # the serve bench's default (the engine bench has its own)
        run_serve_bench_from_args(args)
    elif args.target == "compress":
        from fastserve_ray.bench.compress import run_compress_bench_from_args

        run_compress_bench_from_args(args)
    elif args.target == "peers":
        kw = {} if args.requests is None else {"num_requests": args.requests}
        if args.only == "online":
            from fastserve_ray.bench.peers_online import run_online_peers

            run_online_peers(args.out, preset=args.preset or "bench", quick=args.quick, **kw)
        else:
            from fastserve_ray.bench.peers import run_peers_bench

            run_peers_bench(args.out, preset=args.preset or "bench", quick=args.quick, **kw)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from fastserve_ray.serve.command import run_serve_command

    return run_serve_command(args)


def _cmd_compress(args: argparse.Namespace) -> int:
    from fastserve_ray.compress.command import run_compress_command

    return run_compress_command(args)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from fastserve_ray.pipeline.config import PipelineConfig, load_pipeline_config
    from fastserve_ray.pipeline.runner import run_pipeline_job

    cfg = load_pipeline_config(args.config)
    if args.out:
        cfg = PipelineConfig.from_dict({**cfg.model_dump(), "out": str(args.out)}, where=str(args.config))
    run_pipeline_job(cfg)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastserve_ray.demo import run_demo

    run_demo(Path(args.out), preset=args.preset, quick=args.quick)
    return 0


def location(value: str) -> str | Path:
    """A command-line path: a URI (``s3://bucket/key``) as given, a local path as a Path.

    ``Path("s3://b/k")`` would collapse the ``//`` into ``s3:/b/k``, a different location.
    """
    return value if "://" in value else Path(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="fastserve-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare-data", help="tokenize a corpus into Parquet shards + manifest")
    s.add_argument("--out", required=True, type=location, help="output data directory (or s3://...)")
    s.add_argument("--input", action="append", type=location,
                   help=".txt file/folder, .jsonl or .parquet (repeatable); default: built-in corpus")
    s.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    s.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    s.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    s.add_argument("--rows-per-shard", type=int, default=4096, help="sequences per Parquet shard")
    s.add_argument("--val-fraction", type=float, default=0.05, help="share of rows for validation")
    s.add_argument("--builtin", default="docs", choices=["docs", "docs+code"],
                   help="flavour of the built-in corpus (when no --input)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=_cmd_prepare_data)

    s = sub.add_parser("train", help="data-parallel training on Ray Train")
    s.add_argument("--data", required=True, type=location, help="a prepare-data output directory (or s3://...)")
    s.add_argument("--out", required=True, type=location,
                   help="run directory (model/, metrics, checkpoints; or s3://...)")
    s.add_argument("--preset", help="model preset NAME[,key=value...] (default: small)")
    s.add_argument("--config", type=Path, help="YAML with train config keys (see README)")
    s.add_argument("--num-workers", help="N, or MIN:MAX for elastic training")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--global-batch-size", type=int)
    s.add_argument("--micro-batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--run-name", help="Ray Train run name; rerunning with the same name resumes")
    s.add_argument("--use-gpu", choices=["auto", "true", "false"],
                   help="auto: GPUs if the cluster has them now; true: wait for them (autoscaling from zero)")
    s.add_argument("--storage-path", type=location, help="checkpoint storage (default RUN_DIR/checkpoints)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="perplexity of a model on a data directory (JSON on stdout)")
    s.add_argument("--model", required=True, type=location, help="model directory (or s3://...)")
    s.add_argument("--data", required=True, type=location, help="data directory (or s3://...)")
    s.add_argument("--split", default="validation", choices=["train", "validation"])
    s.add_argument("--max-rows", type=int, default=0, help="evaluate at most this many rows (0: all)")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="generate text from a model directory")
    s.add_argument("--model", required=True, type=location, help="model directory (or s3://...)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("import-hf", help="convert a local Hugging Face Llama/Qwen2 checkpoint")
    s.add_argument("hf_dir", type=Path)
    s.add_argument("model_dir", type=Path)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_import_hf)

    s = sub.add_parser("export-hf", help="write a model directory as a Hugging Face checkpoint")
    s.add_argument("model_dir", type=location, help="model directory (or s3://...)")
    s.add_argument("hf_dir", type=location, help="the checkpoint to write (or s3://...)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_export_hf)

    s = sub.add_parser("pipeline", help="prepare -> train -> compress -> evaluate -> deploy -> smoke, "
                                        "resuming at the first unfinished stage")
    s.add_argument("--config", required=True, type=Path, help="pipeline YAML (see deployments/pipeline.yaml)")
    s.add_argument("--out", type=location, help="override the config's out (local path or s3://...)")
    s.set_defaults(func=_cmd_pipeline)

    # -- serve (owned by fastserve_ray/serve; flags here, behaviour in serve/command.py) --------
    s = sub.add_parser("serve", help="serve model directories on Ray Serve (OpenAI-compatible HTTP)")
    s.add_argument("--model", action="append", default=[], metavar="DIR | NAME=DIR",
                   help="a model directory to serve (repeatable; served name defaults to the dir name)")
    s.add_argument("--config", type=Path, help="serving config YAML (see README 'Serving')")
    s.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("--api-key", default=None, help="require this Bearer key on /v1 (or FASTSERVE_API_KEY)")
    s.add_argument("--min-replicas", type=int, default=None)
    s.add_argument("--max-replicas", type=int, default=None)
    s.add_argument("--ingress", choices=("router", "direct"), default=None,
                   help="router (default): an HTTP front routes to each model's replicas and retries a "
                        "failed replica; direct: one model's replicas answer HTTP themselves, faster")
    s.add_argument("--address", default=None, help="Ray address to join (default: start or join local)")
    s.add_argument("--detach", action="store_true", help="deploy and return instead of serving until Ctrl-C")
    s.set_defaults(func=_cmd_serve)

    # -- compress (owned by fastserve_ray/compress; behaviour in compress/command.py) -----------
    s = sub.add_parser("compress", help="compress a model directory with a recipe (Ray task graph)")
    s.add_argument("--model", required=True, type=location, help="source model directory (or s3://...)")
    s.add_argument("--recipe", required=True, help="a shipped recipe name (int8, ...) or a YAML path")
    s.add_argument("--out", required=True, type=location, help="compressed model directory to write (or s3://...)")
    s.add_argument("--data", type=location,
                   help="data directory for calibration/eval, or s3://... (default: built-in corpus)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=_cmd_compress)

    s = sub.add_parser("bench", help="benchmarks: JSON + table, ratios measured side by side")
    s.add_argument("target", choices=["train", "engine", "serve", "compress", "peers"],
                   help="what to benchmark (peers: against vLLM CPU and llama.cpp, after "
                        "scripts/setup_peers.sh)")
    s.add_argument("--quick", action="store_true", help="serve/compress: tiny sizes, a smoke run")
    s.add_argument("--out", type=Path, help="write the JSON result here")
    s.add_argument("--preset", help="model preset (default: bench)")
    s.add_argument("--steps", type=int, default=12, help="train: optimizer steps per configuration")
    s.add_argument("--requests", type=int, default=None,
                   help="engine: requests in the offline trace (default 24); serve: requests (default 32)")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="engine: where both sides run (default: CUDA where available, else the CPU)")
    s.add_argument("--compile", action="store_true",
                   help="engine: also measure the engine with engine.compile (compiled decode steps)")
    s.add_argument("--only", choices=["structured", "prefix", "cold-start", "online", "sim"], default=None,
                   help="serve: run one part alone (structured: json_schema vs free requests, no Ray; "
                        "prefix: prefix-aware vs default routing over 2 replicas; cold-start: scale "
                        "from zero to the first token, local and s3://); peers: online = each engine's "
                        "OpenAI server under the same Poisson arrivals (default: offline and batch 1); "
                        "engine: sim = recompute the scheduling simulator of the --out report from its "
                        "measured figures")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("demo", help="the whole pipeline on the built-in corpus")
    s.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything is written")
    s.add_argument("--preset", default="small", help="model preset (NAME[,key=value...])")
    s.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastserve-ray` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastServeError as e:
        print(f"fastserve-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_subcommand(name: str) -> None:
    """Run one subcommand with this process's arguments and exit: the body of every jobs/*.py."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
