"""Supervised fine-tuning: an adapter on the frozen base learns to continue prompts.

loss = mean over trained tokens of -log p(x_t | x_<t), tokens counted across the whole global
batch (all micro-batches and processes), so gradient accumulation and DDP give the same
gradient as one big batch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import torch

from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.data.formats import Skipped, sft_pairs
from pocketrlhf.data.loading import load_records
from pocketrlhf.errors import DataError
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.data.tokenize import TokenExample, collate, pack, tokenize_sft
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log


@dataclasses.dataclass
class SFTConfig(ModelOptions, AdapterOptions, TrainOptions):
    output_dir: str = option("runs/sft", "run directory")
    data: str = option("", "training data: .jsonl/.json/.parquet/.csv/.arrow, a save_to_disk folder, or a hub id")
    eval_data: str = option("", "held-out data (default: eval_fraction of data)")
    eval_fraction: float = option(0.05, "fraction of data held out for eval when no eval_data (0: no eval)")
    template: TemplateName = option("plain", "prompt format (stackllama: 'Question: ...\\n\\nAnswer: ...'; auto: tokenizer chat template)")
    packing: bool = option(True, "pack EOS-joined examples into constant-length chunks (StackLLaMA) instead of padding")
    seq_length: int = option(512, "packed chunk length, or the truncation length of padded examples")
    completion_only: bool = option(False, "train only on completion tokens (prompt tokens get no loss)")
    init_adapter: str = option("", "start from this saved adapter instead of a fresh one")


# ---------------------------------------------------------------------------------------------


def prepare_data(cfg: SFTConfig, tokenizer) -> tuple[list[TokenExample], list[TokenExample], dict]:
    """Training and eval examples (packed or not), plus a report of what was skipped."""
    ds = load_records(cfg.data)
    skipped = Skipped()
    pairs, skipped = sft_pairs(ds, cfg.data, cfg.template, tokenizer)
    eval_pairs = []
    if cfg.eval_data:
        eval_pairs, eval_skipped = sft_pairs(load_records(cfg.eval_data), cfg.eval_data, cfg.template, tokenizer)
        for k, v in eval_skipped.counts.items():
            skipped.counts[f"eval {k}"] += v
    elif cfg.eval_fraction > 0 and len(pairs) >= 10:
        order = common.epoch_order(len(pairs), cfg.seed, epoch=-1)
        n_eval = max(1, int(round(len(pairs) * cfg.eval_fraction)))
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        pairs = [pairs[i] for i in order[n_eval:]]
    max_len = None if cfg.packing else cfg.seq_length
    train = tokenize_sft(tokenizer, pairs, cfg.completion_only, max_len, skipped)
    evals = tokenize_sft(tokenizer, eval_pairs, cfg.completion_only, max_len, skipped) if eval_pairs else []
    if cfg.packing:
        train = pack(train, cfg.seq_length, cfg.seed)
        evals = pack(evals, cfg.seq_length, cfg.seed) if evals and sum(len(e.input_ids) for e in evals) >= cfg.seq_length else []
    report = {"train_examples": len(pairs), "eval_examples": len(eval_pairs), "train_sequences": len(train),
              "eval_sequences": len(evals), "skipped": dict(skipped.counts)}
    if skipped.total:
        log.info("data: %s", skipped.describe())
    return train, evals, report


def build_policy(cfg, tokenizer=None, total_steps: int = 1000, adapter_name: str = "default"):
    """Frozen base (quantized as asked) + one trainable adapter; dropout off in the base."""
    from peft import prepare_model_for_kbit_training

    from pocketrlhf.models.adapters import attach_adapter, load_adapter, make_peft_config
    from pocketrlhf.models.forward import disable_dropout
    from pocketrlhf.models.loading import load_base

    base = load_base(cfg.model, cfg.quantization, cfg.quant_type, cfg.double_quant, cfg.compute_dtype, cfg.dtype,
                     cfg.device, cfg.trust_remote_code, training=True)
    disable_dropout(base)
    gc_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    init = getattr(cfg, "init_adapter", "")
    if init:
        model = load_adapter(base, init, name=adapter_name, trainable=True)
    else:
        peft_cfg = make_peft_config(cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                    cfg.num_virtual_tokens, total_steps)
        model = attach_adapter(base, peft_cfg, adapter_name)
    model.train()
    return model


def sequences_per_step(cfg, world_size: int) -> int:
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def plan_steps(cfg, n_sequences: int, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps); the incomplete last global batch is dropped."""
    per_step = sequences_per_step(cfg, world_size)
    steps_per_epoch = n_sequences // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{n_sequences} training sequences are fewer than one step's {per_step} "
                         f"(batch_size x gradient_accumulation_steps x processes); lower them or add data")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, total


def step_indices(cfg, step: int, steps_per_epoch: int, n: int, world_size: int) -> list[int]:
    """Sequence indices of global step ``step`` (0-based); a function of the step alone."""
    per_step = sequences_per_step(cfg, world_size)
    epoch, k = divmod(step, steps_per_epoch)
    return common.epoch_order(n, cfg.seed, epoch)[k * per_step:(k + 1) * per_step]


