"""Small helpers shared by the benchmark scripts (not part of the package).

Each benchmark runs every side in its own child process (fresh interpreter, same environment,
same number of torch threads), one after another, and reads back a JSON result. Clocks give wall
time and this process's CPU time: on a shared machine CPU seconds are the steadier measure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def child_env(threads: int, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment for a child: ``threads`` threads, offline, quiet; then ``env``
    (a None value removes that variable)."""
    out = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def run_child(script: str, name: str, args: list[str], out: Path, threads: int, fresh: bool = True,
              env: Mapping[str, str | None] | None = None) -> dict:
    """Run ``python script --worker NAME --out OUT ARGS...`` and return the JSON it wrote to OUT/result.json."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, script, "--worker", name, "--out", str(out), "--threads", str(threads), *args]
    print(f"[bench] running {name} ...", flush=True)
    log = out / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=child_env(threads, env), stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        sys.exit(f"[bench] {name} failed (exit {proc.returncode}); see {log}:\n{tail}")
    return json.loads((out / "result.json").read_text())


def write_result(out: Path, result: dict) -> None:
    result.setdefault("max_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


def quiet_libraries() -> None:
    """Silence progress bars and info logs of datasets/transformers in a worker."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def preimport() -> None:
    """Import what the stages import lazily (and the plots of the run report) before any clock
    starts: imports are not what the benchmarks compare."""
    import importlib

    for name in ("peft", "transformers.models.llama.modeling_llama", "pocketrlhf.models.adapters",
                 "pocketrlhf.models.forward", "pocketrlhf.models.generation", "pocketrlhf.models.heads",
                 "pocketrlhf.models.loading", "pocketrlhf.models.roles", "pocketrlhf.stages.common",
                 "pocketrlhf.stages.loop", "pocketrlhf.stages.sft", "pocketrlhf.report"):
        importlib.import_module(name)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------
# The harness of the "pocketrlhf vs trl" benchmarks: the same script is the driver (runs every
# side in a child process, round after round) and, with the hidden ``--worker SIDE``, one side.


# The sides of the rm/ppo/dpo benchmarks, in their default order: run_worker runs pocketrlhf (dtype
# auto) and pocketrlhf-bf16 (bfloat16) with the bench's run_ours, the trl setups with its run_trl.
SIDES = ("pocketrlhf", "trl-defaults", "trl-tuned", "pocketrlhf-bf16")


def add_harness_args(p: argparse.ArgumentParser, name: str, sides: Sequence[str] | None = None,
                     default_sides: Sequence[str] | None = None, sides_flag: str = "--sides",
                     timing_skip: int | None = None, skip_unit: str = "steps",
                     rounds_kept: str | None = "best round kept") -> None:
    """The options every benchmark shares: ``--threads``, ``--timing-skip`` (when ``timing_skip``
    is its default), ``--rounds`` (unless ``rounds_kept`` is None), ``sides_flag`` (the sides to
    run, when ``sides`` names those there are), ``--work`` (default bench/_work/NAME) and the
    hidden ``--worker/--files/--out`` of a child."""
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads of every run")
    if timing_skip is not None:
        p.add_argument("--timing-skip", type=int, default=timing_skip,
                       help=f"warm-up {skip_unit} left out of the steady-state rate")
    if rounds_kept is not None:
        p.add_argument("--rounds", type=int, default=1, help=f"repeat every side, alternating the order; {rounds_kept}")
    if sides is not None:
        p.add_argument(sides_flag, default=",".join(default_sides or sides),
                       help="comma-separated subset of " + ", ".join(sides))
    p.add_argument("--work", default=str(ROOT / "bench" / "_work" / name), help="scratch folder (model, data, runs)")
    # Internal: one side in a child process.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def chosen_sides(text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated sides of ``text``, each one of ``known``."""
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(sides) - set(known)
    if unknown:
        raise SystemExit(f"unknown side(s) {sorted(unknown)}; choose from {', '.join(known)}")
    return sides


def start_worker(a: argparse.Namespace, import_sides: Callable[[], object]) -> tuple[dict, Path]:
    """In a child: torch threads, then every import of every side (``import_sides`` and
    preimport()) before any clock starts, quiet libraries; returns (files, out folder)."""
    import torch

    torch.set_num_threads(a.threads)
    # Every side imports everything before its clock starts: imports are not what is compared.
    import_sides()
    preimport()
    quiet_libraries()
    return json.loads(a.files), Path(a.out)


Side = Callable[[argparse.Namespace, dict, Path, str], dict]


