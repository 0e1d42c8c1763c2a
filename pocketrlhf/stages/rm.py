"""Reward modelling: an adapter + scalar head on the frozen base learns to rank answers.

loss = mean over pairs of -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin), where r is
the head's output at the EOS token closing each answer ("The N+ Implementation Details of RLHF
with PPO", Detail 12). Chosen and rejected run in one batch. The result is saved as a peft
adapter + ``head.safetensors``, so PPO and ``score`` load it as one more adapter on the SAME base
in memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pocketrlhf.algorithms.reward import pairwise_accuracy, pairwise_loss
from pocketrlhf.algorithms.stats import accuracy_report, describe_accuracy
from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.data.formats import PREFERENCE_FORMATS, preference_pairs, sft_pairs
from pocketrlhf.data.loading import load_records
from pocketrlhf.data.rows import read_rows
from pocketrlhf.data.templates import TemplateName, check_seq2seq_template
from pocketrlhf.data.tokenize import (PreferenceExample, collate_preferences, collate_shared_prompt, tokenize_pair,
                                     tokenize_preferences)
from pocketrlhf.diagnostics import reward_model_warnings
from pocketrlhf.errors import ConfigError, DataError
from pocketrlhf.models.loading import is_seq2seq
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log
from pocketrlhf.stages.loop import Loop, plan_steps
from pocketrlhf.stages.loop import evaluate as evaluate_examples


@dataclasses.dataclass
class RMConfig(ModelOptions, AdapterOptions, TrainOptions):
    output_dir: str = option("runs/rm", "run directory")
    data: str = option("", "preference pairs: prompt/chosen/rejected, chosen/rejected, or question/response_j/response_k")
    eval_data: str = option("", "held-out pairs (default: eval_fraction of data)")
    eval_fraction: float = option(0.05, "fraction of pairs held out when no eval_data (0: none)")
    template: TemplateName = option("plain", "prompt format; use the one SFT used (stackllama for Stack Exchange data)")
    max_length: int = option(512, "longest prompt + answer in tokens (prompts are cut from the left to fit)")
    sft_adapter: str = option("", "start the reward adapter from this SFT adapter (else a fresh adapter on --model)")
    margin: float = option(0.0, "required reward gap: loss = -log sigmoid(r_chosen - r_rejected - margin)")
    learning_rate: float = option(1e-4, "peak learning rate")
    stats_pairs: int = option(256, "pairs whose answers set the saved reward mean/std (for PPO normalisation)")
    share_prompt: bool = option(True, "compute each pair's prompt once for both answers (same scores, fewer tokens)")


class RewardLoss:
    """Summed pairwise loss over a batch of pairs; the loop divides by the global pair count."""

    def __init__(self, pad_id: int, margin: float, share_prompt: bool = False):
        self.pad_id, self.margin, self.share_prompt = pad_id, margin, share_prompt

    def batch(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        batch = collate_preferences(examples, self.pad_id)
        if self.share_prompt:
            batch.update(collate_shared_prompt(examples, batch["input_ids"].shape[1]))
        return batch

    def units(self, examples: list[PreferenceExample]) -> int:
        return len(examples)

    def loss(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = module(batch)
        chosen, rejected = scores.chunk(2)
        metrics = {"accuracy": pairwise_accuracy(chosen, rejected).sum(), "margin": (chosen - rejected).detach().sum(),
                   "reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum()}
        return pairwise_loss(chosen, rejected, self.margin).sum(), metrics


def prepare_pairs(cfg: RMConfig, tokenizer) -> tuple[list[PreferenceExample], list[PreferenceExample], dict]:
    rows = read_rows("preference", preference_pairs, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                     cfg.template, tokenizer, is_seq2seq(cfg.model))
    train = tokenize_preferences(tokenizer, rows.train, cfg.max_length, rows.skipped)
    evals = tokenize_preferences(tokenizer, rows.held_out, cfg.max_length, rows.skipped)
    if rows.skipped.total:
        log.info("data: %s", rows.skipped.describe())
    return train, evals, {"template": rows.template, "train_pairs": len(train), "eval_pairs": len(evals),
                          "skipped": dict(rows.skipped.counts), "held_out": rows.split}


@torch.no_grad()
def reward_statistics(pair_scores, stage: RewardLoss, examples: list[PreferenceExample], batch_size: int,
                      device) -> dict:
    """Mean and std of the rewards of both answers of ``examples`` (the reference set), batched as
    in training (one copy of each prompt where the model allows it)."""
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in stage.batch(examples[start:start + batch_size]).items()}
        scores.append(pair_scores(batch).float().cpu())
    s = torch.cat(scores)
    return {"reward_mean": s.mean().item(), "reward_std": s.std().item() if s.numel() > 1 else 1.0, "reward_stats_n": s.numel()}


def train(cfg: RMConfig) -> dict:
    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.forward import disable_dropout, supports_attention_bias
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.models.policy import build_policy, hidden_size
    from pocketrlhf.models.roles import PairScoreModel

    accelerator, run = common.open_run(cfg, "rm")
    if run.finished is not None:  # --resume auto on a finished run: never trained again
        return run.finished
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set, data_report = prepare_pairs(cfg, tokenizer)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_set), accelerator.num_processes)

    model = build_policy(cfg, tokenizer, total_steps, init_adapter=cfg.sft_adapter)
    disable_dropout(model)  # also the adapter's own dropout: one reward per text, in train and eval alike
    device = next(p for p in model.parameters() if p.requires_grad).device
    head = ScalarHead(hidden_size(model), init="reward").to(device)
    pair_scores = PairScoreModel(model, head)
    share_prompt = cfg.share_prompt and supports_attention_bias(model)
    module, params, optimizer, scheduler = common.prepare(accelerator, pair_scores, cfg, total_steps)
    stage = RewardLoss(tokenizer.pad_token_id, cfg.margin, share_prompt)

    def write_weights(path: Path) -> None:
        save_adapter(model, path / "adapter")
        head.save(path / "adapter")

    def load_weights(path: Path) -> None:
        load_adapter_weights(model, path / "adapter")
        head.load_state_dict(ScalarHead.load(path / "adapter", device=device).state_dict())

    loop = Loop(cfg, run, accelerator, module, params, optimizer, scheduler,
                stage, train_set, eval_set, write_weights)
    start_step = loop.resume(load_weights)
    log.info("rm: %d train / %d eval pairs, %d steps", len(train_set), len(eval_set), total_steps)
    last = loop.fit(start_step, steps_per_epoch, total_steps)

    summary = {"train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"), "steps": total_steps, **data_report,
               "distributed": common.strategy(accelerator, cfg)}
    if eval_set:
        metrics = loop.evaluate()
        run.log(total_steps, metrics, split="eval")
        summary.update({f"eval_{k}": v for k, v in metrics.items()})
        summary.update(accuracy_report(metrics["accuracy"], len(eval_set), "eval"))
        # The same number of training pairs, scored the same way: the gap to held-out is overfitting.
        seen = evaluate_examples(module, stage, train_set[::max(1, len(train_set) // len(eval_set))][:len(eval_set)],
                                 cfg.batch_size, device, accelerator)
        summary.update(accuracy_report(seen["accuracy"], min(len(train_set), len(eval_set)), "train_seen"))
    summary["warnings"] = reward_model_warnings(summary.get("eval_accuracy"), summary.get("eval_accuracy_n"),
                                                summary.get("train_seen_accuracy"))
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    # A seeded sample of the training pairs, not the file's first rows (often one topic or one source).
    sample = [train_set[i] for i in sorted(common.epoch_order(len(train_set), cfg.seed, -2)[:cfg.stats_pairs])]
    stats = reward_statistics(pair_scores, stage, sample, cfg.batch_size, device)
    summary.update(stats)
    accelerator.wait_for_everyone()
    with common.whole_trainable(module):  # FSDP: sharded adapters gathered on every process
        if accelerator.is_main_process:
            out = save_adapter(model, run.dir / "adapter", tokenizer=tokenizer)
            head.save(out, metadata=stats)
            write_adapter_info(out, stage="rm", template=data_report["template"], base=BaseSpec.from_config(cfg).record(),
                               eval_accuracy=summary.get("eval_accuracy"),
                               eval_accuracy_n=summary.get("eval_accuracy_n"), eval_accuracy_ci95=summary.get("eval_accuracy_ci95"),
                               train_seen_accuracy=summary.get("train_seen_accuracy"), **stats)
            summary["adapter"] = str(out)
    run.write_summary(summary)
    run.close()
    log.info("rm done: train loss %.4f, held-out accuracy %s; reward adapter in %s", summary["train_loss"],
             describe_accuracy(summary.get("eval_accuracy"), summary.get("eval_accuracy_n")), run.dir / "adapter")
    return summary


# ---------------------------------------------------------------------------------------------
# pocketrlhf score


@dataclasses.dataclass
class ScoreConfig(ModelOptions):
    reward_adapter: str = option("", "reward adapter directory written by `pocketrlhf rm`")
    input: str = option("", "pairs (prompt/chosen/rejected, ...) or texts (text, or prompt/completion) to score")
    output: str = option("", "where to write the scored rows as JSON lines (default: INPUT.scores.jsonl)")
    base: str = option("", "base model (default: the reward adapter's base); same as --model")
    template: str = option("", "prompt format (default: the one the reward model was trained with)")
    batch_size: int = option(16, "rows per forward pass")
    max_length: int = option(512, "longest prompt + answer in tokens")
    normalize: bool = option(False, "report (reward - mean) / std with the statistics saved at training")


def split_tokens(example) -> tuple[list[int], list[int]]:
    """(prompt, answer) ids of a ``tokenize_pair(..., completion_only=True)`` example."""
    cut = example.loss_mask.index(1) if 1 in example.loss_mask else len(example.input_ids)
    return example.input_ids[:cut], example.input_ids[cut:]


def _score_tokens(scorer, pad_id: int, token_rows: list[tuple[list[int], list[int]]], cfg: "ScoreConfig",
                  device) -> list[float]:
    """Scores of (prompt, answer) token rows; the answer's place is what an encoder-decoder needs."""
    from pocketrlhf.data.tokenize import TokenExample, collate

    scores: list[float] = []
    for start in range(0, len(token_rows), cfg.batch_size):
        # Keep the end of long texts: the reward is read at the final EOS.
        chunk = [TokenExample((p + a)[-cfg.max_length:], ([0] * len(p) + [1] * len(a))[-cfg.max_length:])
                 for p, a in token_rows[start:start + cfg.batch_size]]
        batch = collate(chunk, pad_id)
        scores += scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device), cfg.normalize,
                         response_mask=batch["loss_mask"].to(device)).tolist()
    return scores


