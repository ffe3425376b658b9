"""The analytic performance model: predict step time and memory of a plan; search all plans.

Pure Python (no torch, no numpy), so ``zhilu plan`` answers from a cold start.

- :mod:`zhilu.perf.flops`: the model's shape and the work of a layer (FLOPs, bytes, kernels)
- :mod:`zhilu.perf.comm`: alpha-beta collectives and point-to-point on two link tiers
- :mod:`zhilu.perf.pipeline`: layers per stage, bubble, micro-batches in flight
- :mod:`zhilu.perf.memory`: model states per ZeRO stage, activations, buffers
- :mod:`zhilu.perf.step`: one step of a plan, its breakdown and memory (``StepModel``)
- :mod:`zhilu.perf.search`: every valid plan ranked; ``best_plan``, the fastest that fits
- :mod:`zhilu.perf.job`: a ``zhilu train`` job: its prediction, ``--plan auto``, explaining a run
- :mod:`zhilu.perf.plan_cli`: the ``zhilu plan`` command
"""
