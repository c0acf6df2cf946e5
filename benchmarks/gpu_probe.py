"""What `make gpu-check` runs on: prints one JSON object with the Python, torch and its CUDA, the GPU, the driver and
the version of every package the check imports (None where one is missing). benchmarks/gpu_check.py runs it as a
process of its own: that is how it learns whether a Python has torch at all, and its own process never holds the GPU.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "tiktoken", "numpy", "scipy", "matplotlib",
            "filelock", "pytest", "tqdm", "tensorboard", "pyyaml", "pyarrow", "zstandard")


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def main() -> None:
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "host": socket.gethostname(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "cuda_runtime": torch.version.cuda, "driver": driver(),
            "packages": {name: version(name) for name in PACKAGES}}
    if info["cuda"]:
        props, nccl = torch.cuda.get_device_properties(0), torch.cuda.nccl.version()
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
