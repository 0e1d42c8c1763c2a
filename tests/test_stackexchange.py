"""``pocketrlhf data stackexchange`` on generated dumps in the real Posts.xml schema.

Scores and pairs are recomputed here from the generated posts (answer ids are written into the
bodies, so each output response names the answer it came from), not with the module's functions.
"""

import bz2
import gzip
import json
import math
import random
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pyarrow.parquet as pq
import pytest

from pocketrlhf.cli import main
from pocketrlhf.data import stackexchange as se
from pocketrlhf.data.formats import preference_pairs, prompts, sft_pairs
from pocketrlhf.data.loading import load_records
from pocketrlhf.errors import ConfigError, DataError

from conftest import write_jsonl

CODE_HTML = ('<p>I read a file &amp; it fails with <code>x &lt; y</code>:</p>\n'
             '<pre class="lang-py s-code-block"><code class="hljs language-python">if a &lt; b and c &gt; d:\n'
             '    print("&amp;")\n</code></pre>\n'
             '<p>See <a href="https://docs.python.org/3/" rel="nofollow noreferrer">the docs</a> &mdash; thanks.</p>\n'
             '<ul>\n<li>first\n<ul>\n<li>nested</li>\n</ul></li>\n<li>second</li>\n</ul>\n<h2>Update</h2>\n')


# ---------------------------------------------------------------------------------------------
# A generated dump.


def post(**attrs) -> dict:
    return {k: str(v) for k, v in attrs.items() if v is not None}


def question(qid, title, tags, accepted=None, body=None, owner=None, date="2011-04-01T10:00:00.000", fmt="angle"):
    tag_text = "".join(f"<{t}>" for t in tags) if fmt == "angle" else "|" + "|".join(tags) + "|"
    return post(Id=qid, PostTypeId=1, AcceptedAnswerId=accepted, CreationDate=date, Score=3, ViewCount=100,
                Body=body if body is not None else f"<p>question-{qid} asks something</p>", OwnerUserId=owner,
                LastActivityDate=date, Title=title, Tags=tag_text, AnswerCount=2, CommentCount=0,
                ContentLicense="CC BY-SA 3.0")


def answer(aid, parent, votes, body=None):
    return post(Id=aid, PostTypeId=2, ParentId=parent, CreationDate="2011-04-02T10:00:00.000", Score=votes,
                Body=body if body is not None else f"<p>answer-{aid} says <em>this</em></p>", OwnerUserId=aid + 1000,
                LastActivityDate="2011-04-02T10:00:00.000", CommentCount=1, ContentLicense="CC BY-SA 3.0")


def edge_case_posts() -> list[dict]:
    """Hand-made questions, each for one rule, then many random ones so every split gets some."""
    rows = [
        # 1: accepted answer, negative and zero scores, a tie (0 vs 0), HTML with code/links/lists.
        question(1, "How do I compare in Python?", ["python", "comparison"], accepted=3, body=CODE_HTML, owner=42),
        answer(2, 1, 10), answer(3, 1, 1), answer(4, 1, 0), answer(5, 1, -2), answer(6, 1, 0),
        # 10: an accepted answer with negative votes still scores -1 (ties the other negative one).
        question(10, "Accepted but downvoted", ["regex"], accepted=11, fmt="pipe"),
        answer(11, 10, -1), answer(12, 10, -5), answer(13, 10, 2),
        # 20: a question with one answer.
        question(20, "Lonely", ["python"]), answer(21, 20, 5),
        # 30: every answer scores the same (1 and 2 votes both round to... 1 and 2 differ; use 0/0).
        question(30, "All the same", ["python"]), answer(31, 30, 0), answer(32, 30, 0),
        # 40: 7 answers of distinct scores: 21 pairs, sampled down to 10.
        question(40, "Popular", ["java"], fmt="pipe"),
        *[answer(41 + i, 40, v) for i, v in enumerate([0, 1, 3, 7, 15, 31, 63])],
        # Answers before their question (merged questions in real dumps).
        answer(52, 50, 4), answer(53, 50, 0),
        question(50, "Answers came first", ["java", "python"]),
        # Other post types: tag wikis, excerpts.
        post(Id=60, PostTypeId=4, Body="<p>excerpt</p>"), post(Id=61, PostTypeId=5, Body="<p>wiki</p>"),
        # An answer whose question is not in the dump.
        answer(70, 9999, 3),
        # Rows missing required attributes.
        post(Id=80, PostTypeId=2, ParentId=1, Score=1),  # no Body
        post(Id=81, PostTypeId=2, Score=1, Body="<p>x</p>"),  # no ParentId
        post(Id=82, Score=1, Body="<p>no type</p>"),  # no PostTypeId
    ]
    rng = random.Random(0)
    next_id = 1000
    for _ in range(60):
        qid = next_id
        n = rng.choice([0, 1, 2, 2, 3, 4])
        ids = list(range(qid + 1, qid + 1 + n))
        accepted = rng.choice(ids) if ids and rng.random() < 0.5 else None
        rows.append(question(qid, f"Random {qid}", [rng.choice(["python", "java", "go"])], accepted=accepted,
                             fmt=rng.choice(["angle", "pipe"])))
        rows += [answer(a, qid, rng.choice([-3, -1, 0, 0, 1, 2, 5, 9, 40])) for a in ids]
        next_id += 10
    return rows


