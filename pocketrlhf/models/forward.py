"""The one place that knows how to run a model family: hidden states, logits, token log-probs.

Every stage and role (SFT loss, reward, value, policy, reference, DPO) gets its numbers through
``response_logprobs`` and ``final_hidden_states``. Conventions, used everywhere:

* ``input_ids``/``attention_mask`` are [B, T]; padding may be left or right. Pad positions are
  never shown to the model: their ids are replaced by 0 (the pad id may lie outside the
  embedding matrix) and their attention is masked.
* ``position_ids = cumsum(mask) - 1``, so a left-padded row gets the same positions as unpadded
  (matters for absolute-position models such as GPT-2; "The N Implementation Details of RLHF with
  PPO", General 3).
* Log-probs are aligned with tokens: ``logprobs[b, t] = log p(x_t | x_<t)`` computed from the
  hidden state at t-1, in fp32, with logits divided by the sampling temperature; 0 where the
  mask is 0 (and always at t = 0).

Encoder-decoder bases (T5, BART: ``models.loading.is_seq2seq``) keep the same row layout,
[prompt ; response] with a ``response_mask``, so that every stage runs them unchanged. Each row
is split there (``split_rows``): the prompt goes to the encoder, once per distinct prompt in the
batch (a DPO pair's two answers, GRPO's G completions, share it), and the decoder reads
``[decoder_start, r_0 .. r_{n-1}]``. Decoder state j is put at row position (last prompt
token) + j, so ``hidden[:, t-1]`` predicts token t exactly as for a causal LM, and the last real
position holds the state after the final response token (EOS): where rewards are read and where
``token_aligned`` values come from. Positions before the last prompt token hold zeros.

The encoder output is computed under the adapter active then. Inside ``encoder_reuse(model)`` one
encoder pass serves every call on the same prompts whose active adapters give the same, frozen
encoder (``encoder_class``): an adapter with no weights in the encoder leaves it the base's, so
the reference with adapters off, a decoder-only policy, value and reward adapters all read one
pass (``--adapter-scope decoder``). Two adapters that both act in the encoder never share, and an
encoder with trainable weights always runs its own pass. A reused output is the very tensor the
first call computed, so results are bitwise those without reuse. A scope keeps the outputs of its
no-grad passes until it ends (an online step: rollouts x prompt length x d_model values per
encoder class); a pass with gradient reads them but is not kept.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

# Above this many fp32 logits per forward, each chunk's logits are recomputed in backward
# instead of stored (chunked, Liger-style); below it the recomputation costs more than it saves.
_RECOMPUTE_LOGITS_ABOVE = 1 << 25
_CHUNK_ROWS = 2048


@dataclass
class LogprobOutput:
    logprobs: torch.Tensor  # [B, T] fp32
    hidden: torch.Tensor | None = None  # [B, T, d] final hidden states
    entropy: torch.Tensor | None = None  # [B, T] fp32, entropy of the (tempered) next-token distribution


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """``(peft_model_or_None, transformers_causal_lm)`` under any DDP/accelerate wrapper."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    try:
        import peft

        if isinstance(model, peft.PeftModel):
            return model, model.get_base_model()
    except ImportError:  # pragma: no cover
        pass
    return None, model


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad-free ids and positions: pad ids become 0 (masked anyway), positions skip padding."""
    mask = attention_mask.long()
    ids = input_ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, position_ids


def _accepts_position_ids(module: torch.nn.Module) -> bool:
    cached = getattr(module, "_pocketrlhf_accepts_position_ids", None)
    if cached is None:
        cached = "position_ids" in inspect.signature(module.forward).parameters
        module._pocketrlhf_accepts_position_ids = cached  # type: ignore[attr-defined]
    return cached


def _prompt_learning(peft_model) -> tuple[bool, int]:
    """Whether the active adapter prepends virtual tokens/prefixes, and how many output rows it adds."""
    if peft_model is None or getattr(peft_model, "disable_adapters", False) is True:
        return False, 0
    cfg = peft_model.active_peft_config
    if not cfg.is_prompt_learning:
        return False, 0
    added = cfg.num_virtual_tokens if cfg.peft_type.value in ("PROMPT_TUNING", "P_TUNING") else 0
    return True, added


def is_seq2seq_model(model: torch.nn.Module) -> bool:
    from pocketrlhf.models.loading import is_seq2seq

    return is_seq2seq(unwrap(model)[1])


def response_mask_after(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """The response mask of right-padded rows whose first ``prompt_lengths`` tokens are the prompt."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask.long() * (positions[None, :] >= prompt_lengths.to(attention_mask.device)[:, None]).long()


