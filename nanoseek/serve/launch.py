"""`nanoseek serve`: load a model, build the engine and the app, run the server (server.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..infer.config import DECODE_ATTENTION
from ..model.moe import EXPERT_PATHS


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: DIR's name)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights: auto keeps an FP8 checkpoint in FP8 (others as stored); bf16, fp32 dequantize")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (cache slots)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="draft K tokens per step with the MTP module(s) (default 0: off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: torch.compile the decode step before CUDA-graph capture (default on: faster "
                        "decoding; the first requests at batch 1 and at two other batch sizes wait for a compilation)")
    p.add_argument("--expert-path", default="auto", choices=EXPERT_PATHS,
                   help="how the routed experts are computed (default auto: by batch size and device)")
    p.add_argument("--decode-burst", type=int, default=8, metavar="N",
                   help="GPU: decode steps replayed per read-back of their tokens (default 8; tokens "
                        "stream in bursts of up to N, a waiting request waits up to N steps; 1: every step)")
    p.add_argument("--fused-decode", type=int, default=None, metavar="N",
                   help="GPU: decode batches of up to N requests with the fused Triton step (default: as far "
                        "as it was measured faster than the compiled step for this model and GPU; 0: never)")
    p.add_argument("--decode-attention", default="auto", choices=DECODE_ATTENTION,
                   help="the MLA decode attention: kernel (Triton kernels reading each request's own "
                        "positions), torch (reads the whole cache, masked), or auto (default: the kernels on a "
                        "Hopper GPU with a context over 4,096 tokens; from 32,768 for a compiled step of 64+ "
                        "heads)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="reuse the cache of prompt prefixes that slots still hold (shared system prompts, "
                        "multi-turn chats); not with --speculative")
    p.add_argument("--max-len", type=int, default=None, metavar="T",
                   help="tokens per sequence, prompt + output (default: the model's context)")
    p.add_argument("--ui", action="store_true",
                   help="serve a chat page at / (shipped with nanoseek; the conversation stays in the browser)")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="CPU: the model's compute threads (default: the cores less one, kept for the HTTP "
                        "side; OMP_NUM_THREADS, if set, instead)")
    add_access_args(p.add_argument_group("access"))
    add_limit_args(p.add_argument_group("limits"))
    add_record_args(p.add_argument_group("what is kept"))
    add_upstream_args(p.add_argument_group("hybrid"))


def add_access_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default="", metavar="A,B",
                   help="Host header names accepted besides IP addresses, localhost and --host "
                        "(the names a proxy or DNS reaches this server by; '*': any)")
    p.add_argument("--api-key-file", metavar="F", help="API keys, one per line (also env NANOSEEK_API_KEYS=k1,k2)")


def add_limit_args(p) -> None:
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="accepted unfinished requests (then 429)")
    p.add_argument("--max-messages", type=int, default=2048, metavar="N", help="messages in one chat request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="B")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="ignore request fields this server does not implement (default: 400 naming the field)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="close a connection whose request headers are not in within S seconds (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="answer 408 to a request whose body is not in within S seconds (default 30)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, end requests still running after S seconds with an error (default 30)")


def add_record_args(p) -> None:
    p.add_argument("--audit-log", metavar="F", help="append one JSONL line per request (no content by default)")
    p.add_argument("--audit-content", action="store_true", help="put prompts and outputs in the audit log too")
    p.add_argument("--audit-rotate-bytes", type=int, default=100 << 20, metavar="B",
                   help="rotate the audit log when it reaches B bytes (default 100 MiB; 0: never)")
    p.add_argument("--audit-backups", type=int, default=5, metavar="N", help="rotated audit logs kept (F.1 … F.N)")
    p.add_argument("--feedback-db", metavar="F", help="SQLite file for POST /v1/feedback (default: off)")
    p.add_argument("--feedback-window", type=float, default=3600.0, metavar="S",
                   help="seconds after an answer during which its id takes feedback (default 3600)")
    p.add_argument("--feedback-rate", type=float, default=60.0, metavar="N",
                   help="feedback requests a minute per key, or per client without keys (default 60)")


def add_upstream_args(p) -> None:
    p.add_argument("--upstream", metavar="URL", help="an OpenAI-compatible base URL, e.g. https://host/v1")
    p.add_argument("--upstream-models", default="", metavar="A,B",
                   help="models served by the upstream (requests naming them are proxied)")
    p.add_argument("--upstream-overflow", action="store_true",
                   help="send requests for the local model that are over its limits or find the queue full "
                        "to the first upstream model (default: a 400 or 429 here; the data stays local)")
    p.add_argument("--upstream-api-key-file", metavar="F", help="the upstream's key (also env NANOSEEK_UPSTREAM_API_KEY)")


def read_keys(path: str | None) -> list[str]:
    keys = [k.strip() for k in os.environ.get("NANOSEEK_API_KEYS", "").split(",") if k.strip()]
    if path:
        lines = Path(path).read_text().splitlines()
        keys += [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
    return keys


def inference_config(args: argparse.Namespace):
    """The engine's fast paths from the serve flags (InferenceConfig checks them)."""
    from ..infer.config import InferenceConfig
    return InferenceConfig(expert_path=args.expert_path, compile=args.compile, decode_burst=args.decode_burst,
                           fused_decode_rows=args.fused_decode, decode_attention=args.decode_attention,
                           prefix_cache=args.prefix_cache)


