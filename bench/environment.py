"""Where a result was computed: code commit, Python and package versions, device.

Every record carries this, so a number can be traced to the code and hardware that produced it.
The parts that cannot change within a process (commit, versions, host) are computed once.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Distributions whose versions can change a result or its speed.
PACKAGES = ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image",
            "pillow", "fuad-bench")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed copy, a cluster node): say nothing
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Commit of the checkout and whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """Human name of a torch device (GPU model or CPU model)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_name()


def environment(device) -> dict[str, Any]:
    """The ``environment`` block of a record for a run on ``device``."""
    import torch

    device = torch.device(device)
    env = {
        **code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": package_versions(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env