def xml_text(rows: list[dict]) -> str:
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for r in rows:
        # quoteattr escapes &, <, > and newlines (&#10;), as the dumps do (&#xA;).
        lines.append("  <row " + " ".join(f"{k}={quoteattr(v, {chr(10): '&#xA;'})}" for k, v in r.items()) + " />")
    lines.append("</posts>")
    return "\n".join(lines) + "\n"


def write_dump(path: Path, rows: list[dict], compression: str = "none") -> Path:
    data = xml_text(rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "bz2":
        data = bz2.compress(data)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# The rules, recomputed independently.


def expected_score(votes: int, accepted: bool) -> int:
    if votes < 0:
        return -1
    return int(math.floor(math.log2(votes + 1) + 0.5)) + (1 if accepted else 0)


def expected_pairs(rows: list[dict], min_answers=2) -> dict[int, set[tuple[int, int]]]:
    """qid -> every (better answer id, worse answer id) with different scores."""
    questions = {int(r["Id"]): r for r in rows if r.get("PostTypeId") == "1"}
    answers: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        if r.get("PostTypeId") == "2" and "ParentId" in r and "Body" in r and int(r["ParentId"]) in questions:
            q = questions[int(r["ParentId"])]
            accepted = q.get("AcceptedAnswerId") == r["Id"]
            answers.setdefault(int(r["ParentId"]), []).append((int(r["Id"]), expected_score(int(r["Score"]), accepted)))
    out = {}
    for qid, scored in answers.items():
        if len(scored) < min_answers:
            continue
        pairs = {(a, b) if sa > sb else (b, a) for (a, sa) in scored for (b, sb) in scored if a < b and sa != sb}
        if pairs:
            out[qid] = pairs
    return out


def answer_id(text: str) -> int:
    return int(text.split("answer-")[1].split()[0])


def read_splits(out: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(str(out / split)).to_pylist() for split in se.SPLITS}


def config(dump, out, **kw) -> se.StackExchangeConfig:
    return se.StackExchangeConfig(input=str(dump), output_dir=str(out), progress=False, **{"workers": 1, **kw})


@pytest.fixture(scope="module")
def posts() -> list[dict]:
    return edge_case_posts()


@pytest.fixture(scope="module")
def dump(tmp_path_factory, posts) -> Path:
    return write_dump(tmp_path_factory.mktemp("dump") / "stackoverflow.com" / "Posts.xml", posts)


@pytest.fixture(scope="module")
def built(tmp_path_factory, dump):
    out = tmp_path_factory.mktemp("out") / "se"
    manifest = se.run(config(dump, out))
    return out, manifest


# ---------------------------------------------------------------------------------------------
# Pure functions.


def test_answer_score_follows_the_h4_rule():
    votes = [0, 1, 2, 3, 5, 6, 10, 100, 1000]
    assert [se.answer_score(v, False) for v in votes] == [0, 1, 2, 2, 3, 3, 3, 7, 10]
    assert [se.answer_score(v, True) for v in votes] == [1, 2, 3, 3, 4, 4, 4, 8, 11]
    # Negative votes: -1 whatever the acceptance, below a zero-vote answer (0).
    assert se.answer_score(-1, False) == se.answer_score(-7, True) == -1
    assert all(se.answer_score(v, a) == expected_score(v, a) for v in range(-5, 3000) for a in (False, True))


def test_pairs_skip_ties_put_the_better_answer_first_and_sample_deterministically():
    assert se.ranked_pairs([3, 2, 0, -1, 0]) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (4, 3)]
    assert se.ranked_pairs([1, 1, 1]) == []
    pairs = se.ranked_pairs(list(range(7)))
    assert len(pairs) == 21 and all(a > b for a, b in pairs)
    first = se.sample_pairs(pairs, 10, se.question_rng(0, 40))
    assert first == se.sample_pairs(pairs, 10, se.question_rng(0, 40))
    assert len(set(first)) == 10 and set(first) <= set(pairs)
    assert first != se.sample_pairs(pairs, 10, se.question_rng(1, 40))
    assert se.sample_pairs(pairs[:4], 10, se.question_rng(0, 40)) == pairs[:4]


