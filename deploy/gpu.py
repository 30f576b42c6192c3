"""What GPU this machine has, without torch: `nvidia-smi` for the name, compute capability,
driver, memory and clocks, and the CUDA driver library (libcuda, through ctypes) for the SM
count. Used by engine manifests (the build GPU), the engine check at load time, and benchmark
fingerprints. Every field is None where it cannot be read (no GPU, no driver, a sandbox)."""

from __future__ import annotations

import ctypes
import os
import subprocess
from functools import lru_cache
from typing import Optional

SMI_FIELDS = {  # our name -> nvidia-smi --query-gpu field
    "name": "name",
    "compute_capability": "compute_cap",
    "driver": "driver_version",
    "memory_mib": "memory.total",
    "sm_clock_max_mhz": "clocks.max.sm",
    "memory_clock_max_mhz": "clocks.max.memory",
}
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


def _smi_id(index: int) -> str:
    """nvidia-smi's id of the `index`-th GPU CUDA sees: nvidia-smi ignores CUDA_VISIBLE_DEVICES,
    which renumbers (and may name by UUID) the GPUs TensorRT and CUDA run on."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return visible[index] if index < len(visible) else str(index)


def _smi(index: int) -> Optional[dict]:
    query = ",".join(SMI_FIELDS.values())
    try:
        completed = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", f"--id={_smi_id(index)}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    values = [value.strip() for value in completed.stdout.strip().split(",")]
    if completed.returncode != 0 or len(values) != len(SMI_FIELDS):
        return None
    return {key: (None if value in ("", "[N/A]", "N/A") else value) for key, value in zip(SMI_FIELDS, values)}


def _sm_count(index: int) -> Optional[int]:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, count = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(count), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device) != 0:
        return None
    return count.value


def describe(info: Optional[dict]) -> str:
    """One line for people: name, compute capability, SMs, max SM clock, driver."""
    if not info:
        return "none"
    return (
        f"{info['name']} (compute capability {info['compute_capability']}, {info['sm_count']} SMs, "
        f"max SM clock {info['sm_clock_max_mhz']} MHz, driver {info['driver']})"
    )


@lru_cache(maxsize=None)
def gpu_info(index: int = 0) -> Optional[dict]:
    """Name, compute capability ('9.0'), driver, memory, max clocks and SM count of GPU `index`,
    or None where no NVIDIA GPU is visible."""
    info = _smi(index)
    if info is None:
        return None
    return {**info, "sm_count": _sm_count(index)}


def gpu_description() -> Optional[dict]:
    """Name and compute capability of GPU 0 (no torch), or None without a GPU: what manifests record."""
    info = gpu_info()
    return None if info is None else {"name": info["name"], "compute_capability": info["compute_capability"]}
