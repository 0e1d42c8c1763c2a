"""The package logger, importable without importing any training code (serve, merge, data, ...)."""

from __future__ import annotations

import logging

log = logging.getLogger("pocketrlhf")
