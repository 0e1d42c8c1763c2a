"""PPO with a per-token KL penalty, every role on ONE frozen (16/8/4-bit) base.

    policy     adapter "policy" (a trainable copy of the SFT adapter, or fresh on a merged SFT base)
    reference  adapter "reference" (a frozen copy of the SFT adapter), or adapters disabled
    value      a scalar head on the policy's hidden states (one forward, as StackLLaMA), or with
               --value-model adapter a separate trainable "value" adapter + head (init: the RM)
    reward     frozen adapter "reward" + head from `pocketrlhf rm`, or a Python function

One step of ``train``, each detail with the function that does it:

 Steps 1-3, checkpoints, resume and metrics are the online loop shared with `grpo` (online.py).

 1. prompts of the step: a function of (seed, step) alone, reshuffled every epoch    step_prompts
 2. sample at temperature T from the full distribution, one counter-based random
    stream per rollout (N processes reproduce one), cut after the first EOS          generate_rollouts
 3. score with the reward adapter (normalised with the RM's saved mean/std) or the
    rule; minus the baseline, clipped, minus a penalty when no EOS came [N+] D23      generate_rollouts
 4. one no-grad pass, dropout off [N] Policy 4, logits / T [N] Policy 1: old
    log-probs, values, entropy, and reference log-probs (adapter switch)             old_policy_pass
 5. per-token rewards -beta * KL, the score added on the last token [N] Policy 8     penalized_rewards
 6. optional reward whitening without shifting the mean [N] Policy 9                 masked_whiten
 7. GAE with gamma 1 [N] Policy 6, returns taken BEFORE advantages are whitened       gae
 8. advantages whitened over the whole batch (all processes) [N+] D25                masked_whiten
 9. ppo_epochs over shuffled minibatches, micro-batches weighted by their tokens:
    clipped policy loss + vf_coef * clipped value loss [N] Policy 10                  ppo_update
10. beta adapted towards kl_target (Ziegler et al. 2019) or fixed                    AdaptiveKLController
11. the value head starts at zero [N] Policy 2; a value adapter starts as the RM
    [N+] D22; a different seed per process [N] General 6                             build_roles, online.train

References a newcomer can open:
    [N]  Huang, Liu, von Werra et al., "The N Implementation Details of RLHF with PPO",
         Hugging Face blog / ICLR blog track 2024 (details named by section and number).
    [N+] Huang, Noukhovitch, Hosseini et al., "The N+ Implementation Details of RLHF with PPO:
         A Case Study on TL;DR Summarization", COLM 2024, arXiv:2403.17031 (Detail N).
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch

from pocketrlhf.algorithms.ppo import (AdaptiveKLController, FixedKLController, explained_variance, gae,
                                       kl_per_token, masked_mean, masked_whiten, penalized_rewards, policy_loss,
                                       sequence_kl, value_loss)
from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.errors import ConfigError, NonFiniteError
from pocketrlhf.models.policy import cast_adapter, hidden_size
from pocketrlhf.stages import common, online
from pocketrlhf.stages.online import (POLICY, REFERENCE, REWARD, Roles, Rollout, evaluate, generate_rollouts,  # noqa: F401
                                      prepare_prompts, reward_adapter_warnings, step_prompts)

VALUE = "value"


@dataclasses.dataclass
class PPOConfig(ModelOptions, AdapterOptions, TrainOptions, online.OnlineOptions):
    output_dir: str = option("runs/ppo", "run directory")
    reward_function: str = option("", "rule-based reward instead: module:function or file.py:function (texts in, floats out)")
    value_model: Literal["head", "adapter"] = option("head", "value: a head on the policy, or a separate adapter + head")
    rollouts_per_step: int = option(64, "responses sampled per PPO step (all processes together)")
    ppo_epochs: int = option(4, "passes over each step's rollouts")
    kl_coef: float = option(0.2, "initial KL penalty coefficient beta")
    adaptive_kl: bool = option(True, "adapt beta towards kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, "target sequence KL (nats) of the adaptive controller")
    kl_horizon: float = option(10000.0, "adaptive controller horizon")
    kl_estimator: Literal["kl", "abs", "mse"] = option("kl", "per-token KL estimate in the reward")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    cliprange: float = option(0.2, "policy ratio clip")
    cliprange_value: float = option(0.2, "value clip around the old values")
    vf_coef: float = option(0.1, "value loss weight")
    whiten_rewards: bool = option(False, "whiten the per-token rewards over the batch before GAE")
    target_kl: float = option(0.0, "stop a step's epochs early when its policy KL exceeds 1.5 x this (0: never)")
    learning_rate: float = option(1.41e-5, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", "schedule (linear: decay to 0, N+)")
    adam_eps: float = option(1e-5, "Adam epsilon (N+)")
    batch_size: int = option(8, "rollouts per forward/backward micro-batch")
    gradient_accumulation_steps: int = option(2, "micro-batches per optimizer step (minibatch = both multiplied)")


# ---------------------------------------------------------------------------------------------
# Roles on one base: online's policy, reference and reward, plus the value


def build_roles(cfg: PPOConfig, total_steps: int) -> Roles:
    from pocketrlhf.models.adapters import attach_adapter, load_adapter, make_peft_config
    from pocketrlhf.models.heads import ScalarHead

    if bool(cfg.reward_adapter) == bool(cfg.reward_function):
        raise ConfigError("ppo needs exactly one of --reward-adapter DIR or --reward-function module:function")
    roles = online.build_shared_roles(cfg, total_steps, [cfg.reward_function] if cfg.reward_function else [], [])
    model = roles.model
    device = next(p for p in model.parameters() if p.requires_grad).device
    if cfg.value_model == "adapter":
        roles.value_adapter = VALUE
        if cfg.reward_adapter:  # [N+] Detail 22: the critic starts as the reward model
            model = load_adapter(model, cfg.reward_adapter, name=VALUE, trainable=True)
            roles.value_head = ScalarHead.load(cfg.reward_adapter, device=device)
        else:
            model = attach_adapter(model, make_peft_config(cfg.adapter, cfg.lora_r, cfg.lora_alpha, 0.0,
                                                           cfg.target_modules, cfg.num_virtual_tokens, total_steps),
                                   VALUE, cfg.adapter_scope)
            roles.value_head = ScalarHead(hidden_size(model), init="zero").to(device)
        cast_adapter(model, VALUE, cfg.adapter_dtype)
        roles.model = model
    else:
        roles.value_head = ScalarHead(hidden_size(model), init="zero").to(device)  # [N] Policy 2: zero init
    return online.finish_roles(roles, {POLICY} | ({VALUE} if roles.value_adapter else set()))


class ActorCritic(torch.nn.Module):
    """The trained module (what accelerate/DDP wraps). The caller activates the adapter of the
    role it asks for, and runs backward inside that context (recomputation under gradient
    checkpointing must see the same adapter)."""

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Module, shared_trunk: bool):
        super().__init__()
        self.model, self.value_head, self.shared_trunk = model, value_head, shared_trunk

    def forward(self, input_ids, attention_mask, response_mask, temperature: float, role: str = POLICY,
                return_entropy: bool = False) -> dict[str, torch.Tensor]:
        from pocketrlhf.models.forward import final_hidden_states, response_logprobs, token_aligned

        if role == VALUE:
            hidden = final_hidden_states(self.model, input_ids, attention_mask, response_mask)
            return {"values": token_aligned(self.value_head(hidden))}
        out = response_logprobs(self.model, input_ids, attention_mask, response_mask, temperature,
                                return_hidden=self.shared_trunk, return_entropy=return_entropy)
        result = {"logprobs": out.logprobs}
        if out.entropy is not None:
            result["entropy"] = out.entropy
        if self.shared_trunk:
            result["values"] = token_aligned(self.value_head(out.hidden))
        return result


@torch.no_grad()
def old_policy_pass(cfg: PPOConfig, roles: Roles, module: ActorCritic, r: Rollout) -> dict[str, torch.Tensor]:
    """Log-probs, values, entropy of the sampling policy and reference log-probs (no grad)."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "entropy": []}
    for i in range(0, r.input_ids.shape[0], cfg.batch_size):
        ids, attn, resp = (t[i:i + cfg.batch_size] for t in (r.input_ids, r.attention_mask, r.response_mask))
        with roles.adapters.use(POLICY):
            out = module(ids, attn, resp, cfg.temperature, return_entropy=True)
        if roles.value_adapter:
            with roles.adapters.use(roles.value_adapter):
                out["values"] = module(ids, attn, resp, cfg.temperature, role=VALUE)["values"]
        for k in ("logprobs", "values", "entropy"):
            parts[k].append(out[k].float())
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["ref_logprobs"] = online.reference_logprobs(cfg, roles, r)
    return out