def score(cfg: ScoreConfig) -> dict:
    """Score every row of ``cfg.input``; rows that cannot be scored get null scores and are counted."""
    from pocketrlhf.models.adapters import adapter_base, read_adapter_info, spec_mismatch
    from pocketrlhf.models.loading import load_base, load_tokenizer
    from pocketrlhf.models.roles import load_reward_adapter

    common.setup_logging()
    if not cfg.reward_adapter or not cfg.input:
        raise ConfigError("score needs --reward-adapter DIR and --input FILE")
    spec = BaseSpec.from_config(cfg, path=adapter_base(cfg.reward_adapter, cfg.base or cfg.model, flag="--model"))
    template = cfg.template or read_adapter_info(cfg.reward_adapter).get("template", "plain")
    has_tokenizer = Path(cfg.reward_adapter, "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(cfg.reward_adapter if has_tokenizer else spec.path, cfg.trust_remote_code)
    mismatch = spec_mismatch(cfg.reward_adapter, spec)
    if mismatch:
        log.warning("%s (--quantization, --quant-type, --double-quant)", mismatch)
    seq2seq = is_seq2seq(spec.path)
    if seq2seq:
        check_seq2seq_template(template)
    model = load_base(spec, training=False)
    model, scorer = load_reward_adapter(model, cfg.reward_adapter)
    model.eval()
    device = next(model.parameters()).device
    ds = load_records(cfg.input)
    is_pairs = any(all(c in ds.column_names for c in cols) for cols in PREFERENCE_FORMATS.values())
    pad = tokenizer.pad_token_id
    if is_pairs:
        pairs, skipped = preference_pairs(ds, cfg.input, template, tokenizer, placeholders=True)
        present = [i for i, p in enumerate(pairs) if p is not None]
        examples = tokenize_preferences(tokenizer, [pairs[i] for i in present], None, skipped)
        chosen = _score_tokens(scorer, pad, [(e.prompt_ids, e.chosen_ids) for e in examples], cfg, device)
        rejected = _score_tokens(scorer, pad, [(e.prompt_ids, e.rejected_ids) for e in examples], cfg, device)
        scores = [{"score_chosen": None, "score_rejected": None} for _ in pairs]
        for i, c, r in zip(present, chosen, rejected):
            scores[i] = {"score_chosen": c, "score_rejected": r}
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(present)
    else:
        texts, skipped = sft_pairs(ds, cfg.input, template, tokenizer, placeholders=True)
        present = [i for i, t in enumerate(texts) if t is not None]
        tokens = [split_tokens(tokenize_pair(tokenizer, texts[i].prompt, texts[i].completion, True)) for i in present]
        if seq2seq and any(not prompt for prompt, _ in tokens):
            raise DataError(f"{cfg.input}: rows without a prompt (a bare text column?) cannot be scored by an "
                            "encoder-decoder reward model: give prompt+completion rows")
        scores = [{"score": None} for _ in texts]
        for i, s in zip(present, _score_tokens(scorer, pad, tokens, cfg, device)):
            scores[i] = {"score": s}
    out = Path(cfg.output) if cfg.output else Path(cfg.input).with_suffix(".scores.jsonl")
    with out.open("w") as f:
        for row, s in zip(ds, scores):
            f.write(json.dumps({**row, **s}) + "\n")
    result = {"rows": len(scores), "scored": len(present), "output": str(out), "skipped": dict(skipped.counts)}
    message = f"scored {len(present)} of {len(scores)} {'pairs' if is_pairs else 'texts'} -> {out}"
    if is_pairs:
        result["accuracy"] = accuracy
        message += f"; accuracy {accuracy:.3f}"
    if skipped.total:
        message += f" (not scored: {skipped.describe()})"
    print(message)
    return result
