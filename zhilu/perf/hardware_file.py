"""Hardware files (TOML): reading, validating and writing them, and finding one by name.

:func:`cluster` takes a preset name (:mod:`zhilu.perf.presets`) or a file path;
:func:`load` reads a file in the format :func:`dump` writes (``zhilu calibrate`` writes one
for this machine at :func:`calibrated_path`). Every bad value is a :class:`ZhiluError` naming
the key. Pure Python.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from zhilu.errors import ZhiluError
from zhilu.perf.device import Cluster, Device, Link
from zhilu.perf.presets import PRESETS
from zhilu.perf.rates import AttentionPoint, MatmulPoint, fit_matmul_tflops
from zhilu.plan import PRECISIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def calibrated_path(device_type: str, nproc: int) -> Path:
    """Where ``zhilu calibrate`` keeps this machine's hardware file for ``nproc`` processes on
    ``device_type`` (cpu or cuda): ``$XDG_CACHE_HOME/zhilu`` or ``~/.cache/zhilu``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zhilu"
    return root / f"hardware-{device_type}-{nproc}.toml"


def cluster(name_or_path: str, devices: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """A preset by name or a hardware file by path, sized to ``devices`` if given."""
    base = PRESETS.get(name_or_path)
    if base is None:
        path = Path(name_or_path)
        if path.suffix != ".toml" and not path.exists():
            raise ZhiluError("hardware", f"unknown hardware {name_or_path!r}; valid: {', '.join(PRESETS)}, "
                                         "or the path of a .toml hardware file")
        base = load(path)
    if devices is None:
        return base if devices_per_node is None else base.sized(base.devices, devices_per_node)
    return base.sized(devices, devices_per_node)



def load(path: str | Path) -> Cluster:
    """Read a hardware file (TOML, the format :func:`dump` writes)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ZhiluError("hardware", f"no such hardware file: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ZhiluError("hardware", f"cannot read {path}: {e}") from None
    return from_dict(data, str(path))


def from_dict(data: dict[str, Any], source: str = "hardware") -> Cluster:
    """Build a :class:`Cluster` from the parsed contents of a hardware file."""
    dev = _table(data, "device")
    links = _table(data, "links")
    matmul = tuple(MatmulPoint(_int(r, "m", "device.matmul"), _int(r, "n", "device.matmul"),
                               _int(r, "k", "device.matmul"), _num(r, "tflops", "device.matmul"),
                               _choice(r, "precision", "device.matmul", PRECISIONS, "bf16"))
                   for r in _rows(dev, "matmul"))
    attention = tuple(AttentionPoint(_int(r, "seq_len", "device.attention"), _int(r, "head_dim", "device.attention"),
                                     _num(r, "tflops", "device.attention"),
                                     _choice(r, "precision", "device.attention", PRECISIONS, "bf16"))
                      for r in _rows(dev, "attention"))
    bandwidth = _num(dev, "memory_bandwidth_gbps", "device")
    launch = _num(dev, "launch_us", "device", default=10.0)
    units = _int(dev, "compute_units", "device", default=1)
    peak = _rates(dev, "peak_tflops")
    sustained = _rates(dev, "matmul_tflops", required=False)
    for p in PRECISIONS:
        if p not in sustained:
            if not any(m.precision == p for m in matmul):
                raise ZhiluError(f"hardware.device.matmul_tflops.{p}", "missing; give the sustained rate or "
                                                                     f"measured {p} products as [[device.matmul]]")
            sustained[p] = fit_matmul_tflops(matmul, bandwidth, launch, units, p)
    device = Device(
        name=str(dev.get("name", source)), memory_gib=_num(dev, "memory_gib", "device"),
        memory_bandwidth_gbps=bandwidth, power_w=_num(dev, "power_w", "device"), peak_tflops=peak,
        matmul_tflops=sustained, attention=attention, matmul=matmul,
        compute_units=units, launch_us=launch,
        rate_spread=_fraction(dev, "rate_spread", "device"), synchronous=_bool(dev, "synchronous", "device"),
        tp_layer_us=_nonnegative(dev, "tp_layer_us", "device"),
        tp_layer_s_per_gb=_nonnegative(dev, "tp_layer_s_per_gb", "device"),
        tp_ends_us=_nonnegative(dev, "tp_ends_us", "device"),
        fsdp_step_us=_nonnegative(dev, "fsdp_step_us", "device"),
        fsdp_s_per_gb=_nonnegative(dev, "fsdp_s_per_gb", "device"))
    return Cluster(str(data.get("name", source)), device, _int(data, "devices_per_node", "", default=1),
                   _link(links, "intra"), _link(links, "inter"))


def to_dict(c: Cluster) -> dict[str, Any]:
    """The contents of a hardware file for ``c`` (its size in nodes is given at plan time)."""
    d = c.device
    device: dict[str, Any] = {
        "name": d.name, "memory_gib": d.memory_gib, "memory_bandwidth_gbps": d.memory_bandwidth_gbps,
        "power_w": d.power_w, "compute_units": d.compute_units, "launch_us": d.launch_us,
        "rate_spread": d.rate_spread, "synchronous": d.synchronous, "tp_layer_us": d.tp_layer_us,
        "tp_layer_s_per_gb": d.tp_layer_s_per_gb, "tp_ends_us": d.tp_ends_us,
        "fsdp_step_us": d.fsdp_step_us, "fsdp_s_per_gb": d.fsdp_s_per_gb, "peak_tflops": dict(d.peak_tflops),
        "matmul_tflops": dict(d.matmul_tflops),
        "matmul": [{"precision": p.precision, "m": p.m, "n": p.n, "k": p.k, "tflops": p.tflops} for p in d.matmul],
        "attention": [{"precision": a.precision, "seq_len": a.seq_len, "head_dim": a.head_dim, "tflops": a.tflops}
                      for a in d.attention]}
    links = {tier: {"name": link.name, "latency_us": link.latency_us, "bandwidth_gbps": link.bandwidth_gbps,
                    "compute_share": link.compute_share} for tier, link in (("intra", c.intra), ("inter", c.inter))}
    return {"name": c.name, "devices_per_node": c.devices_per_node, "device": device, "links": links}


def dump(c: Cluster) -> str:
    """The TOML hardware file that :func:`load` reads back to ``c``."""
    import tomli_w

    return ("# zhilu hardware file. Rates are achieved ones, not datasheet peaks; units and the model\n"
            "# that uses them: docs/perf_model.md. `zhilu calibrate` writes one for this machine.\n"
            + tomli_w.dumps(to_dict(c)))


def save(c: Cluster, path: str | Path) -> None:
    """Write :func:`dump` of ``c`` to ``path`` atomically (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump(c))
    os.replace(tmp, path)


def _table(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ZhiluError(f"hardware.{key}", "missing table; a hardware file needs [device] and [links.intra], "
                                            "[links.inter] (see zhilu.hardware.dump)")
    return v


def _rows(d: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
        raise ZhiluError(f"hardware.device.{key}", "must be an array of tables ([[device.%s]])" % key)
    return v


def _num(d: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = d.get(key, default)
    name = f"hardware.{where + '.' if where else ''}{key}"
    if v is None:
        raise ZhiluError(name, "missing; must be a positive number")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ZhiluError(name, f"must be a positive number, got {v!r}")
    return float(v)


def _int(d: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = d.get(key, default)
    name = f"hardware.{where + '.' if where else ''}{key}"
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ZhiluError(name, f"must be a positive integer, got {v!r}")
    return v


def _choice(d: dict[str, Any], key: str, where: str, valid: tuple[str, ...], default: str) -> str:
    v = d.get(key, default)
    if v not in valid:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be one of {', '.join(valid)}, got {v!r}")
    return v


def _rates(dev: dict[str, Any], key: str, required: bool = True) -> dict[str, float]:
    table = dev.get(key)
    if table is None and not required:
        return {}
    if not isinstance(table, dict):
        raise ZhiluError(f"hardware.device.{key}", f"missing table; needs {' and '.join(PRECISIONS)} rates")
    unknown = set(table) - set(PRECISIONS)
    if unknown:
        raise ZhiluError(f"hardware.device.{key}", f"unknown precision {sorted(unknown)[0]!r}; valid: "
                                                   f"{', '.join(PRECISIONS)}")
    out = {p: _num(table, p, f"device.{key}") for p in table}
    if required and set(out) != set(PRECISIONS):
        missing = sorted(set(PRECISIONS) - set(out))
        raise ZhiluError(f"hardware.device.{key}.{missing[0]}", "missing; must be a positive number")
    return out


def _link(links: dict[str, Any], tier: str) -> Link:
    v = links.get(tier)
    if not isinstance(v, dict):
        raise ZhiluError(f"hardware.links.{tier}", "missing table with name, latency_us, bandwidth_gbps")
    return Link(str(v.get("name", tier)), _num(v, "latency_us", f"links.{tier}"),
                _num(v, "bandwidth_gbps", f"links.{tier}"), _fraction(v, "compute_share", f"links.{tier}"))


def _nonnegative(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be a number >= 0, got {v!r}")
    return float(v)


def _bool(d: dict[str, Any], key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ZhiluError(f"hardware.{where}.{key}", f"must be true or false, got {v!r}")
    return v


def _fraction(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be a number in [0, 1), got {v!r}")
    return float(v)