def test_splits_follow_the_fractions_and_skip_empty_ones():
    bounds = se.cumulative((0.5, 0.0, 0.25, 0.25))
    assert [se.pick_split(u, bounds) for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.999999)] == [0, 0, 2, 2, 3, 3]
    assert se.pick_split(0.9999999999, se.cumulative((0.4, 0.3, 0.3, 0.0))) == 2
    counts = [0] * 4
    for key in range(4000):
        counts[se.pick_split(se.question_rng(0, key).random(), se.cumulative((0.3, 0.3, 0.3, 0.1)))] += 1
    assert [round(c / 4000, 1) for c in counts] == [0.3, 0.3, 0.3, 0.1]


def test_both_tag_formats():
    assert se.parse_tags("<python><regex>") == ["python", "regex"]
    assert se.parse_tags("|python|pandas|") == ["python", "pandas"]
    assert se.parse_tags("") == []


def test_html_becomes_markdown_with_fenced_code_atx_headings_links_and_nested_lists():
    md = se.html_to_markdown(CODE_HTML)
    assert md == ("I read a file & it fails with `x < y`:\n\n"
                  '```python\nif a < b and c > d:\n    print("&")\n```\n\n'
                  "See [the docs](https://docs.python.org/3/) \u2014 thanks.\n\n"
                  "- first\n  - nested\n- second\n\n## Update")
    assert se.html_to_markdown('<pre class="lang-js"><code>let a_b = 1;\n</code></pre>') == "```js\nlet a_b = 1;\n```"
    assert se.html_to_markdown("<pre><code>plain\n</code></pre><p>snake_case *stars*</p>") == \
        "```\nplain\n```\n\nsnake_case *stars*"


# ---------------------------------------------------------------------------------------------
# A whole dump.


def test_pairs_scores_and_splits_of_a_whole_dump(built, posts):
    out, manifest = built
    splits = read_splits(out)
    expected = expected_pairs(posts)
    got: dict[int, set] = {}
    split_of: dict[int, str] = {}
    for name, rows in splits.items():
        for row in rows:
            assert split_of.setdefault(row["qid"], name) == name, "a question is in two splits"
            pair = (answer_id(row["response_j"]), answer_id(row["response_k"]))
            assert pair not in got.setdefault(row["qid"], set()), "a pair written twice"
            got[row["qid"]].add(pair)
    assert set(got) == set(expected)
    for qid, pairs in expected.items():
        if len(pairs) <= 10:
            assert got[qid] == pairs, qid
        else:
            assert len(got[qid]) == 10 and got[qid] <= pairs, qid
    # The hand-made cases, spelled out.
    assert got[1] == {(2, 3), (2, 4), (2, 5), (2, 6), (3, 4), (3, 5), (3, 6), (4, 5), (6, 5)}  # 4 and 6 tie
    assert got[10] == {(13, 11), (13, 12)}  # accepted 11 has -1 votes: -1, tied with 12
    assert len(expected[40]) == 21 and len(got[40]) == 10
    assert got[50] == {(52, 53)}  # answers that came before their question
    assert 20 not in got and 30 not in got
    assert all(rows for rows in splits.values())
    assert manifest["splits"] == {name: len(rows) for name, rows in splits.items()}
    assert manifest["pairs_before_sampling"] == sum(len(p) for p in expected.values())
    assert manifest["questions_paired"] == len(expected)


