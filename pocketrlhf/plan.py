"""Memory planner: will this stage fit on this GPU? Reads config.json only, never the weights.

    pocketrlhf plan --model path/to/model --stage ppo --quantization 4bit --lora-r 16 \\
        --batch-size 8 --seq-length 512 --gpu-memory 24GB

Parameters are counted per module type from the config alone (the model is built on PyTorch's
``meta`` device, which allocates nothing). Memory is then added up the way pocketrlhf's own
training path holds it:

* base weights: 16/32-bit, LLM.int8 (1 B per linear weight + a fp32 scale per row) or NF4
  (0.5 B + quantization constants: ~0.516 B with double quantization). For 4/8-bit bases peft's
  ``prepare_model_for_kbit_training`` (used by every stage) upcasts embeddings, lm_head and norms
  to fp32, so the residual stream, and with it every activation, is fp32 too.
* adapters: peft keeps LoRA weights in fp32 even on a 16-bit base, so a trainable LoRA parameter
  costs 4 (weight) + 4 (gradient) + 8 (AdamW moments) = 16 bytes; a frozen one 4 bytes. With
  ``--adapter-dtype bfloat16`` (as QLoRA) weights and gradients take 2 bytes each and the moments
  stay fp32 without a master copy (models/policy.py says why): 12 bytes.
* optimizer state: fp32 AdamW moments (8 B/param) or bitsandbytes' 8-bit ones (~2 B/param). Paged
  optimizers keep the same state in CUDA unified memory, which the driver moves to CPU memory when
  the GPU runs short: the plan shows the peak with the state on the GPU, the peak with it evicted
  (the state must come back one tensor at a time for the optimizer step, when the activations are
  gone), and the CPU memory the evicted state takes.
* activations: the tensors autograd saves for backward, per token and per layer, derived op by
  op for the Llama (also Mistral, Qwen2), GPT-2 and GPT-NeoX blocks and checked against
  measurements of a real training step (tests/test_plan.py).
* logits: pocketrlhf computes log-probs in chunks (``models/forward.py``), so no fp32 [B, T, V]
  tensor is stored above a size threshold; naive setups store B*T*V*4 bytes.
* rollouts (PPO): the KV cache of the generation batch.

Encoder-decoder bases (T5 as flan-t5, BART; config.json's ``is_encoder_decoder``): encoder and
decoder layers are counted apart, ``--decoder-length`` of the ``--seq-length`` tokens are the
decoder's (ppo: ``--max-new-tokens``) and the rest the encoder's input; activations follow T5's
block (sdpa with the relative position bias as a float mask per layer, cross-attention keys and
values over the encoder tokens in every decoder layer); the modules transformers keeps in fp32
(T5's ``wo``) are planned in fp32 and unquantized; generation holds the decoder's self-attention
cache and the cross-attention cache of every prompt token. With ``--adapter-scope decoder`` only
the decoder's layers carry adapters, and the encoder keeps activations only where the training
step runs it with grad (``encoder_graph``).

Numbers are estimates: the CUDA caching allocator adds fragmentation, and kernels differ. Every
formula is in this file, next to the reason for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pocketrlhf.config import adapter_scope_on_causal_lm, option
from pocketrlhf.errors import ConfigError
from pocketrlhf.optimizers import STATE_BYTES, OptimizerName, uses_bitsandbytes

GB = 10**9
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# peft keeps adapter weights in fp32 (autocast_adapter_dtype), whatever the base dtype, unless
# --adapter-dtype casts them (models/policy.py).
ADAPTER_BYTES = 4
# Architectures whose activation formulas were checked against measured training steps (tests/test_plan.py).
VERIFIED_ARCHITECTURES = {"llama", "mistral", "qwen2", "gpt2", "gpt_neox", "t5"}
# bitsandbytes 8-bit optimizers keep 32-bit state for tensors smaller than this (min_8bit_size).
_MIN_8BIT_SIZE = 4096


@dataclasses.dataclass
class PlanConfig:
    model: str = option("", "a model directory with config.json, or a config.json file (no weights are read)")
    stage: Literal["sft", "rm", "ppo", "dpo"] = option("sft", "which training stage to plan")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "the frozen base: 16/32-bit, LLM.int8 or NF4")
    double_quant: bool = option(True, "4-bit: QLoRA double quantization of the quantization constants")
    dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "dtype of the unquantized weights and activations")
    kbit_upcast: bool = option(
        True, "4/8-bit: peft's prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32 "
        "(what pocketrlhf's stages do; activations are then fp32 too)"
    )
    lora_r: int = option(16, "LoRA rank")
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dtype of the adapter weights and gradients (bfloat16: as QLoRA; AdamW moments stay fp32)")
    target_modules: str = option("all-linear", "comma-separated module names, or all-linear")
    adapter_scope: Literal["all", "decoder"] = option(
        "all", "encoder-decoder bases (T5, BART): adapters in encoder and decoder (all), or the decoder only "
        "(decoder: the encoder stays the base's, as the stages' --adapter-scope); causal LMs: all only")
    batch_size: int = option(8, "micro-batch: sequences (sft, ppo) or preference pairs (rm, dpo)")
    seq_length: int = option(512, "tokens per sequence (prompt + answer)")
    packing: bool = option(True, "sft: packed sequences (no padding mask); rm, dpo and ppo batches are always padded")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    reentrant_checkpointing: bool = option(
        False, "with checkpointing: torch's reentrant variant (on an 8-bit base it frees the int8 layers' inputs)")
    optimizer: OptimizerName = option("adamw", "optimizer (as the stages' --optimizer)")
    generation_batch_size: int = option(32, "ppo: prompts per generate() call (their KV cache is held together)")
    decoder_length: int = option(
        0, "encoder-decoder bases: tokens of --seq-length on the decoder's side (the target; ppo: --max-new-tokens), "
        "the rest being the encoder's input (0: half of --seq-length)")
    max_new_tokens: int = option(64, "ppo: answer tokens generated per prompt (part of seq-length)")
    value_model: Literal["head", "adapter"] = option(
        "head", "ppo: the value is a head on the policy, or a separate adapter + head"
    )
    reference: Literal["sft", "base"] = option(
        "sft", "ppo/dpo: the reference is a frozen copy of the SFT adapter (sft) or the base with adapters off"
    )
    gpu_memory: str = option("", "GPU memory to fit in, e.g. 24GB, 24GiB, 80GB (GB = 10^9 bytes, GiB = 2^30)")
    cuda_context: str = option("1GB", "CUDA context and kernel images (about 0.5-1 GB)")
    processes: int = option(1, "processes (GPUs) the stage runs on; the plan is per process")
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "ddp: every process holds the whole base; fsdp (16/4-bit bases): 1/processes of it "
        "plus the layers being gathered"
    )
    json: bool = option(False, "print the plan as JSON instead of a table")
    trust_remote_code: bool = option(False, "allow configs of architectures that ship their own code")


# ---------------------------------------------------------------------------------------------
# Memory strings.


def parse_memory(text: str, where: str = "memory") -> int:
    """``"24GB"`` -> 24e9, ``"13GiB"``/``"13Gib"`` -> 13 * 2^30, ``"500 MB"``, ``"1.5TB"``; bytes as an int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m and not m.group(2):
        raise ConfigError(f"{where}: '{text}' has no unit; write e.g. {text.strip()}GB or {text.strip()}GiB")
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{where}: '{text}' is not a memory size; write e.g. 24GB, 24GiB or 500MB "
                          "(GB = 10^9 bytes, GiB = 2^30)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    if n >= 0.995 * GB:
        return f"{n / GB:.2f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.1f} MB"
    if n >= 10**3:
        return f"{n / 10**3:.1f} KB"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# The model, from its config.


def read_config(path: str, trust_remote_code: bool = False):
    """A transformers config from a model directory or a config.json file; nothing else is read."""
    from transformers import CONFIG_MAPPING

    if not path:
        raise ConfigError("no model given: pass --model DIR (with config.json) or a config.json file")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--model {path}: not found (plan reads a local config.json; download just that file "
                          "from the hub if the model is not local)")
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"--model {path}: the directory has no config.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    model_type = data.get("model_type")
    if not model_type:
        raise ConfigError(f"{file}: no model_type, so the architecture is unknown")
    if model_type not in CONFIG_MAPPING:
        hint = " (it ships its own code; the planner only knows transformers' built-in architectures)" \
            if "auto_map" in data else ""
        raise ConfigError(f"{file}: model_type '{model_type}' is not an architecture this transformers knows{hint}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{file}: not a valid {model_type} config ({str(e).splitlines()[0]})") from None
    # transformers 5 builds T5 with its output layer tied whatever config.json says, and unties it
    # when loading a checkpoint that stores both (flan-t5's, whose config.json says false).
    config.untied_output = data.get("tie_word_embeddings") is False
    return config


