"""The offline training loop shared by SFT, RM and DPO.

A stage supplies a ``StageLoss``: how to batch examples, how many loss units (tokens, pairs)
examples hold, and the summed loss plus summed metrics of a micro-batch. The loop does the rest:
deterministic data order, gradient accumulation and processes (loss normalised by the global
unit count, so any split of a global batch gives the same gradient), clipping, schedule,
logging, periodic eval and atomic checkpoints, and exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from pocketrlhf import optimizers
from pocketrlhf.config import ConfigError
from pocketrlhf.errors import DataError
from pocketrlhf.stages import common


class StageLoss(Protocol):
    def batch(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def units(self, examples: Sequence[Any]) -> int: ...

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the batch's units, {metric: summed value}) for one micro-batch."""
        ...


def sequences_per_step(cfg, world_size: int) -> int:
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def plan_steps(cfg, n_examples: int, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps); the incomplete last global batch is dropped."""
    per_step = sequences_per_step(cfg, world_size)
    steps_per_epoch = n_examples // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{n_examples} training examples are fewer than one step's {per_step} "
                        f"(batch_size x gradient_accumulation_steps x processes); lower them or add data")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, total


def step_indices(cfg, step: int, steps_per_epoch: int, n: int, world_size: int) -> list[int]:
    """Example indices of global step ``step`` (0-based): a function of the step alone."""
    per_step = sequences_per_step(cfg, world_size)
    epoch, k = divmod(step, steps_per_epoch)
    return common.epoch_order(n, cfg.seed, epoch)[k * per_step:(k + 1) * per_step]


def micro_batches(indices: list[int], cfg, rank: int) -> list[list[int]]:
    """This process's share of a global batch, split into gradient-accumulation micro-batches."""
    share = cfg.batch_size * cfg.gradient_accumulation_steps
    mine = indices[rank * share:(rank + 1) * share]
    return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(module, stage: StageLoss, examples: Sequence[Any], batch_size: int, device, accelerator) -> dict[str, float]:
    """Means of the loss and metrics over ``examples`` (sharded across processes)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    units = torch.zeros((), device=device)
    for i in range(common.eval_rounds(len(examples), batch_size, world)):
        start = (i * world + rank) * batch_size
        chunk = examples[start:start + batch_size]
        # A process past the end still runs a forward (of the first examples, counted as nothing):
        # every process must join each forward's collectives (FSDP's weight gathering; DDP's buffer
        # broadcast on its first forward after training).
        weight = 1.0 if chunk else 0.0
        chunk = chunk or examples[:batch_size]
        loss, metrics = stage.loss(module, _to(stage.batch(chunk), device))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * weight
        units += stage.units(chunk) * weight
    units = accelerator.reduce(units, "sum").clamp(min=1)
    return {k: (accelerator.reduce(v, "sum") / units).item() for k, v in sums.items()}


@dataclass
class Loop:
    cfg: Any
    run: common.Run
    accelerator: Any
    module: torch.nn.Module  # what accelerate/DDP wraps; the stage's loss calls it
    parameters: list[torch.nn.Parameter]  # trained parameters (clipped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stage: StageLoss
    train_set: Sequence[Any]
    eval_set: Sequence[Any]
    write_checkpoint: Callable[[Path], None]  # trained weights only; optimizer/RNG are added here
    unit: str = "tokens"
    nonfinite_skipped: int = 0  # micro-batches and steps skipped so far (skip_nonfinite), in checkpoints too

    def fit(self, start_step: int, steps_per_epoch: int, total_steps: int) -> dict[str, float]:
        """Train from ``start_step``. A non-finite loss or gradient norm stops with a NonFiniteError
        before anything more is written, or with ``skip_nonfinite`` skips that micro-batch or step
        (counted in ``nonfinite_skipped``, over the whole run)."""
        cfg, acc = self.cfg, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        device = self.parameters[0].device
        skip = getattr(cfg, "skip_nonfinite", False)
        progress = common.Progress(total_steps, start_step, self.run.stage, cfg.progress and acc.is_main_process)
        speed = common.Throughput()
        last: dict[str, float] = {}
        for step in range(start_step, total_steps):
            indices = step_indices(cfg, step, steps_per_epoch, len(self.train_set), world)
            global_units = self.stage.units([self.train_set[i] for i in indices])
            batches = micro_batches(indices, cfg, rank)
            sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=device)}
            skipped = 0  # this process's micro-batches skipped in this step
            hessian = optimizers.needs_hessian(self.optimizer, step)  # SophiaH: gradients keep their graph
            for j, ids in enumerate(batches):
                batch = _to(self.stage.batch([self.train_set[i] for i in ids]), device)
                with common.no_sync(acc, self.module, j < len(batches) - 1), optimizers.hessian_pass(hessian):
                    loss, metrics = self.stage.loss(self.module, batch)
                    if not common.finite_everywhere(acc, loss):
                        if not skip:
                            raise self.run.nonfinite(f"the loss of micro-batch {j + 1} of {len(batches)} is "
                                                     f"{loss.detach().float().item()}", step + 1,
                                                     "pass --skip-nonfinite to skip such micro-batches")
                        # The remaining micro-batches keep their weight: the step is a little smaller.
                        skipped += 1
                        common.skip_backward(acc, self.parameters)
                        for k in metrics:  # every process reduces the same metric names below
                            sums.setdefault(k, torch.zeros((), device=device))
                        continue
                    # DDP (and sync_gradients under FSDP) average gradients over processes, hence the factor `world`.
                    acc.backward(loss / global_units * world, create_graph=hessian)
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float()
                speed.add(int(batch["attention_mask"].sum()) * world)
            common.sync_gradients(acc, self.module, self.parameters)  # FSDP; DDP did it in backward
            # Gradients are already summed over processes here, so every process sees the same norm.
            grad_norm = float(common.grad_norm(acc, self.parameters, cfg.max_grad_norm))
            if math.isfinite(grad_norm):
                with optimizers.hessian_pass(hessian):  # SophiaH's Hessian product may recompute checkpointed layers
                    self.optimizer.step()
            elif not skip:
                raise self.run.nonfinite(f"the gradient norm is {grad_norm}", step + 1,
                                         "pass --skip-nonfinite to skip such steps")
            else:
                skipped = 1  # the whole step (the norm is the same on every process): no update; the schedule
                # still advances, so the learning rate stays a function of the step as on resume
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = {k: (acc.reduce(v, "sum") / global_units).item() for k, v in sums.items()}
            last.update(lr=self.scheduler.get_last_lr()[0], epoch=step / steps_per_epoch)
            if cfg.max_grad_norm > 0:
                last["grad_norm"] = grad_norm
            if skip:
                if math.isfinite(grad_norm) and world > 1:
                    skipped = int(acc.reduce(torch.tensor(skipped, device=device), "sum"))
                self.nonfinite_skipped += skipped
                last["nonfinite_skipped"] = self.nonfinite_skipped
            if done % cfg.logging_steps == 0 or done == total_steps:
                last["tokens_per_s"] = speed.rate()
                self.run.log(done, last)
            progress.update(1, loss=last["loss"], tok_s=int(last.get("tokens_per_s", 0)) or None)
            if self.eval_set and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
                self.run.log(done, self.evaluate(), split="eval")
            if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
                self.checkpoint(done, step / steps_per_epoch, total_steps)
        progress.close()
        optimizers.to_eval(self.optimizer)  # schedule-free: the final evaluation and adapter use the averaged weights
        return last

    def evaluate(self) -> dict[str, float]:
        with optimizers.eval_weights(self.optimizer):
            return evaluate(self.module, self.stage, self.eval_set, self.cfg.batch_size, self.parameters[0].device,
                            self.accelerator)

    def checkpoint(self, step: int, epoch: float, total_steps: int) -> None:
        def write(path: Path) -> None:
            # Schedule-free: the checkpoint's adapter is the averaged one; resume switches back (after_resume).
            with optimizers.eval_weights(self.optimizer):
                self.write_checkpoint(path)
                common.save_torch_state(path, self.optimizer, self.scheduler)

        with common.whole_trainable(self.module, self.optimizer):  # FSDP: every process, before the main one writes
            self.run.save_checkpoint(step, write, {"epoch": epoch, "total_steps": total_steps,
                                                   "nonfinite_skipped": self.nonfinite_skipped,
                                                   "processes": self.accelerator.num_processes,
                                                   "sequences_per_step": sequences_per_step(self.cfg,
                                                                                            self.accelerator.num_processes)})

    def check_global_batch(self, state: dict) -> None:
        """The number of processes is not in config.yaml: a checkpoint resumed on another number of
        processes with the same --batch-size would silently change the global batch."""
        recorded = state.get("sequences_per_step")
        current = sequences_per_step(self.cfg, self.accelerator.num_processes)
        if recorded is None or recorded == current:
            return
        what = (f"{recorded} sequences per step on {state.get('processes')} process(es), now {current} on "
                f"{self.accelerator.num_processes}")
        if getattr(self.cfg, "resume_ignore_config", False):
            common.log.warning("resuming with another global batch (%s)", what)
            return
        raise ConfigError(f"the checkpoint was trained with {what}: set --batch-size or --gradient-accumulation-steps "
                          "so that batch_size x gradient_accumulation_steps x processes is the same, and pass "
                          "--resume-ignore-config")

    def resume(self, load_weights: Callable[[Path], None]) -> int:
        """Restore weights, optimizer, schedule and RNG from the checkpoint cfg.resume names; the step."""
        checkpoint = self.run.resume_from()
        if checkpoint is not None:
            self.check_global_batch(common.read_state(checkpoint))
        with common.whole_trainable(self.module, self.optimizer):  # FSDP: each process keeps its part of what is loaded
            step, state, _ = common.resume(self.run, self.optimizer, self.scheduler, load_weights)
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        return step
