"""``pocketrlhf data stackexchange``: StackLLaMA's preference data from a public Stack Exchange dump.

    pocketrlhf data stackexchange stackoverflow.com-Posts.7z --output-dir data/se

1. Stream ``Posts.xml`` (plain, .gz, .bz2, .xz, or .7z with the ``7z`` extra) through expat and keep
   questions and answers in an on-disk SQLite store: memory does not grow with the dump, and an
   answer may come before its question.
2. Per question with enough answers: convert the HTML bodies to Markdown (markdownify), score every
   answer as the H4 / Anthropic PMP recipe does, from its net votes (the ``Score`` attribute, the only
   vote count a dump has)::

       score = -1                                        if votes < 0 (accepted or not)
             = round(log2(1 + votes)) + (1 if accepted)  otherwise

   and pair answers with different scores, better first (``response_j``), sampling at most
   ``max_pairs_per_question`` pairs.
3. Assign each question to one split (``finetune``, ``reward``, ``rl``, ``evaluation``), so no
   question is in two splits, shuffle each split globally, and write it with the columns of
   ``lvwerra/stack-exchange-paired``: qid, question, date, metadata, response_j, response_k.

Every random choice (split, sampled pairs, order) comes from ``random.Random(f"{seed}:{qid}")``, so
the output depends on the seed and the data only, not on the number of workers. An already-paired
dataset (question/response_j/response_k) is only split, by ``qid`` (or question text), in order.
The output folder appears complete or not at all: it is built under a temporary name and renamed.
"""

from __future__ import annotations

import bisect
import bz2
import dataclasses
import gzip
import io
import json
import lzma
import math
import os
import queue
import random
import re
import shutil
import sqlite3
import sys
import threading
import time
import zlib
from collections import Counter, deque
from pathlib import Path
from typing import Iterator, Literal, NamedTuple
from xml.parsers import expat

from pocketrlhf.config import option, to_dict
from pocketrlhf.errors import ConfigError, DataError
from pocketrlhf.folders import refuse_foreign, write_marker
from pocketrlhf.paths import is_hub_dataset

COMMAND = "data stackexchange"
SPLITS = ("finetune", "reward", "rl", "evaluation")
PAIRED_COLUMNS = ("question", "response_j", "response_k")
DATASET_SUFFIXES = {".parquet", ".jsonl", ".json", ".csv", ".arrow"}
READ_CHUNK = 1 << 20
ROWS_PER_FILE = 500_000
ANSWER_CAP_REASON = "questions with fewer than {n} answers"