def run_worker(a: argparse.Namespace, import_sides: Callable[[], object], run_ours: Side, run_trl: Side,
               then: Callable[[dict, dict], dict] | None = None) -> None:
    """One side in a child (start_worker first): ``run_ours(a, files, out, dtype)`` for
    ``pocketrlhf`` (dtype auto) and ``pocketrlhf-bf16`` (bfloat16), ``run_trl(a, files, out, side)``
    for the others; ``then(files, result)`` (after the side returned, outside its clock) adds
    fields; the result, with torch_threads, goes to OUT/result.json."""
    import torch

    files, out = start_worker(a, import_sides)
    if a.worker.startswith("pocketrlhf"):
        result = run_ours(a, files, out, "bfloat16" if a.worker == "pocketrlhf-bf16" else "auto")
    else:
        result = run_trl(a, files, out, a.worker)
    if then is not None:
        result.update(then(files, result))
    result["torch_threads"] = torch.get_num_threads()
    write_result(out, result)


def run_rounds(script: str, a: argparse.Namespace, sides: Sequence[str], child_args: list[str], out_dir: Path,
               on_result: Callable[[int, str, dict], None] | None = None,
               env: Mapping[str, str | None] | None = None) -> dict[str, list[dict]]:
    """Every side in its own child (``script --worker SIDE ... child_args``, out in OUT_DIR/SIDE-ROUND),
    ``a.rounds`` times, every other round in reverse order; ``on_result(round, side, result)``
    after each. Returns each side's results, round by round."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            res = run_child(script, side, child_args, out_dir / f"{side}-{r}", a.threads, env=env)
            runs[side].append(res)
            if on_result is not None:
                on_result(r, side, res)
    return runs


def ratios(rows: Mapping[str, dict], keys: Sequence[str], joiner: str = " / ") -> dict[str, list[float]]:
    """``rows[ours][key] / rows[theirs][key]`` for each key, for every pocketrlhf side (ours) and
    every trl side (theirs), named "OURS / THEIRS" (with ``joiner``), in the order of ``rows``."""
    out = {}
    for ours in [s for s in rows if s.startswith("pocketrlhf")]:
        for theirs in [s for s in rows if s.startswith("trl")]:
            out[f"{ours}{joiner}{theirs}"] = [rows[ours][k] / rows[theirs][k] for k in keys]
    return out


def print_settings(rows: Mapping[str, dict]) -> None:
    """One line per side that recorded the settings it ran with."""
    for side, row in rows.items():
        if row.get("settings"):
            print(f"{side} settings: {row['settings']}")


def save_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n[bench] results in {path}")


def count_parameters(model_dir: str | Path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def review_llama(path: Path, hidden_size: int, layers: int, heads: int, intermediate_size: int,
                 pretrain_steps: int = 0, seed: int = 0) -> Path:
    """A llama for the built-in review task (pocketrlhf.data.synthetic), built once and reused:
    random init, BPE tokenizer trained on the task's words, optionally pretrained (full weights)
    on unlabelled reviews so that it writes words and ends texts with EOS."""
    from pocketrlhf.data import synthetic
    from pocketrlhf.models.tiny import build_tiny_model, pretrain_tiny_model

    done = path / "bench_model.json"
    spec = dict(hidden_size=hidden_size, layers=layers, heads=heads, intermediate_size=intermediate_size,
                pretrain_steps=pretrain_steps, seed=seed)
    if done.is_file() and json.loads(done.read_text()) == spec:
        return path
    shutil.rmtree(path, ignore_errors=True)
    build_tiny_model(path, "llama", texts=synthetic.corpus(), vocab_size=320, hidden_size=hidden_size, layers=layers,
                     heads=heads, intermediate_size=intermediate_size, seed=seed)
    if pretrain_steps:
        print(f"[bench] pretraining the base for {pretrain_steps} steps ...", flush=True)
        pretrain_tiny_model(path, synthetic.pretraining_texts(), steps=pretrain_steps, seed=seed)
    done.write_text(json.dumps(spec))
    return path


def steady_rate(ends: list[tuple[float, float]], units: list[float], skip: int) -> dict:
    """Units per second of wall time and of CPU time between the end of event ``skip`` and the
    last event (``ends[i]`` = clocks at the end of event i, ``units[i]`` its work)."""
    if len(ends) <= skip + 1:
        skip = 0
    if len(ends) < 2:
        return {"per_s": float("nan"), "per_cpu_s": float("nan"), "events": 0}
    work = sum(units[skip + 1:len(ends)])
    wall = ends[-1][0] - ends[skip][0]
    cpu = ends[-1][1] - ends[skip][1]
    return {"per_s": work / wall, "per_cpu_s": work / cpu, "wall_s": wall, "cpu_s": cpu, "events": len(ends) - skip - 1}


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load average {load:.1f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if not math.isfinite(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
