import json

import pytest
import torch

from pocketrlhf.data import synthetic
from pocketrlhf.data.tokenize import left_pad
from pocketrlhf.errors import ModelLoadError
from pocketrlhf.models.adapters import (AdapterSet, attach_adapter, load_adapter, make_peft_config, save_adapter)
from pocketrlhf.models.forward import response_logprobs
from pocketrlhf.models.loading import load_base, load_tokenizer
from pocketrlhf.models.quantization import guard_cpu_4bit, linear4bit_modules
from pocketrlhf.models.tiny import ARCHITECTURES, build_tiny_model

TEXTS = ["the story was really great .", "a dull ending .", "Write a review of the movie Night Train."]


def batch(tok, texts, side="right"):
    ids = [tok(t)["input_ids"] for t in texts]
    if side == "left":
        return left_pad(ids, tok.pad_token_id)
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    m = torch.zeros_like(x)
    for i, s in enumerate(ids):
        x[i, :len(s)] = torch.tensor(s)
        m[i, :len(s)] = 1
    return x, m


def reference_logprobs(model, tok, text):
    """log p(x_t | x_<t) from a plain HF forward of one unpadded sequence."""
    ids = torch.tensor([tok(text)["input_ids"]])
    logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logprobs_match_a_plain_forward_under_any_padding(tiny_models, arch, side):
    tok = load_tokenizer(str(tiny_models[arch]))
    model = load_base(str(tiny_models[arch]), device="cpu")
    ids, mask = batch(tok, TEXTS, side)
    with torch.no_grad():
        lp = response_logprobs(model, ids, mask).logprobs
        for row, text in enumerate(TEXTS):
            ref = reference_logprobs(model, tok, text)
            got = lp[row][mask[row].bool()][1:]  # first real token has no log-prob
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert (lp[mask == 0] == 0).all()


def test_pad_token_is_added_when_missing_and_never_reaches_the_model(tmp_path):
    path = build_tiny_model(tmp_path / "nopad", "llama", texts=synthetic.corpus(), vocab_size=300, pad_token=False)
    tok = load_tokenizer(str(path))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    model = load_base(str(path), device="cpu")
    assert tok.pad_token_id >= model.get_input_embeddings().weight.shape[0]  # beyond the embeddings
    ids, mask = batch(tok, TEXTS)
    assert (ids == tok.pad_token_id).any()
    with torch.no_grad():
        lp = response_logprobs(model, ids, mask).logprobs  # would be an index error if pads leaked
    assert torch.isfinite(lp).all()


def test_tokenizer_that_pads_with_eos_gets_a_distinct_pad(tmp_path, llama):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(llama))
    raw.pad_token = raw.eos_token
    raw.save_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).pad_token_id != raw.eos_token_id


def test_pickle_only_checkpoints_are_refused(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="only pickle weights .*safetensors only"):
        load_base(str(tmp_path), device="cpu")


def test_remote_code_is_off_unless_asked(tmp_path, llama):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["model_type"] = "my_custom_lm"
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel", "AutoConfig": "configuration_custom.Cfg"}
    (tmp_path / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="trust-remote-code"):
        load_base(str(tmp_path), device="cpu")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base(str(tmp_path), device="cpu")


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_adapter_saved_and_reloaded_gives_identical_logits(tmp_path, llama, quantization):
    tok = load_tokenizer(str(llama))
    model = attach_adapter(load_base(str(llama), quantization, device="cpu"),
                           make_peft_config("lora", r=4, target_modules="all-linear"))
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        before = response_logprobs(model, ids, mask).logprobs
        with model.disable_adapter():
            base_lp = response_logprobs(model, ids, mask).logprobs
    assert (before - base_lp).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
    # Same kernels as before saving (training=True keeps bitsandbytes' generic CPU 4-bit kernel;
    # its inference kernel rounds differently, by up to ~1e-2 in log-prob).
    fresh = load_adapter(load_base(str(llama), quantization, device="cpu", training=True), tmp_path / "adapter")
    with torch.no_grad():
        after = response_logprobs(fresh, ids, mask).logprobs
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_base_is_a_clear_error(tmp_path, llama, tiny_models):
    other = build_tiny_model(tmp_path / "wide", "llama", texts=synthetic.corpus(), vocab_size=320, hidden_size=128)
    wide = attach_adapter(load_base(str(other), device="cpu"), make_peft_config("lora", r=4))
    save_adapter(wide, tmp_path / "wide_adapter")
    with pytest.raises(ModelLoadError, match="does not match this base model: .*shape"):
        load_adapter(load_base(str(llama), device="cpu"), tmp_path / "wide_adapter")
    neox = attach_adapter(load_base(str(tiny_models["gpt_neox"]), device="cpu"),
                          make_peft_config("lora", r=4, target_modules="query_key_value"))
    save_adapter(neox, tmp_path / "neox_adapter")
    with pytest.raises(ModelLoadError, match="query_key_value"):
        load_adapter(load_base(str(llama), device="cpu"), tmp_path / "neox_adapter")
    with pytest.raises(ModelLoadError, match="not an adapter directory"):
        load_adapter(load_base(str(llama), device="cpu"), tmp_path)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "adalora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_every_peft_method_trains(llama, method):
    tok = load_tokenizer(str(llama))
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config(method, r=4, num_virtual_tokens=4))
    ids, mask = batch(tok, TEXTS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = -response_logprobs(model, ids, mask).logprobs.sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_unsupported_method_for_an_architecture_is_a_clear_error(tiny_models):
    with pytest.raises(ModelLoadError, match="loha cannot adapt this architecture"):
        attach_adapter(load_base(str(tiny_models["gpt2"]), device="cpu"), make_peft_config("loha", r=4))


def test_adapter_switching_keeps_our_trainability(llama):
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("lora", r=4), "policy")
    attach_adapter(model, make_peft_config("lora", r=4), "value")
    model.set_adapter("policy")
    for name, p in model.named_parameters():  # both adapters trainable: peft alone cannot do this
        if "lora_" in name:
            p.requires_grad_(True)
    adapters = AdapterSet(model)
    with adapters.use("value"):
        assert model.active_adapter == "value"
    assert model.active_adapter == "policy"
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)



