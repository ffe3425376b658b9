"""zhilu (智路): plan, run, watch and serve parallel training of PyTorch models.

The public API (imported on first use, so ``import zhilu`` stays light):

* :class:`ModelSpec`, :class:`PipelineSplit`: how a model plugs in (:mod:`zhilu.spec`)
* :class:`Plan`: the layout of a step (:mod:`zhilu.plan`)
* :func:`train`: train a model under a plan, return the summary; :func:`load`: the trained
  model of a run directory (:mod:`zhilu.api`)
* :func:`init_parallel`, :func:`parallelize`: the pieces for a loop of your own
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "ModelSpec": "zhilu.spec",
    "PipelineSplit": "zhilu.spec",
    "Plan": "zhilu.plan",
    "train": "zhilu.api",
    "load": "zhilu.api",
    "init_parallel": "zhilu.parallel.mesh",
    "parallelize": "zhilu.parallel.parallelize",
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'zhilu' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