@dataclass(frozen=True)
class Linear:
    name: str  # relative to its decoder layer, e.g. "self_attn.q_proj" ("" prefix outside layers)
    in_features: int
    out_features: int
    in_layer: bool
    # transformers keeps it unquantized, and in fp32 under a fp16 dtype (_keep_in_fp32_modules: T5's wo)
    keep_fp32: bool = False
    encoder: bool = False  # in an encoder-decoder's encoder (--adapter-scope decoder leaves it unadapted)


@dataclass
class ModelShape:
    """What the planner needs to know about a model, counted from its config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    counts: dict[str, int]  # embeddings, attention, mlp, norms, lm_head, other
    linears: list[Linear]  # every linear layer but the output head (one entry per layer instance)
    layer_linears: list[Linear]  # the linear layers of one decoder layer
    rotary_dims: int  # 0 for learned positions
    activation: str
    parallel_residual: bool
    outside_linears: int = 0  # block parameters not in linear layers (e.g. fused MoE experts)
    # Encoder-decoder bases: num_layers and layer_linears are the decoder's (cross-attention
    # included), these the encoder's; 0 and [] for a causal LM.
    encoder_layers: int = 0
    encoder_layer_linears: list[Linear] = field(default_factory=list)
    gated_mlp: bool = False

    @property
    def seq2seq(self) -> bool:
        return self.encoder_layers > 0

    @property
    def total_params(self) -> int:
        return sum(self.counts.values())

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def family(self) -> str:
        """Which block's activation formulas apply (Llama's for every other decoder)."""
        if self.model_type in ("gpt2", "gpt_neox"):
            return self.model_type
        if self.seq2seq:
            return "t5" if "t5" in self.model_type else "bart"
        return "llama"


_MLP_NAMES = r"mlp|feed_forward|ffn|expert|\.fc\d|\.fc_(in|out)|DenseReluDense"


def _is_linear(module) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _linear_dims(module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # GPT-2 stores weights as [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _layer_list(module, n_layers: int | None):
    import torch

    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return next((m for m in lists if len(m) == n_layers), None) or max(lists, key=len)


def model_shape(config) -> ModelShape:
    """Count parameters per module type by building the model on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    kind = "encoder-decoder (seq2seq)" if seq2seq else "causal-LM"
    try:
        with torch.device("meta"):
            model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config)
    except ValueError as e:
        raise ConfigError(f"model_type '{config.model_type}' has no {kind} class: {str(e).splitlines()[0]}") from None
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    untie = tied and getattr(config, "untied_output", False)  # read_config says why
    if seq2seq:
        # Decoder layers first: their keys (0..n-1) are the ones the decoder-only formulas read.
        layers = _layer_list(model.get_decoder(), getattr(config, "num_decoder_layers", None))
        encoder = _layer_list(model.get_encoder(), getattr(config, "num_layers", None))
        layer_ids = {**{id(m): i for i, m in enumerate(layers)}, **{id(m): -1 - i for i, m in enumerate(encoder)}}
    else:
        layers = _layer_list(model, getattr(config, "num_hidden_layers", None))
        encoder = []
        layer_ids = {id(m): i for i, m in enumerate(layers)}
    fp32_names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    # The encoder's modules by name (T5: "encoder.", BART: "model.encoder."), as adapters.encoder_exclusion.
    enc_prefix = next(name for name, m in model.named_modules() if m is model.get_encoder()) + "." if seq2seq else None
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0, "other": 0}
    linears: list[Linear] = []
    layer_of: list[int | None] = []
    seen: set[int] = set()
    outside_linears = 0
    prefix_of_layer: dict[int, str] = {}
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            prefix_of_layer[layer_ids[id(module)]] = name + "."
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        n = sum(p.numel() for p in own)
        if module is out_emb:
            counts["lm_head"] += n
        elif isinstance(module, torch.nn.Embedding):
            counts["embeddings"] += n
        elif _is_linear(module) or n and "norm" not in type(module).__name__.lower():
            # Linear layers, and parameters held directly by blocks (e.g. fused MoE experts).
            kind = "mlp" if re.search(_MLP_NAMES, name) else \
                "attention" if re.search(r"attn|attention", name, re.IGNORECASE) else "other"
            counts[kind] += n
            if not _is_linear(module):
                outside_linears += n
                continue
            layer = next((i for i, pre in prefix_of_layer.items() if name.startswith(pre)), None)
            rel = name[len(prefix_of_layer[layer]):] if layer is not None else name
            fin, fout = _linear_dims(module)
            linears.append(Linear(rel, fin, fout, layer is not None, bool(fp32_names & set(name.split("."))),
                                  enc_prefix is not None and name.startswith(enc_prefix)))
            layer_of.append(layer)
        else:
            counts["norms"] += n
    if untie:
        counts["lm_head"] += out_emb.weight.numel()
        tied = False
    per_layer = [lin for lin, layer in zip(linears, layer_of) if layer == 0]
    encoder_per_layer = [lin for lin, layer in zip(linears, layer_of) if layer == -1]
    cfg = config
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or getattr(cfg, "d_ff", None)
             or getattr(cfg, "decoder_ffn_dim", None) or 4 * hidden)
    rope = getattr(cfg, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0)))
    rotary = 0 if cfg.model_type == "gpt2" or seq2seq else int(head_dim * (partial if partial else 1.0))
    act = (getattr(cfg, "hidden_act", None) or getattr(cfg, "dense_act_fn", None)
           or getattr(cfg, "activation_function", "gelu"))
    return ModelShape(
        model_type=cfg.model_type, vocab_size=out_emb.weight.shape[0] if out_emb is not None else cfg.vocab_size,
        hidden_size=hidden, num_layers=len(layers), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=inter, tied_embeddings=tied, counts=counts, linears=linears, layer_linears=per_layer,
        rotary_dims=rotary, activation=str(act), parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)),
        outside_linears=outside_linears, encoder_layers=len(encoder), encoder_layer_linears=encoder_per_layer,
        gated_mlp=bool(getattr(cfg, "is_gated_act", False)),
    )


# ---------------------------------------------------------------------------------------------
# Weights and adapters.


def targeted(linears: list[Linear], target_modules: str) -> list[Linear]:
    """The linear layers peft would put an adapter on ("all-linear": every one but the output head)."""
    if target_modules.strip() in ("", "all-linear"):
        return [lin for lin in linears if lin.in_layer]
    names = [t.strip() for t in target_modules.split(",") if t.strip()]
    return [lin for lin in linears if any(lin.name == t or lin.name.endswith("." + t) for t in names)]


def adapted_linears(linears: list[Linear], cfg: PlanConfig) -> list[Linear]:
    """The linear layers that get an adapter: ``targeted`` ones, the encoder's left out under
    ``--adapter-scope decoder`` (peft's exclude_modules, models/adapters.attach_adapter)."""
    return [lin for lin in targeted(linears, cfg.target_modules) if cfg.adapter_scope == "all" or not lin.encoder]


def encoder_graph(cfg: PlanConfig) -> bool:
    """Whether a training forward's encoder keeps tensors for backward: only with adapters in it
    (``--adapter-scope all``). A frozen encoder's output is cut from the graph (models/forward.py),
    so even under checkpointing (which makes the shared input embeddings' output require grad) its
    layers keep nothing and no backward runs through them (measured, tests/test_plan_seq2seq.py)."""
    return cfg.adapter_scope == "all"


def quantized_linear_bytes(lin: Linear, quantization: str, double_quant: bool, dtype_bytes: int) -> float:
    """Bytes of one linear layer's weight matrix (its bias is counted with the unquantized params)."""
    n = lin.in_features * lin.out_features
    if lin.keep_fp32 and quantization != "none":  # never quantized (its dtype: _base_lines)
        return float(n * dtype_bytes)
    if quantization == "8bit":
        return n + 4 * lin.out_features  # int8 weights + one fp32 scale per output row
    if quantization == "4bit":
        # 4 bits per weight + one absmax per block of 64: uint8 with a fp32 absmax per 256 blocks
        # (double quantization, QLoRA section 3) or fp32 without.
        # Per layer also: the 16-value NF4 code and an offset, and with double quantization the
        # 256-value fp32 map of the second level.
        blocks = math.ceil(n / 64)
        if double_quant:
            return n / 2 + blocks + 4 * math.ceil(blocks / 256) + 68 + 1024
        return n / 2 + 4 * blocks + 64
    return n * dtype_bytes