@dataclasses.dataclass
class StackExchangeConfig:
    input: str = option("", "Posts.xml of a Stack Exchange dump (plain, .gz, .bz2, .xz or .7z), a dump folder holding it, "
                            "or an already-paired dataset (question/response_j/response_k) to split")
    output_dir: str = option("data/stack-exchange-paired", "folder for the finetune/reward/rl/evaluation splits and manifest.json")
    output_format: Literal["parquet", "save_to_disk"] = option("parquet", "parquet files, or datasets' save_to_disk folders")
    overwrite: bool = option(False, "replace an existing output_dir")
    min_answers: int = option(2, "keep questions with at least this many usable answers")
    max_pairs_per_question: int = option(10, "sample at most this many (better, worse) pairs per question")
    max_chars: int = option(0, "leave out questions and answers longer than this many characters of Markdown (0: no limit)")
    tags: list[str] = option([], "keep only questions with at least one of these tags (comma-separated; empty: all)")
    site: str = option("", "site domain for the metadata links, e.g. stackoverflow.com (default: guessed from the path)")
    finetune_fraction: float = option(0.3, "share of questions in the finetune split (SFT)")
    reward_fraction: float = option(0.3, "share of questions in the reward split (reward model)")
    rl_fraction: float = option(0.3, "share of questions in the rl split (PPO prompts)")
    evaluation_fraction: float = option(0.1, "share of questions in the evaluation split")
    seed: int = option(0, "seed of the split assignment, the pair sampling and the shuffle")
    workers: int = option(0, "processes converting HTML to Markdown, the slow part (0: one per CPU core)")
    work_dir: str = option("", "folder for the temporary SQLite store, about the size of the uncompressed dump "
                               "(default: next to output_dir)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if self.min_answers < 2:
            raise ConfigError(f"min_answers must be at least 2 (a pair needs two answers), got {self.min_answers}")
        if self.max_pairs_per_question < 1:
            raise ConfigError(f"max_pairs_per_question must be at least 1, got {self.max_pairs_per_question}")
        if self.max_chars < 0:
            raise ConfigError(f"max_chars must be 0 (no limit) or positive, got {self.max_chars}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (one per CPU core) or positive, got {self.workers}")
        fractions = self.fractions()
        if any(f < 0 for f in fractions) or abs(math.fsum(fractions) - 1.0) > 1e-6:
            parts = " + ".join(f"{name} {f:g}" for name, f in zip(SPLITS, fractions))
            raise ConfigError(f"the split fractions must be >= 0 and add up to 1, got {parts} = {math.fsum(fractions):g}")
        self.tags = [normalize_tag(t) for t in self.tags if normalize_tag(t)]

    def fractions(self) -> tuple[float, float, float, float]:
        return (self.finetune_fraction, self.reward_fraction, self.rl_fraction, self.evaluation_fraction)


def say(message: str) -> None:
    print(f"[pocketrlhf] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Scores, pairs, splits and Markdown: small pure functions.


def answer_score(votes: int, accepted: bool) -> int:
    """Preference score of an answer from its net votes; a negative vote count scores -1, accepted or not."""
    if votes < 0:
        return -1
    return round(math.log2(1 + votes)) + int(accepted)


def ranked_pairs(scores: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of every two answers whose scores differ, in answer order."""
    pairs = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] > scores[j]:
                pairs.append((i, j))
            elif scores[i] < scores[j]:
                pairs.append((j, i))
    return pairs


def sample_pairs(pairs: list[tuple[int, int]], limit: int, rng: random.Random) -> list[tuple[int, int]]:
    if len(pairs) <= limit:
        return pairs
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), limit))]


def cumulative(fractions: tuple[float, ...]) -> tuple[float, ...]:
    total = math.fsum(fractions)
    return tuple(math.fsum(fractions[:i + 1]) / total for i in range(len(fractions)))


def pick_split(u: float, bounds: tuple[float, ...]) -> int:
    """The split whose share of [0, 1) holds ``u``; splits with a zero share never get anything."""
    index = bisect.bisect_right(bounds, u)
    last = max(i for i, b in enumerate(bounds) if b > (bounds[i - 1] if i else 0.0))
    return min(index, last)


def question_rng(seed: int, key) -> random.Random:
    # Seeding with a string hashes it (SHA-512): the same on every run and platform, unlike hash().
    return random.Random(f"{seed}:{key}")


def normalize_tag(tag: str) -> str:
    return tag.strip().strip("<>|").strip().lower()


def parse_tags(text: str) -> list[str]:
    """Tags in either dump format: ``<python><regex>`` (older dumps) or ``|python|regex|`` (newer)."""
    if "<" in text:
        return [t.lower() for t in re.findall(r"<([^<>]+)>", text)]
    return [t.lower() for t in text.split("|") if t]


def _code_language(pre) -> str:
    """The language of a code block: ``<code class="language-python">`` or ``<pre class="lang-py">``."""
    code = pre.find("code")
    for element in (code, pre):
        for cls in (element.get("class") or []) if element is not None else []:
            if cls.startswith("language-"):
                return cls[len("language-"):]
    for cls in pre.get("class") or []:
        if cls.startswith("lang-") and cls not in ("lang-none", "lang-default"):
            return cls[len("lang-"):]
    return ""


_converter = None


def html_to_markdown(html: str) -> str:
    """A post body (rendered HTML) as Markdown: ATX headings, fenced code blocks with their language.

    ``_`` and ``*`` in prose are left unescaped: the text trains a language model, and ``snake\\_case``
    would teach it escapes that the authors never typed.
    """
    global _converter
    if _converter is None:
        from markdownify import MarkdownConverter

        _converter = MarkdownConverter(heading_style="ATX", bullets="-", escape_underscores=False,
                                       escape_asterisks=False, code_language_callback=_code_language)
    return _converter.convert(html).strip()


class Question(NamedTuple):
    id: int
    title: str
    body: str  # HTML
    accepted: int | None
    date: str
    owner: int | None


class Answer(NamedTuple):
    id: int
    votes: int
    body: str  # HTML


@dataclasses.dataclass(frozen=True)
class PairOptions:
    min_answers: int
    max_pairs: int
    max_chars: int
    seed: int
    site: str
    bounds: tuple[float, ...]


def metadata(site: str, question: Question) -> list[str]:
    if not site:
        return []
    links = [f"https://{site}/questions/{question.id}", f"https://{site}"]
    if question.owner is not None:
        links.append(f"https://{site}/users/{question.owner}/")
    return links


def question_rows(question: Question, answers: list[Answer], opts: PairOptions) -> tuple[list[tuple], Counter, int]:
    """Output rows of one question, why things were left out, and how many pairs there were before sampling.

    A row is (split index, shuffle key, qid, question, date, metadata JSON, response_j, response_k).
    """
    skipped: Counter = Counter()
    rng = question_rng(opts.seed, question.id)
    split = pick_split(rng.random(), opts.bounds)
    if len(answers) < opts.min_answers:
        skipped[ANSWER_CAP_REASON.format(n=opts.min_answers)] += 1
        return [], skipped, 0
    body = html_to_markdown(question.body)
    text = f"{question.title.strip()}\n\n{body}".strip() if question.title.strip() else body
    if not body:
        skipped["questions with an empty body"] += 1
        return [], skipped, 0
    if opts.max_chars and len(text) > opts.max_chars:
        skipped["questions longer than max_chars"] += 1
        return [], skipped, 0
    texts, scores = [], []
    for answer in sorted(answers, key=lambda a: a.id):
        markdown = html_to_markdown(answer.body)
        if not markdown:
            skipped["answers with an empty body"] += 1
        elif opts.max_chars and len(markdown) > opts.max_chars:
            skipped["answers longer than max_chars"] += 1
        else:
            texts.append(markdown)
            scores.append(answer_score(answer.votes, answer.id == question.accepted))
    if len(texts) < opts.min_answers:
        skipped[f"questions with fewer than {opts.min_answers} usable answers"] += 1
        return [], skipped, 0
    pairs = ranked_pairs(scores)
    if not pairs:
        skipped["questions whose answers all have the same score"] += 1
        return [], skipped, 0
    chosen = sample_pairs(pairs, opts.max_pairs, rng)
    meta = json.dumps(metadata(opts.site, question))
    rows = [(split, rng.getrandbits(63), question.id, text, question.date, meta, texts[j], texts[k]) for j, k in chosen]
    return rows, skipped, len(pairs)


def _chunk_rows(chunk: list[tuple[Question, list[Answer]]], opts: PairOptions) -> list:
    return [question_rows(question, answers, opts) for question, answers in chunk]


# ---------------------------------------------------------------------------------------------
# Reading a dump: decompression, 7z, XML.


class _Cancelled(Exception):
    pass


class SevenZipStream(io.RawIOBase):
    """One member of a .7z archive as a byte stream: py7zr decompresses it on a thread into a
    bounded queue, so only a few chunks are in memory however large the member is."""

    CHUNK = 1 << 20

    def __init__(self, path: Path):
        super().__init__()
        try:
            import py7zr
            from py7zr.io import Py7zIO, WriterFactory
        except ImportError:
            raise DataError(f"{path}: reading .7z archives needs py7zr: pip install 'pocketrlhf[7z]' "
                            f"(or extract Posts.xml with 7z first)") from None
        try:
            self.archive = py7zr.SevenZipFile(path, "r")
            members = [m for m in self.archive.list() if not m.is_directory]
        except Exception as e:  # noqa: BLE001 - py7zr raises many types for damaged archives
            raise DataError(f"{path}: cannot open as a 7z archive ({type(e).__name__}: {e})") from None
        posts = [m for m in members if Path(m.filename).name.lower() == "posts.xml"]
        if not posts and len(members) == 1:
            posts = members
        if not posts:
            names = ", ".join(m.filename for m in members[:8]) or "nothing"
            raise DataError(f"{path}: no Posts.xml in the archive (it holds {names})")
        self.path, self.member = path, posts[0].filename
        self.size = posts[0].uncompressed
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.delivered = 0
        self._view = memoryview(b"")
        self._done = False
        stream = self

        class QueueWriter(Py7zIO):
            def write(self, data) -> int:
                view = memoryview(data)
                for start in range(0, len(view), stream.CHUNK):
                    piece = bytes(view[start:start + stream.CHUNK])
                    while True:
                        if stream.stop.is_set():
                            raise _Cancelled
                        try:
                            stream.queue.put(piece, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                return len(data)

            def read(self, size=None) -> bytes:
                return b""

            def seek(self, offset, whence=0) -> int:
                return 0

            def flush(self) -> None:
                pass

            def size(self) -> int:
                return 0

        class Factory(WriterFactory):
            def create(self, filename):
                return QueueWriter()

        self._factory = Factory()
        self._thread = threading.Thread(target=self._extract, daemon=True)
        self._thread.start()

    def _extract(self) -> None:
        try:
            self.archive.extract(targets=[self.member], factory=self._factory)
            self._put(None)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._view) and not self._done:
            item = self.queue.get()
            if item is None:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise DataError(f"{self.path}: the 7z archive is damaged or cut short "
                                f"({type(item).__name__}: {item})")
            else:
                self._view = memoryview(item)
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        self.delivered += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.stop.set()
            while self._thread.is_alive():
                try:
                    self.queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self.archive.close()
        super().close()


MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z"))


class DumpReader:
    """The decompressed bytes of a dump file (compression told by its first bytes), and how far
    through the file we are, for the progress bar."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb")
        head = self.raw.read(8)
        self.raw.seek(0)
        self.kind = next((kind for magic, kind in MAGIC if head.startswith(magic)), "xml")
        self.size = path.stat().st_size
        self.stream: io.RawIOBase | io.BufferedIOBase
        if self.kind == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw)
        elif self.kind == "bz2":
            self.stream = bz2.BZ2File(self.raw)
        elif self.kind == "xz":
            self.stream = lzma.LZMAFile(self.raw)
        elif self.kind == "7z":
            self.raw.close()
            self.stream = SevenZipStream(path)
            self.size = self.stream.size
        else:
            self.stream = self.raw

    def read(self, n: int) -> bytes:
        try:
            return self.stream.read(n)
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise DataError(f"{self.path}: the {self.kind} data is damaged or cut short ({e})") from None

    def fraction_read(self) -> float:
        position = self.stream.delivered if self.kind == "7z" else self.raw.tell()
        return position / max(self.size, 1)

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def xml_error(path: Path, e: expat.ExpatError, saw_root: bool) -> DataError:
    message = expat.errors.messages[e.code]
    truncated = {expat.errors.codes[m] for m in (expat.errors.XML_ERROR_NO_ELEMENTS, expat.errors.XML_ERROR_UNCLOSED_TOKEN,
                                                 expat.errors.XML_ERROR_PARTIAL_CHAR)}
    if saw_root and e.code in truncated:
        return DataError(f"{path}:{e.lineno}: the XML stops before </posts> ({message}): the file is cut short "
                         f"(an interrupted download or extraction?)")
    if not saw_root and e.code == expat.errors.codes[expat.errors.XML_ERROR_NO_ELEMENTS]:
        return DataError(f"{path}: empty, or no XML in it")
    return DataError(f"{path}:{e.lineno}: not well-formed XML ({message} at column {e.offset + 1})")


# ---------------------------------------------------------------------------------------------
# The on-disk store.


class PostStore:
    """Questions and answers in SQLite, so that memory stays flat while the dump streams past."""

    BATCH = 2000

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-65536", "locking_mode=EXCLUSIVE",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript("""
            CREATE TABLE questions (id INTEGER PRIMARY KEY, accepted INTEGER, date TEXT, owner INTEGER,
                                    title TEXT, body TEXT);
            CREATE TABLE answers (id INTEGER PRIMARY KEY, parent INTEGER, votes INTEGER, body TEXT);
            CREATE TABLE dropped (id INTEGER PRIMARY KEY);
        """)
        self.db.execute("BEGIN")
        self.pending: dict[str, list[tuple]] = {"questions": [], "answers": [], "dropped": []}
        self.pending_dropped: set[int] = set()
        self.n_dropped = 0
        self.duplicates = 0

    def add_question(self, row: tuple) -> None:
        self._add("questions", row)

    def drop_question(self, qid: int) -> None:
        """Remember a question left out (tags, bad row), so its answers need not be stored."""
        self.pending_dropped.add(qid)
        self.n_dropped += 1
        self._add("dropped", (qid,))

    def add_answer(self, row: tuple) -> bool:
        """Store an answer; False if its question is already known to be left out."""
        parent = row[1]
        if self.n_dropped and (parent in self.pending_dropped or
                               self.db.execute("SELECT 1 FROM dropped WHERE id=?", (parent,)).fetchone()):
            return False
        self._add("answers", row)
        return True

    def _add(self, table: str, row: tuple) -> None:
        rows = self.pending[table]
        rows.append(row)
        if len(rows) >= self.BATCH:
            self._flush(table)

    def _flush(self, table: str) -> None:
        rows = self.pending[table]
        if not rows:
            return
        marks = ",".join("?" * len(rows[0]))
        cursor = self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)
        if table != "dropped":
            self.duplicates += len(rows) - cursor.rowcount
        else:
            self.pending_dropped.clear()
        rows.clear()

    def finish(self) -> None:
        for table in self.pending:
            self._flush(table)
        self.db.execute("COMMIT")
        # Built once after loading: far cheaper than keeping it up to date on every insert.
        self.db.execute("CREATE INDEX answers_parent ON answers (parent)")

    def count(self, sql: str, *args) -> int:
        return self.db.execute(sql, args).fetchone()[0]

    def orphans(self) -> tuple[int, int]:
        """(answers to questions left out, answers whose question is not in the dump)."""
        left_out = self.count("SELECT COUNT(*) FROM answers a WHERE NOT EXISTS (SELECT 1 FROM questions q WHERE q.id = a.parent)"
                              " AND EXISTS (SELECT 1 FROM dropped d WHERE d.id = a.parent)")
        missing = self.count("SELECT COUNT(*) FROM answers a WHERE NOT EXISTS (SELECT 1 FROM questions q WHERE q.id = a.parent)"
                             " AND NOT EXISTS (SELECT 1 FROM dropped d WHERE d.id = a.parent)")
        return left_out, missing

    ENOUGH = "(SELECT COUNT(*) FROM answers a WHERE a.parent = q.id) >= ?"

    def n_groups(self, min_answers: int) -> int:
        return self.count(f"SELECT COUNT(*) FROM questions q WHERE {self.ENOUGH}", min_answers)

    def groups(self, min_answers: int) -> Iterator[tuple[Question, list[Answer]]]:
        """Questions with at least ``min_answers`` answers, with their answers, in id order."""
        reader = self.db.cursor()
        answers = self.db.cursor()
        reader.execute(f"SELECT id, title, body, accepted, date, owner FROM questions q WHERE {self.ENOUGH} ORDER BY id",
                       (min_answers,))
        for row in reader:
            group = answers.execute("SELECT id, votes, body FROM answers WHERE parent = ? ORDER BY id", (row[0],))
            yield Question(*row), [Answer(*a) for a in group]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------------------------
# Pass 1: Posts.xml -> store.


class RowStats:
    def __init__(self):
        self.posts = 0
        self.questions = 0
        self.answers = 0
        self.other_types = 0
        self.compression = "none"
        self.skipped: Counter = Counter()
        self.first_line: dict[str, int] = {}

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.first_line.setdefault(reason, line)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def read_posts(path: Path, store: PostStore, tags: set[str], show_progress: bool) -> RowStats:
    from tqdm.auto import tqdm

    stats = RowStats()
    reader = DumpReader(path)
    stats.compression = "none" if reader.kind == "xml" else reader.kind
    parser = expat.ParserCreate()
    depth = 0
    saw_root = False

    def on_row(a: dict, line: int) -> None:
        stats.posts += 1
        kind = a.get("PostTypeId")
        if kind not in ("1", "2"):
            if kind is None:
                stats.skip("rows without a PostTypeId", line)
            else:
                stats.other_types += 1
            return
        post_id = _int(a.get("Id"))
        if post_id is None:
            stats.skip("rows without a valid Id", line)
            return
        body = a.get("Body")
        if kind == "1":
            stats.questions += 1
            if body is None:
                stats.skip("questions without a Body", line)
                store.drop_question(post_id)
            elif tags and not tags.intersection(parse_tags(a.get("Tags", ""))):
                stats.skipped["questions without any of the wanted tags"] += 1
                store.drop_question(post_id)
            else:
                created = a.get("CreationDate", "")
                store.add_question((post_id, _int(a.get("AcceptedAnswerId")), created[:10].replace("-", "/"),
                                    _int(a.get("OwnerUserId")), a.get("Title", ""), body))
            return
        stats.answers += 1
        parent, votes = _int(a.get("ParentId")), _int(a.get("Score"))
        if parent is None:
            stats.skip("answers without a valid ParentId", line)
        elif votes is None:
            stats.skip("answers without a valid Score", line)
        elif body is None:
            stats.skip("answers without a Body", line)
        elif not store.add_answer((post_id, parent, votes, body)):
            stats.skipped["answers to questions left out (tags or bad rows)"] += 1

    def start(name: str, attributes: dict) -> None:
        nonlocal depth, saw_root
        depth += 1
        if depth == 1:
            saw_root = True
            if name != "posts":
                raise DataError(f"{path}:{parser.CurrentLineNumber}: not a Stack Exchange Posts.xml: the root element "
                                f"is <{name}>, expected <posts>")
        elif depth == 2:
            if name == "row":
                on_row(attributes, parser.CurrentLineNumber)
            else:
                stats.skip(f"<{name}> elements that are not <row>", parser.CurrentLineNumber)

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    bar = tqdm(desc=f"reading {path.name}", unit=" posts", unit_scale=True, disable=not show_progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        last = 0
        while chunk := reader.read(READ_CHUNK):
            parser.Parse(chunk, False)
            bar.update(stats.posts - last)
            last = stats.posts
            bar.set_postfix_str(f"{reader.fraction_read():.0%} of the {'file' if reader.kind == 'xml' else reader.kind + ' data'}",
                                refresh=False)
        parser.Parse(b"", True)
        bar.update(stats.posts - last)
    except expat.ExpatError as e:
        raise xml_error(path, e, saw_root) from None
    finally:
        bar.close()
        reader.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Pass 2: pairs -> a second store, sorted by a random key on the way out (a global shuffle on disk).


class RowStore:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-65536", "locking_mode=EXCLUSIVE",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        try:  # sort spill files next to the store rather than in /tmp (deprecated pragma; fine if absent)
            self.db.execute(f"PRAGMA temp_store_directory = '{str(path.parent).replace(chr(39), chr(39) * 2)}'")
        except sqlite3.DatabaseError:
            pass
        self.db.execute("CREATE TABLE rows (split INTEGER, key INTEGER, qid INTEGER, question TEXT, date TEXT, "
                        "metadata TEXT, response_j TEXT, response_k TEXT)")
        self.db.execute("BEGIN")
        self.pending: list[tuple] = []

    def add(self, rows: list[tuple]) -> None:
        self.pending.extend(rows)
        if len(self.pending) >= 2000:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.db.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?)", self.pending)
            self.pending.clear()

    def finish(self) -> None:
        self.flush()
        self.db.execute("COMMIT")

    def shuffled(self) -> Iterator[tuple]:
        yield from self.db.execute("SELECT split, qid, question, date, metadata, response_j, response_k FROM rows "
                                   "ORDER BY split, key")

    def close(self) -> None:
        try:  # the setting is process-wide, and the folder is about to be deleted
            self.db.execute("PRAGMA temp_store_directory = ''")
        except sqlite3.DatabaseError:
            pass
        self.db.close()


def make_pairs(store: PostStore, rows: RowStore, opts: PairOptions, workers: int, show_progress: bool) -> tuple[Counter, int, int]:
    """Run ``question_rows`` over every question with enough answers; (skipped, pairs found, questions paired)."""
    from tqdm.auto import tqdm

    skipped: Counter = Counter()
    found = paired = 0
    bar = tqdm(total=store.n_groups(opts.min_answers), desc="pairing answers", unit=" questions", unit_scale=True,
               disable=not show_progress, dynamic_ncols=True, smoothing=0.1)

    def take(result) -> None:
        nonlocal found, paired
        out, why, n = result
        rows.add(out)
        skipped.update(why)
        found += n
        paired += bool(out)
        bar.update(1)

    try:
        groups = store.groups(opts.min_answers)
        if workers == 1:
            for question, answers in groups:
                take(question_rows(question, answers, opts))
        else:
            import multiprocessing

            # Chunks handed out with apply_async, at most a few per worker in flight: the workers stay
            # busy while this process reads the store, and memory stays bounded (Pool.imap would read
            # the whole store into its task queue).
            pending: deque = deque()
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                chunk: list = []
                for group in groups:
                    chunk.append(group)
                    if len(chunk) == 32:
                        pending.append(pool.apply_async(_chunk_rows, (chunk, opts)))
                        chunk = []
                        while len(pending) > 4 * workers:
                            for result in pending.popleft().get():
                                take(result)
                if chunk:
                    pending.append(pool.apply_async(_chunk_rows, (chunk, opts)))
                while pending:
                    for result in pending.popleft().get():
                        take(result)
    finally:
        bar.close()
    rows.finish()
    return skipped, found, paired


# ---------------------------------------------------------------------------------------------
# Writing the splits.


def pair_schema():
    import pyarrow as pa

    return pa.schema([("qid", pa.int64()), ("question", pa.string()), ("date", pa.string()),
                      ("metadata", pa.list_(pa.string())), ("response_j", pa.string()), ("response_k", pa.string())])


class SplitWriter:
    """Parquet files ``<split>/data-00000.parquet``, ... (names that datasets reads as a train split)."""

    def __init__(self, root: Path, schema):
        self.root, self.schema = root, schema
        self.writers: dict[str, object] = {}
        self.rows = Counter()
        self.files = Counter()
        self.in_file = Counter()

    def write(self, split: str, table) -> None:
        import pyarrow.parquet as pq

        while table.num_rows:
            if split not in self.writers or self.in_file[split] >= ROWS_PER_FILE:
                self._close(split)
                folder = self.root / split
                folder.mkdir(parents=True, exist_ok=True)
                self.writers[split] = pq.ParquetWriter(str(folder / f"data-{self.files[split]:05d}.parquet"), self.schema)
                self.files[split] += 1
                self.in_file[split] = 0
            take = min(table.num_rows, ROWS_PER_FILE - self.in_file[split])
            self.writers[split].write_table(table.slice(0, take))
            self.rows[split] += take
            self.in_file[split] += take
            table = table.slice(take)

    def _close(self, split: str) -> None:
        writer = self.writers.pop(split, None)
        if writer is not None:
            writer.close()

    def close(self) -> dict[str, int]:
        for split in list(self.writers):
            self._close(split)
        for split in SPLITS:
            if not self.rows[split]:  # an empty but readable split, so every folder exists
                import pyarrow.parquet as pq

                (self.root / split).mkdir(parents=True, exist_ok=True)
                pq.write_table(self.schema.empty_table(), str(self.root / split / "data-00000.parquet"))
        return {split: self.rows[split] for split in SPLITS}


def write_pair_rows(rows: RowStore, writer: SplitWriter, show_progress: bool, total: int) -> None:
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = writer.schema
    bar = tqdm(total=total, desc="writing splits", unit=" pairs", unit_scale=True, disable=not show_progress,
               dynamic_ncols=True)
    batch: list[tuple] = []
    current = None

    def flush() -> None:
        if batch:
            columns = list(zip(*batch))
            table = pa.Table.from_arrays([pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.string()),
                                          pa.array(columns[2], pa.string()),
                                          pa.array([json.loads(m) for m in columns[3]], pa.list_(pa.string())),
                                          pa.array(columns[4], pa.string()), pa.array(columns[5], pa.string())],
                                         schema=schema)
            writer.write(SPLITS[current], table)
            bar.update(len(batch))
            batch.clear()

    try:
        for split, *row in rows.shuffled():
            if split != current or len(batch) >= 2000:
                flush()
                current = split
            batch.append(row)
        flush()
    finally:
        bar.close()


def split_paired(source: str, writer_root: Path, cfg: StackExchangeConfig) -> dict:
    """An already-paired dataset: each question (by qid, else by text) to one split, rows in order."""
    import pyarrow as pa

    from pocketrlhf.data.loading import load_records

    ds = load_records(source)
    missing = [c for c in PAIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: not a Posts.xml dump nor a paired dataset: no column {', '.join(missing)} "
                        f"(found {', '.join(ds.column_names)})")
    key_column = "qid" if "qid" in ds.column_names else "question"
    bounds = cumulative(cfg.fractions())
    writer = SplitWriter(writer_root, ds.data.schema)
    for table in ds.with_format("arrow").iter(batch_size=10_000):
        splits = [pick_split(question_rng(cfg.seed, key).random(), bounds) for key in table.column(key_column).to_pylist()]
        for index, name in enumerate(SPLITS):
            mask = pa.array([s == index for s in splits])
            writer.write(name, table.filter(mask))
    counts = writer.close()
    return {"input_kind": "paired dataset", "rows": len(ds), "split_by": key_column, "splits": counts,
            "columns": ds.column_names}


def to_save_to_disk(root: Path) -> None:
    """Turn each split's parquet files into a ``save_to_disk`` folder."""
    import datasets

    datasets.disable_progress_bars()
    for split in SPLITS:
        folder = root / split
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        cache = root / f".cache-{split}"
        ds = datasets.Dataset.from_parquet(files, cache_dir=str(cache))
        saved = root / f".{split}-saved"
        ds.save_to_disk(str(saved))
        del ds
        shutil.rmtree(folder)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(saved, folder)


# ---------------------------------------------------------------------------------------------
# The command.


def cpu_count() -> int:
    """CPUs this process may use (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def guess_site(path: Path) -> str:
    """``stackoverflow.com-Posts.7z``, ``askubuntu.com.7z`` or ``cooking.stackexchange.com/Posts.xml``."""
    for name in (path.name, path.parent.name):
        m = re.match(r"^((?:[a-z0-9-]+\.)+(?:com|net))(?:-posts)?(?:\.(?:7z|xml|gz|bz2|xz))*$", name.lower())
        if m:
            return m.group(1)
    return ""


def resolve_input(raw: str) -> tuple[Path | None, str]:
    """(the dump file, "") for a Posts.xml, or (None, source) for a paired dataset."""
    path = Path(raw).expanduser()
    if path.is_dir():
        names = ("Posts.xml", "Posts.xml.gz", "Posts.xml.bz2", "Posts.xml.xz", "posts.xml")
        for name in names:
            if (path / name).is_file():
                return path / name, ""
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        if not saved and not any(f.suffix.lower() in DATASET_SUFFIXES for f in path.rglob("*") if f.is_file()):
            raise DataError(f"{raw}: a folder with no {', '.join(names[:4])} and no dataset files "
                            f"({', '.join(sorted(DATASET_SUFFIXES))}) in it")
        return None, raw
    if path.is_file():
        return (None, raw) if path.suffix.lower() in DATASET_SUFFIXES else (path, "")
    if is_hub_dataset(raw):
        return None, raw
    raise DataError(f"{raw}: no such file or folder")


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder in with renames: readers see the old folder or the new one, never half."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _prepared_before_markers(out: Path) -> bool:
    """A folder this command wrote before it left a marker: its manifest.json lists the splits."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "splits" in manifest and "options" in manifest


def run(cfg: StackExchangeConfig) -> dict:
    """Build the splits and manifest.json in ``cfg.output_dir``; return the manifest."""
    if not cfg.input:
        raise ConfigError("no input: pocketrlhf data stackexchange PATH/Posts.xml (or .gz/.bz2/.xz/.7z, or a paired dataset)")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not _prepared_before_markers(out):  # --overwrite replaces the whole folder
        refuse_foreign(out, list(out.iterdir()) if out.is_dir() else [out], "replace it", command=COMMAND)
    dump, source = resolve_input(cfg.input)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if dump is None:
            manifest = split_paired(source, tmp, cfg)
            manifest["skipped"] = {}
        else:
            manifest = _from_dump(dump, tmp, cfg)
        if cfg.output_format == "save_to_disk":
            to_save_to_disk(tmp)
        manifest = {"source": str(cfg.input), **manifest, "format": cfg.output_format,
                    "seconds": round(time.perf_counter() - started, 2), "options": to_dict(cfg)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_marker(tmp, COMMAND)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = manifest["splits"]
    say(f"wrote {sum(counts.values())} pairs to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if manifest["skipped"]:
        say("left out: " + ", ".join(f"{n} {reason}" for reason, n in manifest["skipped"].items()))
    return manifest


def _from_dump(dump: Path, tmp: Path, cfg: StackExchangeConfig) -> dict:
    site = cfg.site or guess_site(dump)
    if cfg.work_dir:
        Path(cfg.work_dir).expanduser().mkdir(parents=True, exist_ok=True)
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="pocketrlhf-se-", dir=Path(cfg.work_dir).expanduser()))
    else:
        work = tmp / ".work"
        work.mkdir()
    workers = cfg.workers or cpu_count()
    store = rows = None
    try:
        store = PostStore(work / "posts.sqlite")
        t0 = time.perf_counter()
        stats = read_posts(dump, store, set(cfg.tags), cfg.progress)
        store.finish()
        parse_seconds = time.perf_counter() - t0
        skipped = Counter(stats.skipped)
        if store.duplicates:
            skipped["rows with an Id seen before"] += store.duplicates
        left_out, missing = store.orphans()
        if left_out:
            skipped["answers to questions left out (tags or bad rows)"] += left_out
        if missing:
            skipped["answers whose question is not in the dump"] += missing
        n_questions = store.count("SELECT COUNT(*) FROM questions")
        few = n_questions - store.n_groups(cfg.min_answers)
        if few:
            skipped[ANSWER_CAP_REASON.format(n=cfg.min_answers)] += few
        opts = PairOptions(cfg.min_answers, cfg.max_pairs_per_question, cfg.max_chars, cfg.seed, site,
                           cumulative(cfg.fractions()))
        rows = RowStore(work / "pairs.sqlite")
        t1 = time.perf_counter()
        why, found, paired = make_pairs(store, rows, opts, workers, cfg.progress)
        skipped.update(why)
        store.close()
        store = None
        pair_seconds = time.perf_counter() - t1
        total = rows.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        if total == 0:
            reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "the dump holds no questions"
            raise DataError(f"{dump}: no answer pairs to write ({reasons})")
        t2 = time.perf_counter()
        writer = SplitWriter(tmp, pair_schema())
        write_pair_rows(rows, writer, cfg.progress, total)
        counts = writer.close()
        write_seconds = time.perf_counter() - t2
    finally:
        for db in (store, rows):
            if db is not None:
                db.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "input_kind": "Posts.xml", "compression": stats.compression, "site": site,
        "posts": stats.posts, "questions": stats.questions, "answers": stats.answers,
        "other_post_types": stats.other_types, "questions_paired": paired,
        "pairs_before_sampling": found, "splits": counts, "columns": pair_schema().names,
        "skipped": dict(skipped.most_common()), "skipped_first_line": stats.first_line,
        "posts_per_second": round(stats.posts / max(parse_seconds, 1e-9), 1),
        "phase_seconds": {"read": round(parse_seconds, 2), "pair": round(pair_seconds, 2), "write": round(write_seconds, 2)},
    }

