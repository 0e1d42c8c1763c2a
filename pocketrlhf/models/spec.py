"""The frozen base, described once: where it is and how it is loaded.

A ``BaseSpec`` is built from a command's model options (``--model --quantization --quant-type
--double-quant --compute-dtype --dtype --device --trust-remote-code``; chat and serve spell the
quantization ``--load-4bit``/``--load-8bit``), passed whole to ``load_base``, and recorded whole in
every adapter's ``pocketrlhf_adapter.json``. Merge, chat, serve, evaluate and the DPO reference
cache read it back from there, so an adapter is always met with the base it was trained on: an FP4
or single-quantized 4-bit adapter is dequantized as FP4 or single-quantized.

Import-light (no torch): configs and the planner use it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where a run happened is not how its base was stored: never recorded, never compared.
_NOT_RECORDED = ("device",)


def model_reference(path: str) -> str:
    """A local model path made absolute (so that records work from any folder), a hub id as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if path and p.exists() else path


@dataclass(frozen=True)
class BaseSpec:
    path: str
    quantization: str = "none"  # none | 8bit | 4bit
    quant_type: str = "nf4"  # 4-bit data type: nf4 | fp4
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (QLoRA)
    compute_dtype: str = "bfloat16"  # 4-bit: dtype of the matmuls
    dtype: str = "auto"  # dtype of the weights that are not quantized
    device: str = "auto"
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg: Any, path: str | None = None) -> "BaseSpec":
        """The spec a command's model options describe (``path`` overrides ``cfg.model``)."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name != "path" and hasattr(cfg, f.name)}
        return cls(path=cfg.model if path is None else path, **values)

    def replace(self, **changes: Any) -> "BaseSpec":
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """What adapters store: every field but the device, the path absolute when local."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_RECORDED}
        values["path"] = model_reference(self.path)
        return values

    @classmethod
    def from_record(cls, info: dict, **overrides: Any) -> "BaseSpec | None":
        """The spec an adapter's ``pocketrlhf_adapter.json`` records (``base``), or for adapters
        written before it did, what they recorded (``base_model``, ``quantization``); None when
        there is nothing. ``overrides`` replace recorded fields (e.g. another copy of the base)."""
        recorded = info.get("base")
        if isinstance(recorded, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in recorded.items() if k in known}
        elif info.get("base_model"):
            values = {"path": info["base_model"], "quantization": info.get("quantization", "none")}
        else:
            return None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> str:
        """``4bit nf4 + double quantization`` and the like, for log lines."""
        if self.quantization == "4bit":
            return f"4bit {self.quant_type}" + (" + double quantization" if self.double_quant else "")
        return self.quantization if self.quantization != "none" else f"unquantized ({self.dtype})"
