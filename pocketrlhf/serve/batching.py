"""Continuous batching: the requests in flight decode together, one token each per forward pass.

Requests join between steps (their prompts are prefilled as a small batch of their own, then
their KV cache is merged into the running one) and leave as soon as they end (EOS, a stop string,
their token limit, cancellation), so a short reply never waits for a long one. Each row names its
adapter: a peft LoRA model answers a batch mixing adapters (and the base, ``__base__``) in ONE
forward pass (peft's mixed-adapter path, ``adapter_names``), the base weights being read once for
all rows; a batch of one adapter just makes it the active one, which costs nothing per layer.

Rows are left-padded to a common length; a padded column is masked out of attention and each
row's position ids count only its own tokens, so a row's tokens do not depend on its neighbours.
Sampling is per row (temperature, top-k, top-p, min-p, repetition penalty, and a row's own
``torch.Generator`` when the request has a seed).

An encoder-decoder (T5, BART) batches the same way on its decoder: each request's prompt goes
through the encoder once, alone, when it is admitted (under its own adapter: a LoRA on the encoder
changes the encoder output), and its first decoder step (the start token) computes the
cross-attention keys and values, kept in the cross-attention half of transformers'
EncoderDecoderCache as ``generate`` keeps them. The running batch holds every row's encoder
states and cross-attention keys/values right-padded to the longest encoder input, with an encoder
mask; the decoder's self-attention cache grows and is left-padded like a causal LM's. T5's
relative position bias depends on distances only, so left padding leaves it as it is; BART's
learned decoder positions are computed from the cache length, the same for every row, so each
row's own position is put in instead (``DecoderPositions``).

Only what transformers' DynamicCache keeps as plain growing key/value tensors can be merged and
split like this; other caches (sliding windows, recurrent states), encoder-decoders whose
decoder positions cannot be set per row, and non-LoRA adapters are served one request at a time
by ``generate`` instead (``batchable`` says which).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


def batchable(model) -> str:
    """Why this model cannot be batched here ("" when it can)."""
    import peft

    from pocketrlhf.models.forward import unwrap

    _, lm = unwrap(model)
    cfg = lm.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "a sliding-window attention cache"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return "a cache mixing attention kinds"
    if getattr(cfg, "is_encoder_decoder", False) and not decoder_positions(lm):
        return f"an encoder-decoder model ({getattr(cfg, 'model_type', '?')}) whose decoder positions cannot be set per row"
    if isinstance(model, peft.PeftModel):
        kinds = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in model.peft_config.values()}
        if kinds - {"LORA"}:
            return f"{', '.join(sorted(kinds))} adapters (mixed-adapter batches need LoRA)"
    return ""


def decoder_positions(lm) -> str:
    """How an encoder-decoder's decoder knows where a token is: "relative" (T5's bias over distances:
    left padding changes nothing), "learned" (BART-style absolute embeddings with an index offset,
    set per row by ``DecoderPositions``), or "" (another scheme: not batched here)."""
    if getattr(lm.config, "model_type", "") in ("t5", "mt5"):
        return "relative"
    embed = getattr(lm.get_decoder(), "embed_positions", None)
    # BART, mBART, PLBart, MVP: an Embedding looked up at position + offset. (Sinusoidal tables, as
    # Marian's and Pegasus's, are Embeddings too but take no offset; M2M100's counts past padding.)
    if (isinstance(embed, torch.nn.Embedding) and type(embed).__name__.endswith("LearnedPositionalEmbedding")
            and isinstance(getattr(embed, "offset", None), int)):
        return "learned"
    return ""


class DecoderPositions:
    """Each row's own decoder position for a BART-style decoder, which otherwise numbers the new
    token by the cache length (the same for every row, padding included)."""

    def __init__(self, lm):
        self.embed = lm.get_decoder().embed_positions if decoder_positions(lm) == "learned" else None

    @contextlib.contextmanager
    def use(self, positions: torch.Tensor):
        """``positions`` [rows, tokens]: the decoder's position ids for this forward pass."""
        if self.embed is None:
            yield
            return
        embed = self.embed

        def own_positions(module, args, output):
            return torch.nn.Embedding.forward(module, positions.to(output.device) + embed.offset)

        handle = embed.register_forward_hook(own_positions)
        try:
            yield
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Sampling one row.


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_k: int, top_p: float,
               min_p: float, repetition_penalty: float, generator: torch.Generator | None) -> int:
    """The next token of one row from its last logits [vocab]; ``seen`` holds the ids the
    repetition penalty applies to (prompt and reply so far)."""
    x = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        seen = seen.to(x.device)
        scores = x[seen]
        x = x.clone()
        x[seen] = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
    if temperature <= 0:
        return int(torch.argmax(x))
    x = x / temperature
    if top_k > 0 and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(x, descending=True)
        probs = torch.softmax(ordered, -1)
        # Drop a token once the ones ranked above it already hold top_p (the first always stays).
        drop = (torch.cumsum(probs, -1) - probs) > top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < min_p * probs.max(), float("-inf"))
    probs = torch.softmax(x, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# The batch: rows, their attention mask and the shared KV cache.


@dataclasses.dataclass
class Row:
    """One request being decoded: ``last`` is its newest token, not yet in the cache."""

    job: Any  # engine._Job
    decoder: Any  # engine._Decoder
    adapter: str
    max_new: int
    generator: torch.Generator | None
    seen: torch.Tensor | None  # ids for the repetition penalty (None: no penalty)
    last: int = -1
    generated: int = 0


def _pad_left(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _pad_right(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _merge(mine: torch.Tensor, theirs: torch.Tensor, dim: int, pad) -> torch.Tensor:
    """Two row blocks stacked along dim 0, the shorter padded along ``dim`` (by ``pad``) to the longer."""
    width = max(mine.shape[dim], theirs.shape[dim])
    return torch.cat([pad(mine, width - mine.shape[dim], dim), pad(theirs, width - theirs.shape[dim], dim)], dim=0)


class Batch:
    """The running rows with one DynamicCache (an EncoderDecoderCache for an encoder-decoder):
    ``add`` merges prefilled rows in, ``keep`` drops finished ones, ``trim`` drops columns no row
    uses any more (leading ones of the left-padded self-attention cache, trailing ones of the
    right-padded encoder states)."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns]
        self.encoder: torch.Tensor | None = None  # encoder-decoder: [rows, encoder columns, d_model]
        self.encoder_mask: torch.Tensor | None = None  # [rows, encoder columns]

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _layers(cache) -> list:
        """The self-attention layers (the only ones of a decoder-only model's cache)."""
        return list(getattr(cache, "self_attention_cache", cache).layers)

    @staticmethod
    def _cross_layers(cache) -> list:
        cross = getattr(cache, "cross_attention_cache", None)
        return list(cross.layers) if cross is not None else []

    def add(self, rows: list[Row], cache, mask: torch.Tensor, encoder: torch.Tensor | None = None,
            encoder_mask: torch.Tensor | None = None) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            self.encoder, self.encoder_mask = encoder, encoder_mask
            return
        for mine, theirs in zip(self._layers(self.cache), self._layers(cache)):
            for attr in ("keys", "values"):
                setattr(mine, attr, _merge(getattr(mine, attr), getattr(theirs, attr), 2, _pad_left))
        for mine, theirs in zip(self._cross_layers(self.cache), self._cross_layers(cache)):
            for attr in ("keys", "values"):
                setattr(mine, attr, _merge(getattr(mine, attr), getattr(theirs, attr), 2, _pad_right))
        self.mask = _merge(self.mask, mask, 1, _pad_left)
        if self.encoder is not None:
            self.encoder = _merge(self.encoder, encoder, 1, _pad_right)
            self.encoder_mask = _merge(self.encoder_mask, encoder_mask, 1, _pad_right)
        self.rows += rows

    def keep(self, alive: list[int]) -> None:
        if len(alive) == len(self.rows):
            return
        if not alive:
            self.rows, self.cache, self.mask, self.encoder, self.encoder_mask = [], None, None, None, None
            return
        index = torch.tensor(alive, dtype=torch.long, device=self.mask.device)
        for layer in self._layers(self.cache) + self._cross_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
            layer.values = layer.values.index_select(0, index.to(layer.values.device))
        self.mask = self.mask.index_select(0, index)
        if self.encoder is not None:
            self.encoder = self.encoder.index_select(0, index.to(self.encoder.device))
            self.encoder_mask = self.encoder_mask.index_select(0, index.to(self.encoder_mask.device))
        self.rows = [self.rows[i] for i in alive]
        self.trim()

    def trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start:
            for layer in self._layers(self.cache):
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self.mask = self.mask[:, start:]
        if self.encoder_mask is None:
            return
        used = self.encoder_mask.any(dim=0).nonzero()
        end = int(used[-1]) + 1 if used.numel() else 0
        if end < self.encoder_mask.shape[1]:
            for layer in self._cross_layers(self.cache):
                layer.keys = layer.keys[:, :, :end]
                layer.values = layer.values[:, :, :end]
            self.encoder, self.encoder_mask = self.encoder[:, :end], self.encoder_mask[:, :end]


def _plain_lora(module) -> bool:
    """A LoRA layer whose adapters are plain ``B(A(x)) * scaling`` (no DoRA or other variant, not an
    embedding, no accelerate hook that already replaced its forward)."""
    import torch

    return (not getattr(module, "lora_variant", None) and not getattr(module, "lora_embedding_A", None)
            and not hasattr(module, "_hf_hook") and not getattr(module, "merged_adapters", None)
            and all(isinstance(m, torch.nn.Linear) for m in module.lora_A.values())
            and all(getattr(m, "bias", None) is None for m in module.lora_B.values()))  # lora_bias: peft's path


class MixedAdapters:
    """Each row of a batch through its own adapter, in one forward pass.

    Plain LoRA layers (the usual case) get a forward of their own while a mixed batch runs: the
    base layer once over every row, then ONE low-rank product for all the batch's adapters: their
    A matrices stacked (x A_all^T gives every adapter's rank-r projection of every row), a row mask
    keeping each row's own adapter's columns (none for a base row), their B matrices (scaling
    folded in) stacked the other way. Four small tensor operations per layer whatever the number
    of adapters; the stacked weights are made once per set of adapters, the masks once per step.
    peft's own mixed-batch path (``model(..., adapter_names=...)``) gathers each adapter's rows
    from Python lists in every layer and registers a hook on every layer on every call; it is used
    only for layers this cannot handle (DoRA and other variants), through persistent hooks."""

    def __init__(self, model, fast: bool = True):
        from peft.tuners.lora import LoraLayer
        from peft.utils import AuxiliaryTrainingWrapper

        self.names: list[str] | None = None
        self._masks: dict[tuple, torch.Tensor] = {}
        self._stacked: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        others = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        self.fast = fast and bool(layers) and not others and all(_plain_lora(m) for m in layers)
        self.handles = []
        if self.fast:
            for m in layers:
                m.forward = self._forward_of(m, m.forward)
        else:
            self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in layers + others]

    def _layout(self, module) -> tuple:
        # The batch's adapters this layer has, with their ranks: what the stacked weights and mask depend on.
        present = dict.fromkeys(n for n in self.names if n in module.lora_A)
        return tuple((n, module.lora_A[n].out_features) for n in present)

    def _weights(self, module, layout: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(module), layout)
        if key not in self._stacked:
            a = torch.cat([module.lora_A[n].weight for n, _ in layout], dim=0)
            b = torch.cat([module.lora_B[n].weight * module.scaling[n] for n, _ in layout], dim=1)
            self._stacked[key] = (a, b)
        return self._stacked[key]

    def _mask(self, layout: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (layout, like.device, like.dtype)
        if key not in self._masks:
            width = sum(r for _, r in layout)
            mask = torch.zeros((len(self.names), width), dtype=like.dtype)
            start = 0
            for n, r in layout:
                for i, name in enumerate(self.names):
                    if name == n:
                        mask[i, start:start + r] = 1
                start += r
            self._masks[key] = mask.to(like.device)
        return self._masks[key]

    def _forward_of(self, module, original):
        def forward(x, *args, **kwargs):
            if self.names is None:
                return original(x, *args, **kwargs)
            result = module.base_layer(x, *args, **kwargs)
            layout = self._layout(module)
            if not layout:
                return result
            a, b = self._weights(module, layout)
            h = torch.nn.functional.linear(x.to(a.dtype), a)  # [rows, tokens, every adapter's rank]
            mask = self._mask(layout, h)
            delta = torch.nn.functional.linear(h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), -1), b)
            return result + delta.to(result.dtype)

        return forward

    def _hook(self, module, args, kwargs):
        if self.names is None:
            return None
        kwargs["adapter_names"] = self.names
        return args, kwargs

    @contextlib.contextmanager
    def use(self, names: list[str]):
        self.names = list(names)
        self._masks = {}
        try:
            yield
        finally:
            self.names = None
