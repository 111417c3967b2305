"""What a result was measured on: CPU, GPU, memory, load and library versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ["mlx", "mlx-cpu", "mlx-cuda-13", "mlx-lm", "mlx-vlm", "torch", "transformers", "numpy", "mlx-diffgemma"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def versions(python: str = sys.executable) -> dict[str, str]:
    """Installed versions of the libraries that matter, as seen by `python`."""
    if python == sys.executable:
        found = {}
        for name in LIBRARIES:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return found
    code = (
        "import json,sys\nfrom importlib import metadata\nout={}\n"
        f"for n in {LIBRARIES!r}:\n"
        "    try: out[n]=metadata.version(n)\n    except metadata.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    try:
        import json

        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)
    except Exception:
        return {}


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def record(shared: bool, bench_python: str | None = None) -> dict:
    """The machine record stored with every run."""
    repo = Path(__file__).resolve().parent.parent
    rec = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "versions": versions(),
        "commit": _git_commit(repo),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "shared": shared,
        "shared_note": (
            "the CPU cores were shared with other jobs during this run; timings are noisy and "
            "rank the systems rather than price them" if shared else None
        ),
    }
    if bench_python:
        rec["bench_venv_versions"] = versions(bench_python)
    return rec
