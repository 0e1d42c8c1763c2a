"""Which folders pocketrlhf made: a marker file in each, so that nothing it did not create is ever
deleted or overwritten (``--overwrite``, the demo, ``data stackexchange``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pocketrlhf import __version__
from pocketrlhf.errors import ConfigError

MARKER = ".pocketrlhf-run"


def write_marker(folder: Path, command: str) -> None:
    """Mark ``folder`` as made by pocketrlhf (kept as first written: it says who created the folder)."""
    path = Path(folder) / MARKER
    if not path.exists():
        path.write_text(json.dumps({"created_by": "pocketrlhf", "version": __version__, "command": command,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def is_own_folder(folder: Path, command: str | None = None) -> bool:
    """Whether pocketrlhf created ``folder`` (by ``command``, when given): its marker is there. Only
    such folders are ever cleared."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        return marker.get("created_by") == "pocketrlhf" and command in (None, marker.get("command"))
    except (OSError, ValueError, AttributeError):
        return False


def refuse_foreign(folder: Path, found: list[Path], action: str, command: str | None = None) -> None:
    """ConfigError unless ``folder`` is pocketrlhf's own (or ``found`` is empty): never delete or
    overwrite what pocketrlhf did not create."""
    if found and not is_own_folder(folder, command):
        names = ", ".join(sorted(p.name for p in found)[:3]) + (", ..." if len(found) > 3 else "")
        maker = f"`pocketrlhf {command}`" if command else "pocketrlhf"
        raise ConfigError(f"{folder} holds {names} but was not made by {maker} (no {MARKER} file of it), so it will "
                          f"not {action}; choose an empty or new --output-dir")
