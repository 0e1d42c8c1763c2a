"""pocketrlhf merge: merged weights give the logits of base + adapter; the prompt format survives;
bad input is refused with one clear line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pocketrlhf.cli import main
from pocketrlhf.data.templates import FORMATS, render
from pocketrlhf.merge import chat_template_jinja


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """setup_logging binds its handler to the sys.stderr of the moment; capsys swaps sys.stderr per
    test, so start and end each test without a handler."""
    import logging

    logger = logging.getLogger("pocketrlhf")
    saved = list(logger.handlers)
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two\nlines"},
     {"role": "assistant", "content": 'a "quoted" {brace}'}, {"role": "user", "content": "more?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def make_adapter(base: Path, out: Path, method: str = "lora", template: str = "chatml", quantization: str = "none",
                 seed: int = 0, noise: float = 0.3) -> Path:
    """A saved adapter (our own save path) whose weights are random, so merging changes the logits."""
    from pocketrlhf.models.adapters import (
        attach_adapter,
        make_peft_config,
        save_adapter,
        write_adapter_info,
    )
    from pocketrlhf.models.loading import load_base, load_tokenizer

    model = attach_adapter(load_base(str(base), device="cpu", training=True), make_peft_config(method, r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    save_adapter(model, out, tokenizer=load_tokenizer(str(base)))
    write_adapter_info(out, stage="sft", template=template, base_model=str(base), quantization=quantization)
    return out


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + 24).remainder(vocab - 4).unsqueeze(0) + 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def base_plus_adapter(base: Path, adapter: Path):
    from pocketrlhf.models.loading import load_base

    return base_plus_adapter_on(load_base(str(base), device="cpu", training=False), adapter)


def base_plus_adapter_on(model, adapter: Path):
    from pocketrlhf.models.adapters import load_adapter

    return load_adapter(model, adapter)


def load_merged(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_chat_template_renders_like_our_prompt_formats(llama, fmt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama))
    tok.chat_template = chat_template_jinja(fmt)
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt) == \
                render(conversation, fmt, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("llama", "loha"), ("llama", "ia3"), ("gpt2", "lora")])
def test_merged_logits_equal_base_plus_adapter(tiny_models, tmp_path, capsys, arch, method):
    base = tiny_models[arch]
    adapter = make_adapter(base, tmp_path / "adapter", method)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--max-shard-size", "150KB"]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out

    files = {p.name for p in out.iterdir()}
    assert "adapter_config.json" not in files and "config.json" in files and "tokenizer.json" in files
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files  # --max-shard-size was honoured
    assert all(p.stat().st_size <= 150_000 * 1.1 for p in shards)
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in shards)  # not transformers' 0600

    merged = load_merged(out)
    assert not any("lora" in n or "hada" in n or "ia3" in n for n, _ in merged.named_parameters())
    reference = base_plus_adapter(base, adapter)
    vocab = merged.get_output_embeddings().weight.shape[0]
    expected, got = logits(reference, vocab), logits(merged, vocab)
    with reference.disable_adapter():
        plain = logits(reference, vocab)
    assert (expected - plain).abs().max() > 0.5  # the adapter really changes the model...
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)  # ...and the merge keeps that change


def test_merge_keeps_the_prompt_format(llama, tmp_path):
    from transformers import AutoTokenizer

    from pocketrlhf.models.adapters import read_adapter_info

    adapter = make_adapter(llama, tmp_path / "adapter", template="stackllama")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--no-verify"]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    conversation = CONVERSATIONS[1]
    assert render(conversation, "auto", tok, add_generation_prompt=True) == \
        render(conversation, "stackllama", add_generation_prompt=True)
    info = read_adapter_info(out)
    assert info["template"] == "stackllama" and info["merged_from"] == str(adapter.resolve())
    assert info["base_model"] == str(llama.resolve()) and info["merged_dtype"] == "float32"
    # The tokenizer is the base's own: no extra pad token beyond the embedding matrix.
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(llama)))


def test_merge_copies_a_reward_head(llama, tmp_path):
    from pocketrlhf.models.heads import HEAD_FILE, ScalarHead

    adapter = make_adapter(llama, tmp_path / "adapter")
    ScalarHead(64).save(adapter)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-verify"]) == 0
    assert (tmp_path / "merged" / HEAD_FILE).read_bytes() == (adapter / HEAD_FILE).read_bytes()


def test_output_directory_rules(llama, tmp_path, capsys):
    adapter = make_adapter(llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00009-of-00009.safetensors").write_text("stale")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out {out} is not empty; pass --overwrite to replace the model in it\n"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite", "--no-verify"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00009-of-00009.safetensors").exists()  # a stale shard would corrupt loading
    assert load_merged(out) is not None
    assert not list(tmp_path.glob(".*merging"))  # no temporary folder left behind
    capsys.readouterr()

    assert main(["merge", "--adapter", str(adapter), "--out", str(adapter)]) == 2
    assert capsys.readouterr().err == f"error: --out {adapter} is the adapter directory; choose a new folder\n"


def test_input_errors(llama, tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: adapter directory {tmp_path / 'nope'} does not exist\n"

    assert main(["merge", "--adapter", str(llama), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {llama} is not an adapter directory (no adapter_config.json)\n"

    assert main(["merge", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: no adapter given: pass --adapter DIR (a trained adapter directory)\n"

    adapter = make_adapter(llama, tmp_path / "adapter")
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--max-shard-size", "5XB"]) == 2
    assert capsys.readouterr().err == ("error: --max-shard-size: '5XB' is not a memory size; write e.g. 24GB, 24GiB "
                                       "or 500MB (GB = 10^9 bytes, GiB = 2^30)\n")


def test_missing_base_is_named_and_model_overrides_it(llama, tmp_path, capsys):
    adapter = make_adapter(llama, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    # The same words as chat and serve (one function knows where an adapter's base is), with merge's flag.
    assert capsys.readouterr().err == (f"error: adapter {adapter} was trained on {tmp_path / 'moved-away'}, which does "
                                       "not exist here; pass --model DIR to use another copy of that base model\n")
    assert main(["merge", "--adapter", str(adapter), "--model", str(llama), "--out", str(tmp_path / "o"),
                 "--no-verify"]) == 0


def test_prompt_tuning_cannot_be_merged(llama, tmp_path, capsys):
    from pocketrlhf.models.adapters import (
        attach_adapter,
        make_peft_config,
        save_adapter,
    )
    from pocketrlhf.models.loading import load_base

    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("prompt_tuning", num_virtual_tokens=4))
    save_adapter(model, tmp_path / "prompt")
    assert main(["merge", "--adapter", str(tmp_path / "prompt"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'prompt'} is a prompt_tuning adapter: it prepends learned virtual tokens instead of "
        "changing weights, so there is nothing to merge into the base; use the adapter directory itself with chat "
        "or serve\n")


def test_quantized_base_is_refused_unless_dequantize(llama, tmp_path, capsys):
    """A base stored in 4-bit: merging into 4-bit weights would round the adapter away."""
    from pocketrlhf.models.loading import load_base

    stored = tmp_path / "llama-4bit"
    load_base(str(llama), "4bit", device="cpu", training=True).save_pretrained(str(stored))
    shutil.copy(llama / "tokenizer.json", stored / "tokenizer.json")
    shutil.copy(llama / "tokenizer_config.json", stored / "tokenizer_config.json")
    adapter = make_adapter(llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--model", str(stored), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: base model {stored} is stored quantized (bitsandbytes 4bit); merging into quantized weights rounds "
        "the adapter away. Point --model at the original 16-bit checkpoint, or pass --dequantize to merge into its "
        "dequantized weights (saved in float32)\n")

    assert main(["merge", "--adapter", str(adapter), "--model", str(stored), "--out", str(out), "--dequantize"]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_merged(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    dequantized = load_base(str(stored), device="cpu", training=True).dequantize(dtype=torch.float32)
    expected = base_plus_adapter_on(dequantized, adapter)
    vocab = merged.get_output_embeddings().weight.shape[0]
    torch.testing.assert_close(logits(merged, vocab), logits(expected, vocab), atol=2e-4, rtol=1e-4)


def test_dequantize_merges_into_the_weights_a_qlora_adapter_saw(llama, tmp_path):
    """--dequantize with an adapter trained on a 4-bit base: merged = dequant(NF4(W)) + delta."""
    from pocketrlhf.models.loading import load_base

    adapter = make_adapter(llama, tmp_path / "adapter", quantization="4bit")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--dequantize"]) == 0
    merged = load_merged(out)
    saw = load_base(str(llama), "4bit", compute_dtype="float32", device="cpu", training=True).dequantize(
        dtype=torch.float32)
    vocab = merged.get_output_embeddings().weight.shape[0]
    torch.testing.assert_close(logits(merged, vocab), logits(base_plus_adapter_on(saw, adapter), vocab),
                               atol=2e-4, rtol=1e-4)
    # Without --dequantize the same adapter goes into the original weights: a different model.
    original = tmp_path / "merged-original"
    assert main(["merge", "--adapter", str(adapter), "--out", str(original), "--no-verify"]) == 0
    assert (logits(load_merged(original), vocab) - logits(merged, vocab)).abs().max() > 1e-3


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", True), ("nf4", False)])
def test_dequantize_uses_the_4bit_type_and_double_quantization_the_adapter_recorded(llama, tmp_path, quant_type,
                                                                                    double_quant):
    """The adapter's pocketrlhf_adapter.json holds its whole base spec: an FP4 or single-quantized
    NF4 adapter is merged into the weights it saw, not into NF4 + double quantization ones."""
    from pocketrlhf.models.adapters import write_adapter_info
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.models.spec import BaseSpec

    adapter = make_adapter(llama, tmp_path / "adapter")
    spec = BaseSpec(str(llama), "4bit", quant_type, double_quant, "float32", device="cpu")
    write_adapter_info(adapter, stage="sft", template="chatml", base=spec.record())
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--dequantize", "--no-verify"]) == 0
    merged = load_merged(out)
    vocab = merged.get_output_embeddings().weight.shape[0]
    saw = load_base(spec, training=True).dequantize(dtype=torch.float32)
    torch.testing.assert_close(logits(merged, vocab), logits(base_plus_adapter_on(saw, adapter), vocab),
                               atol=2e-4, rtol=1e-4)
    default = load_base(spec.replace(quant_type="nf4", double_quant=True), training=True).dequantize(dtype=torch.float32)
    assert (logits(base_plus_adapter_on(default, adapter), vocab) - logits(merged, vocab)).abs().max() > 1e-3


def test_chat_and_serve_use_a_merged_models_trained_format(tmp_path, llama):
    """`merge` keeps pocketrlhf_adapter.json; serving the merged folder uses its prompt format
    (and so the format's stop strings), not a generic chat template."""
    import json
    import shutil

    from pocketrlhf.serve.engine import ServingOptions, plan_models

    merged = tmp_path / "merged"
    shutil.copytree(llama, merged)
    (merged / "pocketrlhf_adapter.json").write_text(json.dumps({"template": "stackllama", "merged_from": "x"}))
    plan = plan_models(ServingOptions(model=str(merged)))
    assert plan.models[plan.default].template == "stackllama"
    assert plan_models(ServingOptions(model=str(llama))).models["llama"].template == "auto"


# ---------------------------------------------------------------------------------------------
# Encoder-decoder bases (T5): the adapter's encoder and decoder layers merge alike.


def seq2seq_logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + 24).remainder(vocab - 4).unsqueeze(0) + 1
    decoder = torch.arange(5, 5 + 9).remainder(vocab - 4).unsqueeze(0) + 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder).logits


