"""`nanoseek serve`: load a model, build the engine and the app, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..model.moe import EXPERT_PATHS


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: DIR's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights: auto keeps an FP8 checkpoint in FP8 (others as stored); bf16, fp32 dequantize")
    p.add_argument("--api-key-file", metavar="F", help="API keys, one per line (also env NANOSEEK_API_KEYS=k1,k2)")
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
    p.add_argument("--max-len", type=int, default=None, metavar="T",
                   help="tokens per sequence, prompt + output (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="accepted unfinished requests (then 429)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="B")
    p.add_argument("--audit-log", metavar="F", help="append one JSONL line per request (no content by default)")
    p.add_argument("--audit-content", action="store_true", help="put prompts and outputs in the audit log too")
    p.add_argument("--feedback-db", metavar="F", help="SQLite file for POST /v1/feedback (default: off)")
    p.add_argument("--upstream", metavar="URL", help="an OpenAI-compatible base URL, e.g. https://host/v1")
    p.add_argument("--upstream-models", default="", metavar="A,B",
                   help="models served by the upstream (the first also takes requests over local limits)")
    p.add_argument("--ui", action="store_true",
                   help="serve a chat page at / (shipped with nanoseek; the conversation stays in the browser)")
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
                           fused_decode_rows=args.fused_decode)


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


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import Settings, create_app

    if args.speculative < 0:
        raise ValueError(f"--speculative must be >= 0, got {args.speculative}")
    config = inference_config(args)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_tokens", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    upstream_models = [m for m in args.upstream_models.split(",") if m]
    if upstream_models and not args.upstream:
        raise ValueError("--upstream-models needs --upstream URL")
    keys = read_keys(args.api_key_file)
    upstream_key = os.environ.get("NANOSEEK_UPSTREAM_API_KEY")
    if args.upstream_api_key_file:
        upstream_key = Path(args.upstream_api_key_file).read_text().strip()
    engine, tokenizer = load_engine(args, config)
    settings = Settings(api_keys=keys, max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens, max_queue=args.max_queue, audit_log=args.audit_log,
                        audit_content=args.audit_content, feedback_db=args.feedback_db, upstream_url=args.upstream,
                        upstream_models=upstream_models, upstream_api_key=upstream_key, ui=args.ui)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, settings)
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"nanoseek serve: warning: listening on {args.host} without API keys", file=sys.stderr)
    print(f"nanoseek serve: {name} on http://{args.host}:{args.port}/v1 ({len(keys)} API key(s), "
          f"{engine.num_slots} slots of {engine.max_len} tokens)", file=sys.stderr)
    if args.ui:
        print(f"nanoseek serve: chat page on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