@dataclass
class Seq2SeqRows:
    """[prompt ; response] rows split for an encoder-decoder; see the module docstring."""

    encoder_ids: torch.Tensor  # [B, P] prompt tokens, right-padded with 0
    encoder_mask: torch.Tensor  # [B, P]
    decoder_ids: torch.Tensor  # [B, N + 1] decoder start + response tokens, right-padded
    decoder_mask: torch.Tensor  # [B, N + 1]
    rows: torch.Tensor  # [K]: row of each real decoder state ...
    states: torch.Tensor  # [K]: ... its index in the decoder output ...
    positions: torch.Tensor  # [K]: ... and its position in the [B, T] layout


def decoder_start_id(lm: torch.nn.Module) -> int:
    start = getattr(lm.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(lm, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("this encoder-decoder model's config names no decoder_start_token_id")
    return int(start)


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
               start_id: int) -> Seq2SeqRows:
    """Encoder and decoder inputs of [prompt ; response] rows (left or right padded): the prompt
    is every real token outside ``response_mask``, the response must follow it directly."""
    attn = attention_mask.bool()
    resp = response_mask.bool() & attn
    prompt = attn & ~resp
    prompt_len, resp_len = prompt.sum(1), resp.sum(1)
    if bool((prompt_len == 0).any()):
        raise ValueError("an encoder-decoder base needs a prompt (its encoder input) in every row: data without a "
                         "prompt/response split (a bare text column) cannot train or score it")
    n, width = input_ids.shape
    device = input_ids.device
    enc_ids = torch.zeros((n, int(prompt_len.max())), dtype=torch.long, device=device)
    enc_mask = torch.zeros_like(enc_ids)
    pb, pt = prompt.nonzero(as_tuple=True)
    pc = prompt.long().cumsum(1)[pb, pt] - 1
    enc_ids[pb, pc] = input_ids[pb, pt]
    enc_mask[pb, pc] = 1
    dec_width = int(resp_len.max()) + 1
    dec_ids = torch.full((n, dec_width), start_id, dtype=torch.long, device=device)
    rb, rt = resp.nonzero(as_tuple=True)
    rc = resp.long().cumsum(1)[rb, rt] - 1
    dec_ids[rb, rc + 1] = input_ids[rb, rt]
    dec_mask = (torch.arange(dec_width, device=device)[None, :] <= resp_len[:, None]).long()
    last_prompt = (torch.arange(width, device=device)[None, :] * prompt.long()).max(1).values
    if not bool((rt == last_prompt[rb] + 1 + rc).all()):
        raise ValueError("every response must follow its prompt directly (no prompt token after the response starts)")
    db, dj = dec_mask.nonzero(as_tuple=True)
    return Seq2SeqRows(enc_ids, enc_mask, dec_ids, dec_mask, db, dj, last_prompt[db] + dj)


# ---------------------------------------------------------------------------------------------
# One encoder pass for every role whose adapters leave the encoder the same (module docstring).


def _adapter_weights(layer: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """adapter name -> its weights in one peft layer (LoRA, LoHa, IA3, modules_to_save...)."""
    held: dict[str, list[torch.nn.Parameter]] = {}
    for attr in getattr(layer, "adapter_layer_names", ()):
        per_adapter = getattr(layer, attr, None)
        if isinstance(per_adapter, torch.nn.ModuleDict):
            for name, module in per_adapter.items():
                held.setdefault(name, []).extend(module.parameters())
        elif isinstance(per_adapter, torch.nn.ParameterDict):
            for name, param in per_adapter.items():
                held.setdefault(name, []).append(param)
    return held


def _peft_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "adapter_layer_names") and hasattr(m, "disable_adapters")]


