"""Roles on ONE shared base: a reward (or value) model is an adapter plus a scalar head.

The reward of a sequence is the head's output at its last real token, which is the EOS token
of a finished answer (spec 3.2.3; pad is distinct from EOS, so padding is never read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pocketrlhf.errors import ModelLoadError
from pocketrlhf.models.adapters import AdapterSet, load_adapter, read_adapter_info
from pocketrlhf.models.forward import final_hidden_states, last_token_index, pair_hidden_states
from pocketrlhf.models.heads import HEAD_FILE, ScalarHead


def read_at_last_token(head: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """head(hidden state of each row's last real token) -> [B]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_token_index(attention_mask)])


class ScoreModel(torch.nn.Module):
    """Model (with its active adapter) + head as one module: ``forward`` gives one score per row."""

    def __init__(self, model: torch.nn.Module, head: ScalarHead):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return read_at_last_token(self.head, final_hidden_states(self.model, input_ids, attention_mask), attention_mask)


class PairScoreModel(torch.nn.Module):
    """Scores [2B] of a preference batch (``collate_preferences`` rows, plus the one-row
    shared-prompt layout when present, see ``forward.pair_hidden_states``)."""

    def __init__(self, model: torch.nn.Module, head: ScalarHead):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return read_at_last_token(self.head, pair_hidden_states(self.model, batch), batch["attention_mask"])


@dataclass
class RewardAdapter:
    """A frozen reward adapter living on a shared PeftModel, scored by switching to it."""

    model: torch.nn.Module  # the shared PeftModel
    head: ScalarHead
    adapter: str
    mean: float = 0.0  # reward statistics on a reference set, saved by `pocketrlhf rm`
    std: float = 1.0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with AdapterSet(self.model).use(self.adapter):
            hidden = final_hidden_states(self.model, input_ids, attention_mask)
        scores = read_at_last_token(self.head, hidden, attention_mask)
        return (scores - self.mean) / max(self.std, 1e-6) if normalize else scores


def load_reward_adapter(model: torch.nn.Module, directory: str | Path, name: str = "reward"):
    """Load a reward adapter + head saved by ``pocketrlhf rm`` onto ``model`` (plain or PeftModel).

    Returns ``(peft_model, RewardAdapter)``; the base weights are shared, not copied.
    """
    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file():
        raise ModelLoadError(f"{directory} is not a reward adapter (no {HEAD_FILE}); train one with `pocketrlhf rm`")
    model = load_adapter(model, directory, name=name, trainable=False)
    device = next(model.parameters()).device
    head = ScalarHead.load(directory, device=device)
    for p in head.parameters():
        p.requires_grad_(False)
    info = read_adapter_info(directory)
    return model, RewardAdapter(model, head, name, float(info.get("reward_mean", 0.0)), float(info.get("reward_std", 1.0)))
