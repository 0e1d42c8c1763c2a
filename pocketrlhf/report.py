"""``pocketrlhf report RUN_DIR``: PNG plots of every stage's metrics and a markdown summary.

Each stage writes its own report when it finishes (``report.md`` and ``plots/`` in its run
directory); for a pipeline directory the report covers every stage found under it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pocketrlhf.algorithms.stats import describe_accuracy
from pocketrlhf.config import option
from pocketrlhf.errors import ConfigError

log = logging.getLogger("pocketrlhf")

# What to plot, per stage, when present: (metric, title).
PLOTS = {
    "sft": [("loss", "loss"), ("perplexity", "eval perplexity"), ("tokens_per_s", "tokens/s")],
    "rm": [("loss", "loss"), ("accuracy", "pair accuracy"), ("margin", "reward margin")],
    "dpo": [("loss", "loss"), ("accuracy", "implicit-reward accuracy"), ("margin", "reward margin"),
            ("reward_chosen", "reward of chosen"), ("reward_rejected", "reward of rejected")],
    "ppo": [("score", "score"), ("kl", "KL to reference (nats/sequence)"), ("entropy", "entropy"),
            ("pg_clipfrac", "policy clip fraction"), ("vf_loss", "value loss"), ("kl_coef", "KL coefficient"),
            ("response_length", "response length")],
    "grpo": [("score", "score"), ("kl", "KL to reference (nats/sequence)"), ("zero_variance_groups",
             "groups with equal rewards (no signal)"), ("clipfrac", "ratio clip fraction"), ("loss", "loss"),
             ("response_length", "response length")],
}


@dataclasses.dataclass
class ReportConfig:
    run_dir: str = option("", "a stage's run directory, or a pipeline directory holding several")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_dirs(root: Path) -> list[Path]:
    """``root`` itself if it is a stage run, else its sub-directories that are."""
    if (root / "metrics.jsonl").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())


def plot_stage(run_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = records[0].get("stage", run_dir.name)
    wanted = [(k, t) for k, t in PLOTS.get(stage, [("loss", "loss")]) if any(k in r for r in records)]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for key, title in wanted:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=4)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trust_lines(summary: dict) -> list[str]:
    """How far a stage's held-out numbers can be trusted: n, interval, how the split was made, warnings."""
    lines = []
    if summary.get("eval_accuracy_n"):
        lines.append(f"\nheld-out accuracy: {describe_accuracy(summary['eval_accuracy'], summary['eval_accuracy_n'])}")
    if summary.get("train_seen_accuracy_n"):
        lines.append(f"accuracy on as many training pairs: "
                     f"{describe_accuracy(summary['train_seen_accuracy'], summary['train_seen_accuracy_n'])}")
    split = summary.get("held_out") or {}
    if split.get("held_out_rows"):
        lines.append(f"held-out rows: {split.get('held_out_rows', 0)} ({split.get('held_out_prompts', 0)} prompts) "
                     f"from {split['held_out_from']}")
    lines += [f"\n**warning**: {w}" for w in summary.get("warnings") or []]
    return lines


def stage_summary(run_dir: Path, records: list[dict], plots: list[Path]) -> str:
    stage = records[0].get("stage", run_dir.name)
    lines = [f"## {stage} ({run_dir})", ""]
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    keys = [k for k, _ in PLOTS.get(stage, [("loss", "")])]
    if train:
        first, last = train[0], train[-1]
        lines += ["| metric | first step | last step |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in keys if k in last]
        lines.append(f"\n{len(train)} logged steps, last step {last['step']}.")
    if evals:
        final = evals[-1]
        if evals[0].get("step") == 0 and len(evals) > 1:  # eval_at_start: the held-out numbers before training
            lines.append("\nheld-out before training: " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in evals[0].items() if k not in ("stage", "split", "step", "time")))
        lines.append("\nheld-out: " + ", ".join(f"{k} {_fmt(v)}" for k, v in final.items()
                                                 if k not in ("stage", "split", "step", "time")))
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        lines += trust_lines(data)
        if "adapter" in data:
            lines.append(f"\nadapter: `{data['adapter']}`")
    if plots:
        lines.append("")
        lines += [f"![{p.stem}]({p.relative_to(run_dir)})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(root: str | Path) -> Path:
    """Plots and ``report.md`` for ``root`` (a stage run or a pipeline directory)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such run directory")
    sections = []
    for run_dir in stage_dirs(root):
        records = read_metrics(run_dir)
        if not records:
            continue
        try:
            plots = plot_stage(run_dir, records)
        except ImportError:
            plots = []
            log.warning("matplotlib is not installed: report without plots (pip install matplotlib)")
        section = stage_summary(run_dir, records, plots)
        if run_dir != root:
            (run_dir / "report.md").write_text(f"# pocketrlhf report\n\n{section}")
            section = section.replace("](plots/", f"]({run_dir.name}/plots/")
        sections.append(section)
    if not sections:
        raise ConfigError(f"{root}: no metrics.jsonl found in it or its sub-directories")
    evaluation = root / "evaluation" / "evaluation.md"
    if evaluation.is_file():
        sections.append(evaluation.read_text())
    path = root / "report.md"
    path.write_text("# pocketrlhf report\n\n" + "\n".join(sections))
    return path


def run(cfg: ReportConfig) -> dict:
    if not cfg.run_dir:
        raise ConfigError("report needs a run directory: pocketrlhf report RUN_DIR")
    path = write_report(cfg.run_dir)
    print(f"report: {path} (plots in each stage's plots/ folder)")
    return {"report": str(path)}
