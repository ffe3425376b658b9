"""zhilu from Python: train a model under a plan with one call.

    import zhilu
    summary = zhilu.train("examples/my_model.py:spec", plan="dp=2,zero=3", steps=50)
    summary = zhilu.train(my_spec, plan="dp=2", nproc=2, settings={"train.lr": 1e-2})

For a training loop of your own, :func:`zhilu.parallel.parallelize.parallelize` applies a
plan to a module (tensor parallel, recompute, compile, DDP/FSDP2) on the process group
:func:`zhilu.parallel.mesh.init_parallel` joins.
"""

from __future__ import annotations

from typing import Any

from zhilu.config import JobConfig
from zhilu.errors import ZhiluError
from zhilu.launch.prepare import launch, prepare
from zhilu.spec import ModelSpec


def train(model: ModelSpec | str = "gpt-tiny", *, plan: str = "", nproc: int = 0, data: str = "",
          steps: int | None = None, global_batch: int | None = None, seq_len: int | None = None,
          seed: int | None = None, out: str = "", resume: bool = False,
          settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train ``model`` (a spec, or what ``--model`` takes) and return rank 0's summary (``summary.json``).

    ``settings``: any other ``section.key`` of ``zhilu train --help``, e.g. ``{"train.lr": 1e-2}``.
    Raises :class:`zhilu.errors.ZhiluError` for bad input, before anything starts.
    """
    spec = model if isinstance(model, ModelSpec) else None
    values: dict[str, Any] = {"model.name": spec.name if spec else model, "parallel.plan": plan,
                              "launch.nproc": nproc, "data.path": data, "run.out": out, "checkpoint.resume": resume,
                              "train.steps": steps, "train.global_batch": global_batch, "train.seq_len": seq_len,
                              "train.seed": seed, **(settings or {})}
    values = {k: v for k, v in values.items() if v is not None}
    if resume:  # the same run: its own config.toml, these values over it
        import sys

        from zhilu.launch.run_dir import resumed

        given = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()
                 if k not in ("parallel.plan", "data.path", "run.out") or v]
        cfg, changes = resumed(JobConfig.from_dict(_nested(values)), None, given)
        for change in changes:
            print(f"zhilu: {change}", file=sys.stderr)
    else:
        cfg = JobConfig.from_dict(_nested(values))
    resolved, run_plan, resolved_spec = prepare(cfg, spec)
    return launch(resolved, run_plan, resolved_spec)


def _nested(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        nested.setdefault(section, {})[key] = value
    return nested


def load(model: ModelSpec | str, run_dir: str, device: str = "cpu") -> Any:
    """The whole model of ``run_dir``'s newest good checkpoint (trained under any plan), on ``device``.

    A damaged checkpoint, or a bad ``latest``, is named on stderr and the good one before it used."""
    import sys
    from pathlib import Path

    from zhilu.models.registry import resolve
    from zhilu.training.checkpoint import load_model
    from zhilu.training.checkpoint_files import newest_good

    spec = model if isinstance(model, ModelSpec) else resolve(model)
    path = newest_good(Path(run_dir), say=lambda line: print(line, file=sys.stderr))
    if path is None:
        raise ZhiluError("run.out", f"{run_dir} holds no checkpoint; valid: the run directory of a finished run")
    module = spec.create(device)
    load_model(path, module, no_dist=True, hashed=True)  # newest_good has just checked it
    return module
