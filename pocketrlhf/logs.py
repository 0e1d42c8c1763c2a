"""The package logger and its set-up, importable without any training code (serve, merge, data,
evaluate, the pipeline and the demo log through it too)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("pocketrlhf")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at setup: tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[pocketrlhf] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    # bitsandbytes logs a warning on import when an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for noisy in ("transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
