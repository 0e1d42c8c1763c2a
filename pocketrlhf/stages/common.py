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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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
    accelerator = make_accelerator(cfg.device, stage, OFFLINE_STRATEGIES)
    check_fsdp_model(cfg, accelerator)
    run = Run(cfg, stage, accelerator.is_main_process)
    set_seed(cfg.seed)
    return accelerator, run


# ---------------------------------------------------------------------------------------------
# Distributed strategy: what `accelerate launch` asked for, and what a stage actually does.

OFFLINE_STRATEGIES = ("single", "ddp", "fsdp")  # sft, rm, dpo (stages/loop.py)
ONLINE_STRATEGIES = ("single", "ddp", "fsdp")  # ppo, grpo (stages/online.py): every forward through ``Entry``
FSDP_STAGES = "sft, rm, dpo, ppo and grpo"
# accelerate launch announces a strategy to its processes through these; Accelerator() on a CPU
# (MULTI_CPU) ignores every one of them, which once let an FSDP config run as plain DDP unnoticed.
_REQUEST_FLAGS = (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp"),
                  ("ACCELERATE_USE_MEGATRON_LM", "megatron_lm"), ("ACCELERATE_USE_PARALLELISM_CONFIG", "parallelism_config"))


def _flag(env: dict, name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_strategy(env: dict | None = None) -> str:
    """The strategy accelerate launch set up for this process: deepspeed, fsdp, megatron_lm,
    parallelism_config, or "" (plain data parallel, or no launcher at all)."""
    env = os.environ if env is None else env
    for var, name in _REQUEST_FLAGS:
        if _flag(env, var):
            return name
    return ""


def fsdp_options(env: dict | None = None) -> dict:
    """The FSDP settings of ``accelerate launch`` that pocketrlhf honours (reshard_after_forward),
    after refusing, one line each, those it cannot: FSDP1, parameter offload, rank-0-only loading
    and accelerate's activation checkpointing."""
    env = os.environ if env is None else env
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {version}; pocketrlhf shards with FSDP2 "
                          "(torch fully_shard) only: set fsdp_version: 2 (see examples/accelerate/fsdp.yaml)")
    refused = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params: true (weights offloaded to the CPU) is not supported; set it false",
               "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading: true is not supported (every process "
                                                 "loads the base, then keeps its shard); set it false",
               "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing: true is not supported; set it false and "
                                                "pass --gradient-checkpointing"}
    for var, message in refused.items():
        if _flag(env, var):
            raise ConfigError(message)
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if precision == "fp16":
        # accelerate pairs fp16 with a gradient scaler it applies in its own optimizer wrapper, which
        # the sharded update does not go through: unscaled fp16 gradients underflow.
        raise ConfigError("mixed_precision: fp16 is not supported under FSDP: it needs loss scaling (a gradient "
                          "scaler), which pocketrlhf's sharded update does not apply; use bf16 or 'no'")
    if precision not in ("no", "bf16"):
        raise ConfigError(f"mixed_precision: {precision} is not supported under FSDP; use bf16 or 'no'")
    # FSDP2 takes true/false; FSDP1's strategy names are mapped the way accelerate maps them.
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return {"reshard_after_forward": reshard not in ("false", "shard_grad_op", "no_shard", "0"),
            "mixed_precision": precision}


def check_strategy(stage: str, supported: tuple[str, ...], env: dict | None = None) -> str:
    """The requested strategy if ``stage`` can run it (single/ddp when none is named), else a
    one-line ConfigError, raised before anything is loaded or written."""
    request = requested_strategy(env)
    if not request:
        return ""
    if request == "fsdp" and "fsdp" in supported:
        fsdp_options(env)
        return request
    if request == "fsdp":
        raise ConfigError(f"{stage} does not run under FSDP; FSDP is supported by {FSDP_STAGES}: launch {stage} "
                          "with examples/accelerate/ddp.yaml or cpu_ddp.yaml")
    if request == "deepspeed":
        raise ConfigError(f"{stage} does not run under DeepSpeed (README: Several processes or GPUs); use "
                          + ("examples/accelerate/fsdp.yaml to shard the base, or " if "fsdp" in supported else "")
                          + "examples/accelerate/ddp.yaml")
    raise ConfigError(f"{stage} does not run under accelerate's {request.replace('_', ' ')}; use "
                      "examples/accelerate/ddp.yaml" + (" or fsdp.yaml" if "fsdp" in supported else ""))


