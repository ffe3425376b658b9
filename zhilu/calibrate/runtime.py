"""zhilu's own tensor-parallel and ZeRO-3 layers, timed whole: what they take beyond their
kernels and collectives. These call the runtime (zhilu.parallel, zhilu.models.gpt)."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable
from typing import Any

from zhilu.calibrate.shapes import _CPU_LAYER, _FSDP_LAYERS, _GPU_LAYER, _TINY_LAYER, _layer_config
from zhilu.calibrate.timing import _PASSES, _timer


def _layer_seconds(device: Any, shape: dict[str, int], wrap: Callable[[Any], Any],
                   context: Callable[[], Any] = contextlib.nullcontext) -> tuple[float, float]:
    """Forward and backward of zhilu's model at ``shape``, wrapped by ``wrap``: seconds of one layer
    (models of 1 and 3 layers timed, the difference halved) and of the rest (embedding, output, loss)."""
    import torch

    from zhilu.models.gpt.spec import gpt_spec
    from zhilu.spec import token_cross_entropy as loss_fn

    timed = _timer(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    x = torch.randint(0, 256, (shape["batch"], shape["seq_len"]), device=device)
    seconds = {}
    for layers in (1, 3):
        model = wrap(gpt_spec(_layer_config(shape, layers)).create(device))

        def step(model=model) -> None:
            with context():
                with autocast:
                    loss = loss_fn(model(x), x)
                loss.backward()

        seconds[layers] = statistics.median(timed(step, 0.2) for _ in range(_PASSES))
    layer = (seconds[3] - seconds[1]) / 2
    return layer, seconds[1] - layer


def _measure_tensor_parallel(device: Any) -> list[dict[str, Any]]:
    """Seconds of one of zhilu's tensor-parallel layers (tp=2) and of the rest of the model, at a
    tiny size (host and waiting time alone) and at a training size. Every pair of processes runs
    its own tensor-parallel group, all at once."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from zhilu.models.gpt.parallelize import TP_PLAN
    from zhilu.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh(device.type, (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))

    def tensor_parallel(model: Any) -> Any:
        apply_tensor_parallel(model, mesh["tp"], TP_PLAN, None, False)
        return model

    out = []
    for shape in (_TINY_LAYER, _GPU_LAYER if device.type == "cuda" else _CPU_LAYER):
        layer, ends = _layer_seconds(device, shape, tensor_parallel, loss_parallel)
        out.append({"shape": shape, "layer": layer, "ends": ends})
    return out


def _measure_fsdp(device: Any) -> list[dict[str, Any]]:
    """Seconds that ZeRO-3 (zhilu's FSDP2 over every process) adds to one layer, forward and
    backward, at two sizes: the layer timed with and without it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from zhilu.parallel.data_parallel import apply_data_parallel
    from zhilu.parallel.mesh import ParallelEnv
    from zhilu.plan import Plan

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (1, world, 1), mesh_dim_names=("pp", "dp", "tp"))
    env = ParallelEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)),
                      int(os.environ.get("LOCAL_WORLD_SIZE", world)), device, mesh)
    out = []
    for shape in _FSDP_LAYERS:
        plain, _ = _layer_seconds(device, shape, lambda model: model)
        sharded, _ = _layer_seconds(device, shape, lambda model: apply_data_parallel(
            model, list(model.layers.values()), Plan(dp=world, zero=3), env))
        out.append({"shape": shape, "added": sharded - plain})
    return out
