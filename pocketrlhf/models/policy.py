"""The trainable side of the shared base: the frozen base with one trainable adapter (every
training stage starts here), frozen adapters added beside it without touching what trains, and
exactly which adapters train.

peft's ``load_adapter(is_trainable=False)`` and ``set_adapter`` both rewrite ``requires_grad``
(and the former puts the whole model in eval mode, which turns gradient checkpointing off), so
adding a role goes through ``add_frozen_adapter`` and choosing what trains through
``set_trainable``.

Adapter dtype (``--adapter-dtype``): peft keeps adapter weights in fp32 whatever the base; in
bfloat16 (as QLoRA trained) the weights and their gradients take 2 bytes each instead of 4. The
optimizer keeps its AdamW moments in fp32 (``stages.common.build_optimizer``) and updates the 16-bit
weights directly, with no fp32 master copy: a master copy would cost the 4 bytes per parameter the
change saves, while 16-bit moments would be wrong (0.999 * v rounds back to v in bfloat16, so the
second moment stops decaying). The cost is that an update smaller than half a bfloat16 step of its
weight is lost; tests/test_adapter_dtype.py checks that training still follows the fp32 curve.
Frozen roles added later (reference, reward) take the trained adapter's dtype, so that a reference
copied from the policy's starting adapter equals it exactly.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pocketrlhf.config import adapter_scope_on_causal_lm
from pocketrlhf.errors import ConfigError
from pocketrlhf.models.spec import BaseSpec

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the hidden states that the scalar heads read."""
    from pocketrlhf.models.forward import unwrap

    return unwrap(model)[1].get_output_embeddings().weight.shape[1]


def build_policy(cfg: Any, tokenizer=None, total_steps: int = 1000, adapter_name: str = "default",
                 init_adapter: str | None = None) -> torch.nn.Module:
    """Frozen base (as ``cfg``'s model options describe it) + one trainable adapter: fresh from
    ``cfg``'s adapter options, or a copy of ``init_adapter`` (default ``cfg.init_adapter``);
    dropout off in the base."""
    from peft import prepare_model_for_kbit_training

    from pocketrlhf.models.adapters import attach_adapter, load_adapter, make_peft_config
    from pocketrlhf.models.forward import disable_dropout, encoder_adapters
    from pocketrlhf.models.loading import is_seq2seq, load_base

    reentrant = bool(getattr(cfg, "reentrant_checkpointing", False)) and cfg.gradient_checkpointing
    if reentrant and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Untested with DDP's gradient hooks and FSDP's gathers, which recomputation without grad interleaves.
        raise ConfigError("--reentrant-checkpointing runs on one process only: drop it (non-reentrant checkpointing "
                          "works on several) or launch one process")
    scope = getattr(cfg, "adapter_scope", "all")
    if scope != "all" and not is_seq2seq(cfg.model):  # before minutes of loading
        raise ConfigError(adapter_scope_on_causal_lm(scope, cfg.model))
    spec = BaseSpec.from_config(cfg)
    base = load_base(spec, training=True)
    disable_dropout(base)
    # Non-reentrant checkpointing runs the forward with grad on, so bitsandbytes' int8 matmul keeps its
    # input on its autograd context (outside save_for_backward) through checkpointing; the reentrant
    # variant runs it without grad and keeps nothing (plan.checkpointed_layer_bytes).
    gc_kwargs = {"use_reentrant": reentrant}
    if spec.quantization != "none" and cfg.kbit_upcast:
        with warnings.catch_warnings():
            # peft calls transformers' deprecated gradient_checkpointing_enable: a notice no user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                   gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    init = getattr(cfg, "init_adapter", "") if init_adapter is None else init_adapter
    if init:
        model = load_adapter(base, init, name=adapter_name, trainable=True)
        if scope == "decoder" and adapter_name in encoder_adapters(model):
            logging.getLogger("pocketrlhf").warning(
                "--adapter-scope decoder: the adapter %s this run starts from acts in the encoder too (its scope was set "
                "when it was trained), so the policy's encoder is its own", init)
    else:
        peft_cfg = make_peft_config(cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                    cfg.num_virtual_tokens, total_steps)
        model = attach_adapter(base, peft_cfg, adapter_name, getattr(cfg, "adapter_scope", "all"))
    cast_adapter(model, adapter_name, getattr(cfg, "adapter_dtype", "float32"))
    model.train()
    return model


def cast_adapter(model: torch.nn.Module, name: str, dtype: str | torch.dtype) -> None:
    """Adapter ``name``'s weights in ``dtype`` (their gradients follow); in place, before an
    optimizer is built over them. peft loads and creates adapters in fp32."""
    target = ADAPTER_DTYPES[dtype] if isinstance(dtype, str) else dtype
    for param_name, p in model.named_parameters():
        if f".{name}." in param_name and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def adapter_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the adapter weights that train (None when nothing trains)."""
    return next((p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()), None)


def add_frozen_adapter(model: torch.nn.Module, path: str | Path, name: str) -> torch.nn.Module:
    """Load a saved adapter as a frozen role (reference, reward) on the same base; what trained
    before still trains, and the model stays in training mode."""
    from pocketrlhf.models.adapters import load_adapter

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    dtype = adapter_dtype(model)
    model = load_adapter(model, path, name=name, trainable=False)
    if dtype is not None:
        cast_adapter(model, name, dtype)
    for p, flag in flags:
        p.requires_grad_(flag)
    model.train(was_training)
    return model


def set_trainable(model: torch.nn.Module, adapters: set[str]) -> list[torch.nn.Parameter]:
    """requires_grad on exactly the parameters of ``adapters`` (peft would keep only one)."""
    trainable = []
    for name, p in model.named_parameters():
        mine = any(f".{a}." in name for a in adapters)
        p.requires_grad_(mine)
        if mine:
            trainable.append(p)
    return trainable