def lora_tensors(lin: Linear, r: int) -> tuple[int, int]:
    """Element counts of LoRA's A [r, in] and B [out, r]."""
    return r * lin.in_features, lin.out_features * r


def optimizer_bytes(tensor_sizes: list[int], optimizer: str) -> float:
    """AdamW keeps two fp32 moments per parameter; the 8-bit versions keep uint8 moments with a fp32
    absmax per block of 256, except for tensors under 4096 elements (bitsandbytes' min_8bit_size).
    The pytorch-optimizer ones: their bytes per parameter (optimizers.STATE_BYTES)."""
    if not optimizer.endswith("8bit"):
        return STATE_BYTES[optimizer] * sum(tensor_sizes)
    total = 0.0
    for n in tensor_sizes:
        total += 8.0 * n if n < _MIN_8BIT_SIZE else 2.0 * n + 8.0 * math.ceil(n / 256)
    return total


# ---------------------------------------------------------------------------------------------
# Activations: bytes autograd saves for backward, per token.


@dataclass(frozen=True)
class Regime:
    stream: int  # bytes per element of the residual stream and everything computed from it
    kv_repeat: bool  # GQA keys/values expanded to every head (sdpa with a padding mask)
    adapter: int = ADAPTER_BYTES  # bytes per element of the adapter weights (and of their inputs)
    kept_fp32: bool = False  # the layers transformers keeps in fp32 are (fp16, or the k-bit upcast)


