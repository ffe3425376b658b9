"""The training loop that every rank runs.

    zhilu train                                   # gpt-tiny on the Python standard library
    zhilu train --nproc 2 --plan dp=2,zero=3      # two local processes, ZeRO-3
    torchrun --nproc-per-node 2 -m zhilu train    # the same under torchrun

Order of construction, fixed: process group and mesh -> the parts of the model this rank
runs, parallelised (pipeline stages; tensor parallel -> recompute -> compile -> DDP/FSDP2,
see zhilu/parallel/apply.py) -> one AdamW per part -> checkpoint restore. Losses are the
mean over the global batch, so every plan reports what one process with the same global
batch would.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from zhilu.config import JobConfig
from zhilu.data.corpus import load_corpus
from zhilu.data.loader import ShardedLoader, eval_batches
from zhilu.errors import ZhiluError
from zhilu.hardware import cluster
from zhilu.models.gpt import build_model, loss_fn
from zhilu.models.presets import GPTConfig
from zhilu.monitor.memory import tensor_bytes
from zhilu.monitor.mfu import measure_matmul_flops
from zhilu.monitor.progress import TrainProgress
from zhilu.parallel.apply import parallelize
from zhilu.parallel.data_parallel import gradient_sync, reshard
from zhilu.parallel.local_sgd import ModelAveraging
from zhilu.parallel.mesh import ParallelEnv, init_parallel, shutdown_parallel
from zhilu.parallel.tensor_parallel import whole
from zhilu.perf import job
from zhilu.perf.step import Estimate
from zhilu.plan import Plan
from zhilu.train.checkpoint import Checkpointer, load_model
from zhilu.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr


def run(cfg: JobConfig, plan: Plan, model_cfg: GPTConfig) -> dict[str, Any] | None:
    """Entry point of one rank (also the torch elastic entry point). Rank 0 returns the summary."""
    env = init_parallel(plan, cfg.launch.device)
    try:
        return Trainer(cfg, plan, model_cfg, env).fit()
    finally:
        shutdown_parallel()


SAMPLE_MAX_PARAMS = 2_000_000_000  # the end-of-run sample loads the whole model on rank 0


class Trainer:
    def __init__(self, cfg: JobConfig, plan: Plan, model_cfg: GPTConfig, env: ParallelEnv) -> None:
        self.cfg, self.plan, self.model_cfg, self.env = cfg, plan, model_cfg, env
        t = cfg.train
        self.run_dir = Path(cfg.run.out)
        self.device = env.device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction)
        self.byte_level = corpus.vocab_size <= 256
        dp_rank = env.dp_rank
        self.loader = ShardedLoader(corpus.train, t.seq_len, t.global_batch, dp_rank, plan.dp, t.seed)
        self.val_batches = eval_batches(
            corpus.val, t.seq_len, t.eval_batches, t.global_batch, dp_rank, plan.dp, seed=t.seed
        )
        self.prompt = torch.tensor(corpus.val[:16].astype("int64"))[None]

        self.pm = parallelize(model_cfg, plan, env, t.seed, cfg.model.compile)
        self.parts = self.pm.parts
        self.optimizers = [build_optimizer(part, t, self.device.type) for part in self.parts]
        self.averaging = (
            ModelAveraging(self.parts, self.optimizers, plan.avg_every, env.dp_group, cfg.parallel.average_optimizer_state)
            if plan.avg_every else None
        )
        self.loss_context = loss_parallel if plan.tp > 1 else contextlib.nullcontext
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, env.is_main)
        self.step = 0
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        latest = self.checkpointer.latest()
        if latest is not None and (cfg.checkpoint.resume or self.restarts > 0):
            state = self.checkpointer.load(latest, self.parts, self.optimizers)
            self.step = state["step"]
            self.loader.load_state_dict(state["loader"])
        self.tokens_per_step = t.global_batch * t.seq_len
        self.flops_per_step = model_cfg.flops_per_token(t.seq_len) * self.tokens_per_step
        self.peak_flops = self._peak_flops()
        self.hardware = cluster(cfg.parallel.hardware) if cfg.parallel.hardware else None
        self.prediction = self._predict()

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward, backward and update on this rank's share of one global batch.

        Returns this rank's mean loss (detached, not yet averaged over ranks; zero on a
        pipeline rank without the last stage)."""
        lr = lr_at(self.step, self.cfg.train)
        for opt in self.optimizers:
            set_lr(opt, lr)
        with self.loss_context():
            if self.pm.pipeline is not None:
                with self.autocast:
                    loss = self.pm.pipeline.step(inputs, targets)
                total = loss if loss is not None else torch.zeros((), device=self.device)
            else:
                total = self._accumulate(inputs, targets)
        if self.cfg.train.grad_clip > 0:
            clip_grad_norm(self.parts, self.cfg.train.grad_clip, self.env.group("pp"))
        if self.step == 0:
            self.first_grad_bytes = tensor_bytes(p.grad for part in self.parts for p in part.parameters())
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.averaging is not None:
            self.averaging.after_step(self.step)
        return total

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        model, mb = self.parts[0], self.plan.mb
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(inputs.chunk(mb), targets.chunk(mb))):
            with gradient_sync(model, self.plan, last_micro_batch=i == mb - 1):
                with self.autocast:
                    loss = loss_fn(model(x), y) / mb
                loss.backward()
            total += whole(loss.detach())
        return total

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # -- the whole run ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        t, env = self.cfg.train, self.env
        progress = TrainProgress(t.steps, self.step, enabled=env.is_main)
        metrics = _MetricsFile(self.run_dir / "metrics.jsonl", self.step) if env.is_main else None
        progress.print(
            f"[bold]zhilu[/] {self.cfg.model.preset} ({self.model_cfg.num_params() / 1e6:.1f}M params) "
            f"plan {self.plan.describe()} on {env.world_size} x {self.device.type}, "
            f"{t.global_batch} x {t.seq_len} tokens/step" + (f", resumed at step {self.step}" if self.step else "")
        )
        if self.prediction is not None:
            e = self.prediction
            parts = sorted(((v / e.step_time_s, k) for k, v in e.breakdown.items() if v >= 0.01 * e.step_time_s),
                           reverse=True)
            progress.print(f"predicted {e.step_time_s * 1e3:,.0f} ms/step (" + ", ".join(
                f"{k} {share:.0%}" for share, k in parts) + f"), {e.memory_gib_per_device * 1024:,.1f} MiB per rank "
                f"of model states and activations; hardware: {self.cfg.parallel.hardware}"
                + (" (a rough preset; `zhilu calibrate` measures this machine)"
                   if self.cfg.parallel.hardware == "cpu" else ""))
        wall_start = time.perf_counter()
        step_times: list[float] = []
        last_loss = float("nan")
        val_loss: float | None = None
        interval_start, interval_steps = time.perf_counter(), 0
        # Fault injection for testing resume and restarts: crash once, on the first attempt.
        fail_at = int(os.environ.get("ZHILU_FAIL_AT_STEP", 0)) if self.restarts == 0 else 0
        while self.step < t.steps:
            if self.step == fail_at > 0:
                raise RuntimeError(f"ZHILU_FAIL_AT_STEP={fail_at}: simulated crash")
            x, y = self.next_batch()
            loss = self.train_step(x, y)
            interval_steps += 1
            step = self.step
            progress.advance(step)
            if step == 1:
                self._report_memory(progress)
            evaluate = step == t.steps or step == 1 or (t.eval_every > 0 and step % t.eval_every == 0)
            if evaluate or step % t.log_every == 0:
                last_loss = self._global_mean(loss)
                _sync(self.device)
                step_time = (time.perf_counter() - interval_start) / interval_steps
                step_times.extend([step_time] * interval_steps)
                record = self._record(step, last_loss, step_time)
                if evaluate:
                    val_loss = record["val_loss"] = self.evaluate()
                if metrics is not None:
                    metrics.write(record)
                progress.update(step, record)
                interval_start, interval_steps = time.perf_counter(), 0
            if step == t.steps or (self.cfg.checkpoint.every > 0 and step % self.cfg.checkpoint.every == 0):
                self.save()
                interval_start = time.perf_counter()
        progress.close()
        if not env.is_main:
            return None
        sample = self.sample(t.sample_tokens) if t.sample_tokens else None
        measured = statistics.median(step_times[1:] or step_times) if step_times else None
        predicted = self.prediction.step_time_s if self.prediction is not None else None
        summary = {
            "plan": self.plan.to_dict(),
            "world_size": env.world_size,
            "device": self.device.type,
            "model": self.cfg.model.preset,
            "params": self.model_cfg.num_params(),
            "steps": t.steps,
            "seq_len": t.seq_len,
            "global_batch": t.global_batch,
            "hardware": self.cfg.parallel.hardware or None,
            "predicted_step_time_s": predicted,
            "measured_step_time_s": measured,
            "prediction_error": measured / predicted - 1 if measured and predicted else None,
            "predicted_breakdown": self.prediction.breakdown if self.prediction is not None else None,
            "predicted_memory_mib_per_rank": self.prediction.memory_gib_per_device * 1024 if predicted else None,
            "tokens_per_s": self.tokens_per_step / measured if measured else None,
            "mfu": self.flops_per_step / measured / self.peak_flops if measured else None,
            "final_loss": last_loss,
            "final_val_loss": val_loss,
            "wall_s": time.perf_counter() - wall_start,
            "restarts": self.restarts,
            "memory_mib_per_rank": getattr(self, "memory_mib", None),  # None when resumed past step 1
            "sample": sample,
            "explain": self._explain(),
        }
        _write_json(self.run_dir / "summary.json", summary)
        _print_summary(progress, summary, self.run_dir)
        return summary

    def _predict(self) -> Estimate | None:
        """The performance model's step time and memory for this job (rank 0; None without hardware)."""
        if not self.env.is_main:
            return None
        if self.hardware is None:
            print("no prediction: this device is not known; `zhilu calibrate` measures it")
            return None
        t = self.cfg.train
        try:
            return job.predict(self.model_cfg, t.seq_len, t.global_batch, self.plan, self.hardware, self.device.type,
                               self.env.local_world_size, self.cfg.parallel.average_optimizer_state)
        except ZhiluError as e:  # a plan the model does not cover still trains
            print(f"no prediction: {e}")
            return None

    def _explain(self) -> dict[str, Any] | None:
        if self.prediction is None:
            return None
        t = self.cfg.train
        try:
            return job.explain(self.model_cfg, t.seq_len, t.global_batch, self.plan, self.hardware, self.device.type,
                               self.env.local_world_size)
        except ZhiluError:
            return None

    @torch.no_grad()
    def evaluate(self) -> float:
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast, self.loss_context():
                if self.pm.pipeline is not None:
                    loss = self.pm.pipeline.eval(x, y)
                    total += loss if loss is not None else 0.0
                else:
                    total += whole(loss_fn(self.parts[0](x), y))
        for part in self.parts:
            part.train()
            reshard(part)
        return self._global_mean(total / len(self.val_batches))

    @torch.no_grad()
    def sample(self, n_tokens: int) -> str | None:
        """Text generated on rank 0 from the start of the validation data, by a whole model
        loaded from the checkpoint just saved (so it also proves that checkpoint restores)."""
        if self.model_cfg.num_params() > SAMPLE_MAX_PARAMS:
            return None
        model = build_model(self.model_cfg, self.device)
        load_model(self.checkpointer.latest(), model, no_dist=True)
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed)
        model.eval()
        with self.autocast:
            out = model.generate(self.prompt.to(self.device), n_tokens, generator=generator)
        tokens = out[0].tolist()
        return bytes(tokens).decode("utf-8", errors="replace") if self.byte_level else " ".join(map(str, tokens))

    def save(self) -> None:
        state = {"step": self.step, "loader": self.loader.state_dict(), "plan": self.plan.to_dict()}
        self.checkpointer.save(self.step, self.parts, self.optimizers, state)

    # -- helpers ---------------------------------------------------------------------------
    def _global_mean(self, value: torch.Tensor) -> float:
        """The loss of the global batch: from the last pipeline stage, averaged over replicas."""
        value = value.detach().clone()
        for dim in ("pp", "dp"):
            group = self.env.group(dim)
            if group is not None:
                dist.all_reduce(value, group=group)
        return value.item() / self.plan.dp

    def _report_memory(self, progress: TrainProgress) -> None:
        """Print what each rank holds after the first step: parameters, gradients, optimizer states, peak."""
        held = torch.tensor([
            tensor_bytes(p for part in self.parts for p in part.parameters()),
            self.first_grad_bytes,
            tensor_bytes(v for opt in self.optimizers for state in opt.state.values() for v in state.values()),
            _peak_memory_gib(self.device) * 2**30,
        ], dtype=torch.float64)
        rows = [held]
        if dist.is_initialized():
            rows = [torch.zeros_like(held) for _ in range(self.env.world_size)]
            dist.all_gather(rows, held)
        keys = ("params", "grads", "optimizer", "peak")
        self.memory_mib = [dict(zip(keys, (v / 2**20 for v in row.tolist()))) for row in rows]
        progress.print("memory per rank after step 1 (MiB): params / grads / optimizer / peak " +
                       ("RSS" if self.device.type == "cpu" else "allocated"))
        for rank, row in enumerate(self.memory_mib):
            progress.print(f"  rank {rank}: " + " / ".join(f"{row[k]:,.1f}" for k in keys))
        if self.prediction is not None:
            m = self.prediction.memory
            progress.print(f"  predicted (most loaded rank): {m.weights / 2**20:,.1f} / {m.gradients / 2**20:,.1f} / "
                           f"{m.optimizer / 2**20:,.1f} / {m.total / 2**20:,.1f} of states, activations and buffers")

    def _record(self, step: int, loss: float, step_time: float) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / step_time
        return {
            "step": step,
            "loss": loss,
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_step / step_time / self.peak_flops,
            "mem_gib": _peak_memory_gib(self.device),
        }

    def _peak_flops(self) -> float:
        """Matmul FLOP/s of all ranks together, measured now (all ranks at once, as they train)."""
        if dist.is_initialized():
            dist.barrier()
        if self.device.type == "cuda":
            rate = measure_matmul_flops(self.device, torch.bfloat16, size=4096, seconds=0.5)
        else:
            rate = measure_matmul_flops(self.device, torch.float32, size=1024, seconds=0.3)
        value = torch.tensor(rate, dtype=torch.float64)
        if dist.is_initialized() and self.device.type == "cpu":
            dist.all_reduce(value)
        elif dist.is_initialized():
            value *= self.env.world_size
        return value.item()