def strategy(accelerator, cfg: Any = None) -> dict:
    """What this run actually does across processes, for the log and summary.json:
    {strategy: single|ddp|fsdp, processes, backend, sharding}. ``cfg``: the stage's config, which
    says whether the trained adapters are sharded too (``shards_adapters``)."""
    world = accelerator.num_processes
    if world > 1 and requested_strategy() == "fsdp":
        name = "fsdp"
        trained = "" if cfg is None or shards_adapters(cfg) else \
            "; the trained adapters whole on every process (a bitsandbytes optimizer updates them)"
        sharding = ("FSDP2: frozen base weights and the adapters in them sharded over processes per decoder layer "
                    "(an untied input embedding as a unit of its own, the rest in the root unit); heads replicated, "
                    "their gradients all-reduced" + trained)
    else:
        name = "ddp" if world > 1 else "single"
        sharding = "none: every process holds the whole model" if world > 1 else "none"
    backend = torch.distributed.get_backend() if world > 1 and torch.distributed.is_initialized() else None
    out = {"strategy": name, "processes": world, "backend": backend, "sharding": sharding,
           "requested": requested_strategy() or None}
    if name == "fsdp":
        out.update(fsdp_options())
    return out


def describe_strategy(info: dict) -> str:
    if info["strategy"] == "single":
        asked = info.get("requested")
        return f"single process (accelerate launch asked for {asked}: one process has nothing to shard)" if asked \
            else "single process"
    return f"{info['strategy']} over {info['processes']} processes ({info['backend']}); sharding: {info['sharding']}"


def make_accelerator(device: str, stage: str = "", strategies: tuple[str, ...] = ONLINE_STRATEGIES):
    """accelerate's Accelerator for ``--device``. Launched as several processes on a machine
    without a GPU, accelerate joins them (gloo) only when told the run is on the CPU, so ``auto``
    is resolved first: otherwise every process would silently train alone on the same batches.
    A strategy the launcher asked for that ``stage`` cannot run (``strategies``) is refused here,
    before any work; FSDP is applied by pocketrlhf itself (``shard``), so accelerate is never
    shown it: its own FSDP path needs a GPU and wraps modules it cannot know the shape of."""
    from accelerate import Accelerator

    from pocketrlhf.models.loading import resolve_device

    world_size_vars = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and not any(v in os.environ for v in world_size_vars)):
        # `accelerate launch --cpu --num_processes N` (N > 1) sets the rendezvous address but, without
        # mpirun, starts this one process only: training alone would silently change the global batch.
        raise ConfigError("accelerate launch --cpu --num_processes N starts one process unless mpirun is set up; "
                          "use --config_file examples/accelerate/cpu_ddp.yaml (or --multi_gpu --num_processes N)")
    requested = check_strategy(stage or "this stage", strategies)
    hidden = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP",) if requested == "fsdp" and k in os.environ}
    try:
        accelerator = Accelerator(cpu=resolve_device(device) == "cpu")
    finally:
        os.environ.update(hidden)  # strategy() and the shard step read it back
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the run's messages, not one per process
    info = strategy(accelerator)
    # One process says so only in summary.json (its errors stay one line); several always say what they do.
    log.log(logging.INFO if info["processes"] > 1 or requested else logging.DEBUG, "distributed: %s",
            describe_strategy(info))
    return accelerator