# Which tensor feeds each adapted linear layer, per family; adapters on the same input share it.
_INPUT_GROUPS = {
    "llama": {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"},
    "gpt2": {"attn.c_attn": "attn_in", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_mid"},
    "gpt_neox": {"attention.query_key_value": "attn_in", "attention.dense": "attn_out",
                 "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_mid"},
}


def _group(shape: ModelShape, lin: Linear) -> str | None:
    groups = _INPUT_GROUPS[shape.family]
    return next((g for suffix, g in groups.items() if lin.name == suffix or lin.name.endswith("." + suffix)), None)


def linear_input_bytes(shape: ModelShape, adapted: list[Linear], regime: Regime, quantization: str) -> float:
    """Per token and layer: inputs of linear layers kept for the backward pass.

    LoRA's A matrices keep their input for their weight gradients. When the stream's dtype is not
    the adapters' (a 16-bit stream with fp32 adapters, a fp32 stream with 16-bit ones) peft casts
    each adapter's input to the adapter dtype (a copy per adapted layer); otherwise the input
    tensor itself is kept, once for all adapters that read it. bitsandbytes' int8 matmul also
    keeps the input of every 8-bit layer (4-bit does not). The attention output is held by sdpa
    anyway, except in GPT-NeoX, which copies it first.
    """
    cast = regime.stream != regime.adapter
    total = float(sum(regime.adapter * lin.in_features for lin in adapted)) if cast else 0.0
    kept: dict[str, int] = {}
    for lin in ([] if cast else adapted) + (shape.layer_linears if quantization == "8bit" else []):
        kept[_group(shape, lin) or lin.name] = lin.in_features  # unknown layer: its input on its own
    if shape.family != "gpt_neox":
        kept.pop("attn_out", None)
    return total + regime.stream * sum(kept.values())


def _activation_tensors(shape: ModelShape) -> int:
    """[I]-sized tensors a non-gated MLP activation keeps: 1 for a fused kernel (exact gelu, which
    keeps its input); 4 for the tanh approximations that transformers writes out op by op (the
    input also feeds the next layer's adapter)."""
    return 4 if shape.activation in ("gelu_new", "gelu_fast") else 1  # gelu_fast: not measured


def layer_activation_bytes(shape: ModelShape, adapted_in_layer: list[Linear], r: int, regime: Regime,
                           quantization: str = "none") -> float:
    """Bytes saved for backward per token by one decoder layer whose adapters need gradients."""
    s = regime.stream
    d, inter, heads = shape.hidden_size, shape.intermediate_size, shape.num_heads
    q_dim = heads * shape.head_dim
    kv_dim = q_dim if regime.kv_repeat else shape.kv_dim
    lse = 4 * heads  # sdpa's fp32 log-sum-exp per head
    adapters = linear_input_bytes(shape, adapted_in_layer, regime, quantization) + regime.adapter * r * len(adapted_in_layer)
    if shape.family == "gpt2":
        # LayerNorm keeps its input, mean and rstd; c_attn's [3d] output holds q, k, v (sdpa keeps
        # views of it).
        norms = 2 * (s * d + 2 * s)
        attention = s * 3 * d + s * q_dim + lse
        mlp = s * inter * _activation_tensors(shape)
        return norms + attention + mlp + adapters
    if shape.family == "gpt_neox":
        # Parallel residual: both LayerNorms read the layer input (kept once); the fused qkv
        # output stays alive through sdpa's view of v; q and k are concatenated after partial rotary.
        norms = (1 if shape.parallel_residual else 2) * s * d + 2 * 2 * s
        attention = s * 3 * d + s * 2 * q_dim + s * q_dim + lse
        mlp = s * inter * _activation_tensors(shape)
        return norms + attention + mlp + adapters
    # Llama family. RMSNorm keeps a fp32 copy of its input (4d) and rsqrt; sdpa keeps q and k
    # after rotary, v, its output and the log-sum-exp; SwiGLU keeps gate, up and silu(gate).
    norms = 2 * (4 * d + 4)
    attention = s * (q_dim + 2 * kv_dim + q_dim) + lse
    mlp = s * 3 * inter
    return norms + attention + mlp + adapters


def checkpointed_layer_bytes(shape: ModelShape, regime: Regime, quantization: str = "none",
                             reentrant: bool = False) -> float:
    """With gradient checkpointing each decoder layer keeps only its input hidden state, and on an
    8-bit base the inputs of its int8 layers: bitsandbytes keeps them on the autograd context
    (``ctx.A``, ``ctx.tensors``), outside ``save_for_backward``, which non-reentrant checkpointing
    cannot free (measured: the StackLLaMA step of bench/published_setups.py). Reentrant
    checkpointing runs the forward without grad, so no context is kept (measured, tests/test_plan.py)."""
    kept = {(_group(shape, lin) or lin.name): lin.in_features for lin in shape.layer_linears} \
        if quantization == "8bit" and not reentrant else {}
    return float(regime.stream * (shape.hidden_size + sum(kept.values())))


def model_extra_bytes(shape: ModelShape, regime: Regime) -> float:
    """Per token, outside the layers: rotary cos/sin (shared by all layers) and index bookkeeping."""
    rope = 2 * shape.rotary_dims * regime.stream
    return rope + 25.0  # position ids, label slices, gather indices, masks: ~25 bytes per token


# ---------------------------------------------------------------------------------------------
# Encoder-decoder activations (T5's block; BART's estimated with it).

# Which tensor feeds each adapted linear layer of an encoder-decoder block. "encoder_out": the
# encoder's output, read by the cross-attention keys and values of every decoder layer.
_SEQ2SEQ_GROUPS = {
    "t5": {"SelfAttention.q": "attn_in", "SelfAttention.k": "attn_in", "SelfAttention.v": "attn_in",
           "SelfAttention.o": "attn_out", "EncDecAttention.q": "cross_in", "EncDecAttention.k": "encoder_out",
           "EncDecAttention.v": "encoder_out", "EncDecAttention.o": "cross_out", "wi": "mlp_in", "wi_0": "mlp_in",
           "wi_1": "mlp_in", "wo": "mlp_mid"},
    "bart": {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
             "self_attn.out_proj": "attn_out", "encoder_attn.q_proj": "cross_in", "encoder_attn.k_proj": "encoder_out",
             "encoder_attn.v_proj": "encoder_out", "encoder_attn.out_proj": "cross_out", "fc1": "mlp_in",
             "fc2": "mlp_mid"},
}


def decoder_tokens(shape: ModelShape, cfg: PlanConfig) -> tuple[int, int]:
    """(encoder, decoder) tokens of one sequence; (0, seq_length) for a causal LM."""
    if not shape.seq2seq:
        return 0, cfg.seq_length
    dec = cfg.max_new_tokens if cfg.stage == "ppo" else cfg.decoder_length or cfg.seq_length // 2
    return cfg.seq_length - dec, dec


def _seq2seq_group(shape: ModelShape, lin: Linear) -> str:
    groups = _SEQ2SEQ_GROUPS[shape.family]
    return next((g for suffix, g in groups.items() if lin.name == suffix or lin.name.endswith("." + suffix)), lin.name)


def _seq2seq_input_bytes(shape: ModelShape, adapted: list[Linear], regime: Regime) -> tuple[float, float, int, int]:
    """Bytes the adapters of one layer keep per token of the layer's own stack and per encoder
    token (inputs), then per rank unit likewise (LoRA's A output, kept for B).

    As ``linear_input_bytes``: a 16-bit stream under fp32 adapters (or the other way round) makes
    each adapter keep its own cast copy of its input; otherwise one input serves every adapter that
    reads it. T5's fp32 ``wo`` reads a fp32 copy of the MLP's middle, which its adapter keeps as it
    is. The cross-attention keys and values read the encoder output: per encoder token, and when
    not cast, once for the whole decoder (``seq2seq_activation_bytes``)."""
    own = cross = 0.0
    kept: dict[str, float] = {}
    for lin in adapted:
        group = _seq2seq_group(shape, lin)
        fp32 = lin.keep_fp32 and regime.kept_fp32
        width = 4 if fp32 else regime.stream
        if regime.stream != regime.adapter and not (fp32 and regime.adapter == 4):
            nbytes = float(regime.adapter * lin.in_features)
            if group == "encoder_out":
                cross += nbytes
            else:
                own += nbytes
        elif group != "encoder_out" and group not in ("attn_out", "cross_out"):  # sdpa holds its output anyway
            kept[group] = width * lin.in_features
    lora = regime.adapter * sum(1 for lin in adapted if _seq2seq_group(shape, lin) != "encoder_out")
    lora_cross = regime.adapter * sum(1 for lin in adapted if _seq2seq_group(shape, lin) == "encoder_out")
    return own + sum(kept.values()), cross, lora, lora_cross


def _seq2seq_norm(shape: ModelShape, regime: Regime) -> float:
    """One norm, per token. T5's multiplies the 16-bit stream by a fp32 rsqrt: it keeps that
    input, a fp32 copy for the variance, and the rsqrt; BART's LayerNorm its input, mean and rstd."""
    d, s = shape.hidden_size, regime.stream
    if shape.family == "t5":
        return 4 * d + 4 + (s * d if s != 4 else 0)
    return s * d + 8


def _seq2seq_mlp(shape: ModelShape, regime: Regime) -> float:
    """Per token: the activation's saved tensors, and a gated MLP's two inputs of the product."""
    return regime.stream * shape.intermediate_size * (_activation_tensors(shape) + (2 if shape.gated_mlp else 0))


def seq2seq_activation_bytes(shape: ModelShape, cfg: PlanConfig, sequences: int, padded: bool,
                             checkpointing: bool, graph: bool | None = None) -> float:
    """Saved-for-backward bytes of one encoder-decoder forward (``sequences`` x the encoder's and
    the decoder's tokens), logits excluded.

    Per layer, sdpa keeps q, k, v, its output, the fp32 log-sum-exp and its float mask: T5's
    relative position bias (+ padding) as a [B or 1, heads, queries, keys] tensor in every layer.
    A decoder layer's cross-attention keeps its keys and values over the encoder tokens. The
    encoder's layers count only where it keeps a graph (``encoder_graph``, unless ``graph`` says).
    """
    graph = encoder_graph(cfg) if graph is None else graph
    regime = _regime(cfg, shape, padded)
    s, d, heads = regime.stream, shape.hidden_size, shape.num_heads
    q_dim = kv_dim = heads * shape.head_dim
    enc, dec = decoder_tokens(shape, cfg)
    n_enc, n_dec = sequences * enc, sequences * dec
    rows = sequences if padded else 1  # the mask's batch dimension
    lse = 4 * heads
    if checkpointing:
        # Each layer keeps its input; the encoder output and the position biases are kept once. On
        # an 8-bit base, also the inputs of its int8 layers (bitsandbytes keeps them outside what
        # checkpointing frees, as checkpointed_layer_bytes says).
        int8 = {"encoder": 0.0, "decoder": 0.0}
        if cfg.quantization == "8bit":
            for stack, linears in (("encoder", shape.encoder_layer_linears), ("decoder", shape.layer_linears)):
                groups = {_seq2seq_group(shape, lin): lin.in_features for lin in linears
                          if not lin.keep_fp32 and _seq2seq_group(shape, lin) != "encoder_out"}
                int8[stack] = s * sum(groups.values())
        # Without an encoder graph the decoder's checkpointed layers still keep the encoder output.
        encoder = (s * d + int8["encoder"]) * shape.encoder_layers * n_enc + \
            s * heads * enc * enc + n_enc * _seq2seq_norm(shape, regime) if graph else 0.0
        kept = (s * d * shape.num_layers * n_dec + s * d * n_enc + shape.num_layers * n_dec * int8["decoder"])
        biases = s * heads * (dec * dec + dec * enc)
        return float(encoder + kept + biases + n_dec * _seq2seq_norm(shape, regime) + (n_enc + n_dec) * 25.0)
    r = cfg.lora_r
    enc_adapted = adapted_linears(shape.encoder_layer_linears, cfg)
    dec_adapted = adapted_linears(shape.layer_linears, cfg)
    own, _, lora, _ = _seq2seq_input_bytes(shape, enc_adapted, regime)
    encoder_layer = (2 * _seq2seq_norm(shape, regime) + s * (q_dim + 2 * kv_dim + q_dim) + lse
                     + _seq2seq_mlp(shape, regime) + own + lora * r)
    own, cross, lora, lora_cross = _seq2seq_input_bytes(shape, dec_adapted, regime)
    decoder_layer = (3 * _seq2seq_norm(shape, regime) + s * (q_dim + 2 * kv_dim + q_dim) + lse
                     + s * (2 * q_dim) + lse + _seq2seq_mlp(shape, regime) + own + lora * r)
    per_encoder_token_of_decoder = s * 2 * kv_dim + cross + lora_cross * r  # cross keys/values in each decoder layer
    shared_encoder_out = s * d if any(_seq2seq_group(shape, lin) == "encoder_out" for lin in dec_adapted) \
        and regime.stream == regime.adapter else 0
    encoder = shape.encoder_layers * encoder_layer + _seq2seq_norm(shape, regime) if graph else 0.0
    masks = rows * heads * s * ((shape.encoder_layers * enc * enc if graph else 0)
                                + shape.num_layers * (dec * dec + dec * enc))
    return float(n_enc * (encoder + 25.0 + shape.num_layers * per_encoder_token_of_decoder + shared_encoder_out)
                 + n_dec * (shape.num_layers * decoder_layer + _seq2seq_norm(shape, regime) + 25.0) + masks)


def final_norm_bytes(shape: ModelShape, regime: Regime) -> float:
    if shape.family == "llama":
        return 4.0 * shape.hidden_size + 4
    return regime.stream * (shape.hidden_size + 2)


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclass
class Line:
    key: str
    label: str
    bytes: float
    phase: str = "static"  # static, rollout or train: the peak is static + the larger phase
    note: str = ""
    # Paged optimizer state: 0 if the line stays on the GPU; otherwise the bytes that must come
    # back to the GPU at once (one tensor's state, for the optimizer step).
    pageable: float = 0.0


@dataclass
class Setup:
    name: str
    lines: list[Line] = field(default_factory=list)
    available: bool = True
    reason: str = ""

    def add(self, key: str, label: str, nbytes: float, phase: str = "static", note: str = "",
            pageable: float = 0.0) -> None:
        self.lines.append(Line(key, label, float(nbytes), phase, note, float(pageable)))

    def phase_total(self, phase: str) -> float:
        return sum(line.bytes for line in self.lines if line.phase == phase)

    @property
    def static(self) -> float:
        return self.phase_total("static") + self.phase_total("overhead")

    @property
    def peak(self) -> float:
        """With every tensor on the GPU (paged optimizer state too)."""
        return self.static + max(self.phase_total("rollout"), self.phase_total("train"))

    @property
    def paged(self) -> float:
        """Bytes of paged optimizer state: what eviction can move to CPU memory (and needs there)."""
        return sum(line.bytes for line in self.lines if line.pageable)

    @property
    def peak_evicted(self) -> float:
        """The GPU peak with the paged state in CPU memory during rollouts, forward and backward;
        the optimizer step, when activations are freed, brings it back one tensor at a time."""
        if not self.paged:
            return self.peak
        resident = max(line.pageable for line in self.lines)
        return self.static - self.paged + max(self.phase_total("rollout"), self.phase_total("train"), resident)


@dataclass
class Plan:
    config: PlanConfig
    shape: ModelShape
    setups: list[Setup]
    facts: dict[str, float]  # lora params, activation alternatives, ...
    notes: list[str]
    gpu_memory: int | None

    def fits(self, setup: Setup) -> bool | None:
        """Whether the setup runs in ``gpu_memory``: with a paged optimizer, when its state may be
        evicted to CPU memory (QLoRA's reason to page; slower only while it is evicted)."""
        return None if self.gpu_memory is None or not setup.available else setup.peak_evicted <= self.gpu_memory


def _check(cfg: PlanConfig) -> None:
    for name in ("lora_r", "batch_size", "seq_length", "generation_batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {cfg.processes}")
    if cfg.strategy == "fsdp" and cfg.quantization == "8bit":
        raise ConfigError("--strategy fsdp: the stages shard 16-bit and 4-bit bases only, not 8-bit ones "
                          "(README: Several processes or GPUs)")
    if cfg.decoder_length < 0 or (cfg.decoder_length and cfg.decoder_length >= cfg.seq_length):
        raise ConfigError(f"--decoder-length ({cfg.decoder_length}) must be smaller than --seq-length "
                          f"({cfg.seq_length}), which counts the encoder's input too")
    if cfg.stage == "ppo" and cfg.max_new_tokens >= cfg.seq_length:
        raise ConfigError(f"--max-new-tokens ({cfg.max_new_tokens}) must be smaller than --seq-length "
                          f"({cfg.seq_length}), which counts the prompt too")


def _regime(cfg: PlanConfig, shape: ModelShape, padded: bool) -> Regime:
    dtype_bytes = _DTYPE_BYTES[cfg.dtype]
    stream = 4 if cfg.quantization != "none" and cfg.kbit_upcast else dtype_bytes
    # transformers hands sdpa grouped keys/values only without a mask; a padding mask makes it
    # repeat them for every head (integrations/sdpa_attention.py: use_gqa_in_sdpa).
    return Regime(stream=stream, kv_repeat=padded and shape.num_kv_heads != shape.num_heads,
                  adapter=_DTYPE_BYTES[cfg.adapter_dtype], kept_fp32=cfg.dtype == "float16" or stream == 4)


def activation_bytes(shape: ModelShape, cfg: PlanConfig, sequences: int, tokens: int, padded: bool,
                     checkpointing: bool, head_on_trunk: bool = False) -> float:
    """Saved-for-backward bytes of one forward over ``sequences`` x ``tokens`` (logits excluded).

    ``head_on_trunk``: a value head reads every final hidden state (PPO's default value model);
    the hidden states stay referenced and the fp32 head keeps a fp32 copy.
    """
    regime = _regime(cfg, shape, padded)
    if shape.seq2seq:  # the value head reads the decoder's states
        head = sequences * decoder_tokens(shape, cfg)[1] * shape.hidden_size * \
            (4 + (regime.stream if regime.stream != 4 else 0)) if head_on_trunk else 0.0
        return seq2seq_activation_bytes(shape, cfg, sequences, padded, checkpointing) + head
    n = sequences * tokens
    head = n * shape.hidden_size * (4 + (regime.stream if regime.stream != 4 else 0)) if head_on_trunk else 0.0
    adapted = targeted(shape.layer_linears, cfg.target_modules)
    if checkpointing:
        per_token = (shape.num_layers * checkpointed_layer_bytes(shape, regime, cfg.quantization,
                                                                    cfg.reentrant_checkpointing)
                     + final_norm_bytes(shape, regime))
        if shape.family == "gpt2":
            per_token += regime.stream * shape.hidden_size  # the token embeddings stay referenced (measured)
    else:
        per_token = shape.num_layers * layer_activation_bytes(shape, adapted, cfg.lora_r, regime, cfg.quantization)
    return (n * (per_token + model_extra_bytes(shape, regime)) + head
            + mask_bytes(shape, regime, sequences, tokens, padded, checkpointing))


def mask_bytes(shape: ModelShape, regime: Regime, sequences: int, tokens: int, padded: bool, checkpointing: bool) -> float:
    """A padding mask reaches sdpa as a [B, 1, T, T] boolean; sdpa turns it into an additive mask in
    the activation dtype in every layer and keeps it for backward (measured on CPU; the CUDA
    memory-efficient kernel keeps its bias too). Checkpointing keeps only the boolean mask."""
    if not padded:
        return 0.0
    square = sequences * tokens * tokens
    return float(square if checkpointing else shape.num_layers * square * regime.stream)


def logprob_bytes(shape: ModelShape, cfg: PlanConfig, rows: int) -> tuple[float, float]:
    """(kept for backward, transient peak) of ``response_logprobs`` over ``rows`` positions.

    Small problems keep the fp32 logits of every row; above the threshold each chunk of rows is
    recomputed in backward, so only the hidden rows are kept and one chunk's logits are live.
    """
    from pocketrlhf.models.forward import _CHUNK_ROWS, _RECOMPUTE_LOGITS_ABOVE

    regime = _regime(cfg, shape, False)
    v = shape.vocab_size
    if rows * v > _RECOMPUTE_LOGITS_ABOVE:
        chunk = min(rows, _CHUNK_ROWS)
        kept = rows * (regime.stream * shape.hidden_size + 8)
        # Backward of one chunk: its recomputed fp32 logits and log-softmax, and two [chunk, V] fp32
        # gradient buffers (gather's scatter, log-softmax's input grad), plus the grad of all hidden rows.
        transient = chunk * v * 4 * 4 + rows * shape.hidden_size * regime.stream
        return kept, transient
    # Kept: the fp32 log-softmax output and the gathered indices. Backward: gather's scatter into
    # one fp32 [rows, V] buffer; log-softmax's backward writes its input grad in place of it.
    kept = rows * (4 * v + 8)
    transient = rows * v * 4
    return kept, transient


def layer_transient_bytes(shape: ModelShape, cfg: PlanConfig, tokens: int, padded: bool, checkpointing: bool) -> float:
    """Largest short-lived memory while one layer runs (forward or backward): about two tensors as
    wide as its MLP (measured), plus, with checkpointing, the layer's recomputed activations, plus
    a quantized layer's dequantized weight."""
    regime = _regime(cfg, shape, padded)
    if shape.seq2seq:
        # One layer at a time over the longer side; checkpointing recomputes one layer's activations.
        enc, dec = decoder_tokens(shape, cfg)
        rows = tokens // cfg.seq_length * max(enc, dec)
        out = rows * 2 * max(shape.intermediate_size, shape.hidden_size) * regime.stream \
            + dequantized_weight_bytes(shape, cfg, training=True)
        if checkpointing:
            graph = encoder_graph(cfg)  # the layers recomputed: the encoder's only with a graph
            out += seq2seq_activation_bytes(shape, cfg, tokens // cfg.seq_length, padded, False, graph=graph) / \
                ((shape.encoder_layers if graph else 0) + shape.num_layers)
        return out
    adapted = targeted(shape.layer_linears, cfg.target_modules)
    fused_qkv = shape.family in ("gpt2", "gpt_neox")
    wide = max(shape.intermediate_size, (3 if fused_qkv else 1) * shape.hidden_size)
    weight = dequantized_weight_bytes(shape, cfg, training=True)
    if not checkpointing:
        return tokens * 2 * wide * regime.stream + weight
    sequences = tokens // cfg.seq_length
    return (tokens * layer_activation_bytes(shape, adapted, cfg.lora_r, regime, cfg.quantization) + tokens * 4 * wide
            + mask_bytes(shape, regime, sequences, cfg.seq_length, padded, False) / shape.num_layers + weight)


def dequantized_weight_bytes(shape: ModelShape, cfg: PlanConfig, training: bool = False) -> float:
    """bitsandbytes' 4-bit matmul over more than one token dequantizes the whole weight to the
    compute dtype (bf16) first, in forward and again for the input gradient: the largest linear
    layer's weight is live for a moment (measured: the 7B and 65B steps of bench/published_setups.py).
    Its int8 matmul does the same for the input gradient (MatMul8bitLt's backward on CUDA; on the
    CPU MatMul8bitFp also in forward), so a training step of an 8-bit base holds one too (measured:
    the 20B 8-bit PPO update, 0.30 GB at 6144 x 24576); its no-grad forward on CUDA does not."""
    if cfg.quantization == "none" or (cfg.quantization == "8bit" and not training):
        return 0.0
    return 2.0 * max(lin.in_features * lin.out_features for lin in shape.layer_linears)


def _base_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig, copies: int = 1) -> None:
    dtype_bytes = _DTYPE_BYTES[cfg.dtype]
    q = cfg.quantization
    other_bytes = 4 if q != "none" and cfg.kbit_upcast else dtype_bytes
    # Layers transformers keeps unquantized (T5's wo): fp32 under fp16 and after the k-bit upcast.
    kept = 4 if cfg.dtype == "float16" or other_bytes == 4 else dtype_bytes
    linear_weights = sum(quantized_linear_bytes(lin, q, cfg.double_quant, kept if lin.keep_fp32 else dtype_bytes)
                         for lin in shape.linears)
    linear_params = sum(lin.in_features * lin.out_features for lin in shape.linears)
    unquantized = shape.total_params - linear_params
    kind = {"none": cfg.dtype, "8bit": "int8", "4bit": "NF4" + ("+DQ" if cfg.double_quant else "")}[q]
    per_param = linear_weights / max(linear_params, 1)
    times = f" x {copies}" if copies > 1 else ""
    shards = cfg.processes if cfg.strategy == "fsdp" else 1  # stages/common.shard: 1/N of the base per process
    times += f" / {shards} (FSDP shard)" if shards > 1 else ""
    setup.add("base_linear", f"base{times}: linear layers ({kind}, {per_param:.3g} B/param)",
              copies * linear_weights / shards)
    other = ("fp32: upcast for k-bit training" if q != "none" else "fp32") if other_bytes == 4 else cfg.dtype
    what = "embeddings, lm_head, norms" + (", other" if shape.outside_linears else "")
    setup.add("base_other", f"base{times}: {what} ({other})", copies * unquantized * other_bytes / shards)
    if shards > 1:
        # The largest unit gathered whole: all-gather output and unsharded copy of the running
        # unit plus the prefetched next one, ~4 units (bench/fsdp_memory.py measured 4-4.4).
        layer = sum(lin.in_features * lin.out_features for lin in shape.layer_linears)
        unit = max(layer, shape.counts.get("embeddings", 0), shape.counts.get("lm_head", 0)) * dtype_bytes
        setup.add("fsdp_gathered", "FSDP: layers gathered whole while they run (~4 units)", 4 * unit, phase="train")


def _adapter_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig, role: str, trainable: bool) -> None:
    """Weights (+ gradients and optimizer state when trained) of one LoRA adapter."""
    sizes = [n for lin in adapted_linears(shape.linears, cfg) for n in lora_tensors(lin, cfg.lora_r)]
    params = sum(sizes)
    # Frozen roles take the trained adapter's dtype (models/policy.py: add_frozen_adapter).
    size, name = _DTYPE_BYTES[cfg.adapter_dtype], _SHORT_DTYPE[cfg.adapter_dtype]
    # FSDP shards the adapters with their decoder layer (stages/common.shard): 1/N of each per process,
    # except trained ones a bitsandbytes optimizer updates (stages/common.shards_adapters: kept whole).
    whole = trainable and uses_bitsandbytes(cfg.optimizer, cfg.adapter_dtype)
    shards = cfg.processes if cfg.strategy == "fsdp" and not whole else 1
    name += f", / {shards} (FSDP shard)" if shards > 1 else ""
    if trainable:
        paged = cfg.optimizer.startswith("paged")
        opt = {"adamw": "AdamW", "paged_adamw": "AdamW"}.get(cfg.optimizer, cfg.optimizer)
        opt = ("paged " if paged else "") + ("8-bit AdamW" if cfg.optimizer.endswith("8bit") else opt)
        setup.add(f"{role}_weights", f"{role} LoRA: weights ({name})", size * params / shards)
        setup.add(f"{role}_grads", f"{role} LoRA: gradients ({name})", size * params / shards)
        setup.add(f"{role}_optimizer", f"{role} LoRA: {opt} state" + (f" / {shards} (FSDP shard)" if shards > 1 else ""),
                  optimizer_bytes(sizes, cfg.optimizer) / shards,
                  pageable=optimizer_bytes([max(sizes)], cfg.optimizer) if paged else 0.0)
    else:
        setup.add(f"{role}_weights", f"{role} LoRA: frozen weights ({name})", size * params / shards)


def _head_lines(setup: Setup, shape: ModelShape, role: str, trainable: bool) -> None:
    """A fp32 Linear(d, 1) scalar head: 16 B/param trained (weights, gradients, AdamW), 4 frozen."""
    params = shape.hidden_size + 1
    setup.add(f"{role}_head", f"{role} head ({'trained' if trainable else 'frozen'})", params * (16 if trainable else 4))


def _train_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig, sequences: int, padded: bool, logprob_rows: int,
                 graphs: int = 1, naive_logits: bool = False, head_on_trunk: bool = False) -> None:
    """Activations, log-probs and working set of one training micro-batch (``graphs`` forwards held
    together for one backward)."""
    tokens = sequences * cfg.seq_length
    acts = activation_bytes(shape, cfg, sequences, cfg.seq_length, padded, cfg.gradient_checkpointing, head_on_trunk)
    what = ("with reentrant" if cfg.reentrant_checkpointing else "with") if cfg.gradient_checkpointing else "no"
    setup.add("activations", f"activations ({sequences} x {cfg.seq_length} tokens, {what} checkpointing)",
              graphs * acts, "train")
    transient = layer_transient_bytes(shape, cfg, tokens, padded, cfg.gradient_checkpointing)
    if logprob_rows:
        if naive_logits:
            full = sequences * decoder_tokens(shape, cfg)[1] * shape.vocab_size  # the decoder's positions only
            setup.add("logits", "logits (fp32 B x T x V, kept)", graphs * full * 4.0, "train")
            transient = max(transient, full * 4.0 * 4)
        else:
            kept, chunk = logprob_bytes(shape, cfg, logprob_rows)
            setup.add("logits", f"log-probs ({logprob_rows} rows, chunked)", kept, "train")
            # The layers' backward starts once the log-prob backward has freed what it kept.
            transient = max(transient - kept, chunk)
    setup.add("working_set", "largest transient (forward or backward)", transient, "train")