def encoder_adapters(model: torch.nn.Module) -> set[str]:
    """The adapters that act in the encoder of an encoder-decoder ``model`` (weights in one of its
    layers); every other adapter leaves the encoder equal to the base's."""
    encoder = unwrap(model)[1].get_encoder()
    return {name for layer in _peft_layers(encoder) for name in _adapter_weights(layer)}


def encoder_class(lm: torch.nn.Module) -> tuple[frozenset[str], bool] | None:
    """``(adapters acting in the encoder now, whether that encoder is frozen)``: two states with the
    same adapters compute the same encoder output (the empty set: the base's). Frozen: neither the
    base's encoder weights nor those of the acting adapters train. None when a layer holds merged
    adapter weights (the base weights themselves changed: never shared)."""
    encoder = lm.get_encoder()
    acting: set[str] = set()
    idle: set[int] = set()  # weights of adapters not acting now: a trainable one changes nothing here
    for layer in _peft_layers(encoder):
        if getattr(layer, "merged", False):
            return None
        active = set() if layer.disable_adapters else set(layer.active_adapters)
        for name, params in _adapter_weights(layer).items():
            if name in active:
                acting.add(name)
            else:
                idle.update(id(p) for p in params)
    frozen = not any(p.requires_grad and id(p) not in idle for p in encoder.parameters())
    return frozenset(acting), frozen