def cpu_threads(requested: int | None) -> int | None:
    """The model's intra-op threads on a CPU: `requested`, else OMP_NUM_THREADS's choice (None:
    left as torch set it), else the cores this process may use less one. The engine's threads
    share the cores with the event loop that streams every token: on 2 cores a tiny model served
    50.2 requests/s on 2 compute threads and 129.8 on 1 (benchmarks/results/serve_load_tiny*.json)."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def load_engine(args: argparse.Namespace, config):
    """(engine, tokenizer) of --model on --device, its weights as --dtype says, with the serve
    flags' fast paths."""
    from ..infer.engine import Engine
    from ..infer.fp8_weights import DTYPE_CHOICES
    from ..loading import load_model_dir
    _, model, tokenizer = load_model_dir(args.model, args.device, **DTYPE_CHOICES[args.dtype])
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len,
                    speculative_k=args.speculative, config=config)
    return engine, tokenizer


def check_args(args: argparse.Namespace):
    """Every flag's range, before anything loads (a ValueError is one line and exit 2); returns
    the engine's InferenceConfig."""
    if args.speculative < 0:
        raise ValueError(f"--speculative must be >= 0, got {args.speculative}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise ValueError(f"--cpu-threads must be positive, got {args.cpu_threads}")
    if args.prefix_cache and args.speculative:
        raise ValueError("--prefix-cache does not work with --speculative; drop one of them")
    config = inference_config(args)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_tokens", "max_queue", "max_messages", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("audit_rotate_bytes", "audit_backups", "feedback_window", "feedback_rate", "shutdown_timeout"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("header_timeout", "body_timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.upstream_models and not args.upstream:
        raise ValueError("--upstream-models needs --upstream URL")
    if args.upstream_overflow and not args.upstream_models:
        raise ValueError("--upstream-overflow needs --upstream URL --upstream-models NAME")
    return config


def settings_from_args(args: argparse.Namespace):
    """The server's Settings from the flags, the key files and the environment."""
    from .app import Settings
    from .cross_site import is_ip

    allowed_hosts = [h for h in args.allowed_hosts.split(",") if h]
    if not is_ip(args.host):
        allowed_hosts.append(args.host)
    upstream_key = os.environ.get("NANOSEEK_UPSTREAM_API_KEY")
    if args.upstream_api_key_file:
        upstream_key = Path(args.upstream_api_key_file).read_text().strip()
    return Settings(api_keys=read_keys(args.api_key_file), max_body_bytes=args.max_body_bytes,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    max_messages=args.max_messages, header_timeout=args.header_timeout,
                    body_timeout=args.body_timeout, shutdown_timeout=args.shutdown_timeout,
                    audit_log=args.audit_log, audit_content=args.audit_content,
                    audit_max_bytes=args.audit_rotate_bytes, audit_backups=args.audit_backups,
                    feedback_db=args.feedback_db, feedback_window=args.feedback_window,
                    feedback_rate=args.feedback_rate,
                    upstream_url=args.upstream, upstream_models=[m for m in args.upstream_models.split(",") if m],
                    upstream_api_key=upstream_key, upstream_overflow=args.upstream_overflow,
                    allowed_hosts=allowed_hosts, ui=args.ui, allow_unknown_fields=args.allow_unknown_fields)


def cmd_serve(args: argparse.Namespace) -> None:
    from .app import create_app
    from .server import build_server

    config = check_args(args)
    settings = settings_from_args(args)
    engine, tokenizer = load_engine(args, config)
    threads = cpu_threads(args.cpu_threads) if engine.device.type == "cpu" else None
    if threads is not None:  # the process's setting: the server is all this process runs
        import torch
        torch.set_num_threads(threads)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, settings)
    keys = settings.api_keys
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"nanoseek serve: warning: listening on {args.host} without API keys", file=sys.stderr)
    print(f"nanoseek serve: {name} on http://{args.host}:{args.port}/v1 ({len(keys)} API key(s), "
          f"{engine.num_slots} slots of {engine.max_len} tokens"
          + (f", {threads} compute thread(s)" if threads is not None else "") + ")", file=sys.stderr)
    if args.ui:
        print(f"nanoseek serve: chat page on http://{args.host}:{args.port}/", file=sys.stderr)
    run_until_signal(build_server(app, args.host, args.port))


def run_until_signal(server) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return (exit status 0). uvicorn raises
    the signal again once it has shut down, to whatever handler was there before it: here
    one that ignores it, where the default one would kill the process (or raise
    KeyboardInterrupt) after a clean shutdown."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