def plan_memory(shape: ModelShape, cfg: PlanConfig) -> Plan:
    """The memory plan of ``cfg.stage`` for this model: pocketrlhf's setup (and, for PPO, naive ones).

    Each stage is built from the same pieces (base, adapters, heads, one training micro-batch,
    rollouts), mirroring what the stage's code holds, so a stage that changes is re-planned here
    in a few lines.
    """
    _check(cfg)
    if cfg.adapter_scope != "all" and not shape.seq2seq:  # as models/policy.build_policy says it
        raise ConfigError(adapter_scope_on_causal_lm(cfg.adapter_scope, cfg.model))
    gpu = parse_memory(cfg.gpu_memory, "--gpu-memory") if cfg.gpu_memory else None
    context = parse_memory(cfg.cuda_context, "--cuda-context")
    adapted = adapted_linears(shape.linears, cfg)
    if not adapted:
        names = ", ".join(sorted({lin.name.split(".")[-1] for lin in shape.layer_linears}))
        raise ConfigError(f"--target-modules {cfg.target_modules}: no linear layer of this model has that name "
                          f"(its layers have: {names})")
    lora_params = sum(a + b for lin in adapted for a, b in [lora_tensors(lin, cfg.lora_r)])
    notes: list[str] = []
    facts: dict[str, float] = {"lora_params": lora_params, "total_params": shape.total_params}
    T = cfg.seq_length
    # Positions whose log-probs are computed: every next token (causal), the decoder's targets (seq2seq).
    scored = decoder_tokens(shape, cfg)[1] if shape.seq2seq else T - 1
    if shape.seq2seq:
        enc, dec = decoder_tokens(shape, cfg)
        notes.append(f"encoder-decoder: {enc} encoder + {dec} decoder tokens per sequence (--seq-length "
                     f"{T}, --decoder-length{' = --max-new-tokens' if cfg.stage == 'ppo' else ''} {dec})")
    ours = Setup("pocketrlhf")
    setups = [ours]
    head_on_trunk = False

    if cfg.stage == "sft":
        # stages/sft.py: one trainable adapter; packed sequences need no padding mask.
        _base_lines(ours, shape, cfg)
        _adapter_lines(ours, shape, cfg, "policy", trainable=True)
        sequences, padded = cfg.batch_size, not cfg.packing or shape.seq2seq
        _train_lines(ours, shape, cfg, sequences, padded, sequences * scored)
        if shape.seq2seq and cfg.packing:
            notes.append("sft: packing does not apply to an encoder-decoder (each input is its own encoder sequence): "
                         "planned with padded batches")
    elif cfg.stage == "rm":
        # stages/rm.py: adapter + head; chosen and rejected answers of a pair in one padded batch.
        _base_lines(ours, shape, cfg)
        _adapter_lines(ours, shape, cfg, "reward", trainable=True)
        _head_lines(ours, shape, "reward", trainable=True)
        sequences, padded = 2 * cfg.batch_size, True
        _train_lines(ours, shape, cfg, sequences, padded, 0)
        notes.append("rm: each pair's chosen and rejected answers run in one batch (2 x batch-size sequences)")
    elif cfg.stage == "dpo":
        # stages/dpo.py: policy adapter; reference = frozen SFT adapter copy or adapters off, its
        # log-probs precomputed without grad.
        _base_lines(ours, shape, cfg)
        _adapter_lines(ours, shape, cfg, "policy", trainable=True)
        if cfg.reference == "sft":
            _adapter_lines(ours, shape, cfg, "reference", trainable=False)
        sequences, padded = 2 * cfg.batch_size, True
        _train_lines(ours, shape, cfg, sequences, padded, sequences * scored)
        notes.append("dpo: chosen and rejected run in one batch (2 x batch-size sequences); log-probs are counted "
                     "for every token (an upper bound: only answer tokens need them)")
    else:
        sequences, padded = cfg.batch_size, True
        head_on_trunk = cfg.value_model == "head"
        _ppo_lines(ours, shape, cfg, copies=1)
        naive_lora = Setup("naive LoRA (4 bases)")
        _ppo_lines(naive_lora, shape, cfg, copies=4)
        naive_full = Setup("naive full FT")
        if cfg.quantization == "none":
            _naive_full_ppo(naive_full, shape, cfg)
        else:
            naive_full.available, naive_full.reason = False, "4/8-bit weights cannot be fully fine-tuned"
        setups += [naive_lora, naive_full]
        notes.append("ppo: naive = a separate model per role (policy, value, reference, reward), policy and value "
                     "forwards held together for one backward and full fp32 logits, as in trl's PPO trainer")
    for setup in setups:
        if setup.available:
            setup.add("cuda_context", "CUDA context and kernels", context, "overhead")

    for flag in (False, True):
        facts[f"activations_{'with' if flag else 'without'}_checkpointing"] = activation_bytes(
            shape, cfg, sequences, T, padded, flag, head_on_trunk)
    if cfg.adapter_scope == "decoder":
        notes.append("--adapter-scope decoder: the encoder trains nothing and keeps no activations for backward")
    if cfg.quantization != "none" and cfg.kbit_upcast:
        notes.append("4/8-bit: peft's prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32, "
                     "so activations and the KV cache are fp32 too (--kbit-upcast false plans them in "
                     f"{cfg.dtype})")
    if shape.outside_linears > 0.01 * shape.total_params:
        notes.append(f"{shape.outside_linears / 1e6:,.1f}M parameters are not in linear layers (e.g. fused MoE experts): "
                     "planned unquantized and without adapters")
    if shape.model_type not in VERIFIED_ARCHITECTURES:
        notes.append(f"activations of model_type '{shape.model_type}' are estimated with the {shape.family} block's "
                     "formulas, which were checked against measurements for "
                     f"{', '.join(sorted(VERIFIED_ARCHITECTURES))} only")
    if cfg.optimizer.startswith("paged"):
        notes.append("paged optimizers keep their state in CUDA unified memory, which moves to CPU memory when the "
                     "GPU runs short (on a CPU-only run pocketrlhf falls back to the unpaged optimizer)")
    return Plan(cfg, shape, setups, facts, notes, gpu)


