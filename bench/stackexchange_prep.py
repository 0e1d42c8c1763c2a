"""Benchmark (not a test): ``pocketrlhf data stackexchange`` on generated dumps of growing size.

For each size it generates a Posts.xml in the dump schema (HTML bodies with paragraphs, code
blocks, lists and links; 0 to 5 answers per question; some answers before their question), then
runs the command in a fresh process and records posts/s (end to end and for the reading pass) and
peak RSS. Target: peak RSS under 1 GB whatever the size, and time linear in the size.

For contrast it also runs, on the smaller sizes only, an in-memory reader: ElementTree.parse of
the whole file with answers grouped in a dict (reading and grouping only: no Markdown, no output),
whose memory grows with the file.

    OMP_NUM_THREADS=1 python bench/stackexchange_prep.py --sizes-mb 100,250,500,1000

Dumps go to bench/_work/ (git-ignored) and are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a value list file error function return string python java class object method array loop index "
         "key dict query table column server client request response thread memory pointer type module import "
         "install version build test case null empty default config option parse read write open close").split()
LANGS = ("py", "java", "js", "cpp", "none", "sql")
TAGS = ("python", "java", "javascript", "c++", "sql", "regex", "pandas", "linux", "git", "css")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."


def body_html(rng: random.Random, post_id: int) -> str:
    """A post body like the dumps' rendered HTML, about 1 KB on average."""
    parts = [f"<p>Post {post_id}: {' '.join(sentence(rng) for _ in range(rng.randint(1, 4)))}</p>"]
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        if kind < 0.35:
            code = "\n".join(f"{rng.choice(WORDS)} = {rng.choice(WORDS)}({rng.randint(0, 99)}) &lt; {rng.randint(0, 9)}"
                             for _ in range(rng.randint(2, 12)))
            parts.append(f'<pre class="lang-{rng.choice(LANGS)} s-code-block"><code>{code}\n</code></pre>')
        elif kind < 0.55:
            items = "".join(f"<li>{sentence(rng)}</li>" for _ in range(rng.randint(2, 5)))
            parts.append(f"<ul>{items}</ul>")
        elif kind < 0.7:
            parts.append(f'<p>See <a href="https://example.com/{rng.randint(1, 10**6)}" rel="nofollow">'
                         f"{rng.choice(WORDS)}</a> and <code>{rng.choice(WORDS)}()</code> &amp; more.</p>")
        else:
            parts.append(f"<p>{' '.join(sentence(rng) for _ in range(rng.randint(1, 5)))}</p>")
    return "\n".join(parts)


