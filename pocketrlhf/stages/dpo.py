"""Direct Preference Optimization: an adapter learns from (prompt, chosen, rejected) pairs directly,
with no reward model and no sampling (Rafailov et al. 2023, arXiv:2305.18290).

The reference is the SFT model, reached by switching adapters on the one frozen base:

* ``--sft-adapter DIR``: the SFT adapter is loaded twice, as the trainable policy's starting point
  and as a frozen copy named "reference" (as trl does), so policy == reference at step 0;
* otherwise: a fresh adapter, and the reference is the base with every adapter disabled.

Sequence log-prob = sum of the answer tokens' log-probs (EOS included, prompt excluded), through
``models.forward.response_logprobs``. By default each pair runs as ONE row, prompt + chosen +
rejected, where the rejected answer attends to the prompt but not to the chosen answer and its
positions restart after the prompt: the same numbers as two rows, with the prompt computed once.

By default (``--precompute-ref-logprobs``) the reference runs once over all pairs before training,
in batches of similar lengths, and the numbers are kept in OUTPUT_DIR/reference_logprobs.safetensors,
tagged with a hash of the data and the reference: later epochs, a resumed run, or another run in
the same folder on the same data reuse them instead of running the reference again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from pocketrlhf.algorithms.dpo import LossType, dpo_loss, reward_metric_sums
from pocketrlhf.algorithms.stats import accuracy_report, describe_accuracy
from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.data.formats import Skipped, preference_pairs
from pocketrlhf.data.rows import read_rows
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.data.tokenize import PreferenceExample, collate_preferences, collate_shared_prompt, tokenize_preferences
from pocketrlhf.errors import ConfigError, DataError
from pocketrlhf.models.loading import is_seq2seq
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log
from pocketrlhf.stages.loop import Loop, plan_steps, sequences_per_step

REFERENCE_ADAPTER = "reference"
REFERENCE_CACHE = "reference_logprobs.safetensors"


@dataclasses.dataclass
class DPOConfig(ModelOptions, AdapterOptions, TrainOptions):
    output_dir: str = option("runs/dpo", "run directory")
    learning_rate: float = option(5e-5, "peak learning rate (DPO wants a small one; LoRA examples use 5e-6 to 5e-4)")
    data: str = option("", "preference pairs: prompt+chosen+rejected, chosen+rejected, or question+response_j+response_k")
    eval_data: str = option("", "held-out pairs (default: eval_fraction of data)")
    eval_fraction: float = option(0.05, "fraction of pairs held out when no eval_data (0: none)")
    template: TemplateName = option("plain", "prompt format; use the one the SFT adapter was trained with")
    max_length: int = option(512, "longest prompt + answer in tokens (prompts are cut from the left to fit)")
    sft_adapter: str = option("", "adapter from 'pocketrlhf sft': the policy starts from it, a frozen copy is the reference")
    beta: float = option(0.1, "strength of the pull towards the reference (IPO: tau)")
    loss_type: LossType = option("sigmoid", "sigmoid (DPO; cDPO with label smoothing), robust (rDPO), hinge (SLiC) or ipo")
    label_smoothing: float = option(0.0, "sigmoid/robust: assumed chance that a pair's label is flipped, in [0, 0.5)")
    precompute_ref_logprobs: bool = option(True, "run the reference once over all pairs before training and cache it "
                                                 "(off: a reference forward in every step)")
    share_prompt: bool = option(True, "compute each pair's prompt once for both answers (same numbers, fewer tokens)")


def check_config(cfg: DPOConfig) -> None:
    if not cfg.data:
        raise ConfigError("dpo needs --data FILE (preference pairs)")
    if cfg.beta <= 0:
        raise ConfigError(f"--beta must be > 0 (got {cfg.beta})")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5) (got {cfg.label_smoothing})")
    if cfg.label_smoothing and cfg.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"--label-smoothing applies to the sigmoid and robust losses, not {cfg.loss_type}")


# ---------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class DPOExample(PreferenceExample):
    ref_chosen: float | None = None  # precomputed reference log-probs, when cached
    ref_rejected: float | None = None


def tokenize(tokenizer, pairs, max_length: int, skipped: Skipped) -> list[DPOExample]:
    out = []
    for ex in tokenize_preferences(tokenizer, pairs, max_length, skipped):
        if ex.chosen_ids == ex.rejected_ids:  # nothing to prefer (caught here for every data format)
            skipped.add("pairs whose two answers are identical")
            continue
        out.append(DPOExample(ex.prompt_ids, ex.chosen_ids, ex.rejected_ids))
    return out


def prepare_data(cfg: DPOConfig, tokenizer) -> tuple[list[DPOExample], list[DPOExample], dict]:
    rows = read_rows("preference", preference_pairs, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                     cfg.template, tokenizer, is_seq2seq(cfg.model))
    template, skipped = rows.template, rows.skipped
    train = tokenize(tokenizer, rows.train, cfg.max_length, skipped)
    evals = tokenize(tokenizer, rows.held_out, cfg.max_length, Skipped())
    if not train:
        raise DataError(f"{cfg.data}: no usable preference pairs ({skipped.describe()} skipped)")
    if skipped.total:
        log.info("data: %s", skipped.describe())
    report = {"template": template, "train_pairs": len(train), "eval_pairs": len(evals), "skipped": dict(skipped.counts),
              "held_out": rows.split}
    return train, evals, report


# ---------------------------------------------------------------------------------------------
# Log-probs, the reference, the loss.


class PairLogps(torch.nn.Module):
    """Summed answer log-probs of a pair batch [2B] (rows [0, B) chosen, [B, 2B) rejected) with the
    active adapter: what accelerate/DDP wraps."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from pocketrlhf.models.forward import pair_hidden_states, response_logprobs

        out = response_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                hidden=pair_hidden_states(self.model, batch))
        return out.logprobs.sum(-1)


