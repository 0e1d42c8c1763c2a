"""The memory planner on encoder-decoder bases (T5 as flan-t5): parameters counted per stack from
config.json alone, T5's fp32 ``wo``, the cross-attention KV cache, and activations checked against
the exact tensors of a real training step on a tiny T5 (as tests/test_plan.py does for causal LMs)."""

from __future__ import annotations

import json

import pytest
import torch

from pocketrlhf import measure
from pocketrlhf import plan as P
from pocketrlhf.cli import main
from pocketrlhf.errors import ConfigError

# google/flan-t5-xl and -xxl config.json values (T5 v1.1: gated-gelu, untied output layer).
FLAN_T5_XL = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 2048, "d_ff": 5120,
              "d_kv": 64, "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24, "vocab_size": 32128,
              "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "relative_attention_num_buckets": 32,
              "relative_attention_max_distance": 128, "is_encoder_decoder": True, "decoder_start_token_id": 0,
              "pad_token_id": 0, "eos_token_id": 1, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1}
FLAN_T5_XXL = dict(FLAN_T5_XL, d_model=4096, d_ff=10240, num_heads=64)


def write_config(path, data: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))
    return path


def line(setup, key) -> float:
    return sum(x.bytes for x in setup.lines if x.key == key)


@pytest.mark.parametrize("config,total", [(FLAN_T5_XL, 2_849_757_184), (FLAN_T5_XXL, 11_135_332_352)])
def test_flan_t5_parameters_are_counted_per_stack(tmp_path, config, total):
    """T5 v1.1 XL / XXL: 2.85B / 11.14B parameters (the published sizes), the output layer untied
    as the checkpoints store it, 24 encoder and 24 decoder layers (cross-attention in the latter)."""
    shape = P.model_shape(P.read_config(str(write_config(tmp_path, config))))
    d, ff, v = config["d_model"], config["d_ff"], config["vocab_size"]
    assert shape.seq2seq and shape.encoder_layers == shape.num_layers == 24
    assert shape.total_params == total and not shape.tied_embeddings
    assert shape.counts["lm_head"] == shape.counts["embeddings"] - 2 * 32 * config["num_heads"] == v * d
    assert shape.counts["attention"] == 24 * 4 * d * d + 24 * 8 * d * d
    assert shape.counts["mlp"] == 48 * 3 * d * ff
    assert {lin.name.split(".")[-1] for lin in shape.layer_linears} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert len(shape.layer_linears) == 4 + 4 + 3 and len(shape.encoder_layer_linears) == 4 + 3
    assert [lin.name.split(".")[-1] for lin in shape.linears if lin.keep_fp32] == ["wo"] * 48


def test_t5_wo_stays_unquantized(tmp_path):
    """transformers never quantizes T5's wo; under fp16 (and the k-bit upcast) it is fp32."""
    shape = P.model_shape(P.read_config(str(write_config(tmp_path, FLAN_T5_XXL))))
    cfg = dict(model="unused", cuda_context="0GB")
    wo = 48 * 10240 * 4096
    rest = sum(lin.in_features * lin.out_features for lin in shape.linears) - wo
    bf16 = line(P.plan_memory(shape, P.PlanConfig(**cfg)).setups[0], "base_linear")
    fp16 = line(P.plan_memory(shape, P.PlanConfig(dtype="float16", **cfg)).setups[0], "base_linear")
    int8 = line(P.plan_memory(shape, P.PlanConfig(quantization="8bit", **cfg)).setups[0], "base_linear")
    assert bf16 == 2 * (rest + wo) and fp16 == 2 * rest + 4 * wo
    int8_rows = sum(lin.out_features for lin in shape.linears if not lin.keep_fp32)
    assert int8 == rest + 4 * int8_rows + 4 * wo  # int8 + a fp32 scale per row; wo in fp32 after the upcast


