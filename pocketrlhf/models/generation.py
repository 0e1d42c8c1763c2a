"""Batched sampling from a (peft) causal LM: left-padded prompts, explicit sampling settings.
An encoder-decoder (``models.loading.is_seq2seq``) gets its prompts right-padded as encoder input
(its positions then start at 0 whatever the padding) and answers with decoder tokens, returned
without the decoder start token: the same response ids as a causal LM's.

transformers fills every generation field we leave unset from the model folder's
generation_config.json (``min_new_tokens``, ``no_repeat_ngram_size``, ``suppress_tokens``,
``bad_words_ids``, ``min_p``, ...). While generating, the model's defaults are therefore replaced
by a clean config that keeps only the special token ids, so what is sampled depends on the
settings passed here and nothing else: RL rollouts are pure samples of softmax(logits / T), the
distribution their log-probs are recomputed from, and chat/serve do what their settings say.

Seeded rollouts (``row_seeds``) of decoder-only models skip ``generate`` for ``seeded_decode``:
the same samples, in a loop that drops finished answers from the batch and its KV cache.
"""

from __future__ import annotations

import contextlib

import torch

from pocketrlhf.data.tokenize import left_pad, right_pad
from pocketrlhf.models.forward import is_seq2seq_model, unwrap


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
    _, lm = unwrap(model)
    start = {}
    if is_seq2seq_model(lm):
        from pocketrlhf.models.forward import decoder_start_id

        start = {"decoder_start_token_id": decoder_start_id(lm)}
    return GenerationConfig(
        **start,
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


# The folder's generation fields that are kept: they name tokens, they do not shape the distribution.
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def folder_generation_settings(model) -> dict:
    """The model folder's generation settings that generation here ignores (to tell the user)."""
    _, lm = unwrap(model)
    folder = getattr(lm, "generation_config", None)
    if folder is None:
        return {}
    return {k: v for k, v in folder.to_diff_dict().items() if k not in _TOKEN_FIELDS and k != "transformers_version"}


@contextlib.contextmanager
def inference_mode(model):
    """Generation as asked and nothing else: eval mode, KV cache on despite gradient checkpointing,
    and the model folder's generation defaults swapped for clean ones; all restored afterwards."""
    from transformers import GenerationConfig

    was_training = model.training
    _, lm = unwrap(model)
    use_cache = lm.config.use_cache
    folder = lm.generation_config
    lm.generation_config = GenerationConfig(**{k: getattr(folder, k) for k in _TOKEN_FIELDS
                                               if getattr(folder, k, None) is not None})
    model.eval()
    lm.config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        lm.config.use_cache = use_cache
        lm.generation_config = folder
        model.train(was_training)


def truncate_after_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS, and whether an EOS was found."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seeds: torch.Tensor, counter: int, width: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), [len(seeds), width]: SplitMix64 of (seed, counter, column), a
    counter-based generator computed in one shot on the seeds' device (int64 arithmetic wraps)."""
    columns = torch.arange(width, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] * _GOLDEN + (counter * width + columns)[None, :] * _MIX2 + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * 2.0 ** -53


def gumbel_noise(seeds: torch.Tensor, step: int, width: int) -> torch.Tensor:
    """Gumbel noise [len(seeds), width] for decoding step ``step``, a function of (seed, step) alone."""
    return -torch.log(-torch.log(counter_uniform(seeds, step, width))).float()


class SeededSampling:
    """Pure sampling at temperature T as argmax(logits / T + Gumbel noise) (the Gumbel-max trick:
    an exact sample of softmax(logits / T)), the noise of row i at decoding step t being a function
    of (seed_i, t) alone. A row's answer then depends on its seed only, not on which prompts share
    its batch or its process: rollouts are the same on 1 or N processes and for any generation
    batch size. The noise is made on the model's device, all rows at once."""

    def __init__(self, seeds: list[int], temperature: float):
        self.seeds = torch.tensor([int(s) for s in seeds], dtype=torch.int64)
        self.temperature = temperature
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gumbel = gumbel_noise(self.seeds.to(scores.device), self.step, scores.shape[-1])
        self.step += 1
        return scores.float() / self.temperature + gumbel


def _decode_arguments(lm) -> dict[str, str] | None:
    """The names ``seeded_decode`` passes to a decoder-only model's forward (the KV cache kwarg was
    renamed in transformers 5: ``cache``, before ``past_key_values``), or None to leave the model to
    ``generate``."""
    cached = getattr(lm, "_pocketrlhf_decode_arguments", False)
    if cached is not False:
        return cached
    import inspect

    names = set(inspect.signature(lm.forward).parameters)
    cache = "cache" if "cache" in names else "past_key_values" if "past_key_values" in names else None
    ok = (not getattr(lm.config, "is_encoder_decoder", False) and cache is not None
          and {"position_ids", "logits_to_keep", "use_cache"} <= names)
    found = {"cache": cache} if ok else None
    lm._pocketrlhf_decode_arguments = found  # type: ignore[attr-defined]
    return found


def _can_decode_here(model) -> dict[str, str] | None:
    peft_model, lm = unwrap(model)
    if peft_model is not None and any(c.is_prompt_learning for c in peft_model.peft_config.values()):
        return None  # virtual tokens are added by PeftModel.forward, which generate goes through
    return _decode_arguments(lm)


@torch.no_grad()
def seeded_decode(model, ids: torch.Tensor, attn: torch.Tensor, seeds: list[int], temperature: float,
                  max_new_tokens: int, eos_ids: set[int], names: dict[str, str],
                  prompt_of: torch.Tensor | None = None) -> list[list[int]]:
    """What ``generate`` with ``SeededSampling`` samples (the same forward calls, positions,
    cache and Gumbel noise per row), in a plain loop that drops finished rows from the batch and
    the KV cache: a rollout batch runs as long as its longest answer, and after most answers end
    the remaining steps cost only their own rows (generate computes every row to the end, and
    pays its per-call and per-step set-up). Responses are cut after the first EOS.

    ``prompt_of`` (one entry per answer, an index into the rows of ``ids``): answers that share a
    prompt (GRPO's G completions) get it computed once, its KV cache and next-token logits then
    copied to each of them; without it answer i answers prompt row i."""
    _, lm = unwrap(model)
    rows = ids.shape[0] if prompt_of is None else prompt_of.shape[0]
    seeds_t = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=ids.device)
    eos = torch.tensor(sorted(eos_ids), device=ids.device)
    position = attn.long().cumsum(-1) - 1
    position = position.masked_fill(attn == 0, 0)  # generate's positions for left-padded prompts
    active = torch.arange(rows, device=ids.device)
    out: list[list[int]] = [[] for _ in range(rows)]
    cache_key = names["cache"]
    kwargs = {"input_ids": ids, "attention_mask": attn, "position_ids": position, "use_cache": True,
              "logits_to_keep": 1}
    last = position[:, -1]
    live = torch.ones(rows, dtype=torch.bool, device=ids.device)  # rows of the batch still answering
    for step in range(max_new_tokens):
        output = lm(**kwargs)
        cache = output[cache_key] if cache_key in output else output.get("past_key_values")
        if cache is None:
            raise RuntimeError(f"{type(lm).__name__} returned no KV cache")
        logits = output.logits[:, -1].to(copy=True, dtype=torch.float32)
        del output
        if step == 0 and prompt_of is not None:  # each prompt computed once: its cache and logits to every answer
            if not hasattr(cache, "batch_select_indices"):
                return seeded_decode(model, ids[prompt_of], attn[prompt_of], seeds, temperature, max_new_tokens,
                                     eos_ids, names)
            cache.batch_select_indices(prompt_of)
            logits, attn, last = logits[prompt_of], attn[prompt_of], last[prompt_of]
        tokens = (logits / temperature + gumbel_noise(seeds_t[active], step, logits.shape[-1])).argmax(-1)
        for row, token, on in zip(active.tolist(), tokens.tolist(), live.tolist()):
            if on:
                out[row].append(token)
        going = live & ~torch.isin(tokens, eos)
        if step + 1 == max_new_tokens or not bool(going.any()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        last = last + 1
        if not bool(going.all()):
            if hasattr(cache, "batch_select_indices"):  # finished rows leave the batch and the cache
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, tokens, attn, last, going = active[keep], tokens[keep], attn[keep], last[keep], going[keep]
            live = going  # else they run on (as in generate), their tokens ignored
        kwargs = {"input_ids": tokens[:, None], "attention_mask": attn, "position_ids": last[:, None],
                  cache_key: cache, "use_cache": True, "logits_to_keep": 1}
    return out


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Each distinct prompt once (in order of first appearance), and for every prompt the index
    of its copy there."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    return [list(p) for p in first], torch.tensor(index, dtype=torch.long)


def row_seed(*parts: int) -> int:
    """A seed from integers (run seed, step, position, ...), for SeededSampling."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (1 << 62)
    return h


def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, batch_size: int = 64, stop_token_ids: list[int] | None = None,
           streamer=None, row_seeds: list[int] | None = None, synced: bool = False, **extra) -> list[list[int]]:
    """Responses (token ids, cut after the first EOS or stop token) for each prompt.

    With ``row_seeds`` (pure sampling only: temperature > 0, no top-k/top-p), prompt i is answered
    from its own random stream ``row_seeds[i]``; otherwise from torch's global generator.

    ``synced`` (a model sharded over processes, FSDP): every forward gathers weights with the
    other processes, so each process keeps stepping until all of them are done (transformers'
    ``synced_gpus``: one all-reduce of a done flag per token); the caller makes every process
    call this with the same number of batches."""
    from transformers import LogitsProcessorList

    _, lm = unwrap(model)
    device = lm.get_input_embeddings().weight.device
    seeded = row_seeds is not None
    if seeded and (temperature <= 0 or top_k or top_p < 1.0 or extra):
        raise ValueError("row_seeds sample from the full tempered distribution: no top-k/top-p/other settings")
    cfg = generation_config(tokenizer, model, max_new_tokens, 0.0 if seeded else temperature, top_p, top_k,
                            stop_token_ids=stop_token_ids, **extra)
    eos_ids = set(cfg.eos_token_id)
    seq2seq = is_seq2seq_model(lm)
    out: list[list[int]] = []
    # seeded_decode drops finished rows, so processes of a sharded model would stop gathering weights at
    # different steps: synced runs keep generate's lockstep.
    names = _can_decode_here(model) if seeded and streamer is None and not synced else None
    with inference_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            if names is not None:
                unique, prompt_of = distinct_prompts(chunk)
                ids, attn = left_pad(unique, cfg.pad_token_id)
                out += seeded_decode(model, ids.to(device), attn.to(device), row_seeds[start:start + batch_size],
                                     temperature, max_new_tokens, eos_ids, names,
                                     None if len(unique) == len(chunk) else prompt_of.to(device))
                continue
            ids, attn = (right_pad if seq2seq else left_pad)(chunk, cfg.pad_token_id)
            processors = LogitsProcessorList(
                [SeededSampling(row_seeds[start:start + batch_size], temperature)] if seeded else [])
            generated = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                       generation_config=cfg, streamer=streamer, logits_processor=processors,
                                       synced_gpus=synced)
            # A causal LM returns prompt + answer, an encoder-decoder decoder start + answer.
            for row in generated[:, 1 if seq2seq else ids.shape[1]:].tolist():
                out.append(truncate_after_eos(row, eos_ids)[0])
    return out
