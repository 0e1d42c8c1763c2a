"""Small helpers shared by the benchmark scripts (not part of the package).

Each benchmark runs every side in its own child process (fresh interpreter, same environment,
same number of torch threads), one after another, and reads back a JSON result. Clocks give wall
time and this process's CPU time: on a shared machine CPU seconds are the steadier measure.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_child(script: str, name: str, args: list[str], out: Path, threads: int, fresh: bool = True,
              env: dict[str, str] | None = None) -> dict:
    """Run ``python script --worker NAME --out OUT ARGS...`` and return the JSON it wrote to OUT/result.json."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, script, "--worker", name, "--out", str(out), "--threads", str(threads), *args]
    print(f"[bench] running {name} ...", flush=True)
    log = out / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run(cmd, env={**child_env(threads), **(env or {})}, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
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
