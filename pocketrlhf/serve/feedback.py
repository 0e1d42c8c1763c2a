"""Votes from the web page's compare view, kept as preference pairs that ``rm`` and ``dpo`` read as they are.

One vote is one JSON line (a vote among 3-4 answers: one line per answer the winner beat), written
with ONE ``write`` on a file opened for appending, under a lock, then flushed to disk: concurrent
voters never interleave, and a crash or a kill loses at most the vote in flight. A line cut short
by a crash (a power cut mid-write) is cut off when the server next opens the file.

    {"prompt": "...", "chosen": "...", "rejected": "...", "vote": "better",
     "chosen_model": "dpo", "rejected_model": "sft", "models": ["sft", "dpo"], "anonymous": true,
     "sampling": {"temperature": 0.7, ...}, "timestamp": "2026-...Z", "annotator": "a1b2...",
     "comparison": "cmp-..."}

Ties and both-bad votes are kept (``vote``: "tie" / "both_bad", the answers under ``answers``,
no chosen/rejected) and skipped by the preference loaders with a count.

Each finished comparison is also appended to a journal beside the votes file
(``votes.comparisons.jsonl``), so that a page still open when the server restarts can vote on
what it shows; the votes already in the file say which comparisons have had their vote.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("pocketrlhf")

VOTES = ("better", "tie", "both_bad")
NOT_PREFERENCES = ("tie", "both_bad")  # kept in the file, skipped by rm/dpo
_ANNOTATOR = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclasses.dataclass
class Comparison:
    """One prompt answered by 2-4 model ids; ``answers`` fill in as they stream."""

    id: str
    prompt: str
    system: str
    models: list[str]
    sampling: dict
    anonymous: bool
    answers: list[str]
    finished: list[bool]
    created: float = dataclasses.field(default_factory=time.time)
    voted: bool = False

    @property
    def complete(self) -> bool:
        return all(self.finished)

    def record(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "system": self.system, "models": self.models,
                "sampling": self.sampling, "anonymous": self.anonymous, "answers": self.answers,
                "created": self.created}

    @classmethod
    def from_record(cls, row: dict) -> Comparison | None:
        """A journalled comparison, or None for a row that is not one (edited by hand, another tool)."""
        try:
            models, answers = [str(m) for m in row["models"]], [str(a) for a in row["answers"]]
            c = cls(str(row["id"]), str(row["prompt"]), str(row.get("system", "")), models, dict(row["sampling"]),
                    bool(row["anonymous"]), answers, [True] * len(answers), float(row.get("created", 0)))
        except (KeyError, TypeError, ValueError):
            return None
        return c if 2 <= len(models) == len(answers) <= 4 else None


def journal_path(feedback_file: str | Path) -> Path:
    path = Path(feedback_file).expanduser()
    return path.with_name(path.stem + ".comparisons.jsonl")


class Comparisons:
    """The comparisons a vote may still name (the newest ``limit``; older ones are forgotten).

    With a ``journal``, finished comparisons outlive the server: they are read back at start,
    those named in ``voted`` (the ids in the votes file) marked as voted.
    """

    def __init__(self, limit: int = 10_000, journal: FeedbackFile | None = None, voted: Iterable[str] = ()):
        self.limit = limit
        self.journal = journal
        self._items: collections.OrderedDict[str, Comparison] = collections.OrderedDict()
        self._lock = threading.Lock()
        if journal is not None:
            voted = set(voted)
            for row in journal.rows():
                c = Comparison.from_record(row)
                if c is not None:
                    c.voted = c.id in voted
                    self._add(c)

    def _add(self, c: Comparison) -> None:
        self._items[c.id] = c
        self._items.move_to_end(c.id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def new(self, prompt: str, system: str, models: list[str], sampling: dict, anonymous: bool) -> Comparison:
        c = Comparison(f"cmp-{uuid.uuid4().hex}", prompt, system, list(models), dict(sampling), anonymous,
                       [""] * len(models), [False] * len(models))
        with self._lock:
            self._add(c)
        return c

    def finished(self, c: Comparison) -> None:
        """Journal a comparison whose answers all finished (only those can be voted on)."""
        if self.journal is not None and c.complete:
            self.journal.append([c.record()])

    def get(self, cid: str) -> Comparison | None:
        with self._lock:
            return self._items.get(cid)

    def claim(self, cid: str) -> bool:
        """Mark a comparison voted; False when it already was (one vote per comparison)."""
        with self._lock:
            c = self._items.get(cid)
            if c is None or c.voted:
                return False
            c.voted = True
            return True


def valid_annotator(value: str) -> bool:
    return bool(_ANNOTATOR.match(value))


def vote_rows(c: Comparison, vote: str, winner: int | None, annotator: str) -> list[dict]:
    """The lines one vote becomes: one preference pair per beaten answer, or one tie/both-bad line."""
    common = {"models": c.models, "anonymous": c.anonymous, "sampling": c.sampling,
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
              "annotator": annotator, "comparison": c.id}
    prompt = c.prompt
    if vote in NOT_PREFERENCES:
        return [{"prompt": prompt, "vote": vote, "answers": list(c.answers), **common,
                 **({"system": c.system} if c.system else {})}]
    rows = []
    for i, answer in enumerate(c.answers):
        if i == winner:
            continue
        rows.append({"prompt": prompt, "chosen": c.answers[winner], "rejected": answer, "vote": "better",
                     "chosen_model": c.models[winner], "rejected_model": c.models[i], **common,
                     **({"system": c.system} if c.system else {})})
    return rows


class FeedbackFile:
    """Appends votes to one JSONL file, a whole vote per write."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._repair()

    def _repair(self) -> None:
        """Cut off a last line without its newline (a write cut short by a crash)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            try:
                json.loads(data[keep:])
            except ValueError:
                f.truncate(keep)
            else:  # a whole row without its newline (written by hand or another tool): keep it
                f.write(b"\n")
                return
        log.warning("%s: dropped an unfinished last line (%d bytes) left by a crash", self.path, len(data) - keep)

    def append(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write (rare: a full disk, a signal) goes on where it stopped
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def summary(rows: list[dict]) -> dict:
    """Votes per model id: wins, losses, ties, both-bad, and the win rate over its decided votes."""
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    comparisons = set()
    votes = collections.Counter()
    for r in rows:
        vote = r.get("vote")
        if vote not in VOTES:
            continue
        cid = r.get("comparison")
        if cid not in comparisons:
            votes[vote] += 1
            comparisons.add(cid)
        if vote == "better":
            stats[r.get("chosen_model", "?")]["wins"] += 1
            stats[r.get("rejected_model", "?")]["losses"] += 1
        else:
            for m in r.get("models") or ():
                stats[m]["ties" if vote == "tie" else "both_bad"] += 1
    models = []
    for name, s in sorted(stats.items()):
        decided = s["wins"] + s["losses"]
        models.append({"model": name, "wins": s["wins"], "losses": s["losses"], "ties": s["ties"],
                       "both_bad": s["both_bad"], "win_rate": round(s["wins"] / decided, 4) if decided else None})
    models.sort(key=lambda m: (-(m["win_rate"] or 0), m["model"]))
    return {"votes": sum(votes.values()), "by_vote": dict(votes), "preference_pairs": sum(
        1 for r in rows if r.get("vote") == "better"), "models": models}