class DPOLoss:
    """Summed DPO loss and implicit-reward metrics over a batch of pairs; the loop divides by the
    global pair count."""

    def __init__(self, cfg: DPOConfig, pad_id: int, logps: PairLogps, adapters, reference_adapter: str | None,
                 share_prompt: bool):
        self.cfg, self.pad_id, self.logps, self.adapters = cfg, pad_id, logps, adapters
        self.reference_adapter, self.share_prompt = reference_adapter, share_prompt
        self.reuse_encoder = True  # off under FSDP

    def batch(self, examples: list[DPOExample]) -> dict[str, torch.Tensor]:
        batch = collate_preferences(examples, self.pad_id)
        if self.share_prompt:
            batch.update(collate_shared_prompt(examples, batch["input_ids"].shape[1]))
        if examples[0].ref_chosen is not None:
            batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples])
            batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples])
        return batch

    def units(self, examples: list[DPOExample]) -> int:
        return len(examples)

    @torch.no_grad()
    def reference(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        with self.adapters.use(self.reference_adapter):
            chosen, rejected = self.logps(batch).chunk(2)
        return chosen, rejected

    def loss(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from pocketrlhf.models.forward import encoder_reuse

        # An encoder-decoder's policy reads the reference's encoder pass when its adapters leave both
        # encoders the base's, frozen (--adapter-scope decoder); not under FSDP (forward.encoder_reuse).
        with encoder_reuse(self.logps.model, enabled=self.reuse_encoder):
            ref_chosen, ref_rejected = self.reference(batch)
            chosen, rejected = module(batch).chunk(2)
        chosen_len, rejected_len = batch["response_mask"].sum(-1).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing,
            chosen_len, rejected_len)
        return losses.sum(), reward_metric_sums(chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------------
# Precomputed reference log-probs.


def cache_key(sets: dict[str, list[DPOExample]], cfg: DPOConfig) -> str:
    """Names the data (token ids) and the reference model that cached numbers belong to."""
    h = hashlib.sha256()
    h.update(json.dumps(BaseSpec.from_config(cfg).record(), sort_keys=True).encode())
    if cfg.sft_adapter:
        h.update((Path(cfg.sft_adapter) / "adapter_model.safetensors").read_bytes())
    for split, examples in sets.items():
        h.update(split.encode())
        for e in examples:
            h.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(stage: DPOLoss, examples: list[DPOExample], cfg: DPOConfig, device,
                      split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Pairs of similar length go together: little padding. Order does not change the numbers.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].chosen_ids)
                   + len(examples[i].rejected_ids))
    chosen, rejected = torch.zeros(len(examples)), torch.zeros(len(examples))
    progress = common.Progress(len(examples), 0, f"reference log-probs ({split})", cfg.progress, unit="pair")
    for start in range(0, len(order), cfg.batch_size):
        ids = order[start:start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in stage.batch([examples[i] for i in ids]).items()}
        c, r = stage.reference(batch)
        chosen[ids], rejected[ids] = c.float().cpu(), r.float().cpu()
        progress.update(len(ids))
    progress.close()
    return chosen, rejected


