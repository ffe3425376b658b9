"""Predict every published training run in ``benchmarks/published/`` and print the error.

    python benchmarks/published.py [--published DIR]

For each row with a step time or a throughput: the predicted and the published step time
and the absolute percentage error; then the median and the maximum. Then the per-device
memory against Korthikanti et al. 2022 Fig. 1 and the torchtitan memory columns. Then three
sources the model was not developed on: llm-foundry's FSDP tables, NeMo-Megatron's GPT-3
scaling table and BigScience's BLOOM-176B topology sweep (step time, memory, and which
configurations ran out of memory).

Each source ran a known software stack (a :class:`Software`: fused kernels or eager
PyTorch, flash or explicit attention, what overlaps) on known hardware. Settings a source
does not state (micro-batch, schedule and recompute for Megatron-Core; micro-batch and
virtual stages for Llama 3) are left to the search, as their authors tuned them. No
constant here belongs to a row.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zhilu import hardware  # noqa: E402
from zhilu.models.presets import GPTConfig  # noqa: E402
from zhilu.perf.confidence import regime  # noqa: E402
from zhilu.perf.flops import Transformer  # noqa: E402
from zhilu.perf.memory import GIB  # noqa: E402
from zhilu.perf.search import search  # noqa: E402
from zhilu.perf.software import Software, stack  # noqa: E402
from zhilu.perf.step import Estimate, StepModel  # noqa: E402
from zhilu.plan import Plan  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent / "published"  # a copy of the project's shared/published

# --- the software that produced each source: zhilu.perf.software's named stacks -----------------
MEGATRON_2020, MEGATRON_2022, MEGATRON_CORE = stack("megatron-lm-2020"), stack("megatron-lm-2022"), stack("megatron")
TORCHTITAN, TORCHTITAN_COMPILE, LLAMA3 = stack("torchtitan"), stack("torchtitan-compile"), stack("llama3")
FSDP, DEEPSPEED = stack("fsdp"), stack("deepspeed")
# torchtitan's "selective layer" option checkpoints every second layer: a recompute choice of the
# run, not of the stack.
TORCHTITAN_LAYER = replace(TORCHTITAN, selective="alternate")

# Grand Teton H100 (torchtitan's hosts): HBM2e 96 GB at 2.4 TB/s, power limited to 500 W, 400 Gb/s
# RDMA per GPU. The SMs' dynamic power goes as f^3 (voltage follows frequency); about 150 W of a
# GH100 board (HBM, NVLink and PCIe I/O, leakage) does not scale with the SM clock. A 500 W limit
# therefore holds ((500 - 150) / (700 - 150))^(1/3) = 0.86 of the clock a 700 W GH100 sustains.
_H100 = hardware.PRESETS["h100-sxm"]
_CLOCK_500W = ((500 - 150) / (700 - 150)) ** (1 / 3)
GRAND_TETON = replace(_H100, name="h100-grand-teton", device=replace(
    _H100.device, name="H100 96GB HBM2e 500W", memory_gib=94.5,
    memory_bandwidth_gbps=2400 * hardware.COPY_EFFICIENCY, power_w=500,
    matmul_tflops={k: v * _CLOCK_500W for k, v in _H100.device.matmul_tflops.items()},
    attention=tuple(replace(a, tflops=a.tflops * _CLOCK_500W) for a in _H100.device.attention)))


def gpt(layers: int, hidden: int, heads: int, vocab: int, seq: int, *, tied: bool, dropout: bool = True,
        rotary: bool = False) -> Transformer:
    """A GPT-2/3 style model: 4h GELU MLP, learned positions, dropout."""
    cfg = GPTConfig(n_layers=layers, hidden=hidden, n_heads=heads, ffn_hidden=4 * hidden, vocab_size=vocab,
                    max_seq_len=seq, tie_embeddings=tied)
    return Transformer(cfg, seq, gated_mlp=False, rotary=rotary, dropout=dropout)


LLAMA = {  # layers, hidden, heads, kv heads, ffn, vocab
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256), "llama3.1-8b": (32, 4096, 32, 8, 14336, 128256),
    "llama3-70b": (80, 8192, 64, 8, 28672, 128256), "llama3.1-70b": (80, 8192, 64, 8, 28672, 128256),
    "llama3.1-405b": (126, 16384, 128, 8, 53248, 128256),
    "llama2-13b": (40, 5120, 40, 40, 13824, 32000), "llama2-70b": (80, 8192, 64, 8, 28672, 32000),
}


def llama(name: str, seq: int) -> Transformer:
    layers, hidden, heads, kv, ffn, vocab = LLAMA[name]
    return Transformer(GPTConfig(n_layers=layers, hidden=hidden, n_heads=heads, n_kv_heads=kv, ffn_hidden=ffn,
                                 vocab_size=vocab, max_seq_len=seq), seq)


@dataclass(frozen=True)
class Case:
    """What a run's prediction was made for, and the prediction of its plan."""

    model: Transformer
    cluster: hardware.Cluster
    global_batch: int
    software: Software
    estimate: Estimate


