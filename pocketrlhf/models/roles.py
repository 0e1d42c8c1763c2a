"""Roles on ONE shared base: a reward (or value) model is an adapter plus a scalar head, or a
rule-based reward function of the texts.

The reward of a sequence is the head's output at its last real token, which is the EOS token
of a finished answer (pad is distinct from EOS, so padding is never read; Ouyang et al. 2022 and
the N+ implementation details of Huang et al. 2024, Detail 12, read it there too). On an
encoder-decoder base that position holds the decoder's last hidden state after its EOS
(``models.forward``'s row layout): the head reads the decoder there.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pocketrlhf.errors import ConfigError, ModelLoadError, RewardFunctionError
from pocketrlhf.models.adapters import AdapterSet, read_adapter_info
from pocketrlhf.models.forward import (final_hidden_states, group_hidden_states, last_token_index, pair_hidden_states,
                                       response_mask_after, supports_attention_bias)
from pocketrlhf.models.heads import HEAD_FILE, ScalarHead
from pocketrlhf.models.policy import add_frozen_adapter


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``response_mask`` (where each prompt ends) is needed by an encoder-decoder base only."""
        hidden = final_hidden_states(self.model, input_ids, attention_mask, response_mask)
        return read_at_last_token(self.head, hidden, attention_mask)


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
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False,
                 group_size: int = 1, prompt_lengths: torch.Tensor | None = None,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B]; rows in groups of ``group_size`` answering one prompt of ``prompt_lengths``
        tokens run that prompt once (see ``forward.group_hidden_states``). An encoder-decoder base
        needs to know where each prompt ends: ``response_mask``, or ``prompt_lengths`` of
        right-padded rows."""
        if response_mask is None and prompt_lengths is not None:
            response_mask = response_mask_after(attention_mask, prompt_lengths)
        with AdapterSet(self.model).use(self.adapter):
            if group_size > 1 and prompt_lengths is not None and supports_attention_bias(self.model):
                hidden = group_hidden_states(self.model, input_ids, attention_mask, prompt_lengths, group_size)
            else:  # (an encoder-decoder encodes each distinct prompt once here)
                hidden = final_hidden_states(self.model, input_ids, attention_mask, response_mask)
        scores = read_at_last_token(self.head, hidden, attention_mask)
        return (scores - self.mean) / max(self.std, 1e-6) if normalize else scores


def load_reward_adapter(model: torch.nn.Module, directory: str | Path, name: str = "reward"):
    """Load a reward adapter + head saved by ``pocketrlhf rm`` onto ``model`` (plain or PeftModel).

    Returns ``(peft_model, RewardAdapter)``; the base weights are shared, not copied.
    """
    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file():
        raise ModelLoadError(f"{directory} is not a reward adapter (no {HEAD_FILE}); train one with `pocketrlhf rm`")
    model = add_frozen_adapter(model, directory, name)
    device = next(model.parameters()).device
    head = ScalarHead.load(directory, device=device)
    for p in head.parameters():
        p.requires_grad_(False)
    info = read_adapter_info(directory)
    return model, RewardAdapter(model, head, name, float(info.get("reward_mean", 0.0)), float(info.get("reward_std", 1.0)))


# ---------------------------------------------------------------------------------------------
# Rule-based rewards: a Python function of the texts.


def load_reward_function(spec: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"--reward-function {spec}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"--reward-function: no such file {target}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"--reward-function {spec}: cannot import {target} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-function {spec}: {target} has no function {name}")
    return fn


TEXT_PARAMETERS = ("prompts", "completions", "responses")


def rule_reward(fn: Callable, spec: str | None = None) -> Callable:
    """Adapt a user function to the reward interface. A function whose parameters are named
    ``prompts``/``completions`` (or ``responses``) gets them by name, and every other parameter,
    or ``**kwargs``, from the dataset's other columns (``answer=[...]``, one value per response);
    otherwise it is called as ``fn(responses)`` or ``fn(prompts, responses)``. What it raises, and
    anything but one number per response, is a RewardFunctionError naming ``spec`` and the first
    bad value. ``reward.needs`` lists the columns it cannot run without."""
    params = list(inspect.signature(fn).parameters.values())
    named = any(p.name in TEXT_PARAMETERS for p in params)
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
    wanted = [p.name for p in params if p.name not in TEXT_PARAMETERS
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    wants_prompts = len(params) >= 2
    name = spec or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"

    def reward(input_ids, attention_mask, prompts: list[str], responses: list[str],
               columns: dict[str, list] | None = None) -> torch.Tensor:
        columns = columns or {}
        try:
            if named:
                kwargs = dict(columns) if takes_all else {k: columns[k] for k in wanted if k in columns}
                for p in params:
                    if p.name == "prompts":
                        kwargs["prompts"] = prompts
                    elif p.name in ("completions", "responses"):
                        kwargs[p.name] = responses
                scores = fn(**kwargs)
            else:
                scores = fn(prompts, responses) if wants_prompts else fn(responses)
        except Exception as e:  # noqa: BLE001 - the user's code: any failure becomes one line naming it
            detail = str(e).splitlines()[0] if str(e) else ""
            raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}"
                                      f"{': ' + detail if detail else ''} (on {len(responses)} responses)") from e
        return torch.tensor(check_scores(scores, len(responses), f"reward function {name}"), dtype=torch.float32,
                            device=input_ids.device)

    reward.needs = tuple(p.name for p in params if named and p.name in wanted and p.default is p.empty)
    return reward


def check_scores(scores, n: int, source: str) -> list[float]:
    """``scores`` as n floats, or a RewardFunctionError naming ``source`` and the first bad value."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().reshape(-1).tolist() if scores.dim() <= 1 else scores
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__len__"):
        raise RewardFunctionError(f"{source} returned {type(scores).__name__} {short_repr(scores)}; it must return a list "
                                  f"of {n} numbers, one per response")
    if len(scores) != n:
        raise RewardFunctionError(f"{source} returned {len(scores)} scores for {n} responses")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, torch.Tensor) and s.numel() == 1:
            s = s.item()
        if isinstance(s, (str, bytes)) or not isinstance(s, numbers.Real):
            error = RewardFunctionError(f"{source} returned {type(s).__name__} {short_repr(s)} as a score; it must "
                                        "return numbers")
            error.index = i  # lets the caller name the prompt
            raise error
        out.append(float(s))
    return out


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (for error messages)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."