def _ppo_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig, copies: int) -> None:
    """PPO with LoRA (stages/ppo.py): policy adapter (trained), value head on the policy or value
    adapter + head (trained, its own forward and backward), reward adapter + head and reference
    adapter (frozen). ``copies`` = 4: the naive layout with one base per role."""
    _base_lines(setup, shape, cfg, copies=copies)
    naive = copies > 1
    _adapter_lines(setup, shape, cfg, "policy", trainable=True)
    if cfg.value_model == "adapter" or naive:
        _adapter_lines(setup, shape, cfg, "value", trainable=True)
    _head_lines(setup, shape, "value", trainable=True)
    _adapter_lines(setup, shape, cfg, "reward", trainable=False)
    _head_lines(setup, shape, "reward", trainable=False)
    if cfg.reference == "sft":
        _adapter_lines(setup, shape, cfg, "reference", trainable=False)
    _rollout_lines(setup, shape, cfg)
    rows = cfg.batch_size * cfg.max_new_tokens
    if naive:
        _train_lines(setup, shape, cfg, cfg.batch_size, True, rows, graphs=2, naive_logits=True)
    else:
        # A value adapter runs its own forward and backward after the policy's: one graph at a time.
        _train_lines(setup, shape, cfg, cfg.batch_size, True, rows, head_on_trunk=cfg.value_model == "head")