def test_question_text_date_and_metadata(built):
    out, _ = built
    rows = [r for rows in read_splits(out).values() for r in rows if r["qid"] == 1]
    row = rows[0]
    assert row["question"] == "How do I compare in Python?\n\n" + se.html_to_markdown(CODE_HTML)
    assert "```python\nif a < b and c > d:" in row["question"]
    assert row["date"] == "2011/04/01"
    assert row["metadata"] == ["https://stackoverflow.com/questions/1", "https://stackoverflow.com",
                               "https://stackoverflow.com/users/42/"]
    assert all(r["response_j"].startswith("answer-") and "*this*" in r["response_j"] for r in rows)


def test_manifest_counts_every_left_out_row_and_where(built, posts):
    _, manifest = built
    n_questions = sum(r.get("PostTypeId") == "1" for r in posts)
    assert manifest["posts"] == len(posts)
    assert manifest["questions"] == n_questions
    assert manifest["other_post_types"] == 2
    skipped = manifest["skipped"]
    assert skipped["answers without a Body"] == 1
    assert skipped["answers without a valid ParentId"] == 1
    assert skipped["rows without a PostTypeId"] == 1
    assert skipped["answers whose question is not in the dump"] == 1
    assert skipped["questions whose answers all have the same score"] == sum(
        1 for q in {int(r["Id"]) for r in posts if r.get("PostTypeId") == "1"}
        if q not in expected_pairs(posts) and len([a for a in posts if a.get("ParentId") == str(q) and "Body" in a]) >= 2)
    few = sum(1 for r in posts if r.get("PostTypeId") == "1"
              and len([a for a in posts if a.get("ParentId") == r["Id"] and "Body" in a]) < 2)
    assert skipped["questions with fewer than 2 answers"] == few
    # Row problems name the line of the dump they were found on.
    lines = xml_text(posts).splitlines()
    for reason, marker in [("answers without a Body", 'Id="80"'), ("rows without a PostTypeId", 'Id="82"')]:
        line = manifest["skipped_first_line"][reason]
        assert marker in lines[line - 1]
    assert manifest["options"]["seed"] == 0 and manifest["format"] == "parquet"


def test_output_is_deterministic_and_independent_of_workers(tmp_path, dump, built):
    out, _ = built
    again = se.run(config(dump, tmp_path / "again", workers=2))
    assert read_splits(tmp_path / "again") == read_splits(out)
    assert again["splits"] == built[1]["splits"]
    se.run(config(dump, tmp_path / "seed1", seed=1))
    first = {name: {r["qid"] for r in rows} for name, rows in read_splits(out).items()}
    other = {name: {r["qid"] for r in rows} for name, rows in read_splits(tmp_path / "seed1").items()}
    assert first != other


@pytest.mark.parametrize("compression", ["gzip", "bz2"])
def test_compressed_dumps_give_the_same_splits(tmp_path, posts, built, compression):
    dump = write_dump(tmp_path / f"stackoverflow.com-Posts.xml.{ {'gzip': 'gz'}.get(compression, compression)}", posts, compression)
    manifest = se.run(config(dump, tmp_path / "out"))
    assert manifest["compression"] == compression and manifest["site"] == "stackoverflow.com"
    assert read_splits(tmp_path / "out") == read_splits(built[0])


