"""Building blocks shared by every training stage: run directory, metrics, checkpoints, resume,
optimizers, schedules, progress bar. The stage files (sft.py, rm.py, ppo.py, dpo.py) keep only
their algorithm.

Run directory layout::

    OUTPUT_DIR/.pocketrlhf-run    marker: pocketrlhf made this folder (only such folders are ever cleared)
    OUTPUT_DIR/config.yaml        the resolved config (defaults < YAML < flags)
    OUTPUT_DIR/metrics.jsonl      one JSON object per logged step/eval
    OUTPUT_DIR/checkpoint-N/      adapter(s), heads, optimizer, scheduler, RNG, data position, config.yaml
    OUTPUT_DIR/adapter/           the final adapter (peft format + tokenizer)
    OUTPUT_DIR/summary.json       final metrics, written when the stage finishes
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import yaml

from pocketrlhf import optimizers, tracking
from pocketrlhf.config import ConfigError, save_config, to_dict
from pocketrlhf.errors import NonFiniteError
from pocketrlhf.folders import MARKER, is_own_folder, refuse_foreign, write_marker  # noqa: F401
from pocketrlhf.logs import log, setup_logging  # noqa: F401  (the stages log through common)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# What a stage writes into its folder besides checkpoints; --overwrite removes these (and only in a
# folder carrying MARKER).
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "adapter", "report.md", "plots", "tensorboard", "samples.jsonl")
# Options that may differ between a run and its continuation: they change what is shown, logged or
# saved, or where, never the weights of the steps taken. max_steps/epochs extend (or shorten) the run:
# the steps already taken stay the same, and a decaying schedule is stretched from the resumed step
# on. device lets another machine continue a run. skip_nonfinite only decides what happens at a
# non-finite value, which the steps so far never met (it is what one adds after such an error).
RESUME_SAFE = frozenset({"output_dir", "resume", "overwrite", "resume_ignore_config", "progress", "logging_steps",
                         "save_steps", "save_total_limit", "report_to", "push_to_hub", "hub_private", "max_steps",
                         "epochs", "device", "skip_nonfinite", "samples_to_log", "eval_at_start"})


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _normalized(cfg: Any) -> dict:
    """The config as its config.yaml reads back (so floats and lists compare alike)."""
    from pocketrlhf.config import _plain

    return yaml.safe_load(yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)) or {}


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def config_differences(recorded: dict, cfg: Any) -> list[str]:
    """``option: old -> new`` for every option that would change a resumed run's trajectory."""
    safe = set(RESUME_SAFE)
    if not getattr(cfg, "lora_dropout", 0):
        # Offline evaluation runs in training mode: with dropout it draws from the RNG the training
        # steps draw from, so only without dropout is the evaluation cadence free to change.
        safe.add("eval_steps")
    current = _normalized(cfg)
    return [f"{k}: {recorded[k]!r} -> {v!r}" for k, v in current.items()
            if k not in safe and k in recorded and not _same(recorded[k], v)]


