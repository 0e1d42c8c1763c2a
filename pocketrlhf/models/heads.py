"""Scalar heads (reward, value) on the base's final hidden states, kept in fp32.

Saved next to an adapter as ``head.safetensors`` so that a reward or value model is "an adapter
plus a head" on the shared base, never a second copy of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEAD_FILE = "head.safetensors"


class ScalarHead(torch.nn.Module):
    """``hidden -> scalar``; ``init`` is "reward" (N(0, 1/sqrt(d+1)), bias 0) or "zero" (value)."""

    def __init__(self, hidden_size: int, init: str = "reward", bias: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        with torch.no_grad():
            if init == "reward":
                # std 1/sqrt(d_model + 1) ("The N+ Implementation Details of RLHF with PPO", Detail 11;
                # Stiennon et al. 2020 printed it as the variance).
                self.linear.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1))
            elif init == "zero":
                self.linear.weight.zero_()
            else:
                raise ValueError(f"unknown head init '{init}'")
            self.linear.bias.fill_(bias)
        # Subtracted from every output; set after training so that a reference set scores mean 0.
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1) - self.offset

    def save(self, directory: str | Path, metadata: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"hidden_size": str(self.linear.in_features)}
        if metadata:
            meta["pocketrlhf"] = json.dumps(metadata)
        save_file(tensors, str(directory / HEAD_FILE), metadata=meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ScalarHead":
        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {HEAD_FILE} (not a reward/value adapter directory)")
        tensors = load_file(str(path))
        head = cls(tensors["linear.weight"].shape[1], init="zero")
        head.load_state_dict(tensors)
        return head.to(device)


def head_metadata(directory: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / HEAD_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("pocketrlhf", "{}"))
