"""Load a frozen base model (16/32-bit, LLM.int8 or 4-bit) and a tokenizer with sane padding.

Safe by default: safetensors weights only, and no code from the model repo unless asked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pocketrlhf.errors import ModelLoadError
from pocketrlhf.models.quantization import bnb_config, guard_cpu_4bit
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.paths import missing_model_message

log = logging.getLogger("pocketrlhf")

PAD_TOKEN = "<|pad|>"


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps was asked for, but this torch build sees no Apple GPU")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def check_model(path: str) -> None:
    """Fail at once, without the network, for no model or a local-looking path that does not exist.

    What counts as local is ``pocketrlhf.paths``'s rule: an existing path, anything absolute or
    starting with ``./``, ``../`` or ``~``, more than one ``/``, or ``dir/name`` where ``dir`` is a
    folder here. Only ``name`` or ``org/name`` otherwise is tried as a hub id.
    """
    message = missing_model_message(path)
    if message:
        raise ModelLoadError(message)


def check_safetensors(path: str) -> None:
    """Refuse pickle-only checkpoints before transformers gets a chance to unpickle them."""
    p = Path(path).expanduser()
    if not p.is_dir():
        if p.exists():
            raise ModelLoadError(f"{path} is a file; pass the model's directory (with config.json and *.safetensors)")
        return
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
    if pickles:
        raise ModelLoadError(
            f"{path} has only pickle weights ({pickles[0]}); pocketrlhf loads safetensors only because pickle files "
            "can run code. Convert once with transformers (load, then save_pretrained(..., safe_serialization=True))."
        )
    raise ModelLoadError(f"{path} has no *.safetensors weight files")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Tokenizer with a pad token distinct from EOS, right padding (training default).

    When the tokenizer has no pad token (or pads with EOS), an unused special token or a new
    ``<|pad|>`` token is used. A new pad id may lie beyond the embedding matrix: that is fine,
    because pad positions are always masked and replaced before any forward pass
    (``models.forward.model_inputs``), so the embeddings never need resizing.
    """
    from transformers import AutoTokenizer

    check_model(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:  # noqa: BLE001 - many error types; one clear message
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {path} has no EOS token; completions must end with one")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        unk = tok.unk_token_id
        if unk is not None and unk not in (tok.eos_token_id, tok.bos_token_id):
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    return tok


def load_base(spec: BaseSpec | str, *args: Any, training: bool = True, revision: str | None = None,
              max_memory: dict | None = None, **fields: Any) -> torch.nn.Module:
    """The frozen base language model that ``spec`` describes, on its device, with every
    parameter's requires_grad off: a causal LM, or an encoder-decoder (T5, BART) when the folder's
    config.json says ``is_encoder_decoder`` (see ``is_seq2seq``). A path with BaseSpec's fields (in
    BaseSpec's order, or by name) may stand for the spec in short scripts:
    ``load_base("models/llama", "4bit", device="cpu")``.

    ``max_memory`` (accelerate's per-device caps, e.g. ``{0: "8GiB", "cpu": "30GiB"}``) spreads the
    weights with ``device_map="auto"`` instead; layers placed on the CPU stay unquantized there.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    spec = spec if isinstance(spec, BaseSpec) else BaseSpec(spec, *args, **fields)
    model, quantization, dtype, device = spec.path, spec.quantization, spec.dtype, spec.device
    check_model(model)
    dev = resolve_device(device)
    stored = None
    if is_local(model):
        check_safetensors(model)
        # Absolute, so that adapter_config.json's base_model_name_or_path works from any folder.
        model = str(Path(model).expanduser().resolve())
        stored = checkpoint_quantization(model)
        if stored:  # transformers loads a pre-quantized checkpoint as it is stored, whatever else is asked
            if quantization != stored:
                log.info("%s is stored quantized (%s): loading it %s instead of --quantization %s",
                         model, stored, stored, quantization)
            quantization = stored
    if quantization != "none" and dev == "mps":
        raise ModelLoadError("bitsandbytes 8-bit/4-bit does not run on Apple GPUs (mps); use --quantization none or --device cpu")
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype,
        use_safetensors=True,
        trust_remote_code=spec.trust_remote_code,
        device_map={"": dev},
        revision=revision,
    )
    qcfg = None if stored else bnb_config(quantization, spec.quant_type, spec.double_quant, spec.compute_dtype)
    if max_memory is not None:
        kwargs.update(device_map="auto", max_memory=max_memory)
        if qcfg is not None and "cpu" in max_memory:
            qcfg.llm_int8_enable_fp32_cpu_offload = True
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    # transformers keeps T5's ``wo`` projections in fp32 (``_keep_in_fp32_modules``) in every
    # precision, unquantized under LLM.int8/NF4 too: nothing here overrides that.
    auto = AutoModelForSeq2SeqLM if is_seq2seq(model, revision=revision) else AutoModelForCausalLM
    try:
        lm = auto.from_pretrained(model, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{model} needs its own Python code to load; re-run with --trust-remote-code if you trust it") from None
        raise ModelLoadError(f"cannot load {model}: {e}") from None
    except OSError as e:
        where = "" if is_local(model) else " (not a local directory, and the hub could not be reached or has no such model)"
        raise ModelLoadError(f"cannot load {model}{where}: {str(e).splitlines()[0]}") from None
    for p in lm.parameters():
        p.requires_grad_(False)
    if getattr(getattr(lm, "hf_quantizer", None), "pre_quantized", False):
        follow_dtype(lm, torch_dtype)
    if quantization == "4bit" and dev == "cpu":
        guard_cpu_4bit(lm, training=training)
    lm.config.use_cache = not training
    return lm


def is_seq2seq(model_or_config: Any, revision: str | None = None) -> bool:
    """Whether a base is an encoder-decoder (T5, BART...): the one question every part of
    pocketrlhf asks before treating a base as a causal LM. Takes a model (peft-wrapped or not), a
    transformers config, a config.json dict, or a model folder / hub id (its config.json is read;
    a hub id is asked of the hub cache only)."""
    if isinstance(model_or_config, (str, Path)):
        return bool(_folder_config(str(model_or_config), revision).get("is_encoder_decoder"))
    if isinstance(model_or_config, dict):
        return bool(model_or_config.get("is_encoder_decoder"))
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, dict):  # peft's PeftModel.config is the base's config, as a dict at times
        return bool(config.get("is_encoder_decoder"))
    return bool(getattr(config, "is_encoder_decoder", False))


def _folder_config(path: str, revision: str | None = None) -> dict:
    import json

    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except ValueError:
            return {}
    if is_local(path):
        return {}
    try:  # a hub id: its config.json, from the cache or the hub as transformers would
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, revision=revision).to_dict()
    except Exception:  # noqa: BLE001 - loading will report what is wrong, in its own words
        return {}


def checkpoint_quantization(path: str) -> str | None:
    """``4bit``/``8bit`` for a model directory saved already quantized by bitsandbytes, else None."""
    import json

    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if qc.get("quant_method") != "bitsandbytes":
        return None
    return "4bit" if qc.get("load_in_4bit") else "8bit" if qc.get("load_in_8bit") else None


def follow_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the unquantized weights of a pre-quantized checkpoint the dtype asked for.

    transformers 5.23 loads a pre-quantized bitsandbytes checkpoint's float ``.weight`` tensors
    (norms, embeddings, the output layer) in the checkpoint's dtype, ignoring ``dtype=``, while
    biases follow it: a bf16 4-bit checkpoint loaded in fp32 on the CPU failed in its first layer
    norm ("expected scalar type BFloat16 but found Float").
    """
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        kept = any(k in name for k in keep_fp32)
        if type(p) is torch.nn.Parameter and p.is_floating_point() and p.dtype != dtype and not kept:
            p.data = p.data.to(dtype)


def model_summary(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