def check_fsdp_model(cfg: Any, accelerator) -> None:
    """Refuses, before the base is loaded, a base FSDP cannot shard. FSDP2 replaces each sharded
    weight by a plain DTensor and gathers it into a plain Parameter. A 4-bit Linear4bit keeps its
    quantization state on the module too and bitsandbytes puts it back on the gathered weight, so
    4-bit bases shard (the packed weights; the small quantization constants stay whole on each
    process). An 8-bit Linear8bitLt reads its int8 data and scales from attributes of the weight
    object itself (Int8Params.CB/SCB), which the gathered plain Parameter does not carry."""
    if strategy(accelerator)["strategy"] == "fsdp" and getattr(cfg, "quantization", "none") == "8bit":
        raise ConfigError("FSDP cannot shard an 8-bit base: bitsandbytes' LLM.int8 layers read their scales from the "
                          "weight object, which FSDP replaces by a plain sharded tensor; use --quantization 4bit or "
                          "none, or DDP")


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of the model inside ``module`` (its ``_no_split_modules`` classes):
    FSDP's units, so one block's weights are gathered at a time."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    # A block nested in another block (rare) is sharded with its parent.
    return [m for m in layers if not any(m is not o and any(m is c for c in o.modules()) for o in layers)]


def shards_adapters(cfg: Any) -> bool:
    """Whether FSDP shards the trained adapters with their layers: not when a bitsandbytes
    optimizer updates them (adamw_8bit, paged ones, or adamw on 16-bit adapters: optimizers.build),
    whose fused kernels take plain tensors only, not FSDP's sharded DTensors; those adapters stay
    whole on every process, as heads do."""
    return not optimizers.uses_bitsandbytes(getattr(cfg, "optimizer", "adamw"), getattr(cfg, "adapter_dtype", "float32"))


