"""The training loop that every rank runs.

    zhilu train                                          # gpt-tiny on the Python standard library
    zhilu train --nproc 2 --plan dp=2,zero=3             # two local processes, ZeRO-3
    zhilu train --model examples/my_model.py:spec --plan dp=2
    torchrun --nproc-per-node 2 -m zhilu train           # the same under torchrun

Order of construction, fixed: process group and mesh -> the parts of the model this rank
runs, built from its spec and parallelised (pipeline stages; tensor parallel -> recompute ->
compile -> DDP/FSDP2, see zhilu/parallel/parallelize.py) -> one AdamW per part ->
checkpoint restore. Losses are the mean over the global batch, so every plan reports what
one process with the same global batch would.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from zhilu.config import JobConfig
from zhilu.data.batches import training_data
from zhilu.hardware import cluster
from zhilu.mfu import mfu
from zhilu.models.registry import spec_of
from zhilu.monitor.memory import memory_per_rank, peak_memory_gib, tensor_bytes
from zhilu.monitor.progress import TrainProgress
from zhilu.parallel.data_parallel import gradient_sync, reshard
from zhilu.parallel.local_sgd import ModelAveraging
from zhilu.parallel.mesh import ParallelEnv, init_parallel, shutdown_parallel
from zhilu.parallel.parallelize import build_parallel
from zhilu.parallel.tensor_parallel import whole
from zhilu.plan import Plan
from zhilu.spec import ModelSpec, measure_flops
from zhilu.training import predict
from zhilu.training.checkpoint import Checkpointer, load_model
from zhilu.training.metrics import MetricsFile, write_json
from zhilu.training.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from zhilu.training.report import print_memory, print_summary
from zhilu.training.sample import generate

SAMPLE_MAX_PARAMS = 2_000_000_000  # the end-of-run sample loads the whole model on rank 0


def run(cfg: JobConfig, plan: Plan, spec: ModelSpec | None = None) -> dict[str, Any] | None:
    """Entry point of one rank (also the torch elastic entry point). Rank 0 returns the summary.

    ``spec`` None: the model named by ``cfg.model``, resolved in this process."""
    spec = spec or spec_of(cfg)
    env = init_parallel(plan, cfg.launch.device)
    try:
        return Trainer(cfg, plan, spec, env).fit()
    finally:
        shutdown_parallel()


class Trainer:
    def __init__(self, cfg: JobConfig, plan: Plan, spec: ModelSpec, env: ParallelEnv) -> None:
        self.cfg, self.plan, self.spec, self.env = cfg, plan, spec, env
        t = cfg.train
        self.run_dir = Path(cfg.run.out)
        self.device = env.device
        self.precision = plan.precision
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                         else contextlib.nullcontext())
        self.data = training_data(cfg, spec, env.dp_rank, plan.dp)
        self.loader = self.data.loader

        self.pm = build_parallel(spec, plan, env, t.seed, cfg.model.compile)
        self.parts = self.pm.parts
        self.optimizers = [build_optimizer(part, t, self.device.type) for part in self.parts]
        self.averaging = (
            ModelAveraging(self.parts, self.optimizers, plan.avg_every, env.groups.get("average", env.dp_group),
                           cfg.parallel.average_optimizer_state)
            if plan.avg_every else None
        )
        self.loss_context = loss_parallel if self.pm.sharded_logits else contextlib.nullcontext
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, env.is_main)
        self.step = 0
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        # A resumed or restarted run continues from a valid `latest` (else refuses), its files
        # checked against the manifest first (load() verifies); with no checkpoint, from the start.
        latest = self.checkpointer.latest(strict=True) if cfg.checkpoint.resume or self.restarts > 0 else None
        if latest is not None:
            state = self.checkpointer.load(latest, self.parts, self.optimizers)
            self.step = state["step"]
            self.loader.load_state_dict(state["loader"])
        self.seq_len = t.seq_len if spec.is_language_model else 0
        self.items_per_step = t.global_batch * (self.seq_len or 1)  # tokens, or samples
        self.flops_per_item = self._flops_per_item()
        self.hardware = cluster(cfg.parallel.hardware) if cfg.parallel.hardware else None
        self.peak_tflops = (self.hardware.device.peak_tflops.get(self.precision) or None) if self.hardware else None
        self.num_params = spec.num_params()
        self.prediction, why_not = (predict.predict(cfg, spec, plan, self.hardware, self.device.type,
                                                    env.local_world_size) if env.is_main else (None, ""))
        if env.is_main and self.prediction is None:
            print(f"no prediction: {why_not}")

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
                    loss = self.spec.loss(model(x), y) / mb
                loss.backward()
            total += whole(loss.detach())
        return total

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # -- the whole run ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        t, env = self.cfg.train, self.env
        progress = TrainProgress(t.steps, self.step, enabled=env.is_main, unit="tok" if self.seq_len else "samples")
        metrics = MetricsFile(self.run_dir / "metrics.jsonl", self.step) if env.is_main else None
        shape = f"{t.global_batch} x {t.seq_len} tokens/step" if self.seq_len else f"{t.global_batch} samples/step"
        progress.print(
            f"[bold]zhilu[/] {self.spec.name} ({self.num_params / 1e6:.1f}M params) plan {self.plan.describe()} on "
            f"{env.world_size} x {self.device.type}, {shape}" + (f", resumed at step {self.step}" if self.step else "")
        )
        if self.prediction is not None:
            progress.print(predict.describe(self.prediction, self.cfg.parallel.hardware))
        wall_start = time.perf_counter()
        step_times: list[float] = []
        last_loss: float | None = None
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
                self.memory_mib = memory_per_rank(self.parts, self.optimizers, self.first_grad_bytes, self.device)
                print_memory(progress, self.memory_mib, self.device.type, self.prediction)
            evaluate = step == t.steps or step == 1 or (t.eval_every > 0 and step % t.eval_every == 0)
            if evaluate or step % t.log_every == 0:
                last_loss = self._global_mean(loss)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
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
        summary = self._summary(step_times, last_loss, val_loss, time.perf_counter() - wall_start)
        write_json(self.run_dir / "summary.json", summary)
        print_summary(progress, summary, self.run_dir)
        return summary

    def _summary(self, step_times: list[float], last_loss: float | None, val_loss: float | None,
                 wall_s: float) -> dict[str, Any]:
        t = self.cfg.train
        sample = self.sample(t.sample_tokens) if t.sample_tokens else None
        measured = statistics.median(step_times[1:] or step_times) if step_times else None
        e = self.prediction
        predicted = e.step_time_s if e is not None else None
        explain = (predict.explain(self.cfg, self.spec, self.plan, self.hardware, self.device.type,
                                   self.env.local_world_size) if e is not None and self.hardware is not None else None)
        return {
            "plan": self.plan.to_dict(),
            "world_size": self.env.world_size,
            "device": self.device.type,
            "model": self.spec.name,
            "params": self.num_params,
            "steps": t.steps,
            "seq_len": self.seq_len,
            "global_batch": t.global_batch,
            "hardware": self.cfg.parallel.hardware or None,
            "predicted_step_time_s": predicted,
            "measured_step_time_s": measured,
            "prediction_error": measured / predicted - 1 if measured and predicted else None,
            "predicted_breakdown": e.breakdown if e is not None else None,
            "predicted_memory_mib_per_rank": e.memory_gib_per_device * 1024 if e is not None else None,
            "tokens_per_s": self.items_per_step / measured if measured else None,
            "mfu": self._mfu(measured) if measured else None,
            "peak_tflops": self.peak_tflops,
            "final_loss": last_loss,
            "final_val_loss": val_loss,
            "wall_s": wall_s,
            "restarts": self.restarts,
            "memory_mib_per_rank": getattr(self, "memory_mib", None),  # None when resumed past step 1
            "sample": sample,
            "explain": explain,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.data.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast, self.loss_context():
                if self.pm.pipeline is not None:
                    loss = self.pm.pipeline.eval(x, y)
                    total += loss if loss is not None else 0.0
                else:
                    total += whole(self.spec.loss(self.parts[0](x), y))
        for part in self.parts:
            part.train()
            reshard(part)
        return self._global_mean(total / len(self.data.val_batches))

    @torch.no_grad()
    def sample(self, n_tokens: int) -> str | None:
        """Text generated on rank 0 from the start of the validation data, by a whole model
        loaded from the checkpoint just saved (so it also proves that checkpoint restores)."""
        spec = self.spec
        if self.data.prompt is None or self.data.decode is None:
            return None
        if self.num_params > SAMPLE_MAX_PARAMS:
            return None
        model = spec.create(self.device)
        load_model(self.checkpointer.latest(), model, no_dist=True, hashed=True)
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed)
        model.eval()
        with self.autocast:
            out = generate(model, self.data.prompt.to(self.device), n_tokens, spec.max_seq_len or self.seq_len,
                           generator=generator)
        return self.data.decode(out[0].tolist())

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

    def _flops_per_item(self) -> float:
        """Model FLOPs of forward and backward per token (a transformer's shape) or per sample (counted)."""
        if self.spec.shape is not None and self.seq_len:
            return self.spec.shape.flops_per_token(self.seq_len)
        x, y = self.data.val_batches[0]
        return measure_flops(self.spec, x[:1], y[:1]) / (self.seq_len or 1)

    def _mfu(self, step_time: float) -> float | None:
        if self.peak_tflops is None:
            return None
        return mfu(self.flops_per_item, self.items_per_step / step_time, self.env.world_size, self.peak_tflops)

    def _record(self, step: int, loss: float, step_time: float) -> dict[str, Any]:
        return {
            "step": step,
            "loss": loss,
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "step_time_s": step_time,
            "tokens_per_s": self.items_per_step / step_time,
            "mfu": self._mfu(step_time),
            "mem_gib": peak_memory_gib(self.device),
        }