@dataclass
class Row:
    """One published run: predicted against published step time (or memory), or why it is not modelled."""

    source: str
    label: str
    published: float
    predicted: float | None = None
    regime: str = ""  # zhilu.perf.confidence.regime of the plan predicted
    case: Case | None = None
    note: str = ""

    @property
    def error(self) -> float | None:
        return None if self.predicted is None else abs(self.predicted / self.published - 1)


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def predict(model: Transformer, hw: hardware.Cluster, global_batch: int, software: Software,
            require_fit: bool = True, **plan) -> tuple[float, str, Case]:
    """Step time of a plan (``micro_batch``: sequences per micro-batch), its regime
    (:func:`zhilu.perf.confidence.regime`) and its case; fields the source leaves open are
    searched among the plans that fit, a plan given whole is evaluated as it is."""
    best = search(model, hw, global_batch, fixed={"precision": "bf16", **plan}, software=software, top=1,
                  require_fit=require_fit)[0]
    return best.step_time_s, regime(best.plan, software.name), Case(model, hw, global_batch, software, best)


def step_rows(root: Path) -> list[Row]:
    rows: list[Row] = []
    a100 = hardware.PRESETS["a100-80gb"]
    for r in read(root / "korthikanti_2022_table3_table5.csv"):
        model = gpt(int(r["layers"]), int(r["hidden"]), int(r["heads"]), 51200, 2048, tied=True)
        tp, pp, gpus = int(r["tp"]), int(r["pp"]), int(r["gpus"])
        v = 3 if r["model"] in ("175B", "530B") else 1
        common = dict(dp=1, tp=tp, pp=pp, zero=0, micro_batch=int(r["micro_batch"]),
                      schedule="interleaved" if v > 1 else "1f1b", vstages=v)
        hw = a100.sized(gpus)
        for mode, col, rec, sp in (("full recompute", "iter_s_full_recompute", "full", False),
                                   ("seq-par + selective", "iter_s_present_work", "selective", True)):
            t = predict(model, hw, int(r["global_batch"]), MEGATRON_2022, recompute=rec, sp=sp, **common)
            rows.append(Row("Korthikanti 2022 T5", f"{r['model']} {mode}", float(r[col]), *t))

    systems = {"dgx2_v100": "v100-32gb", "dgx_a100": "a100-40gb", "dgx_a100_dp": "a100-40gb"}
    for r in read(root / "megatron_readme_2020_single_node_tp.csv"):
        model = gpt(int(r["layers"]), int(r["hidden"]), int(r["heads"]), 51200, 1024, tied=True)
        tp, gpus, batch = int(r["tp"]), int(r["gpus"]), int(r["global_batch"])
        dp = gpus // tp
        hw = hardware.PRESETS[systems[r["system"]]].sized(gpus)
        t = predict(model, hw, batch, MEGATRON_2020, dp=dp, tp=tp, pp=1, zero=0, micro_batch=batch // dp,
                    schedule="1f1b", recompute="full", sp=False)
        rows.append(Row("Megatron 2020 TP", f"{r['case']} tp={tp} {r['system']}", float(r["iter_ms"]) / 1e3, *t))

    h100 = hardware.PRESETS["h100-sxm"]
    for r in read(root / "megatron_core_h100_2024_weak_scaling.csv"):
        model = gpt(int(r["layers"]), int(r["hidden"]), int(r["heads"]), 131072, 4096, tied=False, dropout=False)
        gpus, batch = int(r["gpus"]), int(r["batch"])
        published = model.model_flops_per_token * batch * 4096 / (gpus * float(r["tflops_per_gpu"]) * 1e12)
        # Micro-batch, schedule and recompute are not stated: searched (the fastest plan that fits).
        t = predict(model, h100.sized(gpus), batch, MEGATRON_CORE, dp=int(r["dp"]), tp=int(r["tp"]),
                    pp=int(r["pp"]), zero=1, sp=True)
        rows.append(Row("Megatron-Core H100", f"{r['model']} tp={r['tp']} pp={r['pp']} dp={r['dp']}", published, *t))

    ac = {"none": ("none", TORCHTITAN), "full": ("full", TORCHTITAN), "selective_op": ("selective", TORCHTITAN),
          "selective_layer": ("selective", TORCHTITAN_LAYER), "per_op_sac": ("selective", TORCHTITAN)}
    for r in read(root / "torchtitan_a100_fsdp2_2024.csv"):
        seq, b, gpus = int(r["seq_len"]), int(r["local_batch"]), int(r["gpus"])
        rec, sw = ac[r["ac"]]
        t = predict(llama(r["model"], seq), a100.sized(gpus), b * gpus, sw, dp=gpus, tp=1, pp=1, zero=3,
                    micro_batch=b, schedule="1f1b", recompute=rec, sp=False)
        rows.append(Row("torchtitan A100", f"{r['model']} b={b} ac={r['ac']}", b * seq / float(r["wps_per_gpu"]), *t))

    for r in read(root / "torchtitan_405b_h100_2024.csv"):
        label = f"{r['model']} fsdp={r['fsdp']} tp={r['tp']} {r['optimizations']}"
        tp, dp, b = int(r["tp"]), int(r["fsdp"]), int(r["local_batch"])
        published = b * 8192 / (tp * float(r["wps_per_gpu"]))
        if r["optimizations"] != "none":
            rows.append(Row("torchtitan 405B", label, published, note="not modelled: float8 matmuls"))
            continue
        t = predict(llama(r["model"], 8192), GRAND_TETON.sized(int(r["gpus"])), b * dp, TORCHTITAN, dp=dp, tp=tp,
                    pp=1, zero=3, micro_batch=b, schedule="1f1b", recompute="full", sp=True)
        rows.append(Row("torchtitan 405B", label, published, *t))

    for r in read(root / "torchtitan_asynctp_h100_202506.csv"):
        label = f"{r['model']} tp={r['tp']} {r['tp_type']} {r['quantization']}"
        tp, dp, gpus = int(r["tp"]), int(r["fsdp"]), int(r["gpus"])
        b = 16 if r["model"] == "llama3-70b" else 12  # local batches stated in the file's header
        published = b * 8192 / (tp * float(r["average_tps"]))
        if r["quantization"] != "bf16":
            rows.append(Row("torchtitan async-TP", label, published, note="not modelled: float8 matmuls"))
            continue
        rec, sw = ac[r["ac"]]
        # all runs torch.compile; torchtitan of 2025 wraps the embedding and the output layer apart
        sw = replace(sw, fused_kernels=True, tp_overlap=r["tp_type"] == "async", fsdp_output_with_embedding=False)
        t = predict(llama(r["model"], 8192), GRAND_TETON.sized(gpus), b * dp, sw, dp=dp, tp=tp, pp=1, zero=3,
                    micro_batch=b, schedule="1f1b", recompute=rec, sp=True)
        rows.append(Row("torchtitan async-TP", label, published, *t))

    for r in read(root / "torchtitan_llama31_h100_202412.csv"):
        label = f"T{r['table']} {r['model']} {r['gpus']} GPUs {r['techniques']}"
        b, seq = int(r["local_batch"]), int(r["seq_len"] or 8192)
        published = b * seq / (int(r["tp"]) * float(r["tps_per_gpu"]))
        if "float8" in r["techniques"]:
            rows.append(Row("torchtitan H100", label, published, note="not modelled: float8 matmuls"))
            continue
        gpus = int(r["gpus"])
        sw = TORCHTITAN_COMPILE if "compile" in r["techniques"] else TORCHTITAN
        t = predict(llama(r["model"], seq), GRAND_TETON.sized(gpus), b * gpus, sw, dp=gpus, tp=1, pp=1, zero=3,
                    micro_batch=b, schedule="1f1b", recompute="selective", sp=False)
        rows.append(Row("torchtitan H100", label, published, *t))

    for r in read(root / "llama3_2024_table4_405b.csv"):
        gpus, tp, pp, dp, cp = (int(r[k]) for k in ("gpus", "tp", "pp", "dp", "cp"))
        seq, batch = int(r["seq_len"]), int(r["batch_per_dp"]) * int(r["dp"])
        model = llama("llama3.1-405b", min(seq, 8192))
        label = f"405B {gpus} GPUs tp={tp} cp={cp} pp={pp} dp={dp} seq={seq}"
        published = model.model_flops_per_token * batch * model.seq_len / (gpus * float(r["tflops_per_gpu"]) * 1e12)
        if cp > 1:
            rows.append(Row("Llama 3 Table 4", label, published, note="not modelled: context parallelism"))
            continue
        # Sec. 3.3.2: interleaved 1F1B, and 8K sequences "without activation checkpointing". Its
        # memory-balancing work made that fit; this model's memory does not know it, so fit is not asked.
        t = predict(model, h100.sized(gpus), batch, LLAMA3, require_fit=False, dp=dp, tp=tp, pp=pp,
                    sp=True, schedule="interleaved", recompute="none")
        rows.append(Row("Llama 3 Table 4", label, published, *t))
    return rows