class _MetricsFile:
    """metrics.jsonl, one line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int) -> None:
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")


def _print_summary(progress: TrainProgress, s: dict[str, Any], run_dir: Path) -> None:
    plan = Plan(**s["plan"]).describe()
    lines = [
        f"[bold]plan[/]        {plan} on {s['world_size']} x {s['device']}",
        f"[bold]throughput[/]  {s['tokens_per_s']:,.0f} tokens/s, {s['measured_step_time_s'] * 1e3:.0f} ms/step, "
        f"MFU {100 * s['mfu']:.1f}%",
        f"[bold]loss[/]        train {s['final_loss']:.4f}, validation {s['final_val_loss']:.4f}",
    ]
    if s["prediction_error"] is not None:
        lines.insert(2, f"[bold]predicted[/]   {s['predicted_step_time_s'] * 1e3:.0f} ms/step, measured "
                        f"{s['measured_step_time_s'] * 1e3:.0f} ({s['prediction_error']:+.0%})")
    if s["explain"] is not None:
        x = s["explain"]
        line = f"[bold]time goes to[/] {x['meaning']} ({x['share']:.0%} of the predicted step)"
        if x["switch_to"]:
            w = x["switch_to"]
            line += f"; --plan {w['plan']} is predicted {w['predicted_speedup']:.2f}x faster"
        lines.append(line)
    lines.append(f"[bold]run[/]         {run_dir}")
    for line in lines:
        progress.print(line)
    if s["sample"] is not None:
        progress.print("[bold]sample[/]")
        progress.print(s["sample"], markup=False)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
