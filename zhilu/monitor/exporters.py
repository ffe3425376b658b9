"""Where rank 0 sends each logged step besides metrics.jsonl: TensorBoard and Prometheus.

    zhilu train --metrics.tensorboard true        # event files in <run>/tensorboard
    tensorboard --logdir runs/                    # (tensorboard's own command)
    zhilu train --metrics.prometheus 9400         # http://127.0.0.1:9400/metrics while training runs

Prometheus names follow its conventions: prefix ``zhilu_train_``, base units (``_seconds``,
``_bytes``), ratios in 0-1, ``_total`` on counters, and only ``term`` and ``rank`` as labels.
``zhilu_train_seconds_since_step`` is computed when scraped, so a hung job shows it growing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zhilu.errors import ZhiluError

if TYPE_CHECKING:
    from zhilu.config import MetricsSection

SCALARS = ("loss", "val_loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "hfu", "mem_gib")


class Exporters:
    """The exporters ``metrics`` asks for, on rank 0 (``enabled``); others do nothing."""

    def __init__(self, run_dir: Path, metrics: MetricsSection, enabled: bool, restarts: int) -> None:
        self.tensorboard = self.prometheus = None
        if not enabled:
            return
        if metrics.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ZhiluError("metrics.tensorboard", "needs the tensorboard package: pip install "
                                                        "'zhilu[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if metrics.prometheus:
            self.prometheus = PrometheusEndpoint(metrics.host, metrics.prometheus, restarts)

    def step_done(self, step: int) -> None:
        """Every optimizer step (cheap): the step counter and the time of the last step."""
        if self.prometheus is not None:
            self.prometheus.step_done(step)

    def write(self, record: dict[str, Any]) -> None:
        """A logged step (the metrics.jsonl line)."""
        step = record["step"]
        if self.tensorboard is not None:
            for key in SCALARS:
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], step)
            for group in ("breakdown", "predicted"):
                for term, seconds in record.get(group, {}).items():
                    self.tensorboard.add_scalar(f"{group}/{term}_s", seconds, step)
            self.tensorboard.flush()
        if self.prometheus is not None:
            self.prometheus.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.prometheus is not None:
            self.prometheus.close()


class PrometheusEndpoint:
    """The metrics of one training job, served on ``host:port`` from its own registry."""

    def __init__(self, host: str, port: int, restarts: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError:
            raise ZhiluError("metrics.prometheus", "needs the prometheus-client package: pip install "
                                                   "'zhilu[prometheus]'") from None
        r = self.registry = CollectorRegistry()
        self.step = Gauge("zhilu_train_step", "Optimizer steps completed", registry=r)
        self.loss = Gauge("zhilu_train_loss", "Training loss of the last logged step", registry=r)
        self.val_loss = Gauge("zhilu_train_validation_loss", "Validation loss of the last pass", registry=r)
        self.tokens = Gauge("zhilu_train_tokens_per_second", "Tokens (samples) trained on per second", registry=r)
        self.mfu = Gauge("zhilu_train_mfu_ratio", "Model FLOPs utilisation, 0-1", registry=r)
        self.hfu = Gauge("zhilu_train_hfu_ratio", "Hardware FLOPs utilisation (recomputation counted), 0-1",
                         registry=r)
        self.memory = Gauge("zhilu_train_memory_peak_bytes", "Peak memory (GPU allocated, CPU resident)", ["rank"],
                            registry=r)
        self.step_time = Gauge("zhilu_train_step_seconds", "Measured step time", registry=r)
        self.term = Gauge("zhilu_train_step_term_seconds", "Measured step time by term (mean over ranks)",
                          ["term"], registry=r)
        self.predicted = Gauge("zhilu_train_predicted_step_term_seconds", "Predicted step time by term", ["term"],
                               registry=r)
        self.compute = Gauge("zhilu_train_rank_compute_seconds", "A rank's own compute per step", ["rank"],
                             registry=r)
        self.straggler = Gauge("zhilu_train_straggler_rank", "The rank named a straggler; -1: none", registry=r)
        self.since = Gauge("zhilu_train_seconds_since_step", "Seconds since the last optimizer step ended",
                           registry=r)
        self.restarts = Counter("zhilu_train_restarts", "Restarts of the job so far", registry=r)
        self.restarts.inc(restarts)
        self.straggler.set(-1)
        self._last = time.monotonic()
        self.since.set_function(lambda: time.monotonic() - self._last)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=r)
        except OSError as e:
            raise ZhiluError("metrics.prometheus", f"cannot listen on {host}:{port} ({e.strerror}); choose a free "
                                                   "port") from None

    def step_done(self, step: int) -> None:
        self._last = time.monotonic()
        self.step.set(step)

    def write(self, record: dict[str, Any]) -> None:
        self.loss.set(record["loss"])
        if "val_loss" in record:
            self.val_loss.set(record["val_loss"])
        self.tokens.set(record["tokens_per_s"])
        if record["mfu"] is not None:
            self.mfu.set(record["mfu"])
            self.hfu.set(record["hfu"])
        self.memory.labels(rank="0").set(record["mem_gib"] * 2**30)
        self.step_time.set(record["step_time_s"])
        for term, seconds in record.get("breakdown", {}).items():
            self.term.labels(term=term).set(seconds)
        for term, seconds in record.get("predicted", {}).items():
            self.predicted.labels(term=term).set(seconds)
        for rank, seconds in enumerate(record.get("compute_s_by_rank", [])):
            self.compute.labels(rank=str(rank)).set(seconds)
        straggler = record.get("straggler")
        self.straggler.set(-1 if straggler is None else straggler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
