"""Tiny random-init models with a BPE tokenizer trained on the fly, saved like any HF model.

Used by the tests and the demo: they then go through the REAL loading code (safetensors,
quantization, peft), exactly as a user's model would. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHATML = ["<|im_start|>", "<|im_end|>"]

# Sizes are multiples of 64 so that bitsandbytes' CPU 4-bit inference kernel can run them.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "gpt_neox": dict(model_type="gpt_neox"),
    "gpt2": dict(model_type="gpt2"),
}

# Encoder-decoder bases (``is_seq2seq``): T5 as flan-t5 (gated-gelu, untied output layer, which
# also means no d_model**-0.5 rescaling of the decoder output) and BART (learned positions, tied
# output layer with a final_logits_bias).
SEQ2SEQ_ARCHITECTURES: dict[str, dict] = {
    "t5": dict(model_type="t5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "bart": dict(model_type="bart"),
}

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog . a good movie with a great story and wonderful actors . "
    "a bad film , boring and awful , with terrible acting . Question : what is this ? Answer : it is a test . "
    "def add ( a , b ) : return a + b # python code 0 1 2 3 4 5 6 7 8 9 ! ? : ; ' \" ( ) [ ] { } < > = + - * / "
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, pad_token: bool = True, chatml: bool = True,
                    eos_after_text: bool = False):
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens). ``eos_after_text``: text
    encoded with special tokens ends with EOS, as T5's and BART's tokenizers end the encoder input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS] + ([PAD] if pad_token else []) + (CHATML if chatml else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + [DEFAULT_CORPUS], trainer=trainer)
    if eos_after_text:
        eos = (EOS, tok.token_to_id(EOS))
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                           special_tokens=[eos])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD if pad_token else None,
        additional_special_tokens=CHATML if chatml else [],
    )
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                intermediate_size: int | None = None, max_positions: int = 512, eos_token_id: int = 0,
                pad_token_id: int | None = None):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES and arch not in SEQ2SEQ_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture '{arch}' (one of {', '.join([*ARCHITECTURES, *SEQ2SEQ_ARCHITECTURES])})")
    spec = dict(ARCHITECTURES.get(arch) or SEQ2SEQ_ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    inter = intermediate_size or 2 * hidden_size
    ids = dict(eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if model_type == "t5":
        # T5 starts the decoder with the pad token; every dropout off as in the causal configs.
        kw = dict(d_model=hidden_size, d_kv=hidden_size // heads, d_ff=inter, num_layers=layers, num_heads=heads,
                  dropout_rate=0.0, decoder_start_token_id=pad_token_id)
        ids.pop("bos_token_id")
    elif model_type == "bart":
        # BART starts the decoder with EOS.
        kw = dict(d_model=hidden_size, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                  decoder_attention_heads=heads, encoder_ffn_dim=inter, decoder_ffn_dim=inter,
                  max_position_embeddings=max_positions, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  decoder_start_token_id=eos_token_id, forced_eos_token_id=None)
    elif model_type == "gpt2":
        kw = dict(n_embd=hidden_size, n_layer=layers, n_head=heads, n_inner=inter, n_positions=max_positions,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif model_type == "gpt_neox":
        kw = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    else:
        kw = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, tie_word_embeddings=False)
    spec.update(kw)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **ids, **spec)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    pad_token: bool = True,
    chat_template: str | None = None,
    output_scale: float = 10.0,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and tokenizer files for a random tiny model
    (``arch`` from ARCHITECTURES, or SEQ2SEQ_ARCHITECTURES for an encoder-decoder)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq2seq = arch in SEQ2SEQ_ARCHITECTURES
    tok = train_tokenizer(texts, vocab_size=vocab_size, pad_token=pad_token or seq2seq, eos_after_text=seq2seq)
    if chat_template:
        tok.chat_template = chat_template
    cfg = tiny_config(arch, vocab_size=len(tok), hidden_size=hidden_size, layers=layers, heads=heads,
                      intermediate_size=intermediate_size, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # With HF's init (std 0.02) behind the final norm, a frozen random output layer caps every
        # logit near +-2.5: no adapter could then make the model confident. Real pretrained
        # models have large output weights; so do ours. (T5 starts from std 1, BART ties it to its
        # input embeddings: both get the causal models' std 0.02 * output_scale.)
        if seq2seq:
            model.get_output_embeddings().weight.normal_(0.0, 0.02 * output_scale)
        else:
            model.get_output_embeddings().weight.mul_(output_scale)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "pocketrlhf_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out


def pretrain_tiny_model(model_dir: str | Path, texts: list[str], steps: int = 200, seq_length: int = 64,
                        batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0) -> Path:
    """Full-weight language-model training of a tiny model on ``texts`` (packed, EOS-separated),
    saved in place: a stand-in for the pretrained base a user starts from. Seconds on a CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if json.loads((model_dir / "config.json").read_text()).get("is_encoder_decoder"):
        raise ValueError("pretrain_tiny_model trains causal models only")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]
    n = len(ids) // seq_length
    if n == 0:
        raise ValueError("not enough text to pretrain on")
    data = torch.tensor(ids[: n * seq_length]).view(n, seq_length)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, n, (batch_size,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return model_dir