def _rollout_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig) -> None:
    """Generation (models/generation.py: ``generate`` per batch of prompts, KV cache in the
    activation dtype)."""
    regime = _regime(cfg, shape, True)
    b, T = cfg.generation_batch_size, cfg.seq_length
    if shape.seq2seq:
        _seq2seq_rollout_lines(setup, shape, cfg, regime)
        return
    kv = b * T * 2 * shape.num_layers * shape.kv_dim * regime.stream
    setup.add("kv_cache", f"KV cache ({b} x {T} tokens)", kv, "rollout")
    prompt = b * (T - cfg.max_new_tokens)
    # Prefill without grad: about the widest tensors of one layer, the padding mask, and the last
    # position's fp32 logits for sampling.
    wide = max(2 * shape.intermediate_size, 3 * shape.hidden_size) + shape.hidden_size
    setup.add("generation_working_set", "prefill working set", prompt * wide * regime.stream
              + b * (T - cfg.max_new_tokens) ** 2 * regime.stream + b * shape.vocab_size * 4 * 2
              + dequantized_weight_bytes(shape, cfg), "rollout")


def _seq2seq_rollout_lines(setup: Setup, shape: ModelShape, cfg: PlanConfig, regime: Regime) -> None:
    """An encoder-decoder's generation: the encoder reads the prompts once; every decoder layer
    caches its self-attention keys/values of the new tokens and its cross-attention keys/values of
    every prompt token (transformers' EncoderDecoderCache), next to the encoder output."""
    b, s = cfg.generation_batch_size, regime.stream
    prompt, new = cfg.seq_length - cfg.max_new_tokens, cfg.max_new_tokens
    per_token = 2 * shape.num_layers * shape.kv_dim * s
    setup.add("kv_cache", f"KV cache: decoder self-attention ({b} x {new}) + cross-attention ({b} x {prompt} prompt "
              "tokens)", b * (new + prompt) * per_token, "rollout")
    wide = max(2 * shape.intermediate_size, 3 * shape.hidden_size) + shape.hidden_size
    setup.add("generation_working_set", "encoder pass: output, widest layer tensors, position-bias mask",
              b * prompt * (shape.hidden_size + wide) * s + b * shape.num_heads * prompt * prompt * s
              + b * shape.vocab_size * 4 * 2 + dequantized_weight_bytes(shape, cfg), "rollout")


def _naive_full_ppo(setup: Setup, shape: ModelShape, cfg: PlanConfig) -> None:
    """Policy and value trained in full (16 B/param: weights, gradients, fp32 master and Adam in
    mixed precision, as ZeRO counts them), reference and reward models frozen."""
    cfg = dataclasses.replace(cfg, adapter_scope="all")  # every weight trains: the encoder keeps its graph
    n = shape.total_params
    w = _DTYPE_BYTES[cfg.dtype]
    setup.add("policy_full", "policy: full model trained (16 B/param)", 16 * n)
    setup.add("value_full", "value: full model trained (16 B/param)", 16 * n)
    setup.add("reference_full", f"reference: frozen model ({w} B/param)", w * n)
    setup.add("reward_full", f"reward: frozen model ({w} B/param)", w * n)
    _rollout_lines(setup, shape, cfg)
    _train_lines(setup, shape, cfg, cfg.batch_size, True, cfg.batch_size * cfg.max_new_tokens, graphs=2,
                 naive_logits=True)


# ---------------------------------------------------------------------------------------------
# Report.


