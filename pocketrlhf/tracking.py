"""Experiment trackers beside metrics.jsonl (``--report-to``, comma-separated): tensorboard, Weights &
Biases, trackio, each through its own library (optional extras). They get what metrics.jsonl gets,
the resolved config at the start and the stage's plots (plots/*.png) at the end.

Offline works: wandb honours WANDB_MODE=offline (and falls back to it when it has no API key), its
files go to OUTPUT_DIR/wandb; trackio always writes its local store (TRACKIO_DIR, default
~/.cache/huggingface/trackio) and uploads nothing unless told to by its own settings.

A resumed run opens a new tracker run: the interrupted one keeps what it logged.

Must not import training code (stages).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from pocketrlhf.errors import ConfigError
from pocketrlhf.logs import log

TRACKERS = ("tensorboard", "wandb", "trackio")
_PACKAGE = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}


def parse(report_to: str | list | None) -> list[str]:
    """``"wandb,tensorboard"`` -> ["wandb", "tensorboard"]; none (or empty) -> []. Unknown names are a
    one-line error."""
    items = report_to if isinstance(report_to, list) else str(report_to or "").split(",")
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    if names in ([], ["none"]):
        return []
    wrong = [n for n in names if n not in TRACKERS]
    if wrong or "none" in names:
        raise ConfigError(f"--report-to: '{','.join(wrong) or 'none'}' is not one of none, {', '.join(TRACKERS)} "
                          "(several: comma-separated, e.g. --report-to tensorboard,wandb)")
    return list(dict.fromkeys(names))


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(_PACKAGE[name])
    except ImportError:
        raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'pocketrlhf[{name}]'") from None


class Tracker(Protocol):
    def log(self, step: int, split: str, metrics: dict[str, float]) -> None: ...

    def images(self, paths: list[Path]) -> None: ...

    def close(self) -> None: ...


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers a tracker can plot (metrics.jsonl also keeps lists, strings and None)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir: Path, stage: str, config: dict):
        import yaml

        self.stage = stage
        self.writer = _require("tensorboard").SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(f"{self.stage}/{split}/{k}", v, step)

    def images(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            self.writer.add_image(f"{self.stage}/plots/{p.stem}", np.asarray(Image.open(p).convert("RGB")), 0,
                                  dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, stage: str, config: dict):
        self.wandb = _require("wandb")
        kwargs = dict(project=os.environ.get("WANDB_PROJECT", "pocketrlhf"), name=f"{stage}-{run_dir.name}",
                      dir=str(run_dir), config=config, job_type=stage, tags=["pocketrlhf", stage])
        try:
            self.run = self.wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - no API key (or no network): keep the run, log offline
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            log.warning("wandb: %s; logging offline into %s/wandb (upload later with wandb sync)", reason, run_dir)
            self.run = self.wandb.init(mode="offline", **kwargs)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in _scalars(metrics).items()}, step=step)

    def images(self, paths: list[Path]) -> None:
        if paths:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths})

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run_dir: Path, stage: str, config: dict):
        import inspect

        self.trackio = _require("trackio")
        # No system metrics thread, no notebook embed: where this trackio version has those switches.
        quiet = {k: False for k in ("auto_log_cpu", "auto_log_gpu", "embed")
                 if k in inspect.signature(self.trackio.init).parameters}
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "pocketrlhf"),
                                     name=f"{stage}-{run_dir.name}", config=config, **quiet)
        self.last_step = 0

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        self.trackio.log({f"{split}/{k}": v for k, v in _scalars(metrics).items()}, step=step)

    def images(self, paths: list[Path]) -> None:
        if paths:
            self.trackio.log({f"plots/{p.stem}": self.trackio.Image(str(p)) for p in paths}, step=self.last_step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


def check(names: list[str]) -> None:
    """Every named tracker's package is installed (before anything is written or trained)."""
    for name in names:
        _require(name)


def open_trackers(names: list[str], run_dir: Path, stage: str, config: dict) -> list[Tracker]:
    return [_CLASSES[n](run_dir, stage, config) for n in names]
