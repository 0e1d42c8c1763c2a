"""The online RL loop shared by `ppo` and `grpo`: prompts, rollouts, rewards, the reference,
checkpoints, resume, metrics and held-out evaluation. An algorithm plugs in what differs (its
roles beyond policy/reference/reward, advantages and losses) through ``OnlineAlgorithm``.

One step of ``train``::

    prompts of the step  = a function of (seed, step) alone, every process its share   step_prompts
    rollouts             = G completions per prompt, each from its own random stream,
                           cut after EOS, scored by every reward source              generate_rollouts
    metrics              = algorithm.learn(step, rollouts)  (old/reference passes, advantages, updates)
    log, checkpoint      = common.Run; resume through common.resume

Every role lives on ONE frozen base: the policy is adapter "policy", the reference the frozen
copy "reference" of the SFT adapter (or adapters off), a reward model the frozen adapter "reward".
Under FSDP that base is sharded and every role's forward runs through its root (``wrap``,
``Roles.run``), all processes running the same number of them (generation in lockstep). On an
encoder-decoder base the passes of one step share encoder passes where the roles' adapters leave
the encoder the same (``forward.encoder_reuse``; not under FSDP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch

from pocketrlhf import optimizers
from pocketrlhf.algorithms.ppo import sequence_kl
from pocketrlhf.config import option
from pocketrlhf.data.formats import PromptRow, prompt_rows
from pocketrlhf.data.rows import read_rows
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.data.tokenize import TokenExample, collate, encode
from pocketrlhf.diagnostics import reward_model_warnings
from pocketrlhf.errors import ConfigError, DataError, NonFiniteError, PocketError, RewardFunctionError
from pocketrlhf.models.forward import describe_encoder_sharing, encoder_reuse
from pocketrlhf.models.generation import row_seed
from pocketrlhf.models.loading import is_seq2seq
from pocketrlhf.models.policy import add_frozen_adapter, build_policy
from pocketrlhf.models.roles import load_reward_adapter, load_reward_function, rule_reward, short_repr
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log

POLICY, REFERENCE, REWARD = "policy", "reference", "reward"


@dataclasses.dataclass
class OnlineOptions:
    prompts: str = option("", "prompts: a `prompt` column, Stack Exchange `question`, or `messages` (other columns "
                              "reach reward functions as keyword arguments)")
    eval_prompts: str = option("", "held-out prompts for evaluation (default: eval_fraction of prompts)")
    eval_fraction: float = option(0.05, "fraction of prompts held out when no eval_prompts (0: none)")
    template: TemplateName = option("plain", "prompt format; the one SFT and RM used")
    max_prompt_length: int = option(256, "prompts longer than this many tokens are skipped (and counted)")
    sft_adapter: str = option("", "SFT adapter: the policy starts as a copy of it and the reference is a frozen copy")
    reference: Literal["sft", "base"] = option("sft", "reference model: the SFT model, or the raw base (adapters off)")
    reward_adapter: str = option("", "reward adapter + head from `pocketrlhf rm`")
    reward_normalize: bool = option(True, "reward adapter: (r - mean) / std with the statistics saved by `rm`")
    reward_baseline: float = option(0.0, "subtracted from every score (StackLLaMA's reward_baseline)")
    reward_clip: float = option(0.0, "clip scores to [-c, c] (0: off)")
    missing_eos_penalty: float = option(1.0, "subtracted from the score of a response that never emitted EOS")
    temperature: float = option(1.0, "sampling temperature; log-probs use logits / temperature everywhere")
    max_new_tokens: int = option(64, "response length limit")
    generation_batch_size: int = option(32, "sequences per generate() call (prompts x completions per prompt)")
    share_prompt: bool = option(True, "completions of one prompt: compute the prompt, and the openings completions "
                                      "have in common, once per group in every forward pass (same numbers, fewer "
                                      "tokens; only with several completions per prompt)")
    samples_to_log: int = option(4, "generations written to samples.jsonl at each eval")
    eval_at_start: bool = option(False, "evaluate on the held-out prompts before the first step too (step 0)")


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    ids: list[list[int]]
    columns: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: list[int]) -> "Prompts":
        return Prompts([self.ids[i] for i in indices], [self.columns[i] for i in indices])


def prepare_prompts(cfg, tokenizer) -> tuple[Prompts, Prompts, dict]:
    rows = read_rows("prompt", prompt_rows, cfg.prompts, cfg.eval_prompts, cfg.eval_fraction, cfg.seed, cfg.template,
                     tokenizer, is_seq2seq(cfg.model))
    skipped = rows.skipped

    def tokenize(items: list[PromptRow], label: str) -> Prompts:
        out = Prompts([], [])
        for row in items:
            ids = encode(tokenizer, row.prompt, special=True)
            if len(ids) > cfg.max_prompt_length:
                skipped.add(f"{label}prompts longer than max_prompt_length")
                continue
            out.ids.append(ids)
            out.columns.append(row.columns)
        return out

    seen: set[str] = set()
    unique = [r for r in rows.held_out if not (r.prompt in seen or seen.add(r.prompt))]
    if len(unique) < len(rows.held_out):  # pair data holds a question once per pair: evaluate each once
        skipped.counts["eval prompts repeated (evaluated once)"] += len(rows.held_out) - len(unique)
    train, evals = tokenize(rows.train, ""), tokenize(unique, "eval ")
    if not train:
        raise DataError(f"{cfg.prompts}: no prompt fits max_prompt_length={cfg.max_prompt_length}")
    if skipped.total:
        log.info("prompts: %s", skipped.describe())
    return train, evals, {"template": rows.template, "train_prompts": len(train), "eval_prompts": len(evals),
                          "skipped": dict(skipped.counts), "held_out": rows.split}


def step_prompts(cfg, step: int, n: int, rank: int, world: int, per_step: int) -> list[int]:
    """This process's prompt indices for step ``step``: a function of the step alone."""
    steps_per_epoch = max(n // per_step, 1)
    epoch, k = divmod(step, steps_per_epoch)
    order = common.epoch_order(n, cfg.seed, epoch)
    chosen = [order[(k * per_step + j) % n] for j in range(per_step)]
    share = per_step // world
    return chosen[rank * share:(rank + 1) * share]


# ---------------------------------------------------------------------------------------------
# Rewards: rule functions and a reward adapter, weighted


@dataclass
class RewardSource:
    name: str  # module:function, file.py:function, or the reward adapter's folder
    weight: float
    score: Callable[..., torch.Tensor]  # (ids, attn, prompts, responses, columns, group_size, prompt_lengths) -> [N]
    uses_model: bool = False  # runs the shared base (a reward adapter): a forward like any other under FSDP


@dataclass
class Rewards:
    sources: list[RewardSource]

    def __call__(self, ids, attn, prompts, responses, columns: dict[str, list], group_size: int = 1,
                 prompt_lengths: torch.Tensor | None = None):
        # The reward adapter first: a failing function then cannot skip a forward that, under FSDP,
        # the other processes run with this one.
        scored = {s.name: s.score(ids, attn, prompts, responses, columns, group_size, prompt_lengths).float()
                  for s in sorted(self.sources, key=lambda s: not s.uses_model)}
        parts = {s.name: scored[s.name] for s in self.sources}
        total = sum(s.weight * parts[s.name] for s in self.sources)
        return total, parts

    @property
    def uses_model(self) -> bool:
        return any(s.uses_model for s in self.sources)


def reward_columns(functions: list[str]) -> dict[str, tuple[str, ...]]:
    """The data columns each reward function cannot run without."""
    return {spec: rule_reward(load_reward_function(spec), spec).needs for spec in functions}


def check_reward_columns(needs_of: dict[str, tuple[str, ...]], prompts: "Prompts", source: str) -> None:
    """Every column a reward function needs is in the prompts (checked before any model loads)."""
    available = list(prompts.columns[0]) if len(prompts) else []
    for spec, needs in needs_of.items():
        missing = [c for c in needs if c not in available]
        if missing:
            raise ConfigError(f"reward function {spec} needs the column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}, which {source} does not have (columns besides the prompt: "
                              f"{', '.join(available) or 'none'})")


def build_rewards(model, functions: list[str], weights: list[float], reward_adapter: str, normalize: bool,
                  share_prompt: bool):
    """``(model, Rewards)``: each function, then the reward adapter (loaded onto ``model``)."""
    count = len(functions) + bool(reward_adapter)
    if count == 0:
        raise ConfigError("no reward: give --reward-adapter DIR and/or --reward-function module:function")
    if len(set(functions)) < len(functions):
        raise ConfigError(f"a reward function is named twice ({', '.join(functions)}): weight it with --reward-weights")
    weights = list(weights) or [1.0] * count
    if len(weights) != count:
        raise ConfigError(f"--reward-weights has {len(weights)} numbers for {count} rewards "
                          f"({', '.join(functions + ([reward_adapter] if reward_adapter else []))})")
    sources = []
    for spec, weight in zip(functions, weights):
        fn = rule_reward(load_reward_function(spec), spec)
        sources.append(RewardSource(spec, weight, lambda i, a, p, r, c, g, n, fn=fn: fn(i, a, p, r, columns=c)))
    if reward_adapter:
        model, scorer = load_reward_adapter(model, reward_adapter, name=REWARD)

        def adapter_score(ids, attn, prompts, responses, columns, group_size, prompt_lengths):
            return scorer(ids, attn, normalize=normalize, group_size=group_size if share_prompt else 1,
                          prompt_lengths=prompt_lengths)

        sources.append(RewardSource(reward_adapter, weights[-1], adapter_score, uses_model=True))
    return model, Rewards(sources)


def reward_adapter_warnings(reward_adapter: str) -> list[str]:
    """The reward model's own held-out record, checked before any rollout is optimised against it."""
    from pocketrlhf.models.adapters import read_adapter_info

    info = read_adapter_info(reward_adapter)
    return reward_model_warnings(info.get("eval_accuracy"), info.get("eval_accuracy_n"), info.get("train_seen_accuracy"))


# ---------------------------------------------------------------------------------------------
# Roles on one base


@dataclass
class Roles:
    model: torch.nn.Module  # the one PeftModel: every adapter lives on its single base
    adapters: Any  # AdapterSet
    reference: str | None  # adapter name, or None for adapters disabled
    reward: Rewards
    trainable: list[torch.nn.Parameter]
    value_head: torch.nn.Module | None = None
    value_adapter: str | None = None  # PPO: a separate value adapter; None: the head reads the policy's states
    # How a role's forward on the shared base is run: ``run(fn, *args)``. Directly, or under FSDP
    # through the sharded root (common.Entry), which gathers its weights and counts the pass.
    run: Callable[..., Any] = field(default=lambda fn, *args, **kwargs: fn(*args, **kwargs))
    sharded: bool = False


def build_shared_roles(cfg, total_steps: int, functions: list[str], weights: list[float]) -> Roles:
    """Policy (a trainable copy of the SFT adapter), reference and rewards on one base; the caller
    adds its own roles and then calls ``finish_roles``."""
    from pocketrlhf.models.adapters import AdapterSet

    model = build_policy(cfg, total_steps=total_steps, adapter_name=POLICY, init_adapter=cfg.sft_adapter)
    reference = None
    if cfg.reference == "sft" and cfg.sft_adapter:
        model = add_frozen_adapter(model, cfg.sft_adapter, REFERENCE)
        reference = REFERENCE
    model, rewards = build_rewards(model, functions, weights, cfg.reward_adapter, cfg.reward_normalize,
                                   cfg.share_prompt)
    return Roles(model, AdapterSet(model), reference, rewards, [])


def finish_roles(roles: Roles, trainable_adapters: set[str]) -> Roles:
    from pocketrlhf.models.adapters import AdapterSet, fuse_lora_layers
    from pocketrlhf.models.forward import disable_dropout
    from pocketrlhf.models.policy import set_trainable

    roles.model.set_adapter(POLICY)
    roles.adapters = AdapterSet(roles.model)
    disable_dropout(roles.model)  # [N] Policy 4, adapters' dropout too: the ratio is exactly 1 before the first update
    fuse_lora_layers(roles.model)  # every rollout, scoring, reference and training pass runs through the LoRA layers
    roles.trainable = set_trainable(roles.model, trainable_adapters)
    if roles.value_head is not None:
        roles.value_head.requires_grad_(True)
        roles.trainable += list(roles.value_head.parameters())
    return roles


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, T] prompt + response, right-padded
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens (EOS included)
    prompt_lengths: torch.Tensor  # [N]
    scores: torch.Tensor  # [N] after baseline, clipping and the missing-EOS penalty
    raw_scores: torch.Tensor  # [N] the weighted sum of the rewards as given
    has_eos: torch.Tensor  # [N] bool
    prompts: list[str]
    responses: list[str]
    kept: torch.Tensor | None = None  # [N] bool: False for rollouts dropped for a non-finite score (skip_nonfinite)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] per reward source
    group_size: int = 1  # completions per prompt, next to each other