# ---------------------------------------------------------------------------------------------
# The PPO update


def ppo_update(cfg: PPOConfig, roles: Roles, module, r: Rollout, old: dict, advantages, returns, optimizer,
               scheduler, accelerator, generator: torch.Generator) -> dict[str, float]:
    """ppo_epochs passes of shuffled minibatches. Each minibatch's losses are token means over the
    minibatch on ALL processes (micro-batches weighted by their tokens, DDP's averaging undone),
    so N processes take the same step as one process with the same global minibatch.

    A non-finite loss or gradient norm is a NonFiniteError, or with ``skip_nonfinite`` skips that
    micro-batch's backward or that minibatch's update; ``nonfinite_skipped`` counts them (this
    process's micro-batches plus the minibatch updates)."""
    mask = r.response_mask.float()
    n = mask.shape[0]
    world = accelerator.num_processes
    minibatch = cfg.batch_size * cfg.gradient_accumulation_steps
    sums: dict[str, float] = {}
    weight = 0.0
    first: dict[str, float] = {}
    stats: dict[str, float] = {}
    skipped = 0

    def finite(loss: torch.Tensor, what: str, epoch: int, start: int) -> bool:
        if common.finite_everywhere(accelerator, loss):
            return True
        if not cfg.skip_nonfinite:
            raise NonFiniteError(f"the {what} loss is {loss.detach().float().item()} (PPO epoch {epoch + 1}, "
                                 f"minibatch {start // minibatch + 1})")
        common.skip_backward(accelerator, roles.trainable)
        return False

    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, minibatch):
            rows = order[start:start + minibatch]
            tokens = mask[rows].sum()
            if world > 1:
                tokens = accelerator.reduce(tokens, "sum") / world
            tokens = tokens.clamp(min=1)
            for m in range(0, len(rows), cfg.batch_size):
                idx = torch.tensor(rows[m:m + cfg.batch_size], device=mask.device)
                ids, attn, resp, mb_mask = r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx], mask[idx]
                share = mb_mask.sum() / tokens  # this micro-batch's share of the minibatch's tokens
                ok = True
                with roles.adapters.use(POLICY):
                    out = module(ids, attn, resp, cfg.temperature)
                    pg = policy_loss(out["logprobs"], old["logprobs"][idx], advantages[idx], mb_mask, cfg.cliprange)
                    loss = pg.loss
                    if roles.value_adapter is None:
                        vf, vf_clip = value_loss(out["values"], old["values"][idx], returns[idx], mb_mask,
                                                 cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * vf
                    # Backward inside the adapter's context: recomputation must see the same adapter.
                    if finite(loss, "policy" if roles.value_adapter else "policy + value", epoch, start):
                        accelerator.backward(loss * share)
                    else:
                        ok = False
                if roles.value_adapter is not None:
                    with roles.adapters.use(roles.value_adapter):
                        values = module(ids, attn, resp, cfg.temperature, role=VALUE)["values"]
                        vf, vf_clip = value_loss(values, old["values"][idx], returns[idx], mb_mask, cfg.cliprange_value)
                        if finite(vf, "value", epoch, start):
                            accelerator.backward(cfg.vf_coef * vf * share)
                        else:
                            ok = False
                if not ok:
                    skipped += 1
                    continue
                stats = {"pg_loss": pg.loss.item(), "vf_loss": vf.item(), "pg_clipfrac": pg.clipfrac.item(),
                         "vf_clipfrac": vf_clip.item(), "approxkl": pg.approxkl.item(), "policykl": pg.policykl.item(),
                         "ratio": pg.ratio.item()}
                if not first:
                    first = {"first_ratio": stats["ratio"], "first_approxkl": stats["approxkl"]}
                w = mb_mask.sum().item()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * w
                weight += w
            common.sync_gradients(accelerator, module, roles.trainable)  # FSDP; DDP did it in backward
            norm = float(common.grad_norm(accelerator, roles.trainable, cfg.max_grad_norm))
            if math.isfinite(norm):
                optimizer.step()
            elif not cfg.skip_nonfinite:
                raise NonFiniteError(f"the gradient norm is {norm} (PPO epoch {epoch + 1}, minibatch "
                                     f"{start // minibatch + 1})")
            else:
                skipped += 1  # this minibatch's update is dropped
            optimizer.zero_grad(set_to_none=True)
        if cfg.target_kl > 0 and stats.get("policykl", 0.0) > 1.5 * cfg.target_kl:
            first["early_stopped_epoch"] = epoch + 1
            break
    scheduler.step()
    result = {**{k: v / max(weight, 1.0) for k, v in sums.items()}, **first}
    if cfg.skip_nonfinite:
        result["nonfinite_skipped"] = skipped
    return result


# ---------------------------------------------------------------------------------------------
# PPO as an online algorithm


class PPO:
    """Steps 4-10 of the list at the top, on the rollouts of ``online.train``."""

    stage = "ppo"
    completions_per_prompt = 1

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.prompts_per_step = cfg.rollouts_per_step
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

    def describe(self) -> str:
        return f"value: {self.cfg.value_model}; {self.cfg.ppo_epochs} PPO epochs"

    def reward_functions(self, cfg: PPOConfig) -> list[str]:
        return [cfg.reward_function] if cfg.reward_function else []

    def build_roles(self, cfg: PPOConfig, total_steps: int) -> Roles:
        return build_roles(cfg, total_steps)

    def trained_module(self, roles: Roles) -> torch.nn.Module:
        return ActorCritic(roles.model, roles.value_head, roles.value_adapter is None)

    def learn(self, step: int, r: Rollout, ctx: online.StepContext) -> dict[str, float]:
        cfg = self.cfg
        roles = ctx.roles
        old = old_policy_pass(cfg, roles, ctx.module, r)
        mask = r.response_mask.float()
        kl = kl_per_token(old["logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask
        rewards = penalized_rewards(r.scores, kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=ctx.reduce)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, reduce=ctx.reduce)
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        stats = ppo_update(cfg, roles, ctx.module, r, old, advantages, returns, ctx.optimizer, ctx.scheduler,
                           ctx.accelerator, generator)
        kept = ctx.gather(r.kept)
        return {"kl": ctx.gather(sequence_kl(old["logprobs"], old["ref_logprobs"], mask))[kept].mean().item(),
                "kl_coef": self.kl_ctl.value, "entropy": masked_mean(old["entropy"], mask, ctx.reduce).item(),
                "explained_variance": explained_variance(old["values"], returns, mask, ctx.reduce), **stats}

    def after_step(self, metrics: dict[str, float], rollouts: int) -> None:
        if metrics.get("score") == metrics.get("score"):  # a step whose every rollout was dropped says nothing
            self.kl_ctl.update(metrics["kl"], rollouts)

    def save_extra(self, roles: Roles, path: Path) -> None:
        from pocketrlhf.models.adapters import save_adapter

        if roles.value_adapter:
            save_adapter(roles.model, path / "value", name=VALUE)
        roles.value_head.save(path / "value")

    def load_extra(self, roles: Roles, path: Path) -> None:
        from pocketrlhf.models.adapters import load_adapter_weights
        from pocketrlhf.models.heads import ScalarHead

        if roles.value_adapter:
            load_adapter_weights(roles.model, path / "value", name=VALUE)
        device = next(roles.value_head.parameters()).device
        roles.value_head.load_state_dict(ScalarHead.load(path / "value", device=device).state_dict())

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


def train(cfg: PPOConfig) -> dict:
    return online.train(cfg, PPO(cfg))
