"""Local path or Hugging Face hub id? One rule for every option that names a model or a dataset.

The rule reads the text and the local disk only, never the network, so that a mistyped local path
fails at once instead of after the hub's retries (about 48 s offline):

- a path that exists is local;
- a hub id is ``name`` or ``org/name`` (letters, digits, ``_``, ``-`` and ``.``, no ``..``), and
  ``org/name`` only when ``org`` is not a folder here: with a ``models/`` folder next to you,
  ``models/llama`` is that folder's ``llama``, not a hub repository;
- anything else is a local path: absolute, ``./``, ``../``, ``~``, a backslash, two or more ``/``.

Datasets follow ``load_records``: a dataset hub id also needs the ``/`` and no file suffix, so
``data/train.jsonl`` is always a (possibly missing) local file.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_REQUIRED = "--model is required (a local Hugging Face model folder)"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def is_hub_id(text: str) -> bool:
    """``text`` can only be read as a hub id (it is not an existing or local-looking path)."""
    if not _HUB_ID.match(text) or ".." in text or Path(text).expanduser().exists():
        return False
    org, slash, _ = text.partition("/")
    return not (slash and Path(org).is_dir())


def is_hub_dataset(text: str) -> bool:
    return is_hub_id(text) and "/" in text and not Path(text).suffix


def missing_local(text: str, dataset: bool = False) -> bool:
    """A local-looking path (not a hub id) that does not exist: an error before any work."""
    if Path(text).expanduser().exists():
        return False
    return not (is_hub_dataset(text) if dataset else is_hub_id(text))


def missing_model_message(model: str, what: str = "a local Hugging Face model folder") -> str | None:
    """The one-line error for a ``--model`` value that cannot be used, or None when it may be."""
    if not model:
        return MODEL_REQUIRED
    if missing_local(model):
        return f"{model} does not exist (expected {what})"
    return None