class EncoderCache:
    """Encoder outputs of one scope (``encoder_reuse``), keyed by encoder class and prompts.
    ``runs``/``reused`` count the passes computed and saved."""

    def __init__(self):
        self.entries: dict[tuple, torch.Tensor] = {}
        self.runs = 0
        self.reused = 0

    @staticmethod
    def key(cls: frozenset[str], ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        device = ids.device.type
        autocast = ((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if device in ("cpu", "cuda")
                    else ())
        return (cls, autocast, tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())


@contextlib.contextmanager
def encoder_reuse(model: torch.nn.Module, enabled: bool = True) -> Iterator[EncoderCache | None]:
    """Within the body, calls on an encoder-decoder base share encoder passes where the adapters
    allow (module docstring); nested scopes use the outer one. A no-op on a causal LM, or when not
    ``enabled`` (under FSDP, where every process must run the same encoder passes: a pass saved on
    one process only would leave the others waiting in its weight gathers)."""
    lm = unwrap(model)[1]
    if not enabled or not is_seq2seq_model(lm) or getattr(lm, "_pocketrlhf_encoder_cache", None) is not None:
        yield getattr(lm, "_pocketrlhf_encoder_cache", None) if enabled else None
        return
    cache = EncoderCache()
    lm._pocketrlhf_encoder_cache = cache
    try:
        yield cache
    finally:
        lm._pocketrlhf_encoder_cache = None


def _encode(lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cache: EncoderCache | None = getattr(lm, "_pocketrlhf_encoder_cache", None)
    state = encoder_class(lm)
    if state is None or not state[1]:  # merged weights, or a trainable encoder: its own pass, in the graph
        return lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    if cache is None:
        # Frozen: cut from the graph, else checkpointing's input-embedding hook (enable_input_require_grads)
        # makes the encoder keep its layers' inputs and run a backward that reaches no weight.
        return lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    key = cache.key(state[0], ids, mask)
    hit = cache.entries.get(key)
    if hit is not None:
        cache.reused += 1
        return hit
    encoded = lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.detach()  # frozen: no gradient
    cache.runs += 1
    if not torch.is_grad_enabled():  # the no-grad passes come first (scoring, reference); a training batch's
        cache.entries[key] = encoded  # own rows are rarely asked again: not kept
    return encoded


def describe_encoder_sharing(model: torch.nn.Module, roles: dict[str, str | None], trained: set[str] = frozenset(),
                             enabled: bool = True) -> str:
    """One line saying which roles (role -> adapter name, None: adapters off) read one encoder pass
    (``enabled``: whether the run opens ``encoder_reuse`` scopes at all)."""
    touching = encoder_adapters(model)
    groups: dict[str, list[str]] = {}
    for role, adapter in roles.items():
        groups.setdefault(adapter if adapter in touching else "", []).append(role)
    parts = []
    if "" in groups:
        parts.append(f"one for {', '.join(groups.pop(''))} (the base's encoder)")
    for adapter, names in groups.items():
        parts.append(f"one for {', '.join(names)} (adapter '{adapter}' acts in the encoder"
                     + ("; trained: run anew in every call" if adapter in trained else "") + ")")
    hint = "" if not touching else " (--adapter-scope decoder keeps adapters out of the encoder)"
    if not enabled:
        hint += "; under FSDP every role runs its own (every process must run the same passes)"
    return "encoder passes: " + "; ".join(parts) + hint


def seq2seq_hidden_states(lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor) -> torch.Tensor:
    """Decoder states [B, T, d] of an encoder-decoder in the row layout (module docstring). Rows
    with the same prompt share one encoder pass, and within ``encoder_reuse`` so do roles."""
    split = split_rows(input_ids, attention_mask, response_mask, decoder_start_id(lm))
    # Sorted unique prompts: the same rows in another order give the same encoder batch.
    unique, inverse = torch.unique(torch.cat([split.encoder_ids, split.encoder_mask], dim=1), dim=0,
                                   return_inverse=True)
    width = split.encoder_ids.shape[1]
    enc_ids, enc_mask = unique[:, :width], unique[:, width:]
    encoded = _encode(lm, enc_ids, enc_mask)
    decoded = lm.get_decoder()(input_ids=split.decoder_ids, attention_mask=split.decoder_mask,
                               encoder_hidden_states=encoded[inverse], encoder_attention_mask=enc_mask[inverse],
                               use_cache=False).last_hidden_state
    hidden = decoded.new_zeros(input_ids.shape[0], input_ids.shape[1], decoded.shape[-1])
    return hidden.index_put((split.rows, split.positions), decoded[split.rows, split.states])


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last-layer hidden states [B, T, d] (after the final norm) with the active adapter applied.
    ``response_mask`` says where each row's prompt ends: needed for an encoder-decoder base, whose
    decoder states these are (module docstring); a causal LM ignores it."""
    peft_model, lm = unwrap(model)
    if is_seq2seq_model(lm):
        if response_mask is None:
            raise ValueError("an encoder-decoder base needs the response mask (where each prompt ends)")
        return seq2seq_hidden_states(lm, input_ids, attention_mask, response_mask)
    ids, position_ids = model_inputs(input_ids, attention_mask)
    prompt_learning, added = _prompt_learning(peft_model)
    if prompt_learning:
        # Virtual tokens are injected by PeftModel.forward itself, so go through it.
        out = peft_model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][:, added:]
    backbone = lm.base_model  # LlamaModel, GPT2Model, GPTNeoXModel, ... (LoRA layers are inside)
    kwargs = {"position_ids": position_ids} if _accepts_position_ids(backbone) else {}
    out = backbone(input_ids=ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state


def supports_attention_bias(model: torch.nn.Module) -> bool:
    """Whether ``biased_hidden_states`` can run this model: an attention implementation that adds
    a 4D mask to its scores (sdpa, eager), explicit positions, and no virtual-token adapter."""
    peft_model, lm = unwrap(model)
    if peft_model is not None and any(c.is_prompt_learning for c in peft_model.peft_config.values()):
        return False
    if is_seq2seq_model(lm):
        return False  # the prompt is shared through the encoder instead (seq2seq_hidden_states)
    cfg = lm.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        return False  # a 4D mask is used as given: the window would not be applied
    return cfg._attn_implementation in ("sdpa", "eager") and _accepts_position_ids(lm.base_model)


def biased_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         allowed: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states [B, T, d] under an explicit attention pattern: query t may attend
    to key s where ``allowed[b, t, s]``; ``position_ids`` are given. Several sequences can then
    share one prefix in a single row (DPO: both answers after one copy of the prompt). Every row
    of ``allowed`` needs at least one True (e.g. the diagonal), and ``input_ids`` must hold real
    ids everywhere (no out-of-vocabulary pad ids)."""
    _, lm = unwrap(model)
    dtype = lm.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    # Added to the scores by both sdpa and eager attention; a 4D mask is used as given.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    out = lm.base_model(input_ids=input_ids, attention_mask=bias.unsqueeze(1), position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def pair_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states [2B, T, d] of a preference batch in the two-row layout of
    ``data.tokenize.collate_preferences``. When the batch also holds the one-row layout
    (``collate_shared_prompt``: prompt, chosen, rejected in one row, an answer attending to the
    prompt and to itself only), the model runs once per pair on it: the prompt is computed once."""
    from pocketrlhf.data.tokenize import PROMPT

    if "shared_ids" not in batch:  # (an encoder-decoder encodes each pair's prompt once here)
        return final_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("response_mask"))
    seg = batch["shared_segments"]
    query, key = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
    allowed = causal & ((key == PROMPT) | (key == query))  # an answer never sees the other answer
    shared = biased_hidden_states(model, batch["shared_ids"], batch["shared_positions"], allowed)
    return shared.flatten(0, 1)[batch["shared_index"]]  # back to the two-row layout


@dataclass
class GroupLayout:
    """Rows answering one prompt in groups, laid out as one row per group (``group_layout``)."""

    ids: torch.Tensor  # [groups, L] the group rows' tokens
    positions: torch.Tensor  # [groups, L] each token's position in its own original row
    index: torch.Tensor  # [N, T] where each original row's token sits in the flattened group rows
    length: int  # L: tokens per group row (the longest group)
    owner: torch.Tensor  # [groups, G, A] the answer that holds answer a's token at depth t
    answers: torch.Tensor  # [groups, G] answer lengths
    slot_owner: torch.Tensor  # [groups, L] the answer holding each token; -1 prompt, -2 unused
    slot_depth: torch.Tensor  # [groups, L] a token's depth in its answer

    def allowed(self) -> torch.Tensor:
        """[groups, L, L]: query may attend to key (built only for a layout that is used: L^2)."""
        groups, group_size, _ = self.owner.shape
        owner, depth = self.slot_owner, self.slot_depth
        # Answer a's path holds key k when a's token at k's depth belongs to k's answer.
        on_path = ((self.owner.gather(2, depth[:, None].expand(groups, group_size, self.length)) == owner[:, None])
                   & (depth[:, None] < self.answers[:, :, None]) & (owner[:, None] >= 0))
        query_path = on_path[torch.arange(groups, device=owner.device)[:, None], owner.clamp(min=0)]
        is_answer, is_prompt = owner >= 0, owner == -1
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=owner.device).tril()
        # The prompt is seen by all; an answer token sees its ancestors; unused slots see what precedes them.
        return causal & (is_prompt[:, None, :] | ~is_answer[:, :, None] & ~is_prompt[:, :, None]
                         | is_answer[:, :, None] & query_path & (depth[:, None, :] <= depth[:, :, None]))


def group_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                 group_size: int) -> GroupLayout:
    """One row per group of ``group_size`` right-padded prompt + answer rows that share their
    prompt: the prompt once, then the answers as a prefix tree. Where answers of a group begin
    with the same tokens (identical answers, or a shared opening), those tokens are laid out once,
    by the first answer that has them, and every answer that starts so reads them; each answer
    then adds only the tokens where it parts from every answer before it. A token attends to the
    prompt and to the tokens of its own answer up to itself (its ancestors in the tree) and sits
    at its own row's position, so it gets the numbers of its separate row."""
    n, width = input_ids.shape
    if n % group_size:
        raise ValueError(f"{n} rows do not split into groups of {group_size}")
    groups, device = n // group_size, input_ids.device
    lengths = attention_mask.long().sum(1)
    starts = prompt_lengths.to(device).long()
    answers = lengths - starts
    depth = torch.arange(max(int(answers.max()), 1), device=device)
    # Answer tokens [N, A] by depth in the answer, and for every two answers of a group how many
    # leading tokens they share.
    in_answer = depth < answers[:, None]
    tokens = torch.where(in_answer, input_ids.gather(1, (starts[:, None] + depth).clamp(max=width - 1)), -1)
    tokens, in_answer = tokens.view(groups, group_size, -1), in_answer.view(groups, group_size, -1)
    differ = (tokens[:, :, None] != tokens[:, None]) | ~in_answer[:, :, None] | ~in_answer[:, None]
    # the first depth where two answers differ (one byte per pair and depth, not an int64 cumprod)
    common = torch.where(differ.any(-1), differ.to(torch.uint8).argmax(-1), depth.numel())  # [groups, G, G]
    # Each answer token belongs to the first answer of its group that has the same prefix up to it.
    owner = (common[..., None] > depth).to(torch.uint8).argmax(2)  # [groups, G, A]
    owns = (owner == torch.arange(group_size, device=device)[:, None]) & in_answer
    own_count = owns.sum(-1)  # the answer's own tokens: a suffix of it, after what it shares
    shared_count = answers.view(groups, group_size) - own_count
    prompt_length = starts.view(groups, group_size)[:, 0]
    offset = prompt_length[:, None] + own_count.cumsum(1) - own_count  # where each answer's own tokens start
    length = int((prompt_length + own_count.sum(1)).max())
    flat_owner = owner.flatten(1)
    slot_by_depth = (offset.gather(1, flat_owner) - shared_count.gather(1, flat_owner)).view_as(owner) + depth
    column = torch.arange(width, device=device).expand(n, width)
    real = column < lengths[:, None]
    in_prompt = column < starts[:, None]
    at_depth = (column - starts[:, None]).clamp(0, depth.numel() - 1)
    slot = torch.where(in_prompt, column, slot_by_depth.view(n, -1).gather(1, at_depth))
    group = torch.arange(n, device=device) // group_size
    index = torch.where(real, group[:, None] * length + slot, 0)
    target = index[real]

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        # A token several rows share is written once per row, always with the same value.
        out = torch.full((groups * length,), fill, dtype=torch.long, device=device)
        return out.index_put_((target,), values[real]).view(groups, length)

    ids = scatter(input_ids, 0)
    positions = scatter(column, 0)  # a token's position is its column in its own row
    row_owner = owner.view(n, -1).gather(1, at_depth)
    slot_owner = scatter(torch.where(in_prompt, -1, row_owner), -2)  # -1 prompt, -2 unused
    slot_depth = scatter(at_depth, 0)
    return GroupLayout(ids, positions, index, length, owner, answers.view(groups, group_size), slot_owner, slot_depth)


def group_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_lengths: torch.Tensor, group_size: int, layout: GroupLayout | None = None) -> torch.Tensor:
    """Hidden states [N, T, d] of right-padded prompt + response rows where each run of
    ``group_size`` rows answers one prompt (GRPO's G completions), computed in one row per group
    (``group_layout``: the prompt once, answers sharing their common openings). The same numbers
    as ``final_hidden_states`` on the rows (up to float rounding), with fewer tokens; rows that
    read the same token get the same tensor entry, so their gradients meet there. An
    encoder-decoder runs each group's prompt through its encoder once instead."""
    if is_seq2seq_model(model):
        return final_hidden_states(model, input_ids, attention_mask, response_mask_after(attention_mask, prompt_lengths))
    if layout is None:
        layout = group_layout(input_ids, attention_mask, prompt_lengths, group_size)
    shared = biased_hidden_states(model, layout.ids, layout.positions, layout.allowed())
    return shared.flatten(0, 1)[layout.index]


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits from final hidden states, with the family's output scaling."""
    _, lm = unwrap(model)
    cfg = lm.config
    if getattr(cfg, "scale_decoder_outputs", False):  # T5 with a tied output layer (transformers 5.23)
        hidden = hidden * (cfg.d_model ** -0.5)
    logits = lm.get_output_embeddings()(hidden)
    bias = getattr(lm, "final_logits_bias", None)  # BART
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.to(logits.dtype).view(-1)
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_logprobs(model, hidden_rows, targets, temperature: float, with_entropy: bool):
    logits = output_logits(model, hidden_rows).float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax's backward is one fused pass over [rows, vocab]; logits.gather - logsumexp costs
    # three (sub, exp, mul): about a third of the output layer's time on a CPU (bench/sft_vs_trl.py).
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():  # entropy is only reported (response_logprobs detaches it): no graph for it
        entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_hidden: bool = False,
    return_entropy: bool = False,
    hidden: torch.Tensor | None = None,
) -> LogprobOutput:
    """log p(x_t | x_<t) for every token t where ``response_mask`` is 1 (default: every real token).

    Only the masked positions go through the output layer, in chunks, so a long prompt or a large
    vocabulary costs no full [B, T, V] fp32 tensor.
    """
    if hidden is None:
        hidden = final_hidden_states(model, input_ids, attention_mask, response_mask)
    if response_mask is None:
        response_mask = attention_mask
    wanted = (response_mask[:, 1:] * attention_mask[:, 1:]).bool()
    rows = hidden[:, :-1][wanted]
    targets = input_ids[:, 1:][wanted]
    out_lp = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device) if return_entropy else None
    if rows.shape[0]:
        vocab = output_logits_size(model)
        recompute = torch.is_grad_enabled() and rows.requires_grad and rows.shape[0] * vocab > _RECOMPUTE_LOGITS_ABOVE
        lp_parts, ent_parts = [], []
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            h, tgt = rows[start : start + _CHUNK_ROWS], targets[start : start + _CHUNK_ROWS]
            if recompute:
                lp, ent = checkpoint(_chunk_logprobs, model, h, tgt, temperature, return_entropy, use_reentrant=False)
            else:
                lp, ent = _chunk_logprobs(model, h, tgt, temperature, return_entropy)
            lp_parts.append(lp)
            if ent is not None:
                ent_parts.append(ent)
        shifted = torch.zeros(wanted.shape, dtype=torch.float32, device=hidden.device)
        shifted = shifted.masked_scatter(wanted, torch.cat(lp_parts))
        out_lp = torch.cat([out_lp[:, :1], shifted], dim=1)
        if return_entropy:
            ent_shifted = torch.zeros(wanted.shape, dtype=torch.float32, device=hidden.device)
            ent_shifted = ent_shifted.masked_scatter(wanted, torch.cat(ent_parts).detach())
            out_ent = torch.cat([out_ent[:, :1], ent_shifted], dim=1)
    return LogprobOutput(out_lp, hidden if return_hidden else None, out_ent)


