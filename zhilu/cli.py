"""The ``zhilu`` command.

    zhilu train [CONFIG.toml] [--model PRESET|FILE.py:NAME|hf:DIR] [--nproc N] [--plan SPEC] [--section.key VALUE ...]
    zhilu plan --model llama3-8b --seq-len 8192 --global-batch 64 --gpus 64 --hardware h100-sxm
    zhilu calibrate [--nproc N] [--out FILE]
    zhilu data prepare SRC... --out DIR [--tokenizer bytes|bpe:VOCAB|hf:DIR] [--workers N]
    zhilu data inspect DIR [--json]
    zhilu serve RUN_DIR [--port 8000] [--reload] [--api-key KEY]
    zhilu generate RUN_DIR --prompt TEXT [--max-tokens N] [--temperature T]
    zhilu export RUN_DIR --out DIR
    zhilu report RUN_DIR [--out FILE]
    zhilu bench [--model ...] [--nproc N] [--steps N] [--out DIR] [-- TRAIN FLAGS]

Exit codes: 0 success, 2 the input is wrong (one ``error:`` line on stderr), 1 a bug or a crash.
"""

from __future__ import annotations

import argparse
import os
import sys

from zhilu.errors import ZhiluError

# Shortcut flags of `zhilu train` and the config keys they set.
TRAIN_FLAGS: dict[str, tuple[str, str]] = {
    "--model": ("model.name", "a preset (gpt-tiny, gpt2-124m, gpt-1.3b, llama-1b, llama3-8b, llama3-70b), "
                "FILE.py:NAME (a zhilu.ModelSpec) or hf:DIR (a transformers causal LM in a local directory)"),
    "--data": ("data.path", "a dataset `zhilu data prepare` wrote, a text file, a folder of text files, or uint16 .bin "
               "tokens (default: the Python standard library)"),
    "--nproc": ("launch.nproc", "local processes (default: one per GPU; on CPU dp x tp x pp of --plan, else 1)"),
    "--plan": ("parallel.plan", "key=value list of dp, tp, pp, zero, mb, schedule, vstages, sp, recompute, "
               "avg_every, avg_groups, precision, e.g. dp=2,tp=2,zero=3; or auto: the fastest plan the performance "
               "model predicts (default: dp over all processes)"),
    "--steps": ("train.steps", "optimizer steps (default 250)"),
    "--global-batch": ("train.global_batch", "sequences (samples) per step over all replicas (default 16)"),
    "--seq-len": ("train.seq_len", "tokens per sequence (default: the model's, 256 for gpt-tiny)"),
    "--seed": ("train.seed", "random seed (default 0)"),
    "--out": ("run.out", "run directory (default: runs/<model>-<time>)"),
    "--checkpoint-every": ("checkpoint.every", "save a checkpoint every N steps (always at the end)"),
    "--max-restarts": ("launch.max_restarts", "restart after a crash or a hang up to K times, from the newest good "
                       "checkpoint"),
    "--device": ("launch.device", "auto, cpu or cuda"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ZhiluError("arguments", f"{message}; see `{self.prog} --help`")


def _train_parser() -> argparse.ArgumentParser:
    from zhilu.config import settings_help

    def shown(default: object) -> str:
        return str(default).lower() if isinstance(default, bool) else repr(default)

    lines = [f"  --{key} {shown(default)}\n      {text}" for key, text, default in settings_help()]
    p = _Parser(
        prog="zhilu train",
        description="Train a model. Every setting can also be given as --section.key VALUE or in CONFIG.toml "
        "as [section] key = value.",
        epilog="settings (--section.key DEFAULT):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML file with [section] tables")
    for flag, (key, help_text) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=key, metavar=key.split(".")[1].upper(), help=help_text)
    p.add_argument("--resume", dest="checkpoint.resume", action="store_const", const="true",
                   help="continue the run in --out (its config.toml, overridden by the flags given) from its newest "
                   "good checkpoint")
    p.add_argument("--compile", dest="model.compile", action="store_const", const="true", help="torch.compile each block")
    p.add_argument("--dry-run", action="store_true", help="check everything, print the resolved configuration, the "
                   "data and the prediction, and stop before anything starts")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--section.key VALUE`` / ``--section.key=VALUE`` from the other arguments."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            if "=" in arg:
                overrides.append((name, arg.split("=", 1)[1]))
            elif i + 1 < len(argv):
                overrides.append((name, argv[i + 1]))
                i += 1
            else:
                raise ZhiluError(name, f"needs a value: --{name} VALUE")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def train(argv: list[str]) -> int:
    from zhilu.config import load_config
    from zhilu.launch.local import Interrupted, TrainingFailed
    from zhilu.launch.prepare import dry_run, launch, prepare

    rest, overrides = _split_overrides(argv)
    args = vars(_train_parser().parse_args(rest))
    config_path, only_check = args.pop("config"), args.pop("dry_run")
    flags = [(key, value) for key, value in args.items() if value is not None]
    cfg = load_config(config_path, flags + overrides)
    changes: list[str] = []
    if cfg.checkpoint.resume:  # the same run: its own config.toml, then CONFIG.toml and the flags over it
        from zhilu.launch.run_dir import resumed

        cfg, changes = resumed(cfg, config_path, flags + overrides)
    resolved, plan, spec = prepare(cfg, dry_run=only_check)
    if int(os.environ.get("RANK", 0)) == 0:
        for change in changes:
            print(f"zhilu train: {change}", file=sys.stderr, flush=True)
    if only_check:
        dry_run(resolved, plan, spec)
        return 0
    try:
        summary = launch(resolved, plan, spec)
    except TrainingFailed as e:
        print(f"zhilu train: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"zhilu train: stopped by {e}; {resolved.run.out} can be continued with --resume", file=sys.stderr)
        return 128 + e.signum
    if summary is not None and summary.get("ended") == "preempted":
        print(f"zhilu train: pre-empted; a checkpoint of step {summary['last_step']} is saved; continue with --resume",
              file=sys.stderr)
    if summary is not None and summary.get("ended") == "aborted":
        print(f"zhilu train: aborted at {summary['error']}; the last good state is saved in {resolved.run.out}",
              file=sys.stderr)
        return 1
    return 0


def plan(argv: list[str]) -> int:
    from zhilu.perf import plan_cli

    parser = _Parser(prog="zhilu plan", description="Predict step time and memory of parallel plans; pick the fastest that fits.")
    plan_cli.add_arguments(parser)
    return plan_cli.run(parser.parse_args(argv))


def calibrate(argv: list[str]) -> int:
    from zhilu import calibrate as calibration

    parser = _Parser(prog="zhilu calibrate", description="Measure this machine (products, memory, attention, "
                     "collectives) and write the hardware file that plan and train read.")
    calibration.add_arguments(parser)
    args = parser.parse_args(argv)
    from zhilu.launch.local import TrainingFailed

    try:
        return calibration.run(args)
    except TrainingFailed as e:
        print(f"zhilu calibrate: {e}", file=sys.stderr)
        return 1


def data(argv: list[str]) -> int:
    from zhilu.data import cli as data_cli

    parser = _Parser(prog="zhilu data", description="Prepare a corpus for training (clean, deduplicate, tokenize, "
                     "shard, manifest) and inspect prepared datasets.")
    data_cli.add_arguments(parser)
    return data_cli.run(parser.parse_args(argv))


def serve(argv: list[str]) -> int:
    from zhilu.serve import cli as serve_cli

    parser = _Parser(prog="zhilu serve", description="Serve a run's newest good checkpoint with OpenAI's API "
                     "(/v1/completions, /v1/chat/completions, /v1/models, /healthz, /metrics), batching requests "
                     "continuously.")
    serve_cli.add_serve_arguments(parser)
    return serve_cli.serve(parser.parse_args(argv))


def generate(argv: list[str]) -> int:
    from zhilu.serve import cli as serve_cli

    parser = _Parser(prog="zhilu generate", description="Continue a prompt with a run's newest good checkpoint.")
    serve_cli.add_generate_arguments(parser)
    return serve_cli.generate(parser.parse_args(argv))


def export(argv: list[str]) -> int:
    from zhilu.serve import export as exporter

    parser = _Parser(prog="zhilu export", description="Write a run's newest good checkpoint as safetensors and a "
                     "JSON config (a transformers directory for an hf:DIR model).")
    exporter.add_arguments(parser)
    return exporter.run(parser.parse_args(argv))


def bench(argv: list[str]) -> int:
    from zhilu.launch import bench as bencher

    parser = _Parser(prog="zhilu bench", description="Run one job under every strategy (one process, DDP, ZeRO-2, "
                     "ZeRO-3, TP, PP, --plan auto, model averaging) on this machine and compare them with the "
                     "prediction; writes report.html.")
    bencher.add_arguments(parser)
    return bencher.run(parser.parse_args(argv))


def report(argv: list[str]) -> int:
    from zhilu.monitor import report as reporter

    parser = _Parser(prog="zhilu report", description="Write a run's plots (loss, step time and its breakdown "
                     "measured and predicted, memory per rank, one step per rank) as one self-contained HTML file.")
    reporter.add_arguments(parser)
    return reporter.run(parser.parse_args(argv))


COMMANDS = {
    "train": (train, "train a model with a parallel plan"),
    "plan": (plan, "predict step time and memory of plans and pick the fastest that fits"),
    "calibrate": (calibrate, "measure this machine and write its hardware file"),
    "data": (data, "prepare a corpus (clean, deduplicate, tokenize, shard) and inspect prepared datasets"),
    "serve": (serve, "serve a trained run with OpenAI's API, continuous batching and reloads"),
    "generate": (generate, "continue a prompt with a trained run's model"),
    "export": (export, "write a trained run's model as safetensors"),
    "report": (report, "write a run's plots as one HTML file"),
    "bench": (bench, "compare every parallel strategy on this machine, measured and predicted"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: zhilu COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ZhiluError("command", f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
        return COMMANDS[command][0](rest)
    except ZhiluError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
