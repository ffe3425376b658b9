"""Time and memory of one training step of a plan: the analytic model, composed.

Each layer's cost per micro-batch and device (:mod:`zhilu.perf.layer`) is summed over the
layers each pipeline rank holds (:mod:`zhilu.perf.pipeline`, the runtime's own split), with
the embedding on the rank of the first stage and the output layer on the rank of the last,
the pipeline transfers and the per-layer ZeRO-3 traffic; :func:`pipeline_seconds` turns the
ranks' times into the pipeline's time with its bubble; the data-parallel traffic
(:mod:`zhilu.perf.data_parallel`) adds what backward and forward cannot hide; the optimizer
step closes the step. Memory is that of the rank that needs the most. Plans are
:class:`zhilu.plan.Plan`, validated by its own validator plus what depends on the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhilu.errors import ZhiluError
from zhilu.mfu import mfu
from zhilu.perf.comm import collective_seconds, members_per_node, p2p_seconds
from zhilu.perf.data_parallel import DataParallel, Sharding, sharding
from zhilu.perf.device import Cluster
from zhilu.perf.flops import Transformer
from zhilu.perf.layer import EndCost, LayerCost, LayerCosts
from zhilu.perf.memory import GIB, Memory, stage_params, state_bytes, zero3_buffers
from zhilu.perf.pipeline import RankGroup, in_flight, pipeline_seconds, rank_groups
from zhilu.perf.rates import BYTES
from zhilu.perf.software import FOREACH_ADAMW_BYTES, OPTIMIZER_BYTES, ZHILU, Software
from zhilu.plan import PRECISIONS, Plan, PlanError

BREAKDOWN = ("compute", "recompute", "tp_comm", "pp_comm", "dp_comm_exposed", "bubble", "optimizer", "other")


@dataclass(frozen=True)
class Estimate:
    """The prediction for one plan (its ``precision`` concrete)."""

    plan: Plan
    micro_batch: int  # sequences per micro-batch (the plan's ``mb`` counts micro-batches)
    step_time_s: float
    breakdown: dict[str, float]
    memory: Memory
    fits: bool
    tokens_per_s: float
    model_tflops_per_gpu: float
    mfu: float
    peak_tflops: float  # the MFU denominator: the device's peak at the plan's precision
    sharding: Sharding  # what the data parallelism holds and moves, for memory and time alike

    @property
    def memory_gib_per_device(self) -> float:
        return self.memory.total / GIB

    def plan_spec(self) -> str:
        """The plan as a ``zhilu train --plan`` SPEC."""
        return self.plan.spec()

    def as_dict(self) -> dict[str, object]:
        """The plan's entry of ``zhilu plan --json`` (DESIGN.md section 3): ``plan`` is its ``--plan``
        SPEC, ``mb`` counts micro-batches per replica (as in the SPEC), ``micro_batch`` is
        sequences per micro-batch."""
        p = self.plan
        return {"plan": p.spec(), "dp": p.dp, "tp": p.tp, "pp": p.pp, "zero": p.zero, "sp": p.sp,
                "micro_batch": self.micro_batch, "mb": p.mb, "schedule": p.schedule, "vstages": p.vstages,
                "recompute": p.recompute, "precision": p.precision, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s, "model_tflops_per_gpu": self.model_tflops_per_gpu,
                "mfu": self.mfu, "peak_tflops": self.peak_tflops, "memory_gib_per_device": self.memory_gib_per_device,
                "fits": self.fits, "breakdown": dict(self.breakdown)}


class StepModel:
    """Evaluates plans for one model, cluster, global batch and software; caches per-layer costs."""

    def __init__(self, model: Transformer, cluster: Cluster, global_batch: int, software: Software = ZHILU) -> None:
        if global_batch < 1:
            raise ZhiluError("global_batch", f"must be a positive integer, got {global_batch}")
        self.model, self.cluster, self.global_batch, self.software = model, cluster, global_batch, software
        self.device = cluster.device.slowest_of(cluster.devices)
        self.costs = LayerCosts(model, cluster, self.device, software)
        self.traffic = DataParallel(model, cluster, self.device, software)
        self._ranks: dict[tuple[int, int, int], tuple[tuple[RankGroup, float], ...]] = {}

    def layer(self, tp: int, sp: bool, b: int, recompute: str, precision: str) -> LayerCost:
        """One layer's cost for micro-batch size ``b`` (cached: plans share them)."""
        return self.costs.layer(tp, sp, b, recompute, precision)

    def ends(self, tp: int, sp: bool, b: int, precision: str) -> tuple[EndCost, EndCost]:
        """The embedding (first stage) and the final norm, output layer and loss (last stage)."""
        return self.costs.ends(tp, sp, b, precision)

    def sharding(self, plan: Plan) -> Sharding:
        """What ``plan``'s data parallelism holds and moves in a step, as this software runs it."""
        return sharding(plan, self.software)

    def ranks(self, tp: int, pp: int, vstages: int) -> tuple[tuple[RankGroup, float], ...]:
        """The pipeline ranks grouped by what they hold (:func:`zhilu.perf.pipeline.rank_groups`),
        each with the parameters one device of it holds."""
        key = (tp, pp, vstages)
        if key not in self._ranks:
            m = self.model
            groups = rank_groups(m.layers, pp, vstages, self.software.stage_split)
            self._ranks[key] = tuple((g, stage_params(m, tp, g.layers, g.embedding, g.output, pp)) for g in groups)
        return self._ranks[key]

    # --- plans ----------------------------------------------------------------------------------
    def validate(self, plan: Plan) -> None:
        """Raise :class:`ZhiluError` naming the plan field when ``plan`` cannot run this model here:
        the plan's own rules (:meth:`Plan.validate`, ``check_model``, ``check_batch``), then what
        depends on the hardware and the software."""
        c = self.cluster
        try:
            plan.validate(c.devices)
            plan.check_model(self.model.config, runtime=not self.software.ties_across_stages)
            plan.check_batch(self.global_batch)
        except PlanError as e:
            raise ZhiluError(e.key, e.message) from None
        if plan.precision not in PRECISIONS:
            raise ZhiluError("precision", f"{plan.precision!r} must be resolved for the device first "
                                          f"(Plan.resolved); valid: {', '.join(PRECISIONS)}")
        if c.devices_per_node % plan.tp:  # tp innermost: a group that does not divide a node straddles two
            raise ZhiluError("tp", f"tp={plan.tp} must divide a node's {c.devices_per_node} devices "
                                   "(each group inside a node)")
        if plan.pp > 1:
            rank_groups(self.model.layers, plan.pp, plan.stages_per_rank, self.software.stage_split)

    def evaluate(self, plan: Plan) -> Estimate:
        """Predict ``plan``'s step time, its breakdown and the memory per device."""
        self.validate(plan)
        return self.estimate(plan)

    def memory_total(self, plan: Plan) -> float:
        """Bytes per device of a valid ``plan`` (cheaper than :meth:`estimate`)."""
        sp = plan.sp and plan.tp > 1
        b = plan.micro_batch(self.global_batch)
        layer = self.layer(plan.tp, sp, b, plan.recompute, plan.precision)
        _, tail = self.ends(plan.tp, sp, b, plan.precision)
        return self._memory(plan, layer, tail, self.sharding(plan)).total

    def estimate(self, plan: Plan) -> Estimate:
        """:meth:`evaluate` without validation, for plans the search built valid."""
        m, c = self.model, self.cluster
        dp, tp, pp = plan.dp, plan.tp, plan.pp
        v = plan.stages_per_rank if pp > 1 else 1
        sp = plan.sp and tp > 1
        b, micro_batches = plan.micro_batch(self.global_batch), plan.mb
        layer = self.layer(tp, sp, b, plan.recompute, plan.precision)
        head, tail = self.ends(tp, sp, b, plan.precision)
        dp_per_node, pp_across = members_per_node(tp, dp, c.devices_per_node)
        # a collective hidden under compute still takes the SMs it runs on (Link.compute_share)
        share = (c.intra if dp_per_node == dp else c.inter).compute_share
        s = self.sharding(plan)
        z3, z3_once, z3_first = self.traffic.layer_seconds(plan, s, layer, dp_per_node, share)
        pp_time = self._p2p_seconds(plan, b, v, sp, pp_across)
        per_layer = layer.compute + layer.recompute + layer.tp + layer.other + z3
        ends_first = head.compute + head.tp + head.other
        ends_last = tail.compute + tail.tp + tail.other
        groups = self.ranks(tp, pp, v)
        times = [g.layers * per_layer + pp_time + (ends_first + z3_first if g.embedding else z3_once)
                 + (ends_last if g.output else 0.0) for g, _ in groups]
        pipe = pipeline_seconds(times, micro_batches, v, [g.count for g, _ in groups])
        slowest = max(times)
        slow = groups[times.index(slowest)][0]
        n_slow, on_first, on_last = slow.layers, slow.embedding, slow.output
        stage_weights = max(params for _, params in groups)
        if s.group:  # the replicas of one group of hybrid model averaging: consecutive ranks
            dp_per_node = members_per_node(tp, s.group, c.devices_per_node)[0]
        dp_time = self.traffic.step_seconds(plan, s, stage_weights, layer, n_slow, dp_per_node, share)
        local = stage_weights / dp if s.held >= 1 else stage_weights
        per_param = FOREACH_ADAMW_BYTES if self.software.foreach_adamw else OPTIMIZER_BYTES[plan.precision]
        optimizer = self.device.memory_seconds(local * per_param)
        step = pipe + dp_time + optimizer

        mbs = micro_batches
        breakdown = {
            "compute": mbs * (n_slow * layer.compute + head.compute * on_first + tail.compute * on_last),
            "recompute": mbs * n_slow * layer.recompute,
            "tp_comm": mbs * (n_slow * layer.tp + head.tp * on_first + tail.tp * on_last),
            "pp_comm": mbs * pp_time,
            "dp_comm_exposed": dp_time + mbs * (n_slow * z3 + (z3_first if on_first else z3_once)),
            "bubble": pipe - mbs * slowest,
            "optimizer": optimizer,
            "other": mbs * (n_slow * layer.other + head.other * on_first + tail.other * on_last),
        }
        memory = self._memory(plan, layer, tail, s)
        tokens_per_s = self.global_batch * m.seq_len / step
        peak = self.device.peak_tflops[plan.precision]
        return Estimate(plan=plan, micro_batch=b, step_time_s=step, breakdown=breakdown, memory=memory,
                        fits=memory.total <= self.device.memory_gib * GIB, tokens_per_s=tokens_per_s,
                        model_tflops_per_gpu=m.model_flops_per_token * tokens_per_s / c.devices / 1e12,
                        mfu=mfu(m.model_flops_per_token, tokens_per_s, c.devices, peak), peak_tflops=peak,
                        sharding=s)

    def _p2p_seconds(self, plan: Plan, b: int, v: int, sp: bool, across_nodes: bool) -> float:
        """Pipeline transfers per micro-batch and rank: an activation forward and a gradient back,
        per chunk. Without sequence parallelism Megatron-LM sends 1/tp and all-gathers it."""
        if plan.pp == 1:
            return 0.0
        c, tp = self.cluster, plan.tp
        nbytes = b * self.model.seq_len * self.model.hidden * BYTES[plan.precision]
        gather = 0.0
        if sp:
            nbytes /= tp  # the activation between layers is already split over the sequence
        elif self.software.p2p_scatter_gather and tp > 1:
            gather = collective_seconds("all_gather", nbytes, tp, tp, c)
            nbytes /= tp
        seconds = 2 * v * (p2p_seconds(nbytes, across_nodes, c) + gather)
        if self.software.pp_overlap:
            return seconds * (c.inter if across_nodes else c.intra).compute_share
        return seconds

    def _memory(self, plan: Plan, layer: LayerCost, tail: EndCost, s: Sharding) -> Memory:
        """Memory of the pipeline rank that needs the most: of each group of ranks that hold as
        much, the lowest (the most micro-batches in flight); the last rank adds the logits."""
        pp = plan.pp
        v = plan.stages_per_rank if pp > 1 else 1
        grad_bytes = self.software.grad_reduce_bytes if plan.precision == "bf16" else 4
        buffers = zero3_buffers(self.model, plan.tp, plan.precision, grad_bytes) if s.held == 3 else 0.0
        # a layer recomputed in full or by op is rebuilt whole during its backward
        rebuilt = plan.recompute == "full" or (plan.recompute == "selective" and self.software.selective != "attention")
        working = layer.working if rebuilt else 0.0
        best: tuple[float, float, float, float, float] = (-1.0, 0.0, 0.0, 0.0, 0.0)
        for g, params in self.ranks(plan.tp, pp, v):
            w, gr, o = state_bytes(params, plan.precision, s.held, plan.dp)
            flight = in_flight(plan.schedule, pp, plan.mb, v, g.first)
            act = flight * g.layers * layer.saved + working + (tail.memory if g.output else 0.0)
            if w + gr + o + act > best[0]:
                best = (w + gr + o + act, w, gr, o, act)
        return Memory(*best[1:], buffers)
