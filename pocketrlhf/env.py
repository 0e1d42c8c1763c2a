"""``pocketrlhf env``: versions, devices and a bitsandbytes kernel check, for bug reports."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import sys


@dataclasses.dataclass
class EnvConfig:
    pass


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_bnb_kernels(device: str) -> dict[str, str]:
    """Run one tiny 8-bit and one 4-bit layer forward and backward on ``device``."""
    import torch

    results = {}
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure is worth reporting
        return {"import": f"FAILED: {e}"}
    x = torch.randn(4, 64, device=device, requires_grad=True)
    for name, make in (
        ("8bit", lambda: bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)),
        ("4bit-nf4", lambda: bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)),
    ):
        try:
            layer = make().to(device)
            layer(x).float().sum().backward()
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001
            results[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return results


def report() -> str:
    import torch

    lines = [
        f"pocketrlhf     {_version('pocketrlhf')}",
        f"python         {sys.version.split()[0]} ({platform.platform()})",
        f"cpu cores      {os.cpu_count()}, torch threads {torch.get_num_threads()}",
    ]
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors",
                "tokenizers", "trl", "fastapi", "uvicorn"):
        lines.append(f"{pkg:<14} {_version(pkg)}")
    cuda = torch.cuda.is_available()
    lines.append(f"cuda           {'available' if cuda else 'not available'} (torch built with CUDA {torch.version.cuda})")
    devices = ["cpu"]
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}       {props.name}, {props.total_memory / 2**30:.1f} GiB")
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    lines.append(f"mps            {'available' if mps else 'not available'}")
    for device in devices:
        for name, status in check_bnb_kernels(device).items():
            lines.append(f"bitsandbytes {name} on {device}: {status}")
    return "\n".join(lines)


def run(cfg: EnvConfig) -> dict:
    print(report())
    return {}