def _describe_model(shape: ModelShape) -> list[str]:
    c = shape.counts
    attn = f"{shape.num_heads} heads" + (f" ({shape.num_kv_heads} key/value)" if shape.num_kv_heads != shape.num_heads else "")
    layers = (f"{shape.encoder_layers} encoder + {shape.num_layers} decoder layers" if shape.seq2seq
              else f"{shape.num_layers} layers")
    fp32 = sum(lin.in_features * lin.out_features for lin in shape.linears if lin.keep_fp32)
    return [
        f"model: {shape.model_type}, {shape.total_params / 1e9:.2f}B parameters; {layers}, "
        f"hidden {shape.hidden_size}, {attn}, MLP {shape.intermediate_size}, vocab {shape.vocab_size}, "
        f"{'tied' if shape.tied_embeddings else 'untied'} embeddings",
        "parameters: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in c.items() if v)
        + (f" ({fp32 / 1e6:,.1f}M in layers transformers keeps in fp32, unquantized)" if fp32 else ""),
    ]


def render(plan: Plan) -> str:
    cfg, shape = plan.config, plan.shape
    q = {"none": cfg.dtype, "8bit": "8-bit (LLM.int8)", "4bit": "4-bit NF4" + (" + double quant" if cfg.double_quant else "")}
    lines = _describe_model(shape)
    lines.append(
        f"stage {cfg.stage}: base {q[cfg.quantization]}, LoRA r={cfg.lora_r} on {cfg.target_modules} "
        f"({plan.facts['lora_params'] / 1e6:,.2f}M params), batch {cfg.batch_size} x {cfg.seq_length} tokens, "
        f"{cfg.optimizer}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        + (f", {cfg.adapter_dtype} adapters" if cfg.adapter_dtype != "float32" else "")
        + (", adapters in the decoder only" if cfg.adapter_scope == "decoder" else "")
        + (f", generation {cfg.generation_batch_size} x {cfg.max_new_tokens} new tokens, value {cfg.value_model}"
           if cfg.stage == "ppo" else "")
    )
    lines.append("")
    setups = plan.setups
    labels: dict[str, str] = {}
    phases: dict[str, str] = {}
    for s in setups:
        for line in s.lines:
            labels.setdefault(line.key, line.label)
            phases.setdefault(line.key, line.phase)
    width = max(len(v) for v in labels.values()) + 2
    col = max(16, *(len(s.name) + 2 for s in setups))
    header = " " * width + "".join(f"{s.name:>{col}}" for s in setups)
    lines.append(header)

    def row(label: str, values: list[str]) -> str:
        return f"{label:<{width}}" + "".join(f"{v:>{col}}" for v in values)

    for phase, title in (("static", None), ("rollout", "rollouts (peak of generation)"),
                         ("train", "training step (peak of forward + backward)"), ("overhead", None)):
        keys = [k for k in labels if phases[k] == phase]
        if not keys:
            continue
        if title:
            lines.append(title + ":")
        for key in keys:
            values = []
            for s in setups:
                hit = [line.bytes for line in s.lines if line.key == key]
                values.append(format_bytes(hit[0]) if hit and s.available else "-" if s.available else "n/a")
            lines.append(row("  " + labels[key] if title else labels[key], values))
    lines.append(row("-" * (width - 2), ["-" * (col - 2)] * len(setups)))
    lines.append(row("static (weights, adapters, optimizer)", [format_bytes(s.static) if s.available else "n/a" for s in setups]))
    lines.append(row("peak", [format_bytes(s.peak) if s.available else "n/a" for s in setups]))
    if any(s.available and s.paged for s in setups):
        lines.append(row("peak, paged state evicted to CPU", [format_bytes(s.peak_evicted) if s.available else "n/a"
                                                              for s in setups]))
        lines.append(row("CPU memory for the evicted state", [format_bytes(s.paged) if s.available else "n/a"
                                                              for s in setups]))
    if plan.gpu_memory is not None:
        verdicts = []
        for s in setups:
            fits = plan.fits(s)
            if fits is None:
                verdicts.append("n/a")
            elif fits and s.peak > plan.gpu_memory:
                verdicts.append("fits, paging")
            else:
                room = plan.gpu_memory - (s.peak if fits else s.peak_evicted)
                verdicts.append(("fits, " if fits else "no, ") + format_bytes(abs(room)) + (" free" if fits else " over"))
        lines.append(row(f"fits in {cfg.gpu_memory}?", verdicts))
    lines.append("")
    without = plan.facts["activations_without_checkpointing"]
    with_ = plan.facts["activations_with_checkpointing"]
    lines.append(f"activations: {format_bytes(without)} without gradient checkpointing, {format_bytes(with_)} with it")
    for s in setups:
        if not s.available:
            lines.append(f"{s.name}: not possible ({s.reason})")
    if plan.gpu_memory is not None and plan.fits(setups[0]) is False:
        hints = suggestions(plan.shape, cfg)
        if hints:
            lines.append("would fit with: " + "; ".join(hints))
    ours = setups[0]
    if plan.gpu_memory is not None and ours.paged and ours.peak > plan.gpu_memory >= ours.peak_evicted:
        lines.append(f"fits only with the paged state evicted: up to {format_bytes(ours.peak - plan.gpu_memory)} of it "
                     "in CPU memory while the activations are on the GPU (slower while it is away)")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("note: estimates; the CUDA caching allocator's fragmentation is not included (allow ~5-10%)")
    return "\n".join(lines)


def suggestions(shape: ModelShape, cfg: PlanConfig) -> list[str]:
    """Single changes that make pocketrlhf's setup fit, cheapest in quality and speed first: the
    same arithmetic (checkpointing, paging, reentrant checkpointing on an 8-bit base), then lower
    precision (16-bit adapters, 16-bit embeddings, norms and stream on a 4/8-bit base, 8-bit
    optimizer state, a lower-bit base), then smaller batches."""
    tries: list[tuple[str, dict]] = []
    if not cfg.gradient_checkpointing:
        tries.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if not cfg.optimizer.startswith("paged"):
        tries.append((f"--optimizer paged_{cfg.optimizer}", {"optimizer": f"paged_{cfg.optimizer}"}))
    if cfg.quantization == "8bit" and cfg.gradient_checkpointing and not cfg.reentrant_checkpointing \
            and cfg.processes == 1:
        tries.append(("--reentrant-checkpointing", {"reentrant_checkpointing": True}))
    if cfg.adapter_dtype == "float32":
        tries.append(("--adapter-dtype bfloat16", {"adapter_dtype": "bfloat16"}))
    if cfg.quantization != "none" and cfg.kbit_upcast:
        # The published 8-bit setups of 2023 ran this way (peft before 0.3 upcast no LLaMA norm).
        tries.append(("--kbit-upcast false", {"kbit_upcast": False}))
    if not cfg.optimizer.endswith("8bit"):
        paged = "paged_" if cfg.optimizer.startswith("paged") else ""
        tries.append((f"--optimizer {paged}adamw_8bit", {"optimizer": f"{paged}adamw_8bit"}))
    for q in ("8bit", "4bit"):
        if (cfg.quantization, q) in (("none", "8bit"), ("none", "4bit"), ("8bit", "4bit")):
            tries.append((f"--quantization {q}", {"quantization": q}))
    b = cfg.batch_size // 2
    while b >= 1:
        tries.append((f"--batch-size {b}", {"batch_size": b}))
        b //= 2
    if cfg.stage == "ppo" and cfg.generation_batch_size > 1:
        half = cfg.generation_batch_size // 2
        tries.append((f"--generation-batch-size {half}", {"generation_batch_size": half}))
    found = []
    for text, change in tries:
        alt = dataclasses.replace(cfg, **change)
        plan = plan_memory(shape, alt)
        if plan.fits(plan.setups[0]):
            found.append(text)
            if len(found) == 3:
                break
    return found


def to_json(plan: Plan) -> dict:
    return {
        "model": {"model_type": plan.shape.model_type, "parameters": plan.shape.counts,
                  "total_parameters": plan.shape.total_params, "tied_embeddings": plan.shape.tied_embeddings},
        "config": dataclasses.asdict(plan.config),
        "setups": [{"name": s.name, "available": s.available, "reason": s.reason,
                    "lines": [dataclasses.asdict(line) for line in s.lines],
                    "static_bytes": s.static if s.available else None, "peak_bytes": s.peak if s.available else None,
                    "peak_evicted_bytes": s.peak_evicted if s.available else None,
                    "paged_bytes": s.paged if s.available else None,
                    "fits": plan.fits(s)} for s in plan.setups],
        "facts": plan.facts,
        "notes": plan.notes,
    }


def run(cfg: PlanConfig) -> dict:
    shape = model_shape(read_config(cfg.model, cfg.trust_remote_code))
    plan = plan_memory(shape, cfg)
    result = to_json(plan)
    print(json.dumps(result, indent=2) if cfg.json else render(plan))
    return result
