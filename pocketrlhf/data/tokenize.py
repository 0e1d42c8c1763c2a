"""Token-level data: prompt/completion tokenization, packing, and right-padded batches.

Prompt and completion are tokenized separately and concatenated, exactly as at generation time
(the prompt alone, then the model's tokens), so the seam between them looks the same in SFT,
RM, DPO and PPO. Every completion ends with the EOS token id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pocketrlhf.data.formats import Skipped, TextPair
from pocketrlhf.errors import DataError


@dataclass
class TokenExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on (its log-prob counts)


def encode(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids; ``special`` adds the tokenizer's BOS, unless the text (a rendered chat
    template, say) already starts with it."""
    if not text:
        return []
    if special and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        special = False
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_pair(tokenizer, prompt: str, completion: str, completion_only: bool) -> TokenExample:
    """``[BOS] prompt completion EOS``; the loss covers the completion (+EOS) or, if not
    ``completion_only``, every token."""
    prompt_ids = encode(tokenizer, prompt, special=True)
    completion_ids = encode(tokenizer, completion, special=not prompt_ids) + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    mask = ([0] * len(prompt_ids) if completion_only else [1] * len(prompt_ids)) + [1] * len(completion_ids)
    return TokenExample(ids, mask)


def tokenize_sft(tokenizer, pairs: list[TextPair], completion_only: bool, max_length: int | None,
                 skipped: Skipped) -> list[TokenExample]:
    out = []
    truncated = 0
    for pair in pairs:
        ex = tokenize_pair(tokenizer, pair.prompt, pair.completion, completion_only)
        if max_length and len(ex.input_ids) > max_length:
            truncated += 1
            ex = TokenExample(ex.input_ids[:max_length], ex.loss_mask[:max_length])
        if sum(ex.loss_mask[1:]) == 0:
            skipped.add("rows with no trainable token after truncation")
            continue
        out.append(ex)
    if truncated:
        skipped.counts["rows truncated to max_length (kept)"] += truncated
    return out


def pack(examples: list[TokenExample], seq_length: int, seed: int) -> list[TokenExample]:
    """StackLLaMA packing: shuffle, concatenate (each example already ends with EOS), cut into
    chunks of exactly ``seq_length`` and drop the incomplete tail."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    mask: list[int] = []
    for i in order:
        ids.extend(examples[i].input_ids)
        mask.extend(examples[i].loss_mask)
    n = len(ids) // seq_length
    if n == 0:
        raise DataError(f"not enough tokens for one packed sequence of {seq_length} (the data has {len(ids)}); "
                         "lower --seq-length or add data")
    return [TokenExample(ids[k * seq_length:(k + 1) * seq_length], mask[k * seq_length:(k + 1) * seq_length])
            for k in range(n)]


def collate(examples: list[TokenExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attn[row, :n] = 1
        loss[row, :n] = torch.tensor(e.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, for generation (every row ends at the same column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[row, width - len(s):] = 1
    return ids, attn


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (an encoder's input, for generation from an encoder-decoder)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[row, :len(s)] = 1
    return ids, attn


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens, ending with EOS
    rejected_ids: list[int]


def tokenize_preferences(tokenizer, pairs, max_length: int | None, skipped: Skipped) -> list[PreferenceExample]:
    """Prompt and both answers tokenized separately (as at generation time), EOS after each answer.

    A pair longer than ``max_length`` loses prompt tokens from the left (the end of the prompt,
    next to the answer, is kept); a pair whose answer alone does not fit is skipped and counted.
    """
    out = []
    cut = 0
    for pair in pairs:
        prompt = encode(tokenizer, pair.prompt, special=True)
        chosen = encode(tokenizer, pair.chosen, special=not prompt) + [tokenizer.eos_token_id]
        rejected = encode(tokenizer, pair.rejected, special=not prompt) + [tokenizer.eos_token_id]
        if max_length:
            longest = max(len(chosen), len(rejected))
            if longest >= max_length:
                skipped.add("pairs with an answer longer than max_length")
                continue
            if len(prompt) + longest > max_length:
                prompt = prompt[len(prompt) + longest - max_length:]
                cut += 1
        out.append(PreferenceExample(prompt, chosen, rejected))
    if cut:
        skipped.counts["pairs whose prompt was cut from the left to fit max_length (kept)"] += cut
    return out


def collate_preferences(examples: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.
    ``response_mask`` is 1 on answer tokens (EOS included)."""
    seqs = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (p, a) in enumerate(seqs):
        ids[row, :len(p) + len(a)] = torch.tensor(p + a)
        attn[row, :len(p) + len(a)] = 1
        response[row, len(p):len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": response}


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def collate_shared_prompt(examples: list[PreferenceExample], width: int) -> dict[str, torch.Tensor]:
    """Each pair as one row: prompt, chosen, rejected. ``shared_index`` maps every position of the
    two-row layout of ``collate_preferences`` (``width`` columns) to its place in these rows."""
    n = len(examples)
    length = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    ids = torch.zeros((n, length), dtype=torch.long)  # 0, not the pad id: every id reaches the model
    segments = torch.full((n, length), PAD, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    index = torch.zeros((2 * n, width), dtype=torch.long)
    for b, e in enumerate(examples):
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        ids[b, :p + c + r] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
        segments[b, :p], segments[b, p:p + c], segments[b, p + c:p + c + r] = PROMPT, CHOSEN, REJECTED
        positions[b, :p + c] = torch.arange(p + c)
        positions[b, p + c:p + c + r] = torch.arange(p, p + r)  # as if it followed the prompt directly
        index[b, :p + c] = b * length + torch.arange(p + c)
        index[n + b, :p] = b * length + torch.arange(p)
        index[n + b, p:p + r] = b * length + p + c + torch.arange(r)
    return {"shared_ids": ids, "shared_segments": segments, "shared_positions": positions, "shared_index": index}
