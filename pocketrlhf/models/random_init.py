"""Random-init checkpoints of any shape, written one decoder layer at a time, optionally in NF4.

What a step of a 20B model costs can be measured without its weights: the cost depends on the
shapes, not the values. A 20B model is 40 GB in 16 bits and about 11 GB in NF4; this writes the NF4
checkpoint directly, drawing each layer's weights, quantizing them with bitsandbytes exactly as
transformers quantizes a 16-bit checkpoint at load time, and saving them in transformers'
serialized 4-bit format. Neither memory nor disk ever holds more than one layer in 16 bits. The
result is an ordinary Hugging Face model directory that goes through the real loading code.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger("pocketrlhf")

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _random_value(name: str, shape: torch.Size, dtype: torch.dtype, std: float, generator: torch.Generator,
                  device: str) -> torch.Tensor:
    """transformers' own init scheme in short: zero biases, unit norm scales, N(0, std) matrices."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device).mul_(std).to(dtype)


def write_random_checkpoint(config, out_dir: str | Path, quantization: str = "4bit", dtype: torch.dtype = torch.bfloat16,
                            device: str = "cpu", seed: int = 0, std: float | None = None) -> Path:
    """Write ``config``'s model with random weights to ``out_dir`` as sharded safetensors.

    ``quantization``: ``none`` (``dtype`` weights) or ``4bit`` (NF4, double quantization, blocks
    of 64, bf16 compute: pocketrlhf's default 4-bit setting). Every linear layer (GPT-2's Conv1D
    too) except the output embedding is quantized, as transformers does. ``device`` draws and
    quantizes there (a GPU is much faster for a big model); one shard per decoder layer. The same
    seed gives the same 16-bit values whatever the quantization, so a ``none`` and a ``4bit``
    checkpoint of one seed hold the same model.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pocketrlhf.models.quantization import bnb_config

    if quantization not in ("none", "4bit"):
        raise ValueError(f"unknown quantization '{quantization}' (none or 4bit)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    output = model.get_output_embeddings()
    quantized: dict[str, bool] = {}  # weight name -> stored transposed (GPT-2's Conv1D: in x out)
    if quantization == "4bit":
        from transformers.pytorch_utils import Conv1D

        quantized = {f"{n}.weight": isinstance(m, Conv1D) for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output}
    std = config.initializer_range if std is None else std

    shards: dict[int, list[tuple[str, torch.Size]]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        layer = _layer_of(name)
        shards.setdefault(-1 if layer is None else layer, []).append((name, p.shape))
    order = sorted(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index, key in enumerate(order):
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + key)
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shards[key]:
            value = _random_value(name, shape, dtype, std, generator, device)
            if name in quantized:
                import bitsandbytes as bnb

                value = value.T.contiguous() if quantized[name] else value  # as transformers quantizes Conv1D
                packed, state = bnb.functional.quantize_4bit(value, blocksize=64, compress_statistics=True,
                                                             quant_type="nf4", quant_storage=torch.uint8)
                tensors[name] = packed
                tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            else:
                tensors[name] = value
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
        file = f"model-{index + 1:05d}-of-{len(order):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("random checkpoint: shard %d/%d written", index + 1, len(order))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = config.__class__.from_dict(config.to_dict())
    config.dtype = dtype
    if quantization == "4bit":
        config.quantization_config = bnb_config("4bit").to_dict()
    config.save_pretrained(str(out))
    return out
