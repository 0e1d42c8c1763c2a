"""bitsandbytes configuration, and a guard for bitsandbytes' CPU 4-bit inference kernel.

bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a Linear4bit's weight into an inference
layout the first time the layer runs in eval mode without grad. Two consequences we measured:
  * layers whose output size is not a multiple of 32, or input size not a multiple of the
    quantization block (64), crash with "N must be divisible by block_n" (chat, serve, rollouts);
  * once repacked, every later forward uses the inference kernel, which has no backward: gradients
    stop flowing through the frozen base, so adapters below the top layer silently get wrong
    gradients. PPO (eval rollouts, then training) would train on garbage.
``guard_cpu_4bit`` keeps the generic kernel (dequantize + matmul, correct in train and eval) for
every layer of a model that will be trained, and for layers of incompatible shape otherwise.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("pocketrlhf")

_PACK_BLOCK_N = 32


def bnb_config(quantization: str, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16"):
    """A transformers BitsAndBytesConfig for ``8bit``/``4bit``, or None for ``none``."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        )
    raise ValueError(f"unknown quantization '{quantization}' (none, 8bit or 4bit)")


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def cpu_packable(module: torch.nn.Module) -> bool:
    """Whether bitsandbytes' CPU inference layout can hold this Linear4bit's weight."""
    blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64) or 64
    return module.out_features % _PACK_BLOCK_N == 0 and module.in_features % blocksize == 0


def guard_cpu_4bit(model: torch.nn.Module, training: bool) -> list[str]:
    """Route 4-bit layers away from the CPU inference kernel where it is wrong or would crash.

    Returns the names of layers that use the slower generic kernel because of their shape.
    """
    slow = []
    for name, module in linear4bit_modules(model):
        if training:
            module.support_avx512bf16_for_cpu = False
        elif not cpu_packable(module):
            module.support_avx512bf16_for_cpu = False
            slow.append(f"{name} ({module.in_features}->{module.out_features})")
    if slow:
        log.info(
            "4-bit on CPU: %d layer(s) have sizes the fast CPU kernel cannot hold (needs out %% 32 == 0 and "
            "in %% 64 == 0); they use the generic kernel instead, e.g. %s",
            len(slow),
            slow[0],
        )
    return slow