def test_disabling_adapters_gives_the_base_and_restores_everything(llama):
    """AdapterSet.use(None) switches the LoRA layers off itself (no model-wide scan per call): the
    base model's numbers inside, the adapter's after, trainability untouched, nested use fine."""
    tok = load_tokenizer(str(llama))
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("lora", r=4), "policy")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # a non-zero adapter (B starts at zero)
    ids, mask = batch(tok, TEXTS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = AdapterSet(model)
    with torch.no_grad():
        adapted = response_logprobs(model, ids, mask).logprobs
        with model.disable_adapter():
            base = response_logprobs(model, ids, mask).logprobs
        assert not torch.allclose(adapted, base)
        with adapters.use(None):
            assert torch.equal(response_logprobs(model, ids, mask).logprobs, base)
            assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
            with adapters.use(None):  # already off: left off, still the base
                assert torch.equal(response_logprobs(model, ids, mask).logprobs, base)
        assert torch.equal(response_logprobs(model, ids, mask).logprobs, adapted)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.get_model_status().enabled is True

# -- bitsandbytes 4-bit on the CPU ------------------------------------------------------------


def test_4bit_inference_on_odd_layer_sizes_falls_back_instead_of_crashing(odd_llama):
    tok = load_tokenizer(str(odd_llama))
    model = load_base(str(odd_llama), "4bit", device="cpu", training=False)
    slow = [m for _, m in linear4bit_modules(model) if m.support_avx512bf16_for_cpu is False]
    assert slow and all(m.out_features == 176 or m.in_features == 176 for m in slow)
    model.eval()
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        lp = response_logprobs(model, ids, mask).logprobs
        out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.isfinite(lp).all() and out.shape[1] == 7


def test_without_the_guard_bitsandbytes_breaks_on_odd_sizes(odd_llama):
    """The failure the guard exists for (if this starts passing, bitsandbytes fixed it)."""
    model = load_base(str(odd_llama), "4bit", device="cpu", training=False)
    for _, m in linear4bit_modules(model):
        m.support_avx512bf16_for_cpu = True
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for _, m in linear4bit_modules(model)):
        pytest.skip("no AVX512-BF16 kernel here")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu  # noqa: F401
    import bitsandbytes.nn.modules as bnb_modules

    if not bnb_modules.has_avx512bf16():
        pytest.skip("CPU without AVX512-BF16: bitsandbytes never switches kernels here")
    model.eval()
    with pytest.raises(Exception), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_4bit_training_after_an_eval_pass_keeps_gradients(llama):
    """bitsandbytes repacks 4-bit weights in eval/no-grad on CPU; the repacked kernel has no
    backward. A model we train must give the same gradients whether or not it ran eval first."""
    tok = load_tokenizer(str(llama))
    ids, mask = batch(tok, TEXTS)

    def grads(eval_first: bool):
        torch.manual_seed(0)
        model = attach_adapter(load_base(str(llama), "4bit", device="cpu", training=True),
                               make_peft_config("lora", r=4))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, 0, 0.05)
        if eval_first:
            model.eval()
            with torch.no_grad():
                response_logprobs(model, ids, mask)
            model.train()
        response_logprobs(model, ids, mask).logprobs.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], atol=1e-5, rtol=1e-4)


