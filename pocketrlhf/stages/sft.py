"""Supervised fine-tuning: an adapter on the frozen base learns to continue prompts.

loss = mean over trained tokens of -log p(x_t | x_<t), tokens counted across the whole global
batch (all micro-batches and processes), so gradient accumulation and DDP give the same
gradient as one big batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, given_options, option
from pocketrlhf.data.formats import sft_pairs
from pocketrlhf.data.rows import read_rows
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.errors import ConfigError
from pocketrlhf.data.tokenize import TokenExample, collate, pack, tokenize_sft
from pocketrlhf.models.policy import build_policy
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log
from pocketrlhf.stages.loop import Loop, plan_steps, sequences_per_step


@dataclasses.dataclass
class SFTConfig(ModelOptions, AdapterOptions, TrainOptions):
    output_dir: str = option("runs/sft", "run directory")
    data: str = option("", "training data (.jsonl/.json/.parquet/.csv/.arrow, a save_to_disk folder, or a hub id) with "
                           "the columns text, prompt+completion, messages (chat), or question+response_j (Stack Exchange)")
    eval_data: str = option("", "held-out data (default: eval_fraction of data)")
    eval_fraction: float = option(0.05, "fraction of data held out for eval when no eval_data (0: no eval)")
    template: TemplateName = option("plain", "prompt format (stackllama: 'Question: ...\\n\\nAnswer: ...'; auto: tokenizer chat template)")
    packing: bool = option(True, "pack EOS-joined examples into constant-length chunks (StackLLaMA) instead of padding")
    seq_length: int = option(512, "packed chunk length, or the truncation length of padded examples")
    completion_only: bool = option(False, "train only on completion tokens (prompt tokens get no loss)")
    init_adapter: str = option("", "start from this saved adapter instead of a fresh one")


# ---------------------------------------------------------------------------------------------


def prepare_data(cfg: SFTConfig, tokenizer, seq2seq: bool = False) -> tuple[list[TokenExample], list[TokenExample], dict]:
    """Training and eval examples (packed or not), plus a report of what was skipped. For an
    encoder-decoder base (``seq2seq``) each example is input -> target, the loss on the target."""
    if seq2seq and cfg.packing:
        raise ConfigError("--packing does not apply to an encoder-decoder base (each input goes to the encoder, its "
                          "target to the decoder): leave it out, or pass --no-packing")
    rows = read_rows("SFT", sft_pairs, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.template, tokenizer,
                     seq2seq)
    pairs, eval_pairs, skipped = rows.train, rows.held_out, rows.skipped
    completion_only = cfg.completion_only
    if seq2seq:
        if not completion_only:
            log.info("encoder-decoder base: the loss covers the decoder's target only (the input is the encoder's), "
                     "whatever --completion-only says")
        completion_only = True
    max_len = None if cfg.packing else cfg.seq_length
    train = tokenize_sft(tokenizer, pairs, completion_only, max_len, skipped)
    evals = tokenize_sft(tokenizer, eval_pairs, completion_only, max_len, skipped) if eval_pairs else []
    if cfg.packing:
        train = pack(train, cfg.seq_length, cfg.seed)
        evals = pack(evals, cfg.seq_length, cfg.seed) if evals and sum(len(e.input_ids) for e in evals) >= cfg.seq_length else []
    report = {"template": rows.template, "train_examples": len(pairs), "eval_examples": len(eval_pairs),
              "train_sequences": len(train), "eval_sequences": len(evals), "skipped": dict(skipped.counts),
              "held_out": rows.split}
    if skipped.total:
        log.info("data: %s", skipped.describe())
    return train, evals, report


class SFTLoss:
    """Summed -log p over trained tokens; the loop divides by the global token count."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def batch(self, examples: list[TokenExample]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def units(self, examples: list[TokenExample]) -> int:
        return sum(sum(e.loss_mask[1:]) for e in examples)

    def loss(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
        return -(out["logprobs"][:, 1:] * mask).sum(), {}


def train(cfg: SFTConfig) -> dict:
    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.loading import is_seq2seq, load_tokenizer

    seq2seq = is_seq2seq(cfg.model)
    if seq2seq and cfg.packing and "packing" not in given_options(cfg):
        log.info("encoder-decoder base: sft runs without packing (input -> target examples); packing is the "
                 "default for causal LMs only")
        cfg.packing = False  # before open_run, so that the run's saved config says what ran
    accelerator, run = common.open_run(cfg, "sft")
    if run.finished is not None:  # --resume auto on a finished run: never trained again
        return run.finished
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set, data_report = prepare_data(cfg, tokenizer, seq2seq)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_set), accelerator.num_processes)

    model = build_policy(cfg, tokenizer, total_steps)
    module, params, optimizer, scheduler = common.prepare(accelerator, LMWithHeads(model), cfg, total_steps)
    loop = Loop(cfg, run, accelerator, module, params, optimizer, scheduler, SFTLoss(tokenizer.pad_token_id),
                train_set, eval_set, write_checkpoint=lambda path: save_adapter(model, path / "adapter"))
    start_step = loop.resume(lambda path: load_adapter_weights(model, path / "adapter"))
    log.info("sft: %d train / %d eval sequences, %d steps of %d sequences; trainable %s params",
             len(train_set), len(eval_set), total_steps, sequences_per_step(cfg, accelerator.num_processes),
             f"{sum(p.numel() for p in params):,}")
    last = loop.fit(start_step, steps_per_epoch, total_steps)

    summary = {"train_loss": last.get("loss"), "steps": total_steps, **data_report,
               "distributed": common.strategy(accelerator, cfg)}
    if eval_set:
        metrics = loop.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        run.log(total_steps, metrics, split="eval")
        summary.update({"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"]})
    accelerator.wait_for_everyone()
    with common.whole_trainable(module):  # FSDP: sharded adapters gathered on every process
        if accelerator.is_main_process:
            out = save_adapter(model, run.dir / "adapter", tokenizer=tokenizer)
            write_adapter_info(out, stage="sft", template=data_report["template"], base=BaseSpec.from_config(cfg).record())
            summary["adapter"] = str(out)
    run.write_summary(summary)
    run.close()
    log.info("sft done: train loss %.4f%s; adapter in %s", summary["train_loss"] or float("nan"),
             f", eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_perplexity']:.2f})" if eval_set else "",
             run.dir / "adapter")
    return summary
