"""Batched sampling from a (peft) causal LM: left-padded prompts, explicit sampling settings.

Every sampling setting is passed explicitly, so a model repo's generation_config.json (top_k=50,
repetition_penalty, ...) never changes what an RL rollout samples from: rollouts must be pure
sampling at temperature T (spec 4.9), or log-probs recomputed by a forward pass would not match
the distribution the tokens came from.
"""

from __future__ import annotations

import contextlib

import torch

from pocketrlhf.data.tokenize import left_pad
from pocketrlhf.models.forward import unwrap


def safe_pad_id(model, tokenizer) -> int:
    """A pad id inside the embedding matrix (ours may lie beyond it), for generate's filler."""
    _, lm = unwrap(model)
    vocab = lm.get_input_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id
    return pad if pad is not None and pad < vocab else tokenizer.eos_token_id


def generation_config(tokenizer, model, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, min_p: float | None = None, repetition_penalty: float = 1.0,
                      stop_token_ids: list[int] | None = None):
    from transformers import GenerationConfig

    sample = temperature > 0
    eos = [tokenizer.eos_token_id] + [t for t in (stop_token_ids or []) if t != tokenizer.eos_token_id]
    return GenerationConfig(
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=top_k if sample else None,
        top_p=top_p if sample else 1.0,
        min_p=min_p if sample else None,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=safe_pad_id(model, tokenizer),
        use_cache=True,
    )


@contextlib.contextmanager
def inference_mode(model):
    """Eval mode (KV cache on despite gradient checkpointing), restored afterwards."""
    was_training = model.training
    _, lm = unwrap(model)
    use_cache = lm.config.use_cache
    model.eval()
    lm.config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        lm.config.use_cache = use_cache
        model.train(was_training)


def truncate_after_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS, and whether an EOS was found."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


class SeededSampling:
    """Pure sampling at temperature T as argmax(logits / T + Gumbel noise) (the Gumbel-max trick:
    an exact sample of softmax(logits / T)), each row's noise drawn from its own generator. A
    row's answer then depends on its seed alone, not on which prompts share its batch or its
    process: rollouts are the same on 1 or N processes and for any generation batch size."""

    def __init__(self, seeds: list[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
        return scores.float() / self.temperature + gumbel.to(scores.device)


def row_seed(*parts: int) -> int:
    """A seed from integers (run seed, step, position, ...), for SeededSampling."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (1 << 62)
    return h


def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, batch_size: int = 64, stop_token_ids: list[int] | None = None,
           streamer=None, row_seeds: list[int] | None = None, **extra) -> list[list[int]]:
    """Responses (token ids, cut after the first EOS or stop token) for each prompt.

    With ``row_seeds`` (pure sampling only: temperature > 0, no top-k/top-p), prompt i is answered
    from its own random stream ``row_seeds[i]``; otherwise from torch's global generator."""
    from transformers import LogitsProcessorList

    _, lm = unwrap(model)
    device = lm.get_input_embeddings().weight.device
    seeded = row_seeds is not None
    if seeded and (temperature <= 0 or top_k or top_p < 1.0 or extra):
        raise ValueError("row_seeds sample from the full tempered distribution: no top-k/top-p/other settings")
    cfg = generation_config(tokenizer, model, max_new_tokens, 0.0 if seeded else temperature, top_p, top_k,
                            stop_token_ids=stop_token_ids, **extra)
    eos_ids = set(cfg.eos_token_id)
    out: list[list[int]] = []
    with inference_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            ids, attn = left_pad(chunk, cfg.pad_token_id)
            processors = LogitsProcessorList(
                [SeededSampling(row_seeds[start:start + batch_size], temperature)] if seeded else [])
            generated = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                       generation_config=cfg, streamer=streamer, logits_processor=processors)
            for row in generated[:, ids.shape[1]:].tolist():
                out.append(truncate_after_eos(row, eos_ids)[0])
    return out
