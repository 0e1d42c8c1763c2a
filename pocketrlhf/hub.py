"""Uploads to the Hugging Face Hub: an adapter folder (weights, adapter_config.json, the scalar head,
pocketrlhf_adapter.json, tokenizer, model card) or a merged model, in one commit through
huggingface_hub.

The token comes from where huggingface_hub looks (HF_TOKEN, then the file ``hf auth login`` writes);
HF_ENDPOINT points at another Hub (a mirror, an enterprise Hub, a test server). The local folder is
only read: a failed upload leaves it as it was, and says so in one line.

Must not import training code (stages).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pocketrlhf.config import option
from pocketrlhf.errors import ConfigError, PocketError
from pocketrlhf.logs import log

# Never uploaded: what training leaves beside the weights that is not part of the model.
SKIPPED = (".pocketrlhf-run", ".DS_Store")


class UploadError(PocketError):
    """The upload did not happen (or did not finish); the local folder is unchanged."""


@dataclasses.dataclass
class PushConfig:
    dir: str = option("", "the adapter (or merged model) folder to upload")
    repo_id: str = option("", "the Hub repo to upload to: user/name or org/name (created if missing)")
    hub_private: bool = option(False, "create the repo private (an existing repo keeps its visibility)")
    token: str = option("", "Hub token (default: HF_TOKEN, or the one saved by `hf auth login`)")
    commit_message: str = option("", "the commit's message (default: 'Upload with pocketrlhf')")


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise ConfigError(f"--push-to-hub '{repo_id}': expected a Hub repo id like user/name")


def files_to_upload(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIPPED
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "") -> str:
    """Upload ``folder`` to the Hub repo ``repo_id`` (created if missing); the commit's URL. The model
    card uploaded names the repo in its snippets; the local one keeps the folder."""
    from pocketrlhf import cards

    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder to upload")
    if not ((folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()):
        raise ConfigError(f"{folder} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.utils import get_token
    except ImportError:  # a dependency of transformers: only a broken install lacks it
        raise ConfigError("uploading needs huggingface_hub: pip install huggingface_hub") from None
    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or pass --token)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    operations = []
    for path in files_to_upload(folder):
        name = path.relative_to(folder).as_posix()
        content: str | bytes = str(path)
        if name == cards.CARD:
            content = cards.retarget(path.read_text(), folder, repo_id).encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    if not (folder / cards.CARD).is_file():  # a folder saved before cards existed: one is made for the upload
        run_dir = folder.parent if (folder.parent / "summary.json").is_file() else None
        card = cards.card_text(folder, "sft", run_dir, where=repo_id)
        operations.append(CommitOperationAdd(path_in_repo=cards.CARD, path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations, commit_message=commit_message or "Upload with pocketrlhf",
                                   repo_type="model")
    except Exception as e:  # noqa: BLE001 - network, auth, quota...: one line, the folder untouched
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UploadError(f"upload of {folder} to {repo_id} failed ({reason}); the local folder is intact: retry "
                          f"with `pocketrlhf push {folder} {repo_id}`") from None
    log.info("uploaded %d files of %s to %s", len(operations), folder, commit.commit_url)
    return commit.commit_url


def push_after_training(folder: Path, repo_id: str, private: bool) -> str | None:
    """--push-to-hub at the end of a stage or merge: a failure is a one-line error in the log, not a
    failed run (the trained folder is complete and stays)."""
    try:
        return push(folder, repo_id, private)
    except PocketError as e:
        log.error("%s", e)
        return None


def run(cfg: PushConfig) -> dict:
    url = push(cfg.dir, cfg.repo_id, cfg.hub_private, cfg.token or None, cfg.commit_message)
    print(f"uploaded {cfg.dir} to {cfg.repo_id}: {url}")
    return {"repo_id": cfg.repo_id, "commit_url": url}