def shard(module: torch.nn.Module, accelerator, shard_trainable: bool = True) -> torch.nn.Module:
    """FSDP2 (``fully_shard``, in place): one unit per decoder layer, one for an untied input
    embedding, and a root unit for the rest (final norm, output layer; tied embeddings). The
    adapters' weights in a decoder layer (trained or frozen) are sharded with it: FSDP gathers them
    with the layer and reduce-scatters their gradients in backward, and the optimizer keeps its
    state of each process's part only. Trainable parameters outside the layers (heads) stay whole
    on every process and out of FSDP (``ignored_params``); ``sync_gradients`` averages theirs.
    Checkpoints and the saved adapter are written whole (``whole_trainable``), so they resume on
    any number of processes. Every forward of ``module`` (training, evaluation, the reference pass
    with adapters switched) gathers one layer's weights at a time, so all processes must run the
    same number of forwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    options = fsdp_options()
    layers = decoder_layers(module)
    if not layers:
        raise ConfigError(f"FSDP: {type(module).__name__} names no decoder layer class (_no_split_modules); "
                          "this model family cannot be sharded here, use DDP")
    # Before sharding: every process then keeps its part of the same weights.
    broadcast_from_first([p for p in module.parameters() if p.requires_grad])
    in_layers = {p for layer in layers for p in layer.parameters()} if shard_trainable else set()
    replicated = {p for p in module.parameters() if p.requires_grad and p not in in_layers}
    if not shard_trainable:
        log.info("fsdp: the trained adapters stay whole on every process (a bitsandbytes optimizer updates them, "
                 "which takes no sharded tensors)")
    unit = dict(mesh=mesh, reshard_after_forward=options["reshard_after_forward"], ignored_params=replicated,
                mp_policy=mixed_precision_policy(options["mixed_precision"]))
    for layer in layers + _vocabulary_layers(module):
        fully_shard(layer, **unit)
    fully_shard(module, **unit)
    autocast_forward(module, accelerator)

    def held(params: list, what: str) -> str:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        total = sum(p.numel() for p in params)
        return f"{local:,} of the {total:,} {what} ({100 * local / max(total, 1):.0f}%)"

    log.info("fsdp: %d decoder layers, an untied input embedding and 1 root unit; this process holds %s and %s "
             "(%d parameters outside the decoder layers, such as heads, whole)", len(layers),
             held([p for p in module.parameters() if not p.requires_grad], "frozen weights"),
             held([p for p in module.parameters() if p.requires_grad], "trainable weights"), len(replicated))
    return module


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def whole_trainable(module: torch.nn.Module, optimizer=None) -> Iterator[None]:
    """Run on EVERY process around writing or reading trained weights under FSDP (a checkpoint,
    the final adapter, a resumption). The trainable weights sharded with their decoder layer are
    gathered whole for the body: ``save_adapter`` writes them as a normal peft adapter (one file,
    the same as one process writes), so a checkpoint resumes on any number of processes; the
    optimizer's state of those weights is gathered too (``save_torch_state`` writes the state one
    process would have). Afterwards each process keeps its part again, of whatever the body loaded
    (``load_adapter_weights`` copies into the shards itself; a loaded optimizer state is split
    here). Nothing happens without sharded trainable weights."""
    from torch.distributed.tensor import distribute_tensor

    peft_models = [m for m in module.modules() if hasattr(m, "peft_config") and hasattr(m, "save_pretrained")]
    sharded = [p for p in module.parameters() if p.requires_grad and _is_dtensor(p)]
    if not sharded:
        yield
        return
    with torch.no_grad():
        for model in peft_models:
            # A model state dict with its trainable sharded entries whole: save_adapter hands it to peft,
            # which picks the adapter's entries from it (the frozen base stays sharded, never gathered).
            full = {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad and _is_dtensor(p)}
            model._pocketrlhf_full_state = {k: full.get(k, v) for k, v in model.state_dict().items()}
        if optimizer is not None:
            for p in sharded:
                state = optimizer.state.get(p, {})
                for k in sorted(state):  # the same order on every process: each gather is collective
                    if _is_dtensor(state[k]):
                        state[k] = state[k].full_tensor()
    try:
        yield
    finally:
        for model in peft_models:
            model.__dict__.pop("_pocketrlhf_full_state", None)
        if optimizer is not None:
            for p in sharded:
                state = optimizer.state.get(p, {})
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.shape == p.shape and v.dim() > 0:
                        state[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)


def mixed_precision_policy(precision: str):
    """FSDP2's mixed precision for accelerate's ``mixed_precision``: with bf16, weights are gathered
    and computed in bf16 and gradients reduced in fp32 (non-float weights, such as packed 4-bit
    ones, are never cast); with 'no', weights are used in the dtype they were loaded in."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def autocast_forward(module: torch.nn.Module, accelerator) -> None:
    """The autocast accelerate's ``prepare_model`` puts around a model's forward (bf16 on the CPU,
    outputs back in fp32), which the sharded model does not go through: so one process and FSDP
    compute alike under ``mixed_precision: bf16``. Nothing when mixed precision is off."""
    if not accelerator.native_amp:
        return
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(True, accelerator.autocast_handler)
    module.forward = MethodType(convert_outputs_to_fp32(autocast(module.forward.__func__)), module)
    log.info("fsdp: mixed precision %s (autocast %s; float weights gathered in bf16, gradients reduced in fp32)",
             accelerator.mixed_precision, autocast.fast_dtype)


def broadcast_from_first(params: list[torch.nn.Parameter]) -> None:
    """Every process starts from the first process's trainable weights, as DDP makes it do: the
    online stages seed each process differently (its own rollouts), which would otherwise give
    each process its own random initialisation of a fresh adapter or head. One flat broadcast."""
    if not params:
        return
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()


