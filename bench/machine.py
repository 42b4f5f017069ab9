"""The machine and software a benchmark ran on: CPU, cores, RAM, disk, package versions, date, load."""

from __future__ import annotations

import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("gemma2-convert", "torch", "transformers", "numpy", "safetensors", "gguf", "llama-cpp-python",
            "compressed-tensors", "matplotlib")


def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key)), "?")
    except OSError:
        return platform.processor() or "?"


def _microarchitecture() -> str:
    """What LLVM calls this CPU (numba compiles the kernels for it) and its widest vector unit: the same model name
    covers machines whose per-byte costs differ by 2× or more (znver1 with AVX2 against znver4 with AVX-512)."""
    flags = set(_cpuinfo("flags").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    try:
        import llvmlite.binding as llvm

        return f"{llvm.get_host_cpu_name()}, {simd}"
    except Exception:  # noqa: BLE001 - llvmlite comes with numba; the report only loses the name
        return simd


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0


def _filesystem(path: Path) -> str:
    """``device fstype`` of the mount holding ``path``."""
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for ln in f:
                dev, mnt, fstype = ln.split()[:3]
                if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    return f"{best[0]} ({best[1]})"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def describe(scratch: Path) -> dict:
    """Everything the report prints about where it ran; ``scratch`` is where the files were written."""
    du = shutil.disk_usage(scratch)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{_cpuinfo('model name')} ({_microarchitecture()})",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(_meminfo("MemTotal") / 1e9, 1),
        "swap_gb": round(_meminfo("SwapTotal") / 1e9, 1),
        "disk": f"{_filesystem(scratch)}, {du.total / 1e9:.0f} GB, {du.free / 1e9:.0f} GB free",
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(),
        "load": f"{os.getloadavg()[0]:.1f}",
    }


def one_line(m: dict) -> str:
    v = m["versions"]
    pk = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "gguf", "llama-cpp-python") if k in v)
    return (f"{m['date']}; {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.0f} GB RAM; "
            f"gemma2-convert {v.get('gemma2-convert', '?')}, {pk}; load average {m['load']} at the start")
