"""The training loop that every rank runs.

    zhilu train                                          # gpt-tiny on the Python standard library
    zhilu train --nproc 2 --plan dp=2,zero=3             # two local processes, ZeRO-3
    zhilu train --model examples/my_model.py:spec --plan dp=2
    torchrun --nproc-per-node 2 -m zhilu train           # the same under torchrun

Order of construction, fixed: process group and mesh -> the parts of the model this rank
runs, built from its spec and parallelised (pipeline stages; tensor parallel -> recompute ->
compile -> DDP/FSDP2, see zhilu/parallel/parallelize.py) -> one AdamW per part ->
checkpoint restore (the newest good one). Losses are the mean over the global batch, so
every plan reports what one process with the same global batch would.

Each step, one flag reduced over all ranks carries "a loss or gradient norm here is not
finite" and "pre-emption asked for a checkpoint" before any optimizer step, so every rank
takes the same decision (:mod:`zhilu.training.bad_steps`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

import zhilu
from zhilu.config import JobConfig
from zhilu.data.batches import training_data
from zhilu.errors import ZhiluError
from zhilu.hardware import cluster
from zhilu.mfu import mfu
from zhilu.models.registry import spec_of
from zhilu.monitor.breakdown import StepClock
from zhilu.monitor.exporters import Exporters
from zhilu.monitor.memory import memory_per_rank, tensor_bytes
from zhilu.monitor.profile import profiled
from zhilu.monitor.progress import TrainProgress
from zhilu.parallel.data_parallel import (
    gradient_sync,
    on_bucket_launch,
    reshard,
    settle_buckets,
)
from zhilu.parallel.local_sgd import ModelAveraging
from zhilu.parallel.mesh import ParallelEnv, init_parallel, shutdown_parallel
from zhilu.parallel.parallelize import build_parallel
from zhilu.parallel.tensor_parallel import whole
from zhilu.plan import Plan
from zhilu.spec import ModelSpec, flops_per_item
from zhilu.training import predict
from zhilu.training.bad_steps import BadSteps
from zhilu.training.checkpoint import Checkpointer
from zhilu.training.checkpoint_files import read_manifest
from zhilu.training.faults import Faults
from zhilu.training.metrics import MetricsFile, hardware_flops_ratio, step_record, write_json
from zhilu.training.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from zhilu.training.report import print_memory, print_summary
from zhilu.training.summary import note_resumed, run_summary
from zhilu.training.watchdog import Watchdog


def run(cfg: JobConfig, plan: Plan, spec: ModelSpec | None = None, attempt: int = 0,
        history: list[dict[str, Any]] | None = None, supervised: bool = False) -> dict[str, Any] | None:
    """Entry point of one rank. Rank 0 returns the summary.

    ``spec`` None: the model named by ``cfg.model``, resolved in this process. ``attempt``
    and ``history``: which try of the job this is and why the earlier ones ended (from zhilu's
    launcher; under torchrun, its restart count). ``supervised``: under zhilu's launcher, which
    gets a ZhiluError back as ``{"error": ...}`` and hangs are watched for."""
    spec = spec or spec_of(cfg)
    env = init_parallel(plan, cfg.launch.device, timeout_s=_collective_timeout(cfg))
    try:
        return Trainer(cfg, plan, spec, env, attempt, history, supervised).fit()
    except ZhiluError as e:
        if supervised:
            return {"error": [e.field, e.message]}
        raise
    finally:
        shutdown_parallel()


class Trainer:
    def __init__(self, cfg: JobConfig, plan: Plan, spec: ModelSpec, env: ParallelEnv, attempt: int = 0,
                 history: list[dict[str, Any]] | None = None, supervised: bool = False) -> None:
        self.cfg, self.plan, self.spec, self.env = cfg, plan, spec, env
        t = cfg.train
        self.run_dir = Path(cfg.run.out)
        self.device = env.device
        self.precision = plan.precision
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                         else contextlib.nullcontext())
        self.attempt = attempt if supervised else int(os.environ.get("TORCHELASTIC_RESTART_COUNT", attempt))
        self.history = history if history is not None else [{"attempt": a, "cause": "torchrun restarted the job"}
                                                             for a in range(1, self.attempt + 1)]
        self.faults = Faults(env.rank, self.attempt)
        self.watchdog = (Watchdog(self.run_dir, env.rank, env.world_size, cfg.launch.hang_timeout)
                         if supervised or env.world_size > 1 else None)
        self._phase(0, "start")
        self.data = training_data(cfg, spec, env.dp_rank, plan.dp)
        self.loader = self.data.loader

        self.pm = build_parallel(spec, plan, env, t.seed, cfg.model.compile)
        self.parts = self.pm.parts
        self.clock = StepClock(env.world_size, names_stragglers=self.device.type == "cpu")
        self._backward_cpu = 0.0  # CPU seconds of the last backward (a slow-rank fault adds a share of it)
        self.clock.watch_recompute(self.parts[0])
        if cfg.metrics.tp_comm and plan.tp > 1:
            self.clock.watch_tensor_parallel(env.group("tp").group_name, self.faults.tp_delay(lambda: self.step + 1))
        if self.pm.pipeline is None:  # the clock learns when DDP launches each gradient bucket's all-reduce
            on_bucket_launch(self.parts[0], self.clock.bucket_launched, self.faults.comm_delay(lambda: self.step + 1))
        else:
            self.clock.watch_stages(self.pm.pipeline.stages)
            self.faults.delay_stages(self.parts, lambda: self.step + 1)
        self.optimizers = [build_optimizer(part, t, self.device.type) for part in self.parts]
        self.averaging = (
            ModelAveraging(self.parts, self.optimizers, plan.avg_every, env.groups.get("average", env.dp_group),
                           cfg.parallel.average_optimizer_state)
            if plan.avg_every else None
        )
        self.loss_context = loss_parallel if self.pm.sharded_logits else contextlib.nullcontext
        about = {"plan": plan.spec(), "world_size": env.world_size, "model": spec.name,
                 "versions": {"zhilu": zhilu.__version__, "torch": torch.__version__}}
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_, about, self.faults)
        self.bad = BadSteps(t.on_bad_step, t.bad_steps_in_a_row)
        self.step, self.saved_step, self.stop_asked = 0, 0, False  # stop_asked: by SIGUSR1, save and stop
        with contextlib.suppress(ValueError):  # not the main thread: no pre-emption signal
            signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "stop_asked", True))
        if cfg.checkpoint.resume or self.attempt > 0:
            self._phase(0, "load")
            path = self.checkpointer.newest_good(say=self._say)
            if path is not None:
                self.restore(path)
        if self.history:
            note_resumed(self.history, self.step)
            if self.watchdog is not None:
                self.watchdog.resumed(self.step)
        self.seq_len = t.seq_len if spec.is_language_model else 0
        self.items_per_step = t.global_batch * (self.seq_len or 1)  # tokens, or samples
        self.flops_per_item = flops_per_item(spec, self.seq_len, *self.data.val_batches[0])
        self.hfu_ratio = hardware_flops_ratio(spec, self.plan.recompute, *self.data.val_batches[0])
        self.hardware = cluster(cfg.parallel.hardware) if cfg.parallel.hardware else None
        self.peak_tflops = (self.hardware.device.peak_tflops.get(self.precision) or None) if self.hardware else None
        self.num_params = spec.num_params()
        self.prediction, why_not = (predict.predict(cfg, spec, plan, self.hardware, self.device.type,
                                                    env.local_world_size) if env.is_main else (None, ""))
        if env.is_main and self.prediction is None:
            print(f"no prediction: {why_not}")

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Forward, backward and, unless some rank's loss or gradient norm is not finite, the
        update, on this rank's share of one global batch.

        Returns the ranks whose loss (else gradient norm) was not finite (none: the update was
        made), this rank's mean loss
        (detached, not yet averaged over ranks; zero on a pipeline rank without the last stage)
        and the gradient norm."""
        lr = lr_at(self.step, self.cfg.train)
        for opt in self.optimizers:
            set_lr(opt, lr)
        self._phase(self.step + 1, "forward")
        with self.loss_context():
            if self.pm.pipeline is not None:
                with self.autocast, self.clock.term("pipeline"):
                    loss = self.pm.pipeline.step(inputs, targets)
                total = loss if loss is not None else torch.zeros((), device=self.device)
            else:
                total = self._accumulate(inputs, targets)
        with self.clock.term("optimizer"):
            norm = clip_grad_norm(self.parts, self.cfg.train.grad_clip, self.env.group("pp"))
        if self.step == 0:
            self.first_grad_bytes = tensor_bytes(p.grad for part in self.parts for p in part.parameters())
        # flags[r]: rank r's loss is not finite; flags[world + r]: its gradient norm; flags[-1]: stop asked for
        world = self.env.world_size
        flags = torch.zeros(2 * world + 1, device=self.device)
        flags[self.env.rank] = (~torch.isfinite(total)).float()
        flags[world + self.env.rank] = (~torch.isfinite(norm)).float()
        flags[-1] = float(self.stop_asked)
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.tolist()
        bad = ([r for r in range(world) if flags[r]] or [r for r in range(world) if flags[world + r]])
        self.stop_asked = bool(flags[-1])
        self._phase(self.step + 1, "optimizer")
        with self.clock.term("optimizer"):
            for opt in self.optimizers:
                if not bad:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            self.faults.sleep("optimizer", self.step + 1)
        if bad:
            return bad, total, norm
        self.step += 1
        self._phase(self.step, "end")  # complete: what a crash from here on leaves to recompute
        if self.averaging is not None:
            self.averaging.after_step(self.step)
        return bad, total, norm

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        model, mb = self.parts[0], self.plan.mb
        total = torch.zeros((), device=self.device)
        poison = float("nan") if self.faults.nan_at(self.loader.index) else 1.0
        for i, (x, y) in enumerate(zip(inputs.chunk(mb), targets.chunk(mb))):
            with gradient_sync(model, self.plan, last_micro_batch=i == mb - 1):
                with self.clock.term("forward"), self.autocast:
                    start = time.thread_time()
                    loss = self.spec.loss(model(x), y) * poison / mb
                    self.faults.spin(time.thread_time() - start)
                self._phase(self.step + 1, "backward")
                with self.clock.backward():
                    self.faults.spin(self._backward_cpu)
                    start = time.thread_time()
                    loss.backward()
                    self._backward_cpu = time.thread_time() - start
            total += whole(loss.detach())
        return total

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self.clock.term("data"):
            x, y = self.loader.next_batch()
            self.faults.sleep("data", self.step + 1)
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # -- the whole run ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        t, env = self.cfg.train, self.env
        progress = TrainProgress(t.steps, self.step, enabled=env.is_main, unit="tok" if self.seq_len else "samples")
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", self.step) if env.is_main else None
        exporters = Exporters(self.run_dir, self.cfg.metrics, env.is_main, self.attempt)
        shape = f"{t.global_batch} x {t.seq_len} tokens/step" if self.seq_len else f"{t.global_batch} samples/step"
        progress.print(
            f"[bold]zhilu[/] {self.spec.name} ({self.num_params / 1e6:.1f}M params) plan {self.plan.describe()} on "
            f"{env.world_size} x {self.device.type}, {shape}" + (f", resumed at step {self.step}" if self.step else "")
        )
        progress.print(f"data: {self.data.description}")
        if self.prediction is not None:
            progress.print(predict.describe(self.prediction, self.cfg.parallel.hardware))
        self.wall_start = wall_start = time.perf_counter()
        last_loss: float | None = None
        val_loss: float | None = None
        ended, error = "finished", None
        self.clock.reset()
        while self.step < t.steps:
            self.faults.at_step(self.step + 1)
            step_start = time.perf_counter()
            self.clock.start_step()
            with profiled(self.step + 1, self.cfg.metrics.profile_step, self.run_dir, env.rank, self.device.type):
                x, y = self.next_batch()
                bad, loss, norm = self.train_step(x, y)
            if bad:
                mean = self._global_mean(loss)
                action = self.bad.record(self.step + 1, self.loader.index, bad, mean, norm.item())
                self._say(f"zhilu: step {self.step + 1}: loss {mean:g}, gradient norm {norm.item():g}, not finite on "
                          f"rank {', '.join(map(str, bad))} (batch {self.loader.index}); the update is dropped")
                if action == "rollback" and not self.rollback():
                    action = "abort"
                if action == "abort":
                    ended, error = "aborted", self.bad.why_abort()
                    break
                self.clock.reset()
                continue
            self.clock.end_step()
            self.bad.good()
            step = self.step
            progress.advance(step)
            exporters.step_done(step)
            if self.watchdog is not None:
                self.watchdog.step_done(time.perf_counter() - step_start)
            if step == 1 and not self.attempt:
                self.memory_mib = memory_per_rank(self.parts, self.optimizers, self.first_grad_bytes, self.device)
                print_memory(progress, self.memory_mib, self.device.type, self.prediction)
            evaluate = step == t.steps or step == 1 or (t.eval_every > 0 and step % t.eval_every == 0)
            if evaluate or step % t.log_every == 0:
                last_loss = self._global_mean(loss)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                record = step_record(self, step, last_loss, norm.item(), self.clock.collect(self.device))
                if evaluate:
                    val_loss = record["val_loss"] = self.evaluate()
                    if self.data.bytes_per_token:
                        record["val_loss_per_byte"] = val_loss / self.data.bytes_per_token
                if self.metrics is not None:
                    self.metrics.write(record)
                exporters.write(record)
                progress.update(step, record)
                self.clock.reset()
            if self.stop_asked:
                ended = "preempted"
            if step == t.steps or ended == "preempted" or (self.cfg.checkpoint.every > 0
                                                           and step % self.cfg.checkpoint.every == 0):
                self.save()
                self.clock.reset()
            if ended == "preempted":
                break
        if ended == "aborted" and self.saved_step != self.step:  # keep the last good state
            self.save()
        self.checkpointer.wait()
        exporters.close()
        progress.close()
        if self.watchdog is not None:
            self.watchdog.close()
        if not env.is_main:
            return None
        summary = run_summary(self, ended, error, last_loss, val_loss, time.perf_counter() - wall_start)
        write_json(self.run_dir / "summary.json", summary)
        print_summary(progress, summary, self.run_dir)
        return summary

    def save(self) -> None:
        self.saved_step = self.step
        self._phase(self.step, "save")
        state = {"step": self.step, "loader": self.loader.state_dict(), "bad_steps": self.bad.state_dict()}
        self.checkpointer.save(self.step, self.parts, self.optimizers, state)

    def restore(self, path: Path) -> None:
        state = self.checkpointer.load(path, self.parts, self.optimizers)["trainer"]
        self.step = self.saved_step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.bad.load_state_dict(state.get("bad_steps", {}))
        if self.step and self.pm.pipeline is None:
            settle_buckets(self.parts[0], self._throwaway_backward)

    def _throwaway_backward(self) -> None:
        """A backward whose gradients are dropped, in eval mode (no running statistics move)."""
        x, y = (t[:1].to(self.device) for t in self.data.val_batches[0])
        self.parts[0].eval()
        with self.autocast:
            loss = self.spec.loss(self.parts[0](x), y)
        loss.backward()
        self.parts[0].train()

    def rollback(self) -> bool:
        """Return to the last checkpoint, passing over every batch drawn since it; False when
        there is none or this run has already rolled back to it."""
        self.checkpointer.wait()
        path = self.checkpointer.newest_good(say=self._say)
        if path is None or not self.bad.may_roll_back_to(int(read_manifest(path)["step"])):
            return False
        seen, drawn = self.bad.seen, self.loader.batches_drawn
        self.restore(path)
        self.loader.skip |= set(range(self.loader.batches_drawn, drawn))
        self.bad.seen = seen
        if self.metrics is not None:
            self.metrics.truncate(self.step)
        self._say(f"zhilu: rolled back to {path.name}; batches {self.loader.batches_drawn}-{drawn - 1} are skipped")
        return True

    @torch.no_grad()
    def evaluate(self) -> float:
        self._phase(self.step, "eval")
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

    # -- helpers ---------------------------------------------------------------------------
    def _phase(self, step: int, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase(step, name)

    def _say(self, line: str) -> None:
        if self.env.is_main:
            print(line, flush=True)

    def _global_mean(self, value: torch.Tensor) -> float:
        """The loss of the global batch: from the last pipeline stage, averaged over replicas."""
        value = value.detach().clone()
        for dim in ("pp", "dp"):
            group = self.env.group(dim)
            if group is not None:
                dist.all_reduce(value, group=group)
        return value.item() / self.plan.dp

    def _mfu(self, step_time: float) -> float | None:
        if self.peak_tflops is None:
            return None
        return mfu(self.flops_per_item, self.items_per_step / step_time, self.env.world_size, self.peak_tflops)


def _collective_timeout(cfg: JobConfig) -> float:
    """Seconds a collective waits before the process group gives up: beyond the hang bound, so
    the watchdog names a hang first (600 s when the bound is derived from the step time)."""
    return max(60.0, 2 * cfg.launch.hang_timeout) if cfg.launch.hang_timeout else 600.0