@pytest.mark.parametrize("arch,model_class", [("tiny_t5", "T5ForConditionalGeneration"),
                                              ("tiny_bart", "BartForConditionalGeneration")])
def test_merged_seq2seq_logits_equal_base_plus_adapter(arch, model_class, tmp_path, request):
    """A LoRA on a T5 or BART (encoder and decoder) merges; the folder loads back as seq2seq, its
    logits are base + adapter's, and the encoder's share of the adapter counts."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pocketrlhf.merge import MergeConfig, run
    from pocketrlhf.models.loading import is_seq2seq, load_base

    tiny_t5 = request.getfixturevalue(arch)
    # T5's unnormalised residual stream amplifies rounding under a large random adapter: a smaller
    # one still changes every logit by several units.
    adapter = make_adapter(tiny_t5, tmp_path / "adapter", template="auto", noise=0.1)
    out = tmp_path / "merged"
    summary = run(MergeConfig(adapter=str(adapter), out=str(out), progress=False))
    assert summary["max_logit_diff"] < 1e-2  # merge's own check probes encoder and decoder
    assert is_seq2seq(str(out))
    merged = load_base(str(out), device="cpu", training=False)
    assert type(merged).__name__ == model_class
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = base_plus_adapter(tiny_t5, adapter)
    vocab = merged.get_output_embeddings().weight.shape[0]
    expected = seq2seq_logits(reference, vocab)
    torch.testing.assert_close(seq2seq_logits(merged, vocab), expected, atol=2e-4, rtol=1e-4)
    with reference.disable_adapter():
        assert (expected - seq2seq_logits(reference, vocab)).abs().max() > 0.5
    # The encoder's LoRA is in the merged weights too: the merged encoder differs from the base's.
    base = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_t5), dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert (merged.get_encoder()(input_ids=ids).last_hidden_state - base.get_encoder()(input_ids=ids).last_hidden_state).abs().max() > 1e-2
    # 'auto' on an encoder-decoder is the input text as it is: no ChatML template is written.
    assert not AutoTokenizer.from_pretrained(str(out)).chat_template


def test_dequantize_merges_a_qlora_seq2seq_adapter_into_the_weights_it_saw(tiny_t5, tmp_path):
    """--dequantize with an adapter trained on an NF4 T5: merged = dequant(NF4(W)) + delta, T5's
    fp32 ``wo`` layers (never quantized) merged as they are."""
    from pocketrlhf.models.loading import load_base

    adapter = make_adapter(tiny_t5, tmp_path / "adapter", quantization="4bit", noise=0.1)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--dequantize"]) == 0
    merged = load_base(str(out), device="cpu", training=False)
    saw = load_base(str(tiny_t5), "4bit", compute_dtype="float32", device="cpu", training=True).dequantize(
        dtype=torch.float32)
    vocab = merged.get_output_embeddings().weight.shape[0]
    expected = seq2seq_logits(base_plus_adapter_on(saw, adapter), vocab)
    torch.testing.assert_close(seq2seq_logits(merged, vocab), expected, atol=2e-4, rtol=1e-4)
    original = tmp_path / "merged-original"
    assert main(["merge", "--adapter", str(adapter), "--out", str(original), "--no-verify"]) == 0
    assert (seq2seq_logits(load_base(str(original), device="cpu", training=False), vocab) - expected).abs().max() > 1e-3


def test_a_seq2seq_base_stored_in_4bit_merges_with_dequantize(tiny_t5, tmp_path, capsys):
    """A T5 checkpoint stored NF4 (its wo unquantized): refused without --dequantize, merged into its
    dequantized weights with it; the output is a plain seq2seq model."""
    from pocketrlhf.models.loading import load_base

    stored = tmp_path / "t5-4bit"
    load_base(str(tiny_t5), "4bit", device="cpu", training=True).save_pretrained(str(stored))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_t5 / name, stored / name)
    adapter = make_adapter(tiny_t5, tmp_path / "adapter", noise=0.1)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--model", str(stored), "--out", str(out)]) == 2
    assert "is stored quantized (bitsandbytes 4bit)" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--model", str(stored), "--out", str(out), "--dequantize"]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_base(str(out), device="cpu", training=False)
    assert type(merged).__name__ == "T5ForConditionalGeneration"
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    dequantized = load_base(str(stored), device="cpu", training=True).dequantize(dtype=torch.float32)
    vocab = merged.get_output_embeddings().weight.shape[0]
    torch.testing.assert_close(seq2seq_logits(merged, vocab), seq2seq_logits(base_plus_adapter_on(dequantized, adapter), vocab),
                               atol=2e-4, rtol=1e-4)