def with_reference(path: Path, sets: dict[str, list[DPOExample]], stage: DPOLoss, cfg: DPOConfig, device,
                   accelerator) -> dict[str, list[DPOExample]]:
    """The examples with their reference log-probs filled in: from ``path`` when it was written for
    this data and reference, else computed by the main process and written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = cache_key(sets, cfg)
    if accelerator.is_main_process:
        stale = True
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                stale = (f.metadata() or {}).get("key") != key
            log.info("%s reference log-probs in %s", "recomputing the stale" if stale else "reusing the", path)
        if stale:
            tensors = {}
            for split, examples in sets.items():
                tensors[f"{split}_chosen"], tensors[f"{split}_rejected"] = compute_reference(stage, examples, cfg,
                                                                                             device, split)
            tmp = path.with_name(f".tmp-{path.name}")
            save_file(tensors, str(tmp), metadata={"key": key})
            os.replace(tmp, path)
    accelerator.wait_for_everyone()
    with safe_open(str(path), "pt") as f:
        cached = {k: f.get_tensor(k).tolist() for k in f.keys()}
    return {split: [dataclasses.replace(e, ref_chosen=c, ref_rejected=r) for e, c, r in
                    zip(examples, cached[f"{split}_chosen"], cached[f"{split}_rejected"])]
            for split, examples in sets.items()}


# ---------------------------------------------------------------------------------------------


def build_model(cfg: DPOConfig, total_steps: int, template: str | None = None):
    """(model, AdapterSet, reference adapter name or None): the trainable policy adapter
    ("default") on the frozen base, plus a frozen copy of the SFT adapter when there is one.
    ``template``: the prompt format the data is rendered with (checked against the SFT adapter's)."""
    from pocketrlhf.models.adapters import AdapterSet, read_adapter_info
    from pocketrlhf.models.forward import disable_dropout
    from pocketrlhf.models.policy import add_frozen_adapter, build_policy

    model = build_policy(cfg, total_steps=total_steps, init_adapter=cfg.sft_adapter)
    reference = None
    if cfg.sft_adapter:
        sft_template = read_adapter_info(cfg.sft_adapter).get("template")
        template = template or cfg.template
        if sft_template and sft_template != template:
            log.warning("the SFT adapter was trained with --template %s but this run uses %s: prompts will look unlike "
                        "those seen in SFT", sft_template, template)
        model = add_frozen_adapter(model, cfg.sft_adapter, REFERENCE_ADAPTER)
        reference = REFERENCE_ADAPTER
    disable_dropout(model)  # the adapters' dropout too: log-probs must be exact, as the reference's are
    return model, AdapterSet(model), reference


def train(cfg: DPOConfig) -> dict:
    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.forward import supports_attention_bias
    from pocketrlhf.models.loading import load_tokenizer

    check_config(cfg)
    accelerator, run = common.open_run(cfg, "dpo")
    if run.finished is not None:  # --resume auto on a finished run: never trained again
        return run.finished
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_set, eval_set, data_report = prepare_data(cfg, tokenizer)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_set), accelerator.num_processes)

    model, adapters, reference = build_model(cfg, total_steps, data_report["template"])
    share_prompt = cfg.share_prompt and supports_attention_bias(model)
    if cfg.share_prompt and not share_prompt and not is_seq2seq(model):  # (an encoder-decoder encodes it once anyway)
        log.info("this model or adapter cannot share the prompt between answers; running them as separate rows")
    device = next(p for p in model.parameters() if p.requires_grad).device
    logps = PairLogps(model)
    stage = DPOLoss(cfg, tokenizer.pad_token_id, logps, adapters, reference, share_prompt)
    stage.reuse_encoder = common.strategy(accelerator)["strategy"] != "fsdp"
    if is_seq2seq(model):
        from pocketrlhf.models.forward import describe_encoder_sharing

        log.info("%s", describe_encoder_sharing(model, {"policy": "default", "reference": reference}, {"default"},
                                                enabled=stage.reuse_encoder))
    if cfg.precompute_ref_logprobs:  # before any checkpoint is loaded: the reference never trains anyway
        sets = with_reference(run.dir / REFERENCE_CACHE, {"train": train_set, "eval": eval_set}, stage, cfg, device,
                              accelerator)
        train_set, eval_set = sets["train"], sets["eval"]
    # Wrapped after the reference pass: the main process runs that alone, which a sharded model cannot.
    module, params, optimizer, scheduler = common.prepare(accelerator, logps, cfg, total_steps)
    loop = Loop(cfg, run, accelerator, module, params, optimizer, scheduler, stage, train_set, eval_set,
                write_checkpoint=lambda path: save_adapter(model, path / "adapter"))
    start_step = loop.resume(lambda path: load_adapter_weights(model, path / "adapter"))
    log.info("dpo: %d train / %d eval pairs, %d steps of %d pairs, %s loss, beta %g, reference: %s; trainable %s params",
             len(train_set), len(eval_set), total_steps, sequences_per_step(cfg, accelerator.num_processes),
             cfg.loss_type, cfg.beta, f"frozen copy of {cfg.sft_adapter}" if reference else "the base (adapters off)",
             f"{sum(p.numel() for p in params):,}")
    last = loop.fit(start_step, steps_per_epoch, total_steps)

    summary = {"train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"), "steps": total_steps,
               **data_report, "distributed": common.strategy(accelerator, cfg)}
    if eval_set:
        metrics = loop.evaluate()
        run.log(total_steps, metrics, split="eval")
        summary.update({f"eval_{k}": v for k, v in metrics.items()})
        summary.update(accuracy_report(metrics["accuracy"], len(eval_set), "eval"))
    accelerator.wait_for_everyone()
    with common.whole_trainable(module):  # FSDP: sharded adapters gathered on every process
        if accelerator.is_main_process:
            out = save_adapter(model, run.dir / "adapter", tokenizer=tokenizer)
            write_adapter_info(out, stage="dpo", template=data_report["template"], base=BaseSpec.from_config(cfg).record(),
                               reference=cfg.sft_adapter or "base", loss_type=cfg.loss_type,
                               beta=cfg.beta, eval_accuracy=summary.get("eval_accuracy"),
                               eval_accuracy_n=summary.get("eval_accuracy_n"))
            summary["adapter"] = str(out)
    run.write_summary(summary)
    run.close()
    log.info("dpo done: train loss %.4f%s; adapter in %s", summary["train_loss"],
             f", held-out loss {summary['eval_loss']:.4f}, implicit-reward accuracy "
             f"{describe_accuracy(summary['eval_accuracy'], summary['eval_accuracy_n'])}" if eval_set else "",
             run.dir / "adapter")
    return summary
