"""The analytic performance model: predict step time and memory of a plan; search all plans.

Pure Python (no torch, no numpy), so ``zhilu plan`` answers from a cold start. Plans are the
runtime's own :class:`zhilu.plan.Plan`, and pipeline stages its own split
(:func:`zhilu.plan.stage_layers`), so a prediction describes what runs.

- :mod:`zhilu.perf.rates`: measured products and attention, GEMM tiling, the fits to them
- :mod:`zhilu.perf.device`: devices, links and clusters; :mod:`zhilu.perf.presets`: named hardware;
  :mod:`zhilu.perf.hardware_file`: TOML hardware files (``zhilu.hardware`` names them all)
- :mod:`zhilu.perf.flops`: the model's shape and the work of a layer (FLOPs, bytes, kernels)
- :mod:`zhilu.perf.software`: what the training software does (zhilu's runtime, others' stacks)
- :mod:`zhilu.perf.layer`: a layer's and the embedding's and output layer's cost per micro-batch
- :mod:`zhilu.perf.comm`: alpha-beta collectives and point-to-point on two link tiers
- :mod:`zhilu.perf.data_parallel`: what ZeRO holds and its gradient and parameter traffic
- :mod:`zhilu.perf.pipeline`: layers per rank, bubble, micro-batches in flight
- :mod:`zhilu.perf.memory`: model states per ZeRO stage, activations, buffers
- :mod:`zhilu.perf.step`: one step of a plan, its breakdown and memory (``StepModel``)
- :mod:`zhilu.perf.search`: every valid plan ranked; ``best_plan``, the fastest that fits
- :mod:`zhilu.perf.job`: a ``zhilu train`` job: its prediction, ``--plan auto``, explaining a run
- :mod:`zhilu.perf.plan_cli`: the ``zhilu plan`` command
"""