def row(attrs: dict) -> str:
    return "  <row " + " ".join(f"{k}={quoteattr(str(v), {chr(10): '&#xA;'})}" for k, v in attrs.items()) + " />\n"


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Write a dump of about ``target_bytes``; returns the number of rows."""
    rng = random.Random(seed)
    n_rows = 0
    post_id = 1
    with open(path, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        written = 0
        late: list[str] = []
        while written < target_bytes:
            qid = post_id
            n_answers = rng.choice((0, 1, 1, 2, 2, 3, 3, 4, 5))
            answer_ids = list(range(qid + 1, qid + 1 + n_answers))
            post_id += n_answers + 1
            date = f"20{rng.randint(10, 23)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00.000"
            tags = rng.sample(TAGS, rng.randint(1, 3))
            tag_text = "".join(f"<{t}>" for t in tags) if rng.random() < 0.5 else "|" + "|".join(tags) + "|"
            question = {"Id": qid, "PostTypeId": 1, "CreationDate": date, "Score": rng.randint(-2, 50),
                        "ViewCount": rng.randint(10, 10**5), "Body": body_html(rng, qid), "OwnerUserId": rng.randint(1, 10**6),
                        "LastActivityDate": date, "Title": sentence(rng)[:80], "Tags": tag_text,
                        "AnswerCount": n_answers, "CommentCount": rng.randint(0, 5), "ContentLicense": "CC BY-SA 4.0"}
            if answer_ids and rng.random() < 0.5:
                question["AcceptedAnswerId"] = rng.choice(answer_ids)
            answers = [row({"Id": a, "PostTypeId": 2, "ParentId": qid, "CreationDate": date,
                            "Score": rng.choice((-3, -1, 0, 0, 1, 1, 2, 3, 5, 8, 20, 100)), "Body": body_html(rng, a),
                            "OwnerUserId": rng.randint(1, 10**6), "LastActivityDate": date,
                            "CommentCount": rng.randint(0, 5), "ContentLicense": "CC BY-SA 4.0"}) for a in answer_ids]
            # About 2% of questions come after their answers (merged questions in real dumps).
            if answers and rng.random() < 0.02:
                late.append(row(question))
                chunk = "".join(answers)
            else:
                chunk = row(question) + "".join(answers)
            if late and rng.random() < 0.3:
                chunk += late.pop(0)
            if rng.random() < 0.03:  # tag wikis and other post types
                chunk += row({"Id": post_id, "PostTypeId": 5, "Body": "<p>wiki</p>"})
                post_id += 1
            f.write(chunk)
            written += len(chunk)
            n_rows += chunk.count("<row ")
        f.write("".join(late) + "</posts>\n")
        n_rows += len(late)
    return n_rows


# ---------------------------------------------------------------------------------------------
# Children: one measured run per process, so peak RSS is that run's alone.


def child_ours(dump: str, out: str, workers: int) -> dict:
    from pocketrlhf.data.stackexchange import StackExchangeConfig, run

    start = time.perf_counter()
    manifest = run(StackExchangeConfig(input=dump, output_dir=out, overwrite=True, progress=False, workers=workers))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "posts": manifest["posts"], "pairs": sum(manifest["splits"].values()),
            "read_posts_per_s": manifest["posts_per_second"], "phases": manifest["phase_seconds"]}


def child_in_memory(dump: str) -> dict:
    import xml.etree.ElementTree as ET

    start = time.perf_counter()
    tree = ET.parse(dump)
    questions, answers = {}, {}
    for el in tree.getroot():
        a = el.attrib
        if a.get("PostTypeId") == "1":
            questions[a["Id"]] = a
        elif a.get("PostTypeId") == "2":
            answers.setdefault(a["ParentId"], []).append(a)
    posts = len(tree.getroot())
    groups = sum(1 for q in questions if len(answers.get(q, ())) >= 2)
    return {"seconds": time.perf_counter() - start, "posts": posts, "groups": groups}


def peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, children_kb) / 1024


def measure(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_7z(work: Path, size_mb: float, workers: int, keep: bool) -> dict:
    """The same command on a .7z archive (streamed through py7zr): the decompressor's buffers on top."""
    import py7zr

    dump = work / f"Posts-{size_mb:g}MB.xml"
    rows = generate(dump, int(size_mb * 1e6))
    archive = work / "site.7z"
    t = time.perf_counter()
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(dump, "Posts.xml")
    print(f"\n{dump.stat().st_size / 1e6:.0f} MB dump as a {archive.stat().st_size / 1e6:.0f} MB .7z "
          f"(compressed in {time.perf_counter() - t:.0f}s)", flush=True)
    dump.unlink()
    ours = measure(["--child", "ours", "--dump", str(archive), "--out", str(work / "out"), "--workers", str(workers)])
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"  ours (7z): {ours['seconds']:7.1f}s  {ours['posts'] / ours['seconds']:8.0f} posts/s end to end "
          f"(reading pass {ours['read_posts_per_s']:.0f} posts/s)  peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
    if not keep:
        archive.unlink()
    return {"input": "7z", "size_mb": round(size_mb), "rows": rows, "ours": ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="100,250,500,1000", help="dump sizes to measure, in MB (10^6 bytes)")
    p.add_argument("--in-memory-max-mb", type=float, default=250, help="run the in-memory reader up to this size")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sevenzip-mb", type=float, default=0, help="also run on a .7z archive of a dump of this size (0: no)")
    p.add_argument("--work", default=str(ROOT / "bench" / "_work" / "stackexchange"))
    p.add_argument("--keep", action="store_true", help="keep the generated dumps")
    p.add_argument("--child", choices=["ours", "in-memory"], help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child_ours(args.dump, args.out, args.workers) if args.child == "ours" else child_in_memory(args.dump)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, workers={args.workers}")
    results = []
    try:
        for size_mb in [float(s) for s in args.sizes_mb.split(",") if s]:
            dump = work / f"Posts-{size_mb:g}MB.xml"
            t = time.perf_counter()
            rows = generate(dump, int(size_mb * 1e6))
            size = dump.stat().st_size
            print(f"\n{size / 1e6:.0f} MB dump, {rows} rows (generated in {time.perf_counter() - t:.0f}s)", flush=True)
            ours = measure(["--child", "ours", "--dump", str(dump), "--out", str(work / "out"), "--workers", str(args.workers)])
            shutil.rmtree(work / "out", ignore_errors=True)
            line = {"size_mb": round(size / 1e6), "rows": rows, "ours": ours}
            print(f"  ours:      {ours['seconds']:7.1f}s  {ours['posts'] / ours['seconds']:8.0f} posts/s end to end "
                  f"(reading pass {ours['read_posts_per_s']:.0f} posts/s; phases {ours['phases']})  "
                  f"peak RSS {ours['peak_rss_mb']:.0f} MB  {ours['pairs']} pairs", flush=True)
            if size_mb <= args.in_memory_max_mb:
                mem = measure(["--child", "in-memory", "--dump", str(dump)])
                line["in_memory"] = mem
                print(f"  in-memory: {mem['seconds']:7.1f}s  {mem['posts'] / mem['seconds']:8.0f} posts/s (read + group only)  "
                      f"peak RSS {mem['peak_rss_mb']:.0f} MB  (x{mem['peak_rss_mb'] / ours['peak_rss_mb']:.1f} ours)", flush=True)
            results.append(line)
            if not args.keep:
                dump.unlink()
        if args.sevenzip_mb:
            results.append(measure_7z(work, args.sevenzip_mb, args.workers, args.keep))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\ninput | size_MB | posts | ours s | ours posts/s | s per M posts | ours peak RSS MB | in-memory peak RSS MB")
    for r in results:
        o = r["ours"]
        mem = f"{r['in_memory']['peak_rss_mb']:.0f}" if "in_memory" in r else "-"
        print(f"{r.get('input', 'xml')} | {r['size_mb']} | {o['posts']} | {o['seconds']:.1f} | {o['posts'] / o['seconds']:.0f} | "
              f"{o['seconds'] / o['posts'] * 1e6:.0f} | {o['peak_rss_mb']:.0f} | {mem}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
