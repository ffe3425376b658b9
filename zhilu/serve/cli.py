"""``zhilu serve`` and ``zhilu generate``: a run directory's model behind OpenAI's API, or from the shell.

    zhilu serve runs/tiny [--host 127.0.0.1] [--port 8000] [--reload] [--api-key KEY]
    zhilu generate runs/tiny --prompt 'def main(' [--max-tokens 64] [--temperature 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zhilu.errors import ZhiluError

API_KEY_ENV = "ZHILU_API_KEY"


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out of a zhilu train run")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: the most likely token each time "
                   "(default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                   "probabilities reach this (default 1)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="end the text before this string (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out of a zhilu train run")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run "
                   "directory's name)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every endpoint but "
                   f"/healthz (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--reload", action="store_true", help="move to each newer checkpoint the run writes, without "
                   "dropping a request")
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between looks for a newer "
                   "checkpoint (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting; more is HTTP 429 (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="default 0: the model's context less one")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens per choice at most (default 0: what fits)")
    p.add_argument("--max-n", type=int, default=8, help="choices per request at most (default 8)")
    p.add_argument("--max-request-kb", type=int, default=1024, help="request body size at most (default 1024)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _positive(name: str, value: float, low: float = 1) -> None:
    if value < low:
        raise ZhiluError(name, f"must be at least {low}, got {value}")


def generate(args: argparse.Namespace) -> int:
    from zhilu.serve.engine import Engine
    from zhilu.serve.loading import load_run
    from zhilu.serve.protocol import APIError, CompletionRequest, Limits, sampling

    run = load_run(args.run_dir, args.device)
    if run.tokenizer is None:
        raise ZhiluError("RUN_DIR", f"{args.run_dir} was trained on token ids and has no tokenizer; valid: zhilu "
                                    "serve with prompts as token ids")
    prompt = run.tokenizer.encode(args.prompt)
    req = CompletionRequest(model="", prompt=args.prompt, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or None)
    try:
        params = sampling(req, args.max_tokens, len(prompt), run.max_seq_len, Limits())
    except APIError as e:
        raise ZhiluError(f"--{(e.param or 'prompt').replace('_', '-')}", e.message) from None
    engine = Engine(run.model, run.step, run.max_seq_len, run.tokenizer, max_batch=1)
    try:
        text = engine.wait(engine.submit(prompt, params))
    finally:
        engine.close()
    print(args.prompt + text)
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from zhilu.serve.server import Metrics, ServedModel, create_app
    except ImportError as e:
        raise ZhiluError("serve", f"needs {e.name}: pip install 'zhilu[serve]'") from None
    from zhilu.serve.engine import Engine
    from zhilu.serve.loading import chat_template, load_run
    from zhilu.serve.protocol import Limits
    from zhilu.serve.reload import Reloader

    for name in ("port", "max_batch", "max_queue", "max_n", "max_request_kb"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--reload-interval", args.reload_interval, 0.05)
    _check_port_free(args.host, args.port)
    run = load_run(args.run_dir, args.device)
    metrics = Metrics()
    engine = Engine(run.model, run.step, run.max_seq_len, run.tokenizer, args.max_batch, metrics.on_step)
    name = args.model_name or Path(args.run_dir).resolve().name
    served = ServedModel(name, engine, run.max_seq_len, run.tokenizer, chat_template(run))
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_n, args.max_request_kb * 1024, args.max_queue)
    app = create_app(served, limits, args.api_key or os.environ.get(API_KEY_ENV) or None, metrics)
    reloader = Reloader(run.run_dir, engine, args.device, args.reload_interval, metrics.step.set) \
        if args.reload else None
    print(f"zhilu serve: {name} (step {run.step}, {run.spec.name}, tokenizer "
          f"{run.tokenizer.name if run.tokenizer else 'none: token ids'}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if reloader is not None:
            reloader.close()
        engine.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ZhiluError("--port", f"cannot listen on {host}:{port} ({e.strerror}); valid: a free port, or "
                                       "--host an address of this machine") from None