def test_guard_marks_every_layer_of_a_training_model(llama):
    model = load_base(str(llama), "4bit", device="cpu", training=False)
    assert guard_cpu_4bit(model, training=True) == []
    assert all(m.support_avx512bf16_for_cpu is False for _, m in linear4bit_modules(model))


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])  # gpt2: Conv1D weights, stored transposed
def test_a_random_nf4_checkpoint_loads_like_its_16bit_twin_quantized_at_load(tmp_path, arch):
    from pocketrlhf.models.random_init import write_random_checkpoint
    from pocketrlhf.models.tiny import tiny_config

    config = tiny_config(arch, vocab_size=128, hidden_size=128, layers=2, heads=4)
    twin = load_base(str(write_random_checkpoint(config, tmp_path / "bf16", quantization="none", seed=3)),
                     quantization="4bit", device="cpu")
    direct = load_base(str(write_random_checkpoint(config, tmp_path / "nf4", quantization="4bit", seed=3)),
                       quantization="4bit", device="cpu")
    assert len(list((tmp_path / "nf4").glob("*.safetensors"))) == 3  # one shard per layer, one for the rest
    assert len(linear4bit_modules(direct)) == len(linear4bit_modules(twin)) > 0
    # A bf16 pre-quantized checkpoint loaded in fp32 (the CPU default): its norms and embeddings follow
    # dtype= like its biases (transformers alone left them bf16 and the first layer norm failed).
    assert {p.dtype for p in direct.parameters() if p.is_floating_point()} == {torch.float32}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, twin(ids).logits)
        # Stored quantized: loaded 4-bit whatever --quantization says (and guarded as 4-bit on the CPU).
        asked_none = load_base(str(tmp_path / "nf4"), quantization="none", device="cpu")
        assert len(linear4bit_modules(asked_none)) == len(linear4bit_modules(direct))
        assert torch.equal(asked_none(ids).logits, twin(ids).logits)
        other = write_random_checkpoint(config, tmp_path / "seed4", quantization="4bit", seed=4)
        assert not torch.equal(load_base(str(other), quantization="4bit", device="cpu")(ids).logits, twin(ids).logits)


def test_random_checkpoint_refuses_an_unknown_quantization(tmp_path):
    from pocketrlhf.models.random_init import write_random_checkpoint
    from pocketrlhf.models.tiny import tiny_config

    with pytest.raises(ValueError, match="unknown quantization '8bit' \\(none or 4bit\\)"):
        write_random_checkpoint(tiny_config("llama", vocab_size=64), tmp_path / "m", quantization="8bit")


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_an_encoder_decoder_base_loads_as_seq2seq(tiny_t5, quantization):
    """A T5-family base (as flan-t5: gated-gelu) loads with AutoModelForSeq2SeqLM in every precision,
    its ``wo`` projections left in fp32 and unquantized as transformers keeps them, and LoRA adapts
    encoder and decoder with peft's seq2seq task type."""
    import peft
    from transformers import AutoModelForSeq2SeqLM

    from pocketrlhf.models.loading import is_seq2seq

    model = load_base(str(tiny_t5), quantization, device="cpu")
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert is_seq2seq(model) and is_seq2seq(str(tiny_t5)) and is_seq2seq(model.config)
    wo = dict(model.named_modules())["decoder.block.0.layer.2.DenseReluDense.wo"]
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32
    quantized = [type(m).__name__ for n, m in model.named_modules() if n.endswith("DenseReluDense.wi_0")]
    assert set(quantized) == {{"none": "Linear", "8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]}
    ids = torch.tensor([[5, 6, 7, 0]])
    labels = torch.tensor([[8, 9, 0]])
    loss = model(input_ids=ids, labels=labels).loss
    reference = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_t5), dtype=torch.float32)(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < (1e-5 if quantization == "none" else 0.2)
    wrapped = attach_adapter(model, make_peft_config("lora", r=4))
    assert isinstance(wrapped, peft.PeftModelForSeq2SeqLM) and is_seq2seq(wrapped)
    adapted = {n.split(".")[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert any(n.startswith("base_model.model.encoder.") and hasattr(m, "lora_A") for n, m in wrapped.named_modules())


def test_a_causal_base_is_not_seq2seq(llama, tiny_bart):
    from pocketrlhf.models.loading import is_seq2seq

    assert not is_seq2seq(str(llama)) and not is_seq2seq(load_base(str(llama), device="cpu"))
    assert is_seq2seq(str(tiny_bart)) and type(load_base(str(tiny_bart), device="cpu")).__name__ == "BartForConditionalGeneration"


def test_virtual_token_adapters_are_refused_on_an_encoder_decoder(tiny_t5):
    from pocketrlhf.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="prompt_tuning is not supported on an encoder-decoder base"):
        attach_adapter(load_base(str(tiny_t5), device="cpu"), make_peft_config("prompt_tuning", num_virtual_tokens=4))
