"""A stage's rows and its held-out rows, split so that no prompt is on both sides.

Preference data usually holds several pairs per prompt (a Stack Exchange question gives up to ten,
sharing answers), and SFT/PPO data repeats prompts too. A held-out set drawn per row would then
share prompts and answers with training, and its accuracy would measure memory, not
generalisation. So rows are grouped by their prompt (and by ``qid`` when the data has one: two
rows sharing either are in one group) and whole groups are held out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from pocketrlhf.data.formats import (PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS, PreferencePair, Skipped, TextPair,
                                     detect, effective_template)
from pocketrlhf.data.loading import load_records

GROUP_COLUMN = "qid"


@dataclass
class Rows:
    train: list
    held_out: list
    skipped: Skipped
    template: str  # the prompt format the rows were really rendered with (recorded with adapters)
    split: dict = field(default_factory=dict)  # how the held-out rows were chosen (for summary.json)


def prompt_key(row: TextPair | PreferencePair | str) -> str:
    """What makes two rows "the same prompt"; a row without a prompt (plain text) is its own text."""
    if isinstance(row, str):
        return row
    if isinstance(row, TextPair) and not row.prompt:
        return row.completion
    return row.prompt


def group_ids(keys: Sequence[Sequence[Hashable]]) -> list[int]:
    """Group index of each row: rows sharing any key are in one group (union-find). Groups are
    numbered in order of first appearance, so rows with unique keys keep their own order."""
    parent: list[int] = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Hashable, int] = {}
    for i, row_keys in enumerate(keys):
        for key in row_keys:
            if key in owner:
                a, b = find(owner[key]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    numbering: dict[int, int] = {}
    return [numbering.setdefault(find(i), len(numbering)) for i in range(len(keys))]


def split_holdout(items: list, fraction: float, seed: int, groups: Sequence[int] | None = None,
                  minimum: int = 10) -> tuple[list, list]:
    """(train, held-out): whole groups (default: one per item) in a seeded order are held out until
    their rows come closest to ``fraction`` of the items; nothing is held out for tiny data, a
    fraction of 0, or a single group."""
    groups = list(range(len(items))) if groups is None else list(groups)
    n_groups = max(groups, default=-1) + 1
    if fraction <= 0 or len(items) < minimum or n_groups < 2:
        return items, []
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for i, g in enumerate(groups):
        members[g].append(i)
    # Same generator as epoch_order(seed, epoch=-1): with one item per group, the split of
    # data without repeated prompts is what it always was.
    order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed * 1000003 - 1)).tolist()
    target = max(1, int(round(len(items) * fraction)))
    held: set[int] = set()
    count = 0
    for g in order[:-1]:  # at least one group stays for training
        size = len(members[g])
        if count + size > 2 * target:
            continue  # one prompt holding most of the rows must not become most of the hold-out
        held.update(members[g])
        count += size
        if count >= target:
            break
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _row_groups(rows: list, qids: list | None) -> list[int]:
    keys = []
    for i, row in enumerate(rows):
        row_keys: list[Hashable] = [("prompt", prompt_key(row))]
        if qids is not None and qids[i] is not None:
            row_keys.append((GROUP_COLUMN, qids[i]))
        keys.append(row_keys)
    return group_ids(keys)


def read_rows(kind: str, parse: Callable, data: str, eval_data: str, eval_fraction: float, seed: int, template: str,
              tokenizer, seq2seq: bool = False) -> Rows:
    """Rows of ``data`` turned into texts by ``parse`` (formats.sft_pairs, preference_pairs or
    prompts), and held-out rows from ``eval_data`` or a seeded ``eval_fraction`` of ``data``'s
    prompts (never a prompt or qid of the training rows); every row left out is counted. For an
    encoder-decoder base (``seq2seq``) every row needs a prompt, rendered in a format it can take."""
    rows = _read_rows(kind, parse, data, eval_data, eval_fraction, seed, template, tokenizer)
    if seq2seq:
        check_seq2seq_rows(rows, data)
    return rows


def check_seq2seq_rows(rows: Rows, data: str) -> None:
    """An encoder-decoder reads input -> target: a one-line error for a chat format or a row without
    a prompt (a bare text column, a preference pair with no shared prompt)."""
    from pocketrlhf.data.templates import check_seq2seq_template
    from pocketrlhf.errors import DataError

    check_seq2seq_template(rows.template)
    bare = sum(1 for r in rows.train + rows.held_out if not isinstance(r, str) and not r.prompt)
    if bare:
        raise DataError(f"{data}: {bare} rows have no prompt (a bare text column?); an encoder-decoder base reads "
                        "input -> target: give prompt+completion, prompt+chosen+rejected, question+response_j or "
                        "messages rows")


def _read_rows(kind: str, parse: Callable, data: str, eval_data: str, eval_fraction: float, seed: int, template: str,
               tokenizer) -> Rows:
    formats = {"SFT": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}[kind]
    ds = load_records(data)
    fmt = detect(ds.column_names, formats, data, kind)
    parsed, skipped = parse(ds, data, template, tokenizer, placeholders=True)
    qids = ds[GROUP_COLUMN] if GROUP_COLUMN in ds.column_names else None
    present = [i for i, row in enumerate(parsed) if row is not None]
    rows = [parsed[i] for i in present]
    qids = [qids[i] for i in present] if qids is not None else None
    by = "prompt" + (f" and {GROUP_COLUMN}" if qids is not None else "")
    if eval_data:
        held_out, eval_skipped = parse(load_records(eval_data), eval_data, template, tokenizer)
        skipped.merge(eval_skipped, prefix="eval ")
        shared = {prompt_key(r) for r in rows} & {prompt_key(r) for r in held_out}
        split = {"held_out_from": eval_data, "held_out_rows": len(held_out),
                 "held_out_prompts": len({prompt_key(r) for r in held_out}), "prompts_shared_with_training": len(shared)}
        if shared:
            from pocketrlhf.logs import log

            log.warning("%d prompts of %s also appear in %s: held-out numbers on them measure memory, not "
                        "generalisation", len(shared), eval_data, data)
        return Rows(rows, held_out, skipped, effective_template(fmt, template), split)
    groups = _row_groups(rows, qids)
    keep, held = split_holdout(list(range(len(rows))), eval_fraction, seed, groups)
    split = {"held_out_from": f"{eval_fraction:g} of {data}, whole groups by {by}" if held else "none",
             "held_out_rows": len(held), "held_out_prompts": len({groups[i] for i in held}),
             "train_prompts": len({groups[i] for i in keep})}
    return Rows([rows[i] for i in keep], [rows[i] for i in held], skipped, effective_template(fmt, template), split)