def output_logits_size(model: torch.nn.Module) -> int:
    _, lm = unwrap(model)
    return lm.get_output_embeddings().weight.shape[0]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).max(dim=1).values


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere ("The N Implementation Details of RLHF with PPO", Policy 4): nn.Dropout
    modules and attention-probability dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "attn_dropout_p", "dropout_rate"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    _, lm = unwrap(model)
    for attr in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(lm.config, attr, None), float):
            setattr(lm.config, attr, 0.0)


class LMWithHeads(torch.nn.Module):
    """A (peft) causal LM plus named scalar heads, as one module: what accelerate/DDP wraps.

    ``forward`` returns token log-probs (and entropy) plus, for each requested head, its output
    at every position, aligned like the log-probs (head output at t reads the state before x_t).
    """

    def __init__(self, model: torch.nn.Module, heads: dict[str, torch.nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict(heads or {})

    def forward(self, input_ids, attention_mask, response_mask=None, temperature: float = 1.0,
                return_entropy: bool = False, heads: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        out = response_logprobs(self.model, input_ids, attention_mask, response_mask, temperature,
                                return_hidden=bool(heads), return_entropy=return_entropy)
        result = {"logprobs": out.logprobs}
        if out.entropy is not None:
            result["entropy"] = out.entropy
        for name in heads:
            result[name] = token_aligned(self.heads[name](out.hidden))
        return result


def token_aligned(per_position: torch.Tensor) -> torch.Tensor:
    """Shift a head's per-position output [B, T] so index t holds the output at t - 1 (the state
    before token t), like the log-probs; index 0 is 0."""
    return torch.cat([per_position.new_zeros(per_position.shape[0], 1), per_position[:, :-1]], dim=1)