def _vocabulary_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embedding as a unit of its own when it is not tied to the output layer: gathered
    only while it runs (once per forward) instead of through the whole pass with the root. The
    output layer stays with the root: it runs once per chunk of 2048 scored positions
    (forward.response_logprobs), and not at all for a micro-batch with none, so a unit of its own
    would gather a different number of times on each process and the collectives would hang."""
    for m in module.modules():
        if hasattr(m, "get_output_embeddings") and hasattr(m, "_no_split_modules"):
            emb, out = m.get_input_embeddings(), m.get_output_embeddings()
            if emb is None or out is None or emb.weight is out.weight:
                return []
            return [emb]
    return []


class Entry(torch.nn.Module):
    """The root FSDP unit of an online stage. Besides the trained module's forward (``entry(*args)``),
    the roles run forwards of their own on the shared base (rollout generation, the reference and
    reward passes); each goes through here as ``entry(*args, run=fn)``, so that FSDP sees a root
    forward, gathers the root's weights (final norm, output layer) once for it, and every layer's
    hooks gather that layer as it runs. Calls must not nest (the inner one would reshard the root)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, run: Callable | None = None, **kwargs):
        return (run or self.inner)(*args, **kwargs)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def prepare(accelerator, module: torch.nn.Module, cfg: Any, total_steps: int):
    """(wrapped module, trained parameters, optimizer, scheduler) in the order every engine needs:
    the model is wrapped first (DDP, or FSDP2 under ``accelerate launch`` with an FSDP config) and
    the optimizer is built from the parameters of the wrapped model."""
    if getattr(cfg, "optimizer", "") == "sophia" and accelerator.num_processes > 1:
        # Its Hessian estimate differentiates the averaged gradient, whose all-reduce autograd does not
        # see: each process would step by its own estimate and the replicated adapters would drift apart.
        raise ConfigError("--optimizer sophia runs on one process only (its Hessian estimate is not averaged "
                          "across processes yet): choose another optimizer or launch one process")
    if strategy(accelerator)["strategy"] == "fsdp":
        module = shard(module, accelerator, shards_adapters(cfg))
    else:
        # Weights are already placed by load_base (quantized weights cannot be moved anyway).
        module = accelerator.prepare_model(module, device_placement=False)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, str(params[0].device))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    return module, params, optimizer, scheduler


def finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on EVERY process, so that all of them skip (or stop) together: a
    process leaving a backward alone would hang the others in its all-reduce (DDP) or in the
    layers' weight gathering (FSDP)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        finite = accelerator.reduce(flag, "sum").item() == 0
    return finite


def sync_gradients(accelerator, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Under FSDP the replicated trainable parameters' gradients are averaged here, once per step
    (DDP does it in backward). One flat all-reduce; a missing gradient counts as zero on every
    process alike."""
    if accelerator.num_processes == 1 or not is_sharded(module):
        return
    for p in params:
        if _is_dtensor(p) and p.grad is None:
            p.grad = torch.zeros_like(p)  # as the replicated ones: no gradient counts as zero
    # Sharded adapters got theirs averaged by FSDP's reduce-scatter in backward.
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).float()
    torch.distributed.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def eval_rounds(n: int, batch_size: int, world: int) -> int:
    """Forwards each process runs to evaluate ``n`` examples sharded over ``world`` processes (the
    same on every process: a sharded model's forward is collective)."""
    return math.ceil(n / (batch_size * world))


def no_sync(accelerator, model, active: bool):
    # Under FSDP the frozen weights get no gradient and the trainable ones are averaged once per
    # step (sync_gradients): there is nothing to skip.
    if not active or accelerator.num_processes == 1 or is_sharded(model):
        return nullcontext()
    return accelerator.no_sync(model)


def grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm, after clipping to ``max_norm`` when it is > 0. Computed without
    clipping too: a non-finite gradient must be caught either way."""
    if any(_is_dtensor(p.grad) for p in params):
        return _sharded_grad_norm(params, max_norm)
    if max_norm > 0:
        return accelerator.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _sharded_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``grad_norm`` under FSDP with sharded adapters: the squares of each process's gradient
    shards summed over processes, plus those of the whole (replicated) ones once; clipped as
    torch.nn.utils.clip_grad_norm_ clips."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum((g.to_local().detach().float().pow(2).sum() for g in grads if _is_dtensor(g)), torch.zeros(()))
    torch.distributed.all_reduce(sharded)
    whole = sum((g.detach().float().pow(2).sum() for g in grads if not _is_dtensor(g)), torch.zeros(()))
    norm = (sharded + whole).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef.to(g.dtype))
    return norm


def skip_backward(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Stands in for the backward of a micro-batch skipped for a non-finite loss: under DDP every
    process must join the gradient all-reduce, so a zero gradient is accumulated instead (under
    FSDP nothing is reduced in a backward that no process runs)."""
    if any(_is_dtensor(p) for p in params):
        return
    if accelerator.num_processes > 1:
        accelerator.backward(sum(p.sum() for p in params) * 0.0)