def test_cli_plans_flan_t5_xxl(tmp_path, capsys):
    model = write_config(tmp_path, FLAN_T5_XXL)
    assert main(["plan", "--model", str(model), "--stage", "ppo", "--quantization", "8bit", "--gpu-memory", "24GB",
                 "--gradient-checkpointing", "--batch-size", "2", "--generation-batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "11.14B parameters; 24 encoder + 24 decoder layers" in out
    assert "KV cache: decoder self-attention (8 x 64) + cross-attention (8 x 448 prompt tokens)" in out
    assert "fits in 24GB?" in out and "encoder-decoder: 448 encoder + 64 decoder tokens" in out
    assert main(["plan", "--model", str(model), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["total_parameters"] == 11_135_332_352
    assert any("packing does not apply to an encoder-decoder" in n for n in data["notes"])
    with pytest.raises(ConfigError, match=r"--decoder-length \(512\) must be smaller than --seq-length \(512\)"):
        P.plan_memory(P.model_shape(P.read_config(str(model))), P.PlanConfig(model="x", decoder_length=512))


def test_kv_cache_is_exact(tiny_t5):
    """Generation's cache: every decoder layer's self-attention keys/values of the new tokens and
    cross-attention keys/values of the prompt tokens (transformers' EncoderDecoderCache)."""
    from pocketrlhf.models.loading import load_base

    B, prompt, new = 3, 20, 7
    model_dir = str(tiny_t5)
    base = load_base(model_dir, dtype="bfloat16", device="cpu", training=False)
    enc = torch.randint(3, 300, (B, prompt))
    dec = torch.randint(3, 300, (B, new))
    with torch.no_grad():
        cache = base(input_ids=enc, decoder_input_ids=dec, use_cache=True).past_key_values
    layers = list(cache.self_attention_cache.layers) + list(cache.cross_attention_cache.layers)
    kv = sum(t.untyped_storage().nbytes() for layer in layers for t in (layer.keys, layer.values))
    planned = P.plan_memory(P.model_shape(P.read_config(model_dir)), P.PlanConfig(
        model=model_dir, stage="ppo", dtype="bfloat16", seq_length=prompt + new, max_new_tokens=new,
        generation_batch_size=B, cuda_context="0GB")).setups[0]
    assert line(planned, "kv_cache") == kv


# quantization, dtype, gradient checkpointing, target modules, adapter dtype
CASES = [
    ("none", "bfloat16", False, "all-linear", "float32"),
    ("none", "float16", False, "all-linear", "float32"),  # wo in fp32: its adapter reads a fp32 copy
    ("none", "float32", False, "all-linear", "float32"),
    ("4bit", "bfloat16", False, "all-linear", "float32"),
    ("none", "bfloat16", False, "all-linear", "bfloat16"),
    ("8bit", "bfloat16", False, "q,v", "float32"),
    ("none", "bfloat16", True, "all-linear", "float32"),
    ("4bit", "bfloat16", True, "all-linear", "bfloat16"),
    ("8bit", "bfloat16", True, "all-linear", "float32"),  # int8 layers keep their inputs through checkpointing
]


@pytest.mark.parametrize("quantization,dtype,checkpointing,targets,adapter_dtype", CASES)
def test_seq2seq_sft_plan_matches_measured_memory(tiny_t5, quantization, dtype, checkpointing, targets, adapter_dtype):
    """A real training step of a LoRA on the tiny T5 (encoder input -> decoder target, padded
    both sides, log-probs of the targets) on CPU, every tensor storage tracked."""
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages import common
    from pocketrlhf.stages.sft import SFTConfig

    B, enc_len, dec_len, r = 4, 40, 24, 8
    model_dir = str(tiny_t5)
    cfg = SFTConfig(model=model_dir, device="cpu", dtype=dtype, quantization=quantization, lora_r=r,
                    gradient_checkpointing=checkpointing, target_modules=targets, adapter_dtype=adapter_dtype,
                    packing=False)
    model = build_policy(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    enc = torch.randint(3, vocab - 1, (B, enc_len), generator=g)
    dec = torch.randint(3, vocab - 1, (B, dec_len), generator=g)
    enc_mask, dec_mask = torch.ones_like(enc), torch.ones_like(dec)
    enc_mask[-1, -5:] = 0
    dec_mask[-1, -3:] = 0

    def loss():
        out = model(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        logprobs = torch.log_softmax(out.logits.float(), -1).gather(-1, dec.unsqueeze(-1)).squeeze(-1)
        return -(logprobs * dec_mask).sum() / dec_mask.sum()

    optimizer = common.build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    measured = measure.measure_steps(model, optimizer, loss)
    planned = P.plan_memory(P.model_shape(P.read_config(model_dir)), P.PlanConfig(
        model=model_dir, stage="sft", quantization=quantization, dtype=dtype, lora_r=r, target_modules=targets,
        batch_size=B, seq_length=enc_len + dec_len, decoder_length=dec_len, gradient_checkpointing=checkpointing,
        adapter_dtype=adapter_dtype, cuda_context="0GB")).setups[0]
    assert line(planned, "activations") + line(planned, "logits") == pytest.approx(measured["held"], rel=0.15)
    assert planned.peak == pytest.approx(measured["static"] + measured["peak"], rel=0.15)
    static = line(planned, "base_linear") + line(planned, "base_other") + line(planned, "policy_weights") + \
        line(planned, "policy_optimizer")
    assert static == pytest.approx(measured["static"], rel=0.03)


# --adapter-scope decoder: quantization, gradient checkpointing, how the training forward gets its
# encoder output (sft: its own pass, detached; dpo: the reference's no-grad pass, in one encoder_reuse scope)
SCOPE_CASES = [
    ("none", False, "sft"),
    ("4bit", False, "sft"),
    ("none", True, "sft"),  # checkpointing makes the embeddings' output require grad: cut after the frozen encoder
    ("8bit", True, "sft"),  # ... so its int8 layers keep no inputs either
    ("none", True, "dpo"),  # the shared pass is detached: no encoder graph
    ("4bit", True, "dpo"),
]


@pytest.mark.parametrize("quantization,checkpointing,stage", SCOPE_CASES)
def test_decoder_scope_plan_matches_measured_memory(tiny_t5, quantization, checkpointing, stage):
    """With adapters on the decoder only, a training step through pocketrlhf's own path (the row
    layout of models/forward.py) holds no encoder activations, with or without gradient
    checkpointing, whether it runs its own encoder pass or reads a shared one; the plan says so."""
    from pocketrlhf.models.forward import encoder_reuse, response_logprobs
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages import common
    from pocketrlhf.stages.sft import SFTConfig

    B, enc_len, dec_len, r = 4, 40, 24, 8
    model_dir = str(tiny_t5)
    cfg = SFTConfig(model=model_dir, device="cpu", dtype="bfloat16", quantization=quantization, lora_r=r,
                    gradient_checkpointing=checkpointing, packing=False, adapter_scope="decoder")
    model = build_policy(cfg)
    assert not any(p.requires_grad for p in model.get_base_model().get_encoder().parameters())
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(3, 300, (B, enc_len), generator=g)
    dec = torch.randint(3, 300, (B, dec_len), generator=g)
    enc_mask, dec_mask = torch.ones_like(enc), torch.ones_like(dec)
    enc_mask[-1, :5] = 0  # a left-padded prompt, a right-padded answer
    dec_mask[-1, -3:] = 0
    ids, attn = torch.cat([enc, dec], 1), torch.cat([enc_mask, dec_mask], 1)
    resp = torch.cat([torch.zeros_like(enc), dec_mask], 1)

    def loss():
        if stage == "sft":  # stages/sft.py: no encoder_reuse scope
            out = response_logprobs(model, ids, attn, resp)
        else:  # stages/dpo.py's DPOLoss.loss: the reference (adapters off) without grad, then the policy
            with encoder_reuse(model):
                with torch.no_grad(), model.disable_adapter():
                    response_logprobs(model, ids, attn, resp)
                out = response_logprobs(model, ids, attn, resp)
        return -(out.logprobs * resp).sum() / resp.sum()

    optimizer = common.build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    measured = measure.measure_steps(model, optimizer, loss)
    planned = P.plan_memory(P.model_shape(P.read_config(model_dir)), P.PlanConfig(
        model=model_dir, stage=stage, quantization=quantization, dtype="bfloat16", lora_r=r, adapter_scope="decoder",
        batch_size=B // 2 if stage == "dpo" else B, reference="base", seq_length=enc_len + dec_len,
        decoder_length=dec_len, gradient_checkpointing=checkpointing, cuda_context="0GB")).setups[0]
    assert line(planned, "activations") + line(planned, "logits") == pytest.approx(measured["held"], rel=0.15)
    assert planned.peak == pytest.approx(measured["static"] + measured["peak"], rel=0.15)
    static = line(planned, "base_linear") + line(planned, "base_other") + line(planned, "policy_weights") + \
        line(planned, "policy_optimizer")
    assert static == pytest.approx(measured["static"], rel=0.03)


def test_decoder_scope_plans_decoder_adapters_and_less_memory(tmp_path):
    """flan-t5-xl: --adapter-scope decoder counts the LoRA of the 24 decoder layers only (self- and
    cross-attention, gated MLP); weights, optimizer state and activations all shrink, and dpo's
    step keeps nothing of the encoder, checkpointed or not."""
    shape = P.model_shape(P.read_config(str(write_config(tmp_path, FLAN_T5_XL))))
    d, ff, r = 2048, 5120, 16
    assert sum(lin.encoder for lin in shape.linears) == 24 * 7 and not any(lin.encoder for lin in shape.layer_linears)
    assert all(lin.encoder for lin in shape.encoder_layer_linears)
    decoder = 24 * r * (8 * 2 * d + 2 * (d + ff) + (ff + d))
    encoder = 24 * r * (4 * 2 * d + 2 * (d + ff) + (ff + d))
    for stage in ("sft", "rm", "dpo", "ppo"):
        for checkpointing in (False, True):
            cfg = dict(model="unused", stage=stage, gradient_checkpointing=checkpointing, cuda_context="0GB")
            full = P.plan_memory(shape, P.PlanConfig(**cfg))
            scoped = P.plan_memory(shape, P.PlanConfig(adapter_scope="decoder", **cfg))
            assert full.facts["lora_params"] == decoder + encoder and scoped.facts["lora_params"] == decoder
            ours, theirs = scoped.setups[0], full.setups[0]
            role = "reward" if stage == "rm" else "policy"
            assert line(ours, f"{role}_weights") == 4 * decoder and line(ours, f"{role}_optimizer") == 8 * decoder
            assert ours.peak < theirs.peak and ours.static < theirs.static
            assert line(ours, "activations") < line(theirs, "activations")
    assert "adapters in the decoder only" in P.render(scoped)


def test_decoder_scope_on_a_causal_model_is_a_one_line_error(tmp_path, capsys):
    model = write_config(tmp_path, {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                    "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 320})
    assert main(["plan", "--model", str(model), "--adapter-scope", "decoder"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --adapter-scope decoder applies to encoder-decoder bases (T5, BART) only: {model} is a " \
        "causal LM (it has no encoder); leave it at all\n"
    assert main(["plan", "--model", str(model), "--adapter-scope", "all"]) == 0
