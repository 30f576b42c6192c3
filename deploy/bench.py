"""Latency benchmarks of runners: inputs already on the device, time-based warm-up, CUDA events
on GPUs, enough iterations for a stable median, a distribution, and a fingerprint of everything
that decides whether two numbers may be compared."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from vitslim.core.settings import refuse_non_finite, setting

from .errors import DeployError
from .runners import Runner


@dataclass(frozen=True)
class BenchSettings:
    warmup_seconds: float = setting(1.0, "seconds of warm-up before timing")
    min_seconds: float = setting(2.0, "time each measurement round for at least this long")
    min_iterations: int = setting(20, "and for at least this many iterations")
    max_iterations: int = setting(100_000, "at most this many iterations per round")
    max_cov: float = setting(0.10, "a round whose coefficient of variation is above this is measured again")
    max_rounds: int = setting(3, "measurement rounds at most (the quietest is kept)")

    def __post_init__(self) -> None:
        refuse_non_finite(self, DeployError)
        if self.warmup_seconds < 0 or self.min_seconds < 0 or self.max_cov <= 0:
            raise DeployError("timing settings: --warmup-seconds and --min-seconds must be >= 0 and --max-cov > 0")
        if not 1 <= self.min_iterations <= self.max_iterations or self.max_rounds < 1:
            raise DeployError("timing settings: need 1 <= --min-iterations <= --max-iterations and --max-rounds >= 1")


def summarize(samples_ms: list[float], batch: int) -> dict:
    """Distribution of per-iteration latencies (ms) and throughput (images/s at the median)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    mean = float(values.mean())
    median = float(np.median(values))
    return {
        "iterations": int(values.size),
        "mean_ms": mean,
        "median_ms": median,
        "p90_ms": float(np.percentile(values, 90)),
        "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
        "cov": float(values.std() / mean) if mean > 0 else 0.0,
        "throughput_per_s": batch / (median / 1000.0) if median > 0 else float("inf"),
    }


def speedup_columns(baseline_ms: float, median_ms: float, macs_fraction: Optional[float]) -> dict:
    """The speed-up over a baseline timed the same way, the MAC-ideal speed-up (dense MACs /
    variant MACs = 1 / macs_fraction) and realised / ideal; None where the MACs are unknown."""
    speedup = baseline_ms / median_ms
    ideal = None if macs_fraction is None else 1.0 / macs_fraction
    return {"speedup": speedup, "mac_ideal": ideal, "realised_over_ideal": None if ideal is None else speedup / ideal}


def device_timer(runner: Runner):
    """A function timing one `run_prepared` in ms: on GPUs the runner's own `time_ms` where it has
    one (TensorRT, onnxruntime: CUDA events through cudart), CUDA events via torch for PyTorch;
    perf_counter around a synchronised call on CPUs."""
    if hasattr(runner, "time_ms") and runner.device.startswith("cuda"):
        return runner.time_ms
    if runner.device.startswith("cuda"):
        import torch

        def timed(prepared) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream()
            start.record(stream)
            runner.run_prepared(prepared)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed(prepared) -> float:
        started = time.perf_counter()
        runner.run_prepared(prepared)
        runner.synchronize()
        return (time.perf_counter() - started) * 1000.0

    return timed


def measure_round(runner: Runner, images: np.ndarray, settings: BenchSettings) -> list[float]:
    """One round: warm up for warmup_seconds, then time until min_seconds and min_iterations."""
    prepared = runner.prepare(images)
    timed = device_timer(runner)
    deadline = time.perf_counter() + settings.warmup_seconds
    while time.perf_counter() < deadline:
        timed(prepared)
    samples, started = [], time.perf_counter()
    while len(samples) < settings.max_iterations and (
        len(samples) < settings.min_iterations or time.perf_counter() - started < settings.min_seconds
    ):
        samples.append(timed(prepared))
    return samples


def end_to_end_ms(runner: Runner, images: np.ndarray, iterations: int = 20) -> float:
    """Median of `infer` including host-device copies (equals device time on the CPU)."""
    runner.infer(images)
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        runner.infer(images)
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(times))


def host_description() -> dict:
    """The machine a latency was measured on: CPU model and cores, system, Python, and the GPU
    (deploy.gpu: name, compute capability, SM count, memory, max clocks, driver) where one is visible."""
    from .gpu import gpu_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "gpu": gpu_info(),
    }


def device_name(host: dict, device: str) -> Optional[str]:
    """What `device` ("cpu", "cuda", "cuda:N") is on `host` (host_description()): the GPU's name
    or the CPU's model; another name is another machine's latency."""
    return (host.get("gpu") or {}).get("name") if device.startswith("cuda") else host.get("cpu")


def fingerprint(runner: Runner, precision: str, batch: int, artifact_sha256: Optional[str], label: str = "") -> dict:
    """What was measured and where: host, runner (device, library versions), precision, batch,
    label, and the artifact's bytes (for information: see `comparison_key`)."""
    return {
        "host": host_description(),
        "runner": runner.description,
        "precision": precision,
        "batch": batch,
        "artifact_sha256": artifact_sha256,
        "label": label,
    }


# Digests of the measured files: kept in results for information, but a re-export of the same
# model (another token layout, say) must stay comparable with its baseline, so they never decide.
ARTIFACT_DIGESTS = ("artifact_sha256", "onnx_sha256", "engine_sha256")


def comparison_key(fingerprint_: dict) -> dict:
    """The fingerprint's fields that must match for two latencies to be compared, flattened to
    dotted names ('runner.onnxruntime', 'host.cpu', 'batch'): everything but ARTIFACT_DIGESTS."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif prefix.rsplit(".", 1)[-1] not in ARTIFACT_DIGESTS:
            flat[prefix] = value

    walk("", fingerprint_)
    return flat


def fingerprint_id(fingerprint_: dict) -> str:
    """A short stable hash of the comparison key: results compare only within one id."""
    return hashlib.sha256(json.dumps(comparison_key(fingerprint_), sort_keys=True).encode()).hexdigest()[:16]


def benchmark(
    runner: Runner,
    images: np.ndarray,
    precision: str = "fp32",
    artifact_sha256: Optional[str] = None,
    settings: BenchSettings = BenchSettings(),
    label: str = "",
) -> dict:
    """Measure `runner` on `images` (one batch); re-measure up to max_rounds while CoV > max_cov
    and keep the quietest round. `precision`, `artifact_sha256` and `label` go into the
    fingerprint that decides which results may be compared."""
    rounds = []
    for _ in range(settings.max_rounds):
        stats = summarize(measure_round(runner, images, settings), len(images))
        rounds.append(stats)
        if stats["cov"] <= settings.max_cov:
            break
    best = min(rounds, key=lambda s: s["cov"])
    print_ = fingerprint(runner, precision, len(images), artifact_sha256, label)
    return {
        "label": label,
        "batch": len(images),
        **best,
        "rounds": len(rounds),
        "noisy": best["cov"] > settings.max_cov,
        "setup_seconds": getattr(runner, "setup_seconds", {}).get(
            str(tuple(images.shape))
        ),  # compile / capture, not in the latency
        # on a CPU there are no copies: end to end is the device time just measured
        "end_to_end_median_ms": best["median_ms"] if runner.device == "cpu" else end_to_end_ms(runner, images),
        "fingerprint": print_,
        "fingerprint_id": fingerprint_id(print_),
        "settings": asdict(settings),
    }