FOUNDRY_TABLES = ("llmfoundry_a100_40gb.csv", "llmfoundry_a100_80gb.csv", "llmfoundry_a100_80gb_2023-07.csv",
                  "llmfoundry_h100_bf16.csv", "llmfoundry_h100_fp8.csv")
FOUNDRY_GPUS = {"a100_40gb": "a100-40gb", "a100_80gb": "a100-80gb", "h100_80gb": "h100-sxm"}


def foundry_rows(root: Path) -> list[Row]:
    """llm-foundry's MPT benchmarks: pure PyTorch FSDP (FULL_SHARD: ZeRO-3, SHARD_GRAD_OP:
    ZeRO-2) in eager mode through Composer, the ``fsdp`` stack; its ``PURE`` mixed precision
    also reduces the gradients in bf16. Every setting is the row's own (micro-batch, recompute);
    the H100 tables do not state the network, taken as the preset's 400 Gb/s per GPU."""
    rows: list[Row] = []
    for name in FOUNDRY_TABLES:
        for r in read(root / name):
            seq, gpus, batch = int(r["seq_len"]), int(r["n_gpus"]), int(r["global_batch_seqs"])
            label = f"{r['model']} seq={seq} {gpus} GPUs mb={r['micro_batch']} ac={r['recompute']}"
            source = "llm-foundry " + name.removeprefix("llmfoundry_").removesuffix(".csv")
            if "fp8" in r["precision"]:
                rows.append(Row(source, label, float(r["iter_time_s"]), note="not modelled: float8 matmuls"))
                continue
            model = gpt(int(r["n_layers"]), int(r["hidden"]), int(r["n_heads"]), int(r["vocab"]), seq, tied=True,
                        dropout=False)
            sw = replace(FSDP, grad_reduce_bytes=2) if "PURE" in r["precision"] else FSDP
            t = predict(model, hardware.PRESETS[FOUNDRY_GPUS[r["gpu_type"]]].sized(gpus), batch, sw,
                        require_fit=False, dp=gpus, tp=1, pp=1, zero=3 if "FULL_SHARD" in r["sharding"] else 2,
                        micro_batch=min(int(r["micro_batch"]), batch // gpus), schedule="1f1b",
                        recompute="full" if r["recompute"] == "full" else "none", sp=False)
            rows.append(Row(source, label, float(r["iter_time_s"]), *t))
    return rows


# Jean Zay (BLOOM's cluster): A100-SXM4-80GB, 8 a node on NVLink, 4 x 100 Gb/s Omni-Path a node:
# 6.25 GB/s per GPU, the per-GPU share of the DGX-2's 100 Gb/s links (zhilu.perf.presets).
_A100 = hardware.PRESETS["a100-80gb"]
JEAN_ZAY = replace(_A100, name="a100-80gb-jean-zay", inter=replace(
    _A100.inter, name="omni-path-100", bandwidth_gbps=hardware.PRESETS["v100-32gb"].inter.bandwidth_gbps))
BLOOM_VOCAB = 250880  # 250,680 padded to a multiple of 128 x tp (Megatron's --make-vocab-size-divisible-by)


def _number(cell: str) -> float | None:
    """The number a cell starts with (``~79 (DERIVED ...)`` is 79); None for UNKNOWN, OOM."""
    head = cell.strip().lstrip("~").split(" ")[0]
    try:
        return float(head)
    except ValueError:
        return None


@dataclass
class Fit:
    """A published configuration that ran or ran out of memory, and whether the model says it fits."""

    label: str
    ran: bool
    fits: bool


def bloom_rows(root: Path) -> tuple[list[Row], list[Row], list[Fit]]:
    """BigScience's topology sweep for BLOOM-176B (Megatron-DeepSpeed, the ``deepspeed`` stack, on
    Jean Zay): step time, the memory nvidia-smi showed on the busiest GPU, and which
    configurations ran out of memory. Every setting is the row's own; a row that leaves the
    layers, heads or micro-batch unstated is listed as not modelled."""
    steps: list[Row] = []
    memory: list[Row] = []
    fits: list[Fit] = []
    for r in read(root / "bloom176b_topology_benchmarks_prequel.csv"):
        layers, heads, b = _number(r["n_layers"]), _number(r["n_heads"]), _number(r["micro_batch"])
        tp, pp, gpus, batch = int(r["tp"]), int(r["pp"]), int(r["n_gpus"]), int(r["global_batch_seqs"])
        dp = int(_number(r["dp"]) or gpus // (tp * pp))
        label = (f"#{r['row_id']} h={r['hidden']} L={r['n_layers'].split(' ')[0]} tp={tp} pp={pp} dp={dp} "
                 f"mbs={r['micro_batch']}")
        published_s, published_gib = _number(r["iter_time_s"]), _number(r["memory_gib"])
        oom = r["iter_time_s"] == "OOM"
        if None in (layers, heads, b):
            why = "not modelled: " + ", ".join(k for k, v in (("layers", layers), ("heads", heads),
                                                               ("micro-batch", b)) if v is None) + " not stated"
            if published_s:
                steps.append(Row("BLOOM-176B sweep", label, published_s, note=why))
            continue
        model = gpt(int(layers), int(r["hidden"]), int(heads), BLOOM_VOCAB, int(r["seq_len"]), tied=True)
        # fp16 gradients are all-reduced in fp16; BF16_Optimizer accumulates and reduces them in fp32
        sw = replace(DEEPSPEED, grad_reduce_bytes=4) if "fp32 grad" in r["precision"] else DEEPSPEED
        plan = Plan(dp=dp, tp=tp, pp=pp, zero=0 if "ZeRO-0" in r["sharding"] + r["notes"] else 1,
                    mb=batch // (dp * int(b)), recompute="full", precision="bf16")
        estimate = StepModel(model, JEAN_ZAY.sized(gpus), batch, sw).evaluate(plan)
        if published_s:
            steps.append(Row("BLOOM-176B sweep", label, published_s, estimate.step_time_s,
                             regime(plan, sw.name), Case(model, JEAN_ZAY.sized(gpus), batch, sw, estimate)))
        if published_gib:
            memory.append(Row("BLOOM-176B sweep", label, published_gib, estimate.memory_gib_per_device))
        if published_s or oom:
            fits.append(Fit(label, not oom, estimate.fits))
    return steps, memory, fits


def nemo_rows(root: Path) -> list[Row]:
    """NeMo-Megatron's GPT-3 scaling table (2022-09, DGX A100 SuperPOD): throughput as published,
    the layout from the launcher's default configs of the same commit (unverified by the
    source). NeMo then ran Megatron-LM's 2022 code (``megatron-lm-2022``: the
    kernels, sequence parallelism and selective recompute of Korthikanti et al.) with a
    distributed optimizer (ZeRO-1)."""
    rows: list[Row] = []
    for r in read(root / "nemo_launcher_gpt3_a100_scaling.csv"):
        gpus, tp, pp, b = int(r["n_gpus"]), int(_number(r["tp"])), int(_number(r["pp"])), int(_number(r["micro_batch"]))
        dp = gpus // (tp * pp)
        model = gpt(int(r["n_layers"]), int(r["hidden"]), int(r["n_heads"]), 50304 if tp == 1 else 51200, 2048,
                    tied=True)
        label = f"{r['model'].split(' (')[0]} {gpus} GPUs tp={tp} pp={pp} dp={dp} mbs={b}"
        selective = r["recompute"].startswith("selective")
        t = predict(model, hardware.PRESETS["a100-80gb"].sized(gpus), 2048, MEGATRON_2022, require_fit=False, dp=dp,
                    tp=tp, pp=pp, zero=1, micro_batch=b, schedule="1f1b", sp=selective and tp > 1,
                    recompute="selective" if selective else "none")
        rows.append(Row("NeMo GPT-3 A100", label, float(_number(r["iter_time_s"])), *t))
    return rows


def memory_rows(root: Path) -> list[Row]:
    rows: list[Row] = []
    configs = {r["model"]: r for r in read(root / "korthikanti_2022_table3_table5.csv")}
    for r in read(root / "korthikanti_2022_fig1_memory_gib.csv"):
        c = configs[r["model"]]
        model = gpt(int(c["layers"]), int(c["hidden"]), int(c["heads"]), 51200, 2048, tied=True)
        v = 3 if r["model"] in ("175B", "530B") else 1
        rec, sp = ("none", False) if r["mode"] == "none" else ("selective", True)
        batch = int(c["global_batch"])
        plan = Plan(dp=1, tp=int(c["tp"]), pp=int(c["pp"]), mb=batch // int(c["micro_batch"]),
                    schedule="interleaved" if v > 1 else "1f1b", vstages=v if v > 1 else 0, sp=sp, recompute=rec,
                    precision="bf16")
        hw = hardware.PRESETS["a100-80gb"].sized(int(c["gpus"]))
        mem = StepModel(model, hw, batch, MEGATRON_2022).evaluate(plan).memory
        published = float(r["par_opt_gib"]) + float(r["act_gib"])
        rows.append(Row("Korthikanti 2022 Fig. 1", f"{r['model']} {r['mode']}", published, mem.total / GIB))
    for r in read(root / "torchtitan_llama31_h100_202412.csv"):
        if "float8" in r["techniques"]:
            continue
        b, seq, gpus = int(r["local_batch"]), int(r["seq_len"] or 8192), int(r["gpus"])
        sw = TORCHTITAN_COMPILE if "compile" in r["techniques"] else TORCHTITAN
        plan = Plan(dp=gpus, zero=3, mb=1, recompute="selective", precision="bf16")
        mem = StepModel(llama(r["model"], seq), GRAND_TETON.sized(gpus), b * gpus, sw).evaluate(plan).memory
        rows.append(Row("torchtitan H100", f"T{r['table']} {r['model']} {gpus} GPUs {r['techniques']}",
                        float(r["mem_gib"]), mem.total / GIB))
    return rows


def summary(rows: list[Row]) -> tuple[float, float, int]:
    """Median and maximum absolute error of the modelled rows, and how many were modelled."""
    errors = [r.error for r in rows if r.error is not None]
    return median(errors), max(errors), len(errors)


def signed_by_seq(rows: list[Row]) -> dict[int, list[float]]:
    """The signed errors of the modelled rows, by the ``seq=N`` of their labels, shortest first."""
    groups: dict[int, list[float]] = {}
    for r in rows:
        if r.predicted is not None:
            seq = int(r.label.split("seq=")[1].split()[0])
            groups.setdefault(seq, []).append(r.predicted / r.published - 1)
    return dict(sorted(groups.items()))


def by_source(rows: list[Row]) -> dict[str, tuple[float, float, int]]:
    """:func:`summary` of each source's modelled rows."""
    sources = dict.fromkeys(r.source for r in rows if r.error is not None)
    return {src: summary([r for r in rows if r.source == src]) for src in sources}


def _table(title: str, rows: list[Row], unit: str) -> None:
    print(f"\n{title}")
    print(f"{'source':<24} {'run':<52} {'published':>10} {'predicted':>10} {'error':>7}")
    for r in rows:
        if r.predicted is None:
            print(f"{r.source:<24} {r.label:<52} {r.published:>10.3f} {'-':>10} {'':>7}  {r.note}")
        else:
            print(f"{r.source:<24} {r.label:<52} {r.published:>10.3f} {r.predicted:>10.3f} {r.error:>7.1%}")
    for src, (med, worst, n) in by_source(rows).items():
        print(f"  {src:<40} {n:>4} rows   median {med:>6.1%}   max {worst:>6.1%}")
    med, worst, n = summary(rows)
    skipped = sum(r.predicted is None for r in rows)
    print(f"{title}: {n} rows modelled ({skipped} not), median error {med:.1%}, max error {worst:.1%} ({unit})")


BANDS_FILE = Path(__file__).resolve().parent.parent / "zhilu" / "perf" / "error_bands.py"


def band_ratios(rows: list[Row]) -> dict[str, tuple[float, ...]]:
    """Published / predicted step time of the modelled rows, by regime, rounded to 4 places."""
    ratios: dict[str, list[float]] = {}
    for r in rows:
        if r.predicted is not None:
            ratios.setdefault(r.regime, []).append(round(r.published / r.predicted, 4))
    return {k: tuple(sorted(v)) for k, v in sorted(ratios.items())}


def bands_source(ratios: dict[str, tuple[float, ...]]) -> str:
    """The text of zhilu/perf/error_bands.py for ``ratios``."""
    lines = ['"""Published / predicted step time of the published runs, by regime (:mod:`zhilu.perf.confidence`).',
             "", "Written by ``python benchmarks/published.py --write-bands`` from benchmarks/published/; not edited",
             'by hand (tests/test_perf_published.py checks it against the benchmark).', '"""', "",
             "RATIOS: dict[str, tuple[float, ...]] = {"]
    for key, values in ratios.items():
        lines.append(f"    {json.dumps(key)}: (")
        text = ", ".join(f"{v:.4f}" for v in values) + ","
        while text:
            cut = text.rfind(" ", 0, 100) if len(text) > 100 else len(text)
            lines.append("        " + text[:cut].strip())
            text = text[cut:].strip()
        lines.append("    ),")
    return "\n".join(lines + ["}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", type=Path, default=DEFAULT_DIR, help="folder of the published CSV files")
    parser.add_argument("--write-bands", action="store_true",
                        help="also write the error bands of zhilu plan (zhilu/perf/error_bands.py)")
    args = parser.parse_args(argv)
    if args.write_bands:
        BANDS_FILE.write_text(bands_source(band_ratios(step_rows(args.published) + foundry_rows(args.published))))
        print(f"wrote {BANDS_FILE}")
    _table("Step time", step_rows(args.published), "seconds per step")
    foundry = foundry_rows(args.published)
    _table("Step time, llm-foundry (not used in developing the model)", foundry, "seconds per step")
    print("llm-foundry, signed median error (predicted / published - 1) by sequence length:")
    for seq, errors in signed_by_seq(foundry).items():
        print(f"  seq {seq:>6}: {median(errors):>+7.1%} over {len(errors)} rows")
    _table("Memory per device", memory_rows(args.published), "GiB")
    _table("Step time, NeMo GPT-3 scaling, layouts of its default configs (not used in developing the model)",
           nemo_rows(args.published), "seconds per step")
    steps, memory, fits = bloom_rows(args.published)
    _table("Step time, BLOOM-176B topology sweep (not used in developing the model)", steps, "seconds per step")
    _table("Memory per device, BLOOM-176B topology sweep (nvidia-smi, the busiest GPU)", memory, "GiB")
    agree = [f for f in fits if f.ran == f.fits]
    print(f"\nOut of memory, BLOOM-176B topology sweep: {len(agree)} of {len(fits)} configurations predicted as they "
          f"went ({sum(not f.ran for f in fits)} ran out of memory)")
    for f in fits:
        if f.ran != f.fits:
            print(f"  {f.label}: {'ran' if f.ran else 'ran out of memory'}, predicted to "
                  f"{'fit' if f.fits else 'not fit'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
