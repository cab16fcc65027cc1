"""Target devices: what a bundle is built for and what bench compares against.

Each Jetson has a default memory budget for `edgevlm run` (edgevlm.memory): its RAM less what JetPack's
desktop-less OS, the CUDA context and the camera stack typically hold, so a bundle built for it plans its
KV cache to fit at defaults. Hosts (cpu, cuda) plan against the memory available when a bundle loads.

Memory bandwidth is the roofline of decoding (every generated token reads all decoder weights and the
KV cache once), so `edgevlm bench` reports achieved bytes/s against it: the number below for a named
target, or on the machine it runs on a read test with the run's threads over as many bytes as a step reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UsageError
from edgevlm.profiler import DRAM_PROBE_BYTES, measure_bandwidth, run_threads


@dataclass(frozen=True)
class Target:
    name: str
    memory_gb: float | None  # device memory shared by CPU and GPU on Jetson; None: this machine's
    bandwidth_gb_s: float | None  # peak DRAM bandwidth; None: measure it
    description: str
    budget_gb: float | None = None  # default memory budget of a bundle built for it; None: what is available


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", None, None, "this machine's CPU (bandwidth measured by a read test)"),
        Target("cuda", None, None, "an NVIDIA GPU through ONNX Runtime's CUDA provider"),
        Target("jetson-orin-nano", 8, 68.0, "Jetson Orin Nano 8GB (LPDDR5, 128-bit)", 5.5),
        Target("jetson-orin-nx", 16, 102.4, "Jetson Orin NX 16GB (LPDDR5, 128-bit)", 12.5),
        Target("jetson-orin-agx", 64, 204.8, "Jetson AGX Orin 64GB (LPDDR5, 256-bit)", 56.0),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None


def bandwidth(target: str | None = None) -> dict:
    """The memory bandwidth decoding is measured against: `target`'s peak, or where it has no figure (cpu, cuda,
    none given) a read test on this machine with the run's threads, past its caches. As bench documents record
    it: bandwidth_gb_s, bandwidth_source."""
    peak = _peak_bandwidth(target)
    if peak is not None:
        return {"bandwidth_gb_s": peak, "bandwidth_source": target}
    return {"bandwidth_gb_s": round(measure_bandwidth(DRAM_PROBE_BYTES), 3),
            "bandwidth_source": f"read test, {run_threads()} threads"}


def ceiling(target: str | None = None):
    """What a decode step reading `nbytes` is compared with (GB/s, a function of nbytes): `target`'s peak, or
    a read of as many bytes here with the run's threads (a working set that fits a cache reads at its rate),
    read again at each call, the fastest read of that size so far counting."""
    peak = _peak_bandwidth(target)
    if peak is not None:
        return lambda nbytes: peak
    return lambda nbytes: measure_bandwidth(nbytes, again=True)


def _peak_bandwidth(target: str | None) -> float | None:
    """A named target's published DRAM bandwidth (None: none given, or a host measured where it runs)."""
    t = get_target(target) if target else None
    return t.bandwidth_gb_s if t is not None else None