def generate_rollouts(cfg, roles: Roles, tokenizer, prompts: Prompts, row_seeds: list[int],
                      prompt_indices: list[int] | None = None, group_size: int = 1) -> Rollout:
    """Sample ``group_size`` responses per prompt (rows g*G .. g*G+G-1 answer prompt g), truncate
    at EOS and score them; response i comes from its own random stream ``row_seeds[i]``, so
    rollouts do not depend on how prompts are batched or split over processes.

    A non-finite score is a NonFiniteError naming the reward and the prompt (its index in
    ``prompt_indices``, else its position), or with ``skip_nonfinite`` drops that rollout: its
    response mask and score become 0, so it adds nothing to the update, and ``kept`` marks it."""
    from pocketrlhf.models.generation import sample

    prompt_ids = [p for p in prompts.ids for _ in range(group_size)]
    columns = [c for c in prompts.columns for _ in range(group_size)]
    # Under FSDP every process runs as many decoding steps as the slowest (synced): each step's
    # forward gathers every layer's weights with the other processes.
    responses = roles.run(sample, roles.model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                          batch_size=cfg.generation_batch_size, row_seeds=row_seeds, synced=roles.sharded)
    eos = tokenizer.eos_token_id
    batch = collate([TokenExample(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompt_ids, responses)],
                    tokenizer.pad_token_id)
    device = next(roles.model.parameters()).device
    ids, attn, resp = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device)
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    has_eos = torch.tensor([bool(r) and r[-1] == eos for r in responses], device=device)
    prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    response_texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    index = [i for i in (prompt_indices if prompt_indices is not None else range(len(prompts))) for _ in range(group_size)]
    chunk = max(1, cfg.batch_size // group_size) * group_size  # whole groups, so a group's prompt is shared
    totals, parts = [], {}
    score = (lambda *a: roles.run(roles.reward, *a)) if roles.reward.uses_model else roles.reward
    failure = None
    for i in range(0, len(prompt_ids), chunk):
        cols = {k: [c[k] for c in columns[i:i + chunk]] for k in (columns[0] if columns else {})}
        try:
            total, by_source = score(ids[i:i + chunk], attn[i:i + chunk], prompt_texts[i:i + chunk],
                                     response_texts[i:i + chunk], cols, group_size, prompt_lengths[i:i + chunk])
        except RewardFunctionError as e:
            bad = getattr(e, "index", None)
            where = (f"the answer to prompt {index[i + bad]}, {short_repr(prompt_texts[i + bad])}" if bad is not None else
                     f"prompts {index[i]}..{index[min(i + chunk, len(index)) - 1]}")
            failure = failure or (RewardFunctionError(f"{e} ({where})"), e.__cause__)
            if not (roles.sharded and roles.reward.uses_model):
                raise failure[0] from failure[1]
            continue  # the other processes' reward-adapter forwards gather weights with this one: go on with them
        totals.append(total)
        for k, v in by_source.items():
            parts.setdefault(k, []).append(v)
    if failure is not None:
        raise failure[0] from failure[1]
    raw = torch.cat(totals).float()
    kept = torch.isfinite(raw)
    if not kept.all():
        bad = int((~kept).nonzero()[0])
        source = next((k for k, v in parts.items() if not torch.isfinite(torch.cat(v)[bad])), "reward")
        if not cfg.skip_nonfinite:
            what = f"reward adapter {source}" if source == cfg.reward_adapter else f"reward function {source}"
            raise NonFiniteError(f"{what} returned {raw[bad].item()} for the answer to prompt {index[bad]}, "
                                 f"{short_repr(prompt_texts[bad])} ({int((~kept).sum())} of {len(raw)} scores non-finite)")
        resp = resp * kept[:, None].to(resp.dtype)
    scores = torch.where(kept, raw, 0.0) - cfg.reward_baseline
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = (scores - cfg.missing_eos_penalty * (~has_eos).float()) * kept
    return Rollout(ids, attn, resp, prompt_lengths, scores, raw, has_eos, prompt_texts, response_texts, kept,
                   {k: torch.cat(v) for k, v in parts.items()}, group_size)


def rows_logprobs(model, ids, attn, resp, prompt_lengths, temperature: float, group_size: int, share: bool,
                  return_hidden: bool = False, return_entropy: bool = False):
    """``forward.response_logprobs`` of rollout rows; with ``share``, each group's prompt, and the
    openings its answers have in common, run once (``forward.group_layout``) where that pays."""
    from pocketrlhf.models.forward import group_hidden_states, group_layout, response_logprobs, supports_attention_bias

    hidden = None
    if share and group_size > 1 and supports_attention_bias(model):
        layout = group_layout(ids, attn, prompt_lengths, group_size)
        if sharing_pays(attn, prompt_lengths, group_size, linear_cost_per_pair(model), layout.length):
            hidden = group_hidden_states(model, ids, attn, prompt_lengths, group_size, layout)
    return response_logprobs(model, ids, attn, resp, temperature, return_hidden=return_hidden,
                             return_entropy=return_entropy, hidden=hidden)


def linear_cost_per_pair(model) -> float:
    """A decoder layer's linear work per token (q, k, v, o and a gated MLP, multiply-adds) over
    its attention work per query-key pair (scores and the weighted sum of values): how many
    attention pairs one token's trip through the linear layers is worth. 0 when the config
    does not say (sharing is then judged on attention alone)."""
    from pocketrlhf.models.forward import unwrap

    _, lm = unwrap(model)
    cfg = getattr(lm, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(hidden, int):
        return 0.0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    query, kv = heads * head_dim, kv_heads * head_dim
    return (hidden * (2 * query + 2 * kv) + 3 * hidden * inner) / (2 * query)


def sharing_pays(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor, group_size: int,
                 linear_per_pair: float = 0.0, shared_length: int | None = None) -> bool:
    """Whether one row per group (prompt once, then every completion) costs less than G rows: it
    saves (G-1) x prompt tokens of every linear layer, but its attention is dense over the whole
    row (L^2 against G x T^2). The cost of a layout is tokens x ``linear_per_pair`` + attention
    pairs (``linear_cost_per_pair``): on a 7B model one token's linear work is worth ~25,000
    pairs, so the saved prompt copies outweigh the longer row's attention unless the prompt is a
    small part of rows thousands of tokens long. ``shared_length``: the group row's length when
    answers share openings (``forward.group_layout``); by default every answer token counts."""
    n, width = attention_mask.shape
    lengths = attention_mask.long().sum(1).view(-1, group_size)
    prompts = prompt_lengths.view(-1, group_size)[:, 0]
    shared = shared_length if shared_length is not None else int((prompts + (lengths - prompts[:, None]).sum(1)).max())
    groups = n // group_size
    return groups * (shared * linear_per_pair + shared * shared) <= n * (width * linear_per_pair + width * width)


def micro_batches(n: int, batch_size: int, group_size: int) -> list[slice]:
    """Consecutive slices of whole groups, about ``batch_size`` rows each."""
    step = max(1, batch_size // group_size) * group_size
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@torch.no_grad()
def adapter_logprobs(cfg, roles: Roles, r: Rollout, adapter: str | None) -> torch.Tensor:
    """Log-probs [N, T] of the sampled tokens under ``adapter`` (None: adapters off) on the shared
    base, in micro-batches of whole groups, without gradients."""
    parts = []
    with roles.adapters.use(adapter):  # switched once for the whole pass (each switch walks the model)
        for s in micro_batches(r.input_ids.shape[0], cfg.batch_size, r.group_size):
            parts.append(roles.run(rows_logprobs, roles.model, r.input_ids[s], r.attention_mask[s], r.response_mask[s],
                                   r.prompt_lengths[s], cfg.temperature, r.group_size, cfg.share_prompt).logprobs)
    return torch.cat(parts)


def model_roles(roles: Roles) -> dict[str, str | None]:
    """The roles that run the shared base, each with its adapter (None: adapters off)."""
    out: dict[str, str | None] = {POLICY: POLICY, REFERENCE: roles.reference}
    if roles.reward.uses_model:
        out[REWARD] = REWARD
    if roles.value_adapter:
        out["value"] = roles.value_adapter
    return out


def reference_logprobs(cfg, roles: Roles, r: Rollout) -> torch.Tensor:
    """log pi_ref of the sampled tokens [N, T]: the reference adapter (or adapters off) on the same base."""
    return adapter_logprobs(cfg, roles, r, roles.reference)


@torch.no_grad()
def evaluate(cfg, roles: Roles, tokenizer, prompts: Prompts) -> tuple[dict, list[dict]]:
    """Mean score (and each reward's mean), KL to the reference, EOS rate and length on held-out
    prompts, one answer each, plus a few samples to look at. Prompt i is answered from the same
    random stream at every evaluation (less noisy curves)."""
    with encoder_reuse(roles.model, enabled=not roles.sharded):  # reward, policy, reference: one encoder pass if allowed
        r = generate_rollouts(cfg, roles, tokenizer, prompts, [row_seed(cfg.seed, -1, i) for i in range(len(prompts))])
        seq_kl = sequence_kl(adapter_logprobs(cfg, roles, r, POLICY), reference_logprobs(cfg, roles, r),
                             r.response_mask.float())
    mask = r.response_mask.float()
    kept = r.kept if r.kept is not None else torch.ones_like(r.has_eos)  # --skip-nonfinite drops unscored answers
    metrics = {"score": r.raw_scores[kept].mean().item(), "kl": seq_kl[kept].mean().item(),
               "eos_fraction": r.has_eos[kept].float().mean().item(), "response_length": mask.sum(1)[kept].mean().item()}
    if len(r.reward_parts) > 1:
        metrics.update({f"reward/{k}": v[kept].mean().item() for k, v in r.reward_parts.items()})
    samples = [{"prompt": p, "response": s, "score": float(x)}
               for p, s, x in zip(r.prompts, r.responses, r.raw_scores.tolist())][:cfg.samples_to_log]
    return metrics, samples


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepContext:
    roles: Roles
    accelerator: Any
    module: torch.nn.Module  # the trained module as wrapped: DDP with several processes, common.Entry under FSDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reduce: Callable[[torch.Tensor], torch.Tensor]  # sum over processes
    gather: Callable[[torch.Tensor], torch.Tensor]  # concatenate over processes


class OnlineAlgorithm(Protocol):
    """What an online stage plugs into ``train``."""

    stage: str
    completions_per_prompt: int
    prompts_per_step: int  # all processes together

    def build_roles(self, cfg, total_steps: int) -> Roles: ...

    def reward_functions(self, cfg) -> list[str]: ...  # the rule rewards (module:function), checked early

    def trained_module(self, roles: Roles) -> torch.nn.Module: ...

    def learn(self, step: int, r: Rollout, ctx: StepContext) -> dict[str, float]: ...

    def after_step(self, metrics: dict[str, float], rollouts: int) -> None: ...

    def save_extra(self, roles: Roles, path: Path) -> None: ...  # weights besides the policy adapter

    def load_extra(self, roles: Roles, path: Path) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def describe(self) -> str: ...


def train(cfg, algorithm: OnlineAlgorithm) -> dict:
    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.loading import load_tokenizer

    stage = algorithm.stage
    if cfg.optimizer == "sophia":  # its Hessian steps need the backward's graph, which these updates do not keep
        raise ConfigError(f"--optimizer sophia: {stage} does not yet keep the graph its Hessian estimate needs (sft, rm "
                          "and dpo do): choose another optimizer")
    common.setup_logging()
    accelerator = common.make_accelerator(cfg.device, stage, common.ONLINE_STRATEGIES)
    common.check_fsdp_model(cfg, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    if algorithm.prompts_per_step % world:
        raise ConfigError(f"{algorithm.prompts_per_step} prompts per step must be divisible by the {world} processes")
    run = common.Run(cfg, stage, accelerator.is_main_process)
    if run.finished is not None:  # --resume auto on a finished run: never trained again
        return run.finished
    common.set_seed(cfg.seed + rank * 100003)  # each process samples its own rollouts ([N] General 6)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_prompts, eval_prompts, data_report = prepare_prompts(cfg, tokenizer)
    data_report["warnings"] = reward_adapter_warnings(cfg.reward_adapter) if cfg.reward_adapter else []
    for warning in data_report["warnings"]:
        log.warning("%s", warning)
    per_step = algorithm.prompts_per_step
    steps_per_epoch = max(len(train_prompts) // per_step, 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    needs_of = reward_columns(algorithm.reward_functions(cfg))
    check_reward_columns(needs_of, train_prompts, cfg.prompts)
    if len(eval_prompts):
        check_reward_columns(needs_of, eval_prompts, cfg.eval_prompts or cfg.prompts)
    roles = algorithm.build_roles(cfg, total_steps)
    module = wrap(accelerator, algorithm.trained_module(roles), roles, common.shards_adapters(cfg))
    # Built after wrapping (the order every engine needs), from roles.trainable, which wrap has
    # pointed at FSDP's sharded parameters where it shards the adapters.
    optimizer = common.build_optimizer(roles.trainable, cfg, str(roles.trainable[0].device))
    scheduler = common.build_scheduler(optimizer, cfg, total_steps)
    def save_weights(path: Path, tokenizer=None) -> None:
        save_adapter(roles.model, path / "adapter", name=POLICY, tokenizer=tokenizer)
        algorithm.save_extra(roles, path)

    def load_weights(path: Path) -> None:
        load_adapter_weights(roles.model, path / "adapter", name=POLICY)
        algorithm.load_extra(roles, path)

    with common.whole_trainable(module, optimizer):  # FSDP: each process keeps its part of what is loaded
        start_step, state, extra = common.resume(run, optimizer, scheduler, load_weights)
    if extra:
        algorithm.load_state_dict(extra)
    nonfinite_skipped = state.get("nonfinite_skipped", 0)  # rollouts, micro-batches, updates dropped (skip_nonfinite)
    gather = accelerator.gather if world > 1 else (lambda x: x)
    ctx = StepContext(roles, accelerator, module, optimizer, scheduler,
                      (lambda x: accelerator.reduce(x, "sum")) if world > 1 else (lambda x: x), gather)
    G = algorithm.completions_per_prompt
    log.info("%s: %d prompts, %d steps of %d prompts x %d completions; reference: %s; reward: %s; %s", stage,
             len(train_prompts), total_steps, per_step, G,
             f"frozen copy of the SFT adapter ({cfg.sft_adapter})" if roles.reference else "base (adapters off)",
             " + ".join(f"{s.weight:g} x {s.name}" for s in roles.reward.sources), algorithm.describe())
    if is_seq2seq(roles.model):
        trained = {name for name in (POLICY, roles.value_adapter) if name}
        log.info("%s", describe_encoder_sharing(roles.model, model_roles(roles), trained, enabled=not roles.sharded))
    before = {}
    if cfg.eval_at_start and start_step == 0 and len(eval_prompts):
        before = {f"eval_start_{k}": v for k, v in _log_eval(cfg, run, roles, tokenizer, eval_prompts, 0).items()}
    elif cfg.eval_at_start and run.metrics_path.is_file():  # resumed: the numbers before training are on file
        first = next((json.loads(line) for line in run.metrics_path.read_text().splitlines()
                      if '"split": "eval"' in line and json.loads(line).get("step") == 0), None)
        before = {f"eval_start_{k}": v for k, v in (first or {}).items() if k not in ("stage", "split", "step", "time")}
    progress = common.Progress(total_steps, start_step, stage, cfg.progress and accelerator.is_main_process)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        chosen = step_prompts(cfg, step, len(train_prompts), rank, world, per_step)
        first = rank * len(chosen) * G  # global position of this process's first rollout in the step
        # One step's passes on its rollouts (reward, old policy, value, reference; a training forward
        # whose encoder is frozen) share encoder passes where their adapters allow (encoder_reuse).
        with encoder_reuse(roles.model, enabled=not roles.sharded) as encoders:
            try:
                failure = None
                try:
                    r = generate_rollouts(cfg, roles, tokenizer, train_prompts.take(chosen),
                                          [row_seed(cfg.seed, step, first + i) for i in range(len(chosen) * G)],
                                          chosen, G)
                except Exception as e:  # noqa: BLE001 - re-raised below, on every process
                    failure = e
                stop_together(accelerator, failure)
            except NonFiniteError as e:
                raise run.nonfinite(str(e), step + 1, "pass --skip-nonfinite to drop such rollouts") from None
            except RewardFunctionError as e:
                raise RewardFunctionError(f"{stage} step {step + 1}: {e}") from e.__cause__
            try:
                stats = algorithm.learn(step, r, ctx)
            except NonFiniteError as e:
                raise run.nonfinite(str(e), step + 1, "pass --skip-nonfinite to skip such updates") from None
            if encoders is not None:
                stats = {**stats, "encoder_passes": encoders.runs, "encoder_passes_reused": encoders.reused}
        # Statistics of the whole step's rollouts, over every process (dropped rollouts left out).
        kept = gather(r.kept)
        scores = gather(r.raw_scores)[kept]
        mask = r.response_mask.float()
        metrics = {
            "score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
            **{f"reward/{k}": gather(v)[kept].mean().item() for k, v in r.reward_parts.items()
               if len(r.reward_parts) > 1},
            "eos_fraction": gather(r.has_eos.float())[kept].mean().item(),
            "response_length": gather(mask.sum(1))[kept].mean().item(),
            "lr": scheduler.get_last_lr()[0], **{k: v for k, v in stats.items() if k != "nonfinite_skipped"},
            "samples_per_s": per_step * G / (time.perf_counter() - started),
        }
        if cfg.skip_nonfinite:
            nonfinite_skipped += int((~kept).sum()) + stats.get("nonfinite_skipped", 0)
            metrics["nonfinite_skipped"] = nonfinite_skipped
        algorithm.after_step(metrics, per_step * G)
        done = step + 1
        last = metrics
        if done % cfg.logging_steps == 0 or done == total_steps:
            run.log(done, metrics)
        progress.update(1, score=metrics["score"], kl=metrics.get("kl", 0.0),
                        samples_s=round(metrics["samples_per_s"], 1))
        if len(eval_prompts) and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
            with optimizers.eval_weights(optimizer):  # schedule-free: evaluate the averaged weights
                _log_eval(cfg, run, roles, tokenizer, eval_prompts, done)
        if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
            with optimizers.eval_weights(optimizer), common.whole_trainable(module, optimizer):
                # (schedule-free: resume switches back, optimizers.after_resume; FSDP: gathered on every process)
                run.save_checkpoint(done, lambda path: (save_weights(path), common.save_torch_state(
                    path, optimizer, scheduler, algorithm.state_dict())),
                    {"total_steps": total_steps, "nonfinite_skipped": nonfinite_skipped})
    progress.close()

    summary = {"steps": total_steps, "final_score": last.get("score"), "final_kl": last.get("kl"), **data_report,
               "distributed": common.strategy(accelerator, cfg),
               **before}
    optimizers.to_eval(optimizer)  # schedule-free: the averaged weights are the result
    accelerator.wait_for_everyone()
    with common.whole_trainable(module):  # FSDP: sharded adapters gathered on every process
        if accelerator.is_main_process:  # saved before the final evaluation: a failing reward there loses no training
            save_weights(run.dir, tokenizer)
            write_adapter_info(run.dir / "adapter", stage=stage, template=data_report["template"],
                               base=BaseSpec.from_config(cfg).record(), sft_adapter=cfg.sft_adapter,
                               reward_adapter=cfg.reward_adapter)
            summary["adapter"] = str(run.dir / "adapter")
    if len(eval_prompts):
        try:
            summary.update({f"eval_{k}": v for k, v in _log_eval(cfg, run, roles, tokenizer, eval_prompts,
                                                                  total_steps).items()})
        except (NonFiniteError, RewardFunctionError) as e:
            log.warning("the final held-out evaluation failed, the trained adapter is saved: %s", e)
            summary["eval_error"] = str(e)
    run.write_summary(summary)
    run.close()
    log.info("%s done: score %.3f, KL %.3f; policy adapter in %s", stage, summary["final_score"],
             summary["final_kl"] or 0.0, run.dir / "adapter")
    return summary


def wrap(accelerator, trained: torch.nn.Module, roles: Roles, shard_trainable: bool = True) -> torch.nn.Module:
    """The trained module as the loop calls it: DDP-wrapped (several processes), or under FSDP the
    sharded root ``common.Entry`` through which every role's forward runs (``roles.run``): rollout
    generation, the reference and reward passes share the one sharded base with the policy."""
    if common.strategy(accelerator)["strategy"] != "fsdp":
        # Weights are already placed by load_base (quantized weights cannot be moved anyway).
        return accelerator.prepare_model(trained, device_placement=False)
    names = {id(p): n for n, p in trained.named_parameters()}
    order = [names.get(id(p)) for p in roles.trainable]
    entry = common.shard(common.Entry(trained), accelerator, shard_trainable)
    # Sharding replaces the adapters' parameters in the layers by sharded ones: the optimizer, the
    # clipping and the gradient averaging must see those (in the same order as without sharding).
    now = dict(trained.named_parameters())
    roles.trainable[:] = [now[n] if n in now else p for n, p in zip(order, roles.trainable)]
    roles.run = lambda fn, *args, **kwargs: entry(*args, run=fn, **kwargs)
    roles.sharded = True
    return entry


def stop_together(accelerator, failure: BaseException | None) -> None:
    """Raise ``failure`` on every process when any process has one: a process that stopped alone
    would leave the others waiting forever in their next collective."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
        if accelerator.reduce(flag, "sum").item() > 0 and failure is None:
            failure = PocketError("another process stopped at this step (its own message names the cause)")
    if failure is not None:
        raise failure


def _log_eval(cfg, run, roles, tokenizer, eval_prompts, step) -> dict:
    metrics, samples = evaluate(cfg, roles, tokenizer, eval_prompts)
    run.log(step, metrics, split="eval")
    if run.is_main:
        with (run.dir / "samples.jsonl").open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
    return metrics