def micro_batches(indices: list[int], cfg, rank: int) -> list[list[int]]:
    """This process's share of a global batch, split into gradient-accumulation micro-batches."""
    share = cfg.batch_size * cfg.gradient_accumulation_steps
    mine = indices[rank * share:(rank + 1) * share]
    return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def token_nll(lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over trained tokens, number of trained tokens) for one micro-batch."""
    out = lm(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    mask = batch["loss_mask"][:, 1:].float() * batch["attention_mask"][:, 1:].float()
    return -(out["logprobs"][:, 1:] * mask).sum(), mask.sum()


@torch.no_grad()
def evaluate(lm, examples: list[TokenExample], cfg, pad_id: int, device, accelerator) -> dict:
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    for start in range(rank * cfg.batch_size, len(examples), cfg.batch_size * world):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + cfg.batch_size], pad_id).items()}
        nll, n = token_nll(lm, batch)
        total += nll
        count += n
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    loss = (total / count.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count.item())}


def train(cfg: SFTConfig) -> dict:
    from accelerate import Accelerator

    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.loading import load_tokenizer, model_reference

    common.setup_logging()
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    run = common.Run(cfg, "sft", accelerator.is_main_process)
    common.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set, data_report = prepare_data(cfg, tokenizer)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_set), world)

    model = build_policy(cfg, tokenizer, total_steps)
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer = common.build_optimizer(model.parameters(), cfg, str(device))
    scheduler = common.build_scheduler(optimizer, cfg, total_steps)

    start_step = 0
    checkpoint = run.resume_from()
    if checkpoint is not None:
        load_adapter_weights(model, checkpoint / "adapter")
        common.load_torch_state(checkpoint, optimizer, scheduler)
        start_step = common.read_state(checkpoint)["step"]
        run.truncate_metrics(start_step)
        log.info("resuming from %s (step %d of %d)", checkpoint, start_step, total_steps)

    # Weights are already placed by load_base (quantized weights cannot be moved anyway).
    lm = accelerator.prepare_model(LMWithHeads(model), device_placement=False)
    pad_id = tokenizer.pad_token_id
    log.info("sft: %d train / %d eval sequences, %d steps of %d sequences; trainable %s params",
             len(train_set), len(eval_set), total_steps, sequences_per_step(cfg, world),
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")

    def write_checkpoint(path: Path) -> None:
        save_adapter(model, path / "adapter")
        common.save_torch_state(path, optimizer, scheduler)

    progress = common.Progress(total_steps, start_step, "sft", cfg.progress and accelerator.is_main_process)
    speed = common.Throughput()
    last = {}
    for step in range(start_step, total_steps):
        indices = step_indices(cfg, step, steps_per_epoch, len(train_set), world)
        global_tokens = sum(sum(train_set[i].loss_mask[1:]) for i in indices)
        batches = micro_batches(indices, cfg, rank)
        step_nll = torch.zeros((), device=device)
        for j, ids in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate([train_set[i] for i in ids], pad_id).items()}
            with common.no_sync(accelerator, lm, j < len(batches) - 1):
                nll, _ = token_nll(lm, batch)
                # DDP averages gradients over processes, hence the factor `world`.
                accelerator.backward(nll / global_tokens * world)
            step_nll += nll.detach()
            speed.add(int(batch["attention_mask"].sum()) * world)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = (accelerator.reduce(step_nll, "sum") / global_tokens).item()
        done = step + 1
        last = {"loss": loss, "lr": scheduler.get_last_lr()[0], "epoch": step / steps_per_epoch}
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        if done % cfg.logging_steps == 0 or done == total_steps:
            last["tokens_per_s"] = speed.rate()
            run.log(done, last)
        progress.update(1, loss=loss, tok_s=int(last.get("tokens_per_s", 0)) or None)
        if eval_set and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
            run.log(done, evaluate(lm, eval_set, cfg, pad_id, device, accelerator), split="eval")
        if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
            run.save_checkpoint(done, write_checkpoint, {"epoch": step / steps_per_epoch, "total_steps": total_steps})
    progress.close()

    summary = {"train_loss": last.get("loss"), "steps": total_steps, **data_report}
    if eval_set:
        metrics = evaluate(lm, eval_set, cfg, pad_id, device, accelerator)
        run.log(total_steps, metrics, split="eval")
        summary.update({"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"]})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = save_adapter(model, run.dir / "adapter", tokenizer=tokenizer)
        write_adapter_info(out, stage="sft", template=cfg.template, base_model=model_reference(cfg.model),
                           quantization=cfg.quantization)
        summary["adapter"] = str(out)
    run.write_summary(summary)
    run.close()
    log.info("sft done: train loss %.4f%s; adapter in %s", summary["train_loss"] or float("nan"),
             f", eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_perplexity']:.2f})" if eval_set else "",
             run.dir / "adapter")
    return summary