class Run:
    """One stage's output directory: config, metrics, checkpoints. Only the main process writes.

    ``finished`` holds the saved summary when ``--resume auto`` finds a finished run (summary.json
    and adapter): nothing is written then, and the stage returns that summary instead of training."""

    def __init__(self, cfg: Any, stage: str, is_main: bool = True):
        self.cfg = cfg
        self.stage = stage
        self.is_main = is_main
        self.dir = Path(cfg.output_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._trackers: list = []
        self._start = time.time()
        self._compared: Path | None = None
        self.finished = self._finished_summary()
        if self.finished is not None:
            log.info("%s: %s holds a finished run (summary.json, adapter): nothing to resume; pass --overwrite to "
                     "train again", stage, self.dir)
            return
        trackers = tracking.parse(getattr(cfg, "report_to", "none"))
        tracking.check(trackers)  # a missing extra is refused before anything is written, too
        if getattr(cfg, "push_to_hub", ""):
            from pocketrlhf.hub import check_repo_id

            check_repo_id(cfg.push_to_hub)
        self.resume_from()  # a refused resumption is refused before anything is written
        if is_main:
            self._start_fresh_or_resume()
            self.dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.dir, stage)
            save_config(cfg, self.dir / CONFIG_FILE)
            self._trackers = tracking.open_trackers(trackers, self.dir, stage, _normalized(cfg))

    def _finished_summary(self) -> dict | None:
        if getattr(self.cfg, "resume", "") != "auto" or getattr(self.cfg, "overwrite", False):
            return None  # --overwrite: the user asked to train again
        summary = self.dir / "summary.json"
        if not (summary.is_file() and (self.dir / "adapter").is_dir()):
            return None
        try:
            finished = json.loads(summary.read_text())
        except ValueError:
            return None  # a damaged summary: not a finished run
        recorded = self.dir / CONFIG_FILE
        differences = config_differences(yaml.safe_load(recorded.read_text()) or {}, self.cfg) if recorded.is_file() else []
        if differences and not getattr(self.cfg, "resume_ignore_config", False):
            # Its results answer another question: returning them would pass them off as this config's.
            raise ConfigError(f"{self.dir} holds a finished run trained with other settings ({'; '.join(differences)}): "
                              "pass --overwrite to train with the new ones (or --output-dir elsewhere), or "
                              "--resume-ignore-config to keep the finished run's results")
        return finished

    def _start_fresh_or_resume(self) -> None:
        """Never mix two runs' outputs: a fresh run into a folder holding a previous one needs
        --overwrite (or --resume); resuming before the first checkpoint restarts cleanly. Only a
        folder pocketrlhf made (its marker) is ever cleared, and a config.yaml of someone else's is
        never overwritten."""
        previous = [p for p in (self.metrics_path, self.dir / "summary.json", self.dir / "adapter") if p.exists()]
        previous += self.checkpoints() if self.dir.is_dir() else []
        if not previous:
            config = self.dir / CONFIG_FILE
            refuse_foreign(self.dir, [config] if config.exists() else [], "overwrite them")
            return
        resume = getattr(self.cfg, "resume", "")
        if resume and (resume != "auto" or self.checkpoints()):
            return  # outputs past the checkpoint are dropped by truncate_metrics on resume
        if not resume and not getattr(self.cfg, "overwrite", False):
            raise ConfigError(f"{self.dir} already holds a run ({previous[0].name}); pass --resume auto to continue it "
                              "or --overwrite to start over")
        outputs = [p for p in (self.dir / name for name in RUN_OUTPUTS) if p.exists()]
        refuse_foreign(self.dir, sorted(set(previous + outputs)), "delete them")
        for p in sorted(set(previous + outputs)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    # -- metrics ---------------------------------------------------------------------------
    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.is_main:
            return
        record = {"stage": self.stage, "split": split, "step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self._trackers:
            tracker.log(step, split, metrics)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, forget what the interrupted run logged past its last checkpoint."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            (self.dir / "summary.json").write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2))

    def close(self) -> None:
        """The end of a finished stage: report and plots, trackers, the model card of every adapter
        folder (summary.json is written by now), and --push-to-hub."""
        if not self.is_main:
            return
        from pocketrlhf.report import write_report

        try:
            write_report(self.dir)
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training run
            log.warning("could not write the report of %s: %s", self.dir, e)
        for tracker in self._trackers:
            tracker.images(sorted((self.dir / "plots").glob("*.png")))
            tracker.close()
        self._trackers = []
        from pocketrlhf import cards, hub

        adapters = [p.parent for p in sorted(self.dir.glob("*/adapter_config.json"))]
        for folder in adapters:
            cards.write_card(folder, stage=self.stage, run_dir=self.dir)
        if getattr(self.cfg, "push_to_hub", "") and (self.dir / "adapter").is_dir():
            hub.push_after_training(self.dir / "adapter", self.cfg.push_to_hub, self.cfg.hub_private)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        found = []
        for p in self.dir.glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = p.name[len(CHECKPOINT_PREFIX):]
            if p.is_dir() and suffix.isdigit() and (p / STATE_FILE).is_file():
                found.append(p)
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def save_checkpoint(self, step: int, write: Callable[[Path], None], state: dict) -> Path | None:
        """Write into a temporary folder, then rename: a crash never leaves a half checkpoint."""
        if not self.is_main:
            return None
        final = self.dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        save_config(self.cfg, tmp / CONFIG_FILE)  # what a resumption is compared with (check_resume_config)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **{k: _jsonable(v) for k, v in state.items()}}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        limit = getattr(self.cfg, "save_total_limit", 0)
        if limit and limit > 0:
            for old in self.checkpoints()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def resume_from(self) -> Path | None:
        """The checkpoint to continue from, per ``cfg.resume`` ("" none, "auto" latest, or a path)."""
        resume = getattr(self.cfg, "resume", "")
        if not resume:
            return None
        if resume == "auto":
            found = self.checkpoints()
            path = found[-1] if found else None
        else:
            path = Path(resume)
            if not (path / STATE_FILE).is_file():
                raise ConfigError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
        if path is not None:
            self.check_resume_config(path)
        return path

    def check_resume_config(self, checkpoint: Path) -> None:
        """A resumed run continues the same trajectory: a change of data, seed, optimisation,
        batch shape, model or adapter is an error unless --resume-ignore-config."""
        if self._compared == checkpoint:
            return
        self._compared = checkpoint
        recorded_path = checkpoint / CONFIG_FILE
        if not recorded_path.is_file():
            log.warning("%s records no config (an older pocketrlhf): resuming without comparing settings", checkpoint)
            return
        recorded = yaml.safe_load(recorded_path.read_text()) or {}
        differences = config_differences(recorded, self.cfg)
        if not differences:
            return
        listed = "; ".join(differences)
        if getattr(self.cfg, "resume_ignore_config", False):
            log.warning("resuming %s with changed settings (%s)", checkpoint, listed)
            return
        raise ConfigError(f"{checkpoint} was trained with other settings ({listed}); resuming would not continue the "
                          "same run: restore them, pass --resume-ignore-config to continue with the new ones, or "
                          "--overwrite to start over")

    def last_good(self) -> str:
        """Where a stopped run can be continued from, for error messages."""
        found = self.checkpoints() if self.dir.is_dir() else []
        return f"last checkpoint {found[-1]}" if found else "no checkpoint yet"

    def nonfinite(self, what: str, step: int, remedy: str) -> NonFiniteError:
        """The one-line error of a non-finite value at ``step`` (1-based): nothing is written after it."""
        return NonFiniteError(f"{self.stage} step {step}: {what}; stopped before writing anything "
                              f"({self.last_good()}; a saved adapter is unchanged); {remedy}")


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def save_torch_state(path: Path, optimizer, scheduler, extra: dict | None = None) -> None:
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save({"rng": rng_state(), **(extra or {})}, path / "rng_state.pt")


def load_torch_state(path: Path, optimizer, scheduler) -> dict:
    # The checkpoint's optimizer state brings its own hyper-parameters back; those this run was built
    # with win (they differ only under --resume-ignore-config, which asks for the new ones).
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    # weights_only=False is needed for numpy RNG state; these files are our own checkpoints.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _keep_hyperparameters(optimizer, scheduler, built)
    optimizers.after_resume(optimizer)
    extra = torch.load(path / "rng_state.pt", weights_only=False)
    set_rng_state(extra.pop("rng"))
    return extra


def resume(run: "Run", optimizer, scheduler, load_weights: Callable[[Path], None]) -> tuple[int, dict, dict]:
    """Restore weights, optimizer, schedule and RNG from the checkpoint ``cfg.resume`` names and
    forget the metrics logged past it: (step, trainer_state.json, the extra torch state saved with
    it). Step 0 and empty dicts when there is nothing to resume. Every stage resumes through here."""
    checkpoint = run.resume_from()
    if checkpoint is None:
        return 0, {}, {}
    load_weights(checkpoint)
    extra = load_torch_state(checkpoint, optimizer, scheduler)
    state = read_state(checkpoint)
    run.truncate_metrics(state["step"])
    log.info("resuming from %s (step %d)", checkpoint, state["step"])
    return state["step"], state, extra


# Entries of a param group that are running state, not settings (schedule-free AdamW keeps its
# averaging weights and train/eval mode there): always the checkpoint's.
_GROUP_STATE = frozenset({"lr", "initial_lr", "step", "train_mode", "weight_sum", "lr_max"})


def _keep_hyperparameters(optimizer, scheduler, built: list[dict]) -> None:
    for group, fresh in zip(optimizer.param_groups, built):
        for k, v in fresh.items():
            if k not in _GROUP_STATE and k in group and group[k] != v:
                group[k] = v
    base = [fresh.get("initial_lr", fresh["lr"]) for fresh in built]
    if list(scheduler.base_lrs) != base and hasattr(scheduler, "lr_lambdas"):
        scheduler.base_lrs = base
        lrs = [b * f(scheduler.last_epoch) for b, f in zip(base, scheduler.lr_lambdas)]
        for group, b, lr in zip(optimizer.param_groups, base, lrs):
            group["initial_lr"], group["lr"] = b, lr
        scheduler._last_lr = lrs


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule.


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any, device: str) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` (pocketrlhf/optimizers.py) over the parameters that train."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    kind = cfg.optimizer
    if kind.startswith("paged") and not str(device).startswith("cuda"):
        fallback = "adamw_8bit" if kind.endswith("8bit") else "adamw"
        log.warning("%s pages optimizer state through CUDA unified memory and cannot run on %s; using %s instead",
                    kind, device, fallback)
        kind = fallback
    return optimizers.build(params, kind, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps)


def build_scheduler(optimizer, cfg: Any, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(total_steps, 1))


# ---------------------------------------------------------------------------------------------
# Progress.


class Progress:
    """tqdm bar over optimizer steps, showing loss, tokens/s (or another rate) and ETA."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, unit: str = "step"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                        smoothing=0.1)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Counts units (tokens, samples) between logging steps."""

    def __init__(self):
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def rate(self, reset: bool = True) -> float:
        now = time.perf_counter()
        rate = self.count / max(now - self.start, 1e-9)
        if reset:
            self.start, self.count = now, 0
        return rate


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def open_run(cfg: Any, stage: str) -> tuple[Any, "Run"]:
    """The opening of an offline stage: logging, the accelerator, the run folder (checked against
    what is in it, marked as ours), the seed. ``run.finished`` holds the summary of a finished run
    that ``--resume auto`` must not train again."""
    setup_logging()
    accelerator = make_accelerator(cfg.device)
    run = Run(cfg, stage, accelerator.is_main_process)
    set_seed(cfg.seed)
    return accelerator, run


def make_accelerator(device: str):
    """accelerate's Accelerator for ``--device``. Launched as several processes on a machine
    without a GPU, accelerate joins them (gloo) only when told the run is on the CPU, so ``auto``
    is resolved first: otherwise every process would silently train alone on the same batches."""
    from accelerate import Accelerator

    from pocketrlhf.models.loading import resolve_device

    world_size_vars = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and not any(v in os.environ for v in world_size_vars)):
        # `accelerate launch --cpu --num_processes N` (N > 1) sets the rendezvous address but, without
        # mpirun, starts this one process only: training alone would silently change the global batch.
        raise ConfigError("accelerate launch --cpu --num_processes N starts one process unless mpirun is set up; "
                          "use --config_file examples/accelerate/cpu_ddp.yaml (or --multi_gpu --num_processes N)")
    accelerator = Accelerator(cpu=resolve_device(device) == "cpu")
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the run's messages, not one per process
    return accelerator


def no_sync(accelerator, model, active: bool):
    return accelerator.no_sync(model) if active and accelerator.num_processes > 1 else nullcontext()


def grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm, after clipping to ``max_norm`` when it is > 0. Computed without
    clipping too: a non-finite gradient must be caught either way."""
    if max_norm > 0:
        return accelerator.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def skip_backward(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Stands in for the backward of a micro-batch skipped for a non-finite loss: under DDP every
    process must join the gradient all-reduce, so a zero gradient is accumulated instead."""
    if accelerator.num_processes > 1:
        accelerator.backward(sum(p.sum() for p in params) * 0.0)