def test_7z_archive_streams_posts_xml(tmp_path, posts, built):
    py7zr = pytest.importorskip("py7zr")
    xml = write_dump(tmp_path / "Posts.xml", posts)
    archive = tmp_path / "stackoverflow.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.writestr(b"<users/>", "Users.xml")
        z.write(xml, "Posts.xml")
    manifest = se.run(config(archive, tmp_path / "out"))
    assert manifest["compression"] == "7z" and manifest["posts"] == len(posts)
    assert read_splits(tmp_path / "out") == read_splits(built[0])
    with py7zr.SevenZipFile(tmp_path / "other.7z", "w") as z:
        z.writestr(b"<users/>", "Users.xml")
        z.writestr(b"<badges/>", "Badges.xml")
    with pytest.raises(DataError, match=r"other.7z: no Posts.xml in the archive \(it holds .*Users.xml"):
        se.run(config(tmp_path / "other.7z", tmp_path / "out2"))


def test_7z_without_py7zr_says_how_to_install_it(tmp_path, monkeypatch):
    archive = tmp_path / "site.7z"
    archive.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\0" * 32)
    monkeypatch.setitem(__import__("sys").modules, "py7zr", None)
    with pytest.raises(DataError, match=r"site.7z: reading .7z archives needs py7zr: pip install 'pocketrlhf\[7z\]'"):
        se.run(config(archive, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The stages read the output as it is.


def test_loaders_read_every_split(built):
    out, manifest = built
    finetune = load_records(out / "finetune")
    pairs, skipped = sft_pairs(finetune, "finetune")
    assert len(pairs) == manifest["splits"]["finetune"] and skipped.total == 0
    assert pairs[0].prompt.startswith("Question: ") and pairs[0].prompt.endswith("\n\nAnswer: ")
    prefs, _ = preference_pairs(load_records(out / "reward"), "reward")
    assert len(prefs) == manifest["splits"]["reward"] and all("answer-" in p.chosen for p in prefs)
    queries, _ = prompts(load_records(out / "rl"), "rl")
    assert len(queries) == manifest["splits"]["rl"] and queries[0].startswith("Question: ")
    assert len(load_records(out / "evaluation")) == manifest["splits"]["evaluation"]


def test_sft_and_reward_stages_train_on_the_splits(tmp_path, built, llama):
    from pocketrlhf.stages import rm, sft

    out, _ = built
    summary = sft.train(sft.SFTConfig(model=str(llama), data=str(out / "finetune"), output_dir=str(tmp_path / "sft"),
                                      device="cpu", template="stackllama", seq_length=64, batch_size=4, max_steps=2,
                                      eval_fraction=0, lora_r=4, progress=False))
    assert summary["train_loss"] > 0 and (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    summary = rm.train(rm.RMConfig(model=str(llama), data=str(out / "reward"), eval_data=str(out / "evaluation"),
                                   output_dir=str(tmp_path / "rm"), device="cpu", template="stackllama",
                                   max_length=64, batch_size=4, max_steps=2, lora_r=4, progress=False,
                                   stats_pairs=8))
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and (tmp_path / "rm" / "adapter" / "head.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Options.


def test_tags_filter_keeps_questions_with_a_wanted_tag_in_either_format(tmp_path, posts):
    manifest = se.run(config(write_dump(tmp_path / "Posts.xml", posts), tmp_path / "out", tags=["<java>", "Regex"]))
    qids = {r["qid"] for rows in read_splits(tmp_path / "out").values() for r in rows}
    wanted = {int(r["Id"]) for r in posts if r.get("PostTypeId") == "1"
              and ({"java", "regex"} & set(se.parse_tags(r["Tags"])))}
    assert qids == wanted & set(expected_pairs(posts))
    assert {10, 40, 50} <= qids and 1 not in qids
    assert manifest["skipped"]["questions without any of the wanted tags"] == \
        sum(r.get("PostTypeId") == "1" for r in posts) - len(wanted)
    # Their answers are counted too, whether they came before or after the question.
    left_out = [r for r in posts if r.get("PostTypeId") == "2" and "Body" in r and r.get("ParentId")
                and int(r["ParentId"]) in {int(q["Id"]) for q in posts if q.get("PostTypeId") == "1"} - wanted]
    assert manifest["skipped"]["answers to questions left out (tags or bad rows)"] == len(left_out)


def test_min_answers_max_chars_and_max_pairs(tmp_path, posts):
    long_answer = "<p>answer-{} " + "x" * 500 + "</p>"
    rows = posts + [question(900, "Long", ["go"]), answer(901, 900, 1, long_answer.format(901)),
                    answer(902, 900, 0), answer(903, 900, 3), answer(904, 900, 1),
                    question(910, "Too few once the long one is out", ["go"]), answer(911, 910, 1),
                    answer(912, 910, 5), answer(913, 910, 0, long_answer.format(913))]
    manifest = se.run(config(write_dump(tmp_path / "Posts.xml", rows), tmp_path / "out", min_answers=3,
                             max_chars=200, max_pairs_per_question=2))
    got: dict[int, set] = {}
    for r in (r for rows in read_splits(tmp_path / "out").values() for r in rows):
        got.setdefault(r["qid"], set()).add((answer_id(r["response_j"]), answer_id(r["response_k"])))
    # 901 is too long; of the three usable answers' three pairs, two are kept.
    assert len(got[900]) == 2 and got[900] <= {(903, 902), (903, 904), (904, 902)}
    assert all(len(p) <= 2 for p in got.values())
    expected = expected_pairs(rows, min_answers=3)
    assert 1 not in got and 910 not in got  # question 1's code block is longer than 200 characters
    assert set(got) == set(expected) - {1, 910} and all(got[q] <= expected[q] for q in got)
    skipped = manifest["skipped"]
    assert skipped["answers longer than max_chars"] == 2 and skipped["questions longer than max_chars"] == 1
    assert skipped["questions with fewer than 3 usable answers"] == 1
    assert skipped["questions with fewer than 3 answers"] == sum(
        1 for r in rows if r.get("PostTypeId") == "1"
        and len([a for a in rows if a.get("ParentId") == r["Id"] and "Body" in a]) < 3)


def test_an_already_paired_dataset_is_split_by_question(tmp_path):
    rows = [{"qid": q, "question": f"q{q}", "date": "2020/01/01", "metadata": [], "response_j": f"good {q}.{i}",
             "response_k": f"bad {q}.{i}"} for q in range(40) for i in range(3)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    manifest = se.run(config(source, tmp_path / "out"))
    assert manifest["input_kind"] == "paired dataset" and manifest["rows"] == 120
    splits = read_splits(tmp_path / "out")
    assert sum(len(r) for r in splits.values()) == 120 and all(splits.values())
    owner = {}
    for name, split_rows in splits.items():
        for r in split_rows:
            assert owner.setdefault(r["qid"], name) == name
    assert sorted((r["qid"], r["response_j"]) for rs in splits.values() for r in rs) == \
        sorted((r["qid"], r["response_j"]) for r in rows)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"bad.jsonl: not a Posts.xml dump nor a paired dataset: no column question, "
                                        r"response_j, response_k \(found prompt, chosen, rejected\)"):
        se.run(config(bad, tmp_path / "out2"))


def test_save_to_disk_format(tmp_path, dump, built):
    se.run(config(dump, tmp_path / "out", output_format="save_to_disk"))
    for split in se.SPLITS:
        assert (tmp_path / "out" / split / "state.json").is_file()
        assert load_records(tmp_path / "out" / split).to_list() == pq.read_table(str(built[0] / split)).to_pylist()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*se.SPLITS, "manifest.json", ".pocketrlhf-run"])


# ---------------------------------------------------------------------------------------------
# Bad input and crashes: one-line errors, and never a half-written output folder.


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_truncated_xml_is_an_error_naming_the_file_and_line(tmp_path, posts):
    text = xml_text(posts)
    cut = tmp_path / "Posts.xml"
    cut.write_text(text[: len(text) // 2])
    line = text[: len(text) // 2].count("\n") + 1
    with pytest.raises(DataError, match=rf"Posts.xml:{line}: the XML stops before </posts> .*cut short"):
        se.run(config(cut, tmp_path / "out"))
    cut.write_text(text[: text.rindex("</posts>")])  # every row complete, the end tag missing
    with pytest.raises(DataError, match=r"Posts.xml:\d+: the XML stops before </posts>"):
        se.run(config(cut, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("compression", ["gzip", "bz2"])
def test_truncated_compressed_dump_is_an_error(tmp_path, posts, compression):
    whole = write_dump(tmp_path / "Posts.xml.x", posts, compression).read_bytes()
    (tmp_path / "Posts.xml.x").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError, match=rf"Posts.xml.x: the {compression} data is damaged or cut short"):
        se.run(config(tmp_path / "Posts.xml.x", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_a_posts_dump(tmp_path):
    cases = {
        "notes.xml": ("just some text\n", r"notes.xml:1: not well-formed XML \(syntax error at column 1\)"),
        "empty.xml": ("", r"empty.xml: empty, or no XML in it"),
        "Users.xml": ('<?xml version="1.0"?>\n<users>\n  <row Id="1" />\n</users>\n',
                      r"Users.xml:2: not a Stack Exchange Posts.xml: the root element is <users>, expected <posts>"),
        "broken.xml": ('<posts>\n  <row Id="1" PostTypeId="1" Body="a < b" />\n</posts>\n',
                       r"broken.xml:2: not well-formed XML \(not well-formed \(invalid token\) at column \d+\)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            se.run(config(tmp_path / name, tmp_path / "out"))
    write_dump(tmp_path / "lonely.xml", [question(1, "t", ["a"]), answer(2, 1, 3)])
    with pytest.raises(DataError, match=r"lonely.xml: no answer pairs to write \(1 questions with fewer than 2 answers\)"):
        se.run(config(tmp_path / "lonely.xml", tmp_path / "out"))
    with pytest.raises(DataError, match="nothere.xml: no such file or folder"):
        se.run(config(tmp_path / "nothere.xml", tmp_path / "out"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_crash_while_writing_leaves_no_output_and_the_old_one_intact(tmp_path, dump, monkeypatch):
    out = tmp_path / "out"
    se.run(config(dump, out))
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        se.run(config(dump, out))
    (out / "manifest.json").write_text('{"splits": {}, "options": {}, "old": true}')
    old = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(se, "write_pair_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        se.run(config(dump, out, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == old and leftovers(tmp_path) == []
    monkeypatch.undo()
    se.run(config(dump, out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == sorted([*se.SPLITS, "manifest.json", ".pocketrlhf-run"])
    assert "old" not in json.loads((out / "manifest.json").read_text())
    assert leftovers(tmp_path) == []


def test_a_repeated_row_is_counted_once(tmp_path):
    rows = [question(1, "t", ["a"]), answer(2, 1, 3), answer(3, 1, 0), answer(2, 1, 3)]
    manifest = se.run(config(write_dump(tmp_path / "Posts.xml", rows), tmp_path / "out", finetune_fraction=1,
                             reward_fraction=0, rl_fraction=0, evaluation_fraction=0))
    assert manifest["skipped"] == {"rows with an Id seen before": 1} and manifest["splits"]["finetune"] == 1


def test_work_dir_holds_the_store_and_is_cleaned(tmp_path, dump):
    work = tmp_path / "scratch"
    se.run(config(dump, tmp_path / "out", work_dir=str(work)))
    assert work.is_dir() and list(work.iterdir()) == []


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"split fractions must be >= 0 and add up to 1, got finetune 0.5 \+ "
                                          r"reward 0.5 \+ rl 0.3 \+ evaluation 0.1 = 1.4"):
        se.StackExchangeConfig(finetune_fraction=0.5, reward_fraction=0.5)
    with pytest.raises(ConfigError, match="min_answers must be at least 2"):
        se.StackExchangeConfig(min_answers=1)
    with pytest.raises(ConfigError, match="no input"):
        se.run(se.StackExchangeConfig())


def test_cli(tmp_path, dump, capsys):
    assert main(["data", "stackexchange", str(dump), "--output-dir", str(tmp_path / "out"), "--no-progress",
                 "--tags", "python,java", "--seed", "3"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["tags"] == ["python", "java"] and manifest["options"]["seed"] == 3
    assert "wrote" in capsys.readouterr().err
    assert main(["data", "stackexchange", str(dump), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'out'} already exists; pass --overwrite to replace it"]
    assert main(["data", "stackexchange", "--help"]) == 0
    assert "--max-pairs-per-question" in capsys.readouterr().out
