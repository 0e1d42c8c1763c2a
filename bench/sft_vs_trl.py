"""pocketrlhf SFT vs trl's SFTTrainer: same model, same data, same LoRA, same steps, one run.

    OMP_NUM_THREADS=1 python bench/sft_vs_trl.py --steps 30 --rounds 2   # ~20M-parameter llama
    OMP_NUM_THREADS=1 python bench/sft_vs_trl.py --size small --steps 20 # a one-minute check of the script

What is compared (both sides):
  * the same random-init llama (built locally by pocketrlhf.models.tiny, tokenizer trained on the fly),
    fp32 weights on the CPU, the same number of torch threads (--threads, default $OMP_NUM_THREADS);
  * LoRA r=16, alpha=32, dropout 0, on every linear layer but the output head;
  * the same generated text corpus (a Markov "language" over a 6,000-word lexicon), loss on every
    token, packed into sequences of 256 tokens, batch 8, AdamW, the same learning rate, cosine
    schedule, no warm-up, gradient clipping at 1.0, the same number of optimizer steps and seed.

trl runs twice: once with trl's defaults for everything the experiment does not fix (gradient
checkpointing on, bf16 autocast, best-fit-decreasing packing with padding-free batches), and once
tuned to do the same work as pocketrlhf (no gradient checkpointing, fp32, "wrapped" packing =
EOS-joined constant-length chunks, as pocketrlhf packs). trl always computes entropy and top-1
accuracy in its fused LM head; no setting switches that off. ``--runs`` may add ``ours-bf16``
(pocketrlhf with ``--dtype bfloat16``: base weights in bf16, adapter in fp32).

Speed: trained tokens (tokens whose next-token log-prob enters the loss, counted from the batches
each side actually trained on) per second, after ``--timing-skip`` warm-up steps, timed between
the ends of optimizer steps: per second of wall-clock, and per second of the process's own CPU
time (steady when other jobs share the machine; with one thread it is the step's compute cost).
End-to-end wall time (model load, data preparation, training, saving) is reported too.

Quality: the train loss averaged over the last 5 steps (as each side logs it: per-step mean over
trained tokens), and a held-out loss computed THE SAME WAY for every saved adapter, by
pocketrlhf's own evaluate (stages/loop.py, with the SFT loss) on the same packed held-out sequences.
Data order and adapter init differ between the sides, so compare losses over a few ``--seed``s.

Each run is a separate child process of this script (fresh interpreter, same environment), run one
after another; ``--rounds 2`` alternates the order to average out load from other processes.
``--profile`` writes each run's top torch.profiler ops to its run folder.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_harness_args, chosen_sides, count_parameters, now, print_settings, run_child,  # noqa: E402
                     run_rounds, save_summary, write_result)

SIZES = {
    # ~20M parameters: 8 layers of 384 (MLP 1024), vocabulary 8192, untied output layer.
    "full": dict(hidden_size=384, layers=8, heads=6, intermediate_size=1024, vocab_size=8192, train_docs=3000),
    # For checking the script quickly (~1M parameters).
    "small": dict(hidden_size=128, layers=2, heads=4, intermediate_size=256, vocab_size=2048, train_docs=600),
}
SEQ_LENGTH = 256
BATCH_SIZE = 8
LORA_R = 16
LORA_ALPHA = 32
LAST_STEPS = 5  # the train loss reported is the mean of the last LAST_STEPS steps
TRL_SETUPS = {
    "trl-defaults": {},
    "trl-tuned": dict(gradient_checkpointing=False, bf16=False, packing_strategy="wrapped"),
}
RUNS = ("ours", "trl-defaults", "trl-tuned", "ours-bf16")  # the default --runs: the first three


# ---------------------------------------------------------------------------------------------
# Data and model.


def lexicon(n: int, rng: random.Random) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.choice([1, 2, 2, 3, 3, 4])
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) + (rng.choice("nrsl") if rng.random() < 0.3 else "")
                          for _ in range(syllables)))
    return sorted(words)


class MarkovLanguage:
    """Zipf-distributed words, each followed by one of a few favourite successors: a text an LM can learn."""

    def __init__(self, seed: int = 0, words: int = 6000, successors: int = 6):
        rng = random.Random(seed)
        self.words = lexicon(words, rng)
        self.zipf = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.next = [rng.choices(range(len(self.words)), weights=self.zipf, k=successors) for _ in self.words]

    def document(self, rng: random.Random) -> str:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(range(len(self.words)), weights=self.zipf)[0]
            out = [self.words[w]]
            for _ in range(rng.randint(5, 14)):
                w = rng.choice(self.next[w]) if rng.random() < 0.9 else rng.randrange(len(self.words))
                out.append(self.words[w])
            sentences.append(" ".join(out).capitalize() + ".")
        return " ".join(sentences)


def prepare(work: Path, size: str) -> dict:
    """Model and data files under ``work`` (built once, reused)."""
    from pocketrlhf.models.tiny import build_tiny_model

    spec = SIZES[size]
    lang = MarkovLanguage(seed=0)
    data = work / f"data-{size}"
    train, held_out = data / "train.jsonl", data / "eval.jsonl"
    if not held_out.is_file():
        data.mkdir(parents=True, exist_ok=True)
        rng = random.Random(1)
        rows = [{"text": lang.document(rng)} for _ in range(spec["train_docs"])]
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rng = random.Random(2)
        held_out.write_text("".join(json.dumps({"text": lang.document(rng)}) + "\n" for _ in range(200)))
    model = work / f"llama-{size}"
    if not (model / "model.safetensors").is_file():
        texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
        build_tiny_model(model, "llama", texts=texts, vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                         layers=spec["layers"], heads=spec["heads"], intermediate_size=spec["intermediate_size"], seed=0)
    return {"model": str(model), "train": str(train), "eval": str(held_out)}


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own process).


def steady_rate(ends: list[tuple[float, float]], step_tokens: list[int], skip: int) -> dict:
    """Trained tokens per second of wall-clock and of this process's CPU time, over steps skip+1..N,
    timed between the ends of optimizer steps. CPU time is what a step costs even when other
    processes compete for the cores (the machine may be shared); wall-clock is what a user waits."""
    if len(ends) <= skip + 1:
        skip = 0
    tokens = sum(step_tokens[skip + 1:len(ends)])
    wall = ends[-1][0] - ends[skip][0]
    cpu = ends[-1][1] - ends[skip][1]
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "s_per_step": wall / (len(ends) - skip - 1)}


def run_ours(a, files: dict, out: Path, dtype: str = "auto") -> dict:
    from pocketrlhf.stages import loop, sft

    cfg = sft.SFTConfig(
        model=files["model"], data=files["train"], output_dir=str(out), device="cpu", dtype=dtype, packing=True,
        seq_length=SEQ_LENGTH, batch_size=BATCH_SIZE, learning_rate=a.lr, lr_scheduler="cosine", warmup_steps=0,
        max_steps=a.steps, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
        max_grad_norm=1.0, logging_steps=1, eval_fraction=0.0, progress=False, seed=a.seed,
    )
    # The trained tokens of every step, from the very sequences the stage trains on.
    from pocketrlhf.models.loading import load_tokenizer

    train_set, _, _ = sft.prepare_data(cfg, load_tokenizer(cfg.model))
    steps_per_epoch, _ = loop.plan_steps(cfg, len(train_set), 1)
    step_tokens = [sum(sum(train_set[i].loss_mask[1:]) for i in loop.step_indices(cfg, s, steps_per_epoch, len(train_set), 1))
                   for s in range(a.steps)]
    # A clock at every step end: the stage logs each train step (logging_steps=1) right after optimizer.step().
    from pocketrlhf.stages import common

    ends: list[tuple[float, float]] = []
    log = common.Run.log

    def clocked_log(self, step, metrics, split="train"):
        if split == "train":
            ends.append(now())
        return log(self, step, metrics, split)

    common.Run.log = clocked_log
    start = time.perf_counter()
    sft.train(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    return {**steady_rate(ends, step_tokens, a.timing_skip), "wall_s": wall, "losses": losses,
            "tokens": sum(step_tokens), "adapter": str(out / "adapter")}


def run_trl(a, files: dict, out: Path, setup: str) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(files["train"]).read_text().splitlines()]
    args = SFTConfig(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
        packing=True, max_length=SEQ_LENGTH, use_cpu=True, **TRL_SETUPS[setup],
    )
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(now())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    start = time.perf_counter()
    trainer = SFTTrainer(model=files["model"], args=args, train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=peft_config, callbacks=[clock])
    batch_tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        batch_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    wall = time.perf_counter() - start
    step_tokens = batch_tokens[:len(clock.ends)]
    settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "packing_strategy", "padding_free",
                                             "optim", "dataloader_num_workers")}
    settings["padding_free (effective)"] = bool(getattr(trainer, "padding_free", False))
    return {**steady_rate(clock.ends, step_tokens, a.timing_skip), "wall_s": wall, "losses": clock.losses,
            "tokens": sum(step_tokens), "adapter": str(out / "adapter"), "settings": settings}


def run_eval(a, files: dict, adapters: dict[str, str]) -> dict:
    """Held-out loss of each adapter (and of the bare base), by pocketrlhf's own evaluate()."""
    from accelerate import Accelerator

    from pocketrlhf.data.formats import Skipped, sft_pairs
    from pocketrlhf.data.loading import load_records
    from pocketrlhf.data.tokenize import pack, tokenize_sft
    from pocketrlhf.models.adapters import load_adapter
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.loading import load_base, load_tokenizer
    from pocketrlhf.stages import sft
    from pocketrlhf.stages.loop import evaluate

    tokenizer = load_tokenizer(files["model"])
    pairs, _ = sft_pairs(load_records(files["eval"]), files["eval"], "plain", tokenizer)
    examples = pack(tokenize_sft(tokenizer, pairs, False, None, Skipped()), SEQ_LENGTH, seed=0)
    accelerator = Accelerator(cpu=True)
    losses = {}
    for name, path in {"base (no adapter)": None, **adapters}.items():
        model = load_base(files["model"], device="cpu", training=False)
        if path:
            model = load_adapter(model, path)
        model.eval()
        losses[name] = evaluate(LMWithHeads(model), sft.SFTLoss(tokenizer.pad_token_id), examples, BATCH_SIZE, "cpu",
                                accelerator)["loss"]
    return {"eval_loss": losses, "eval_tokens": sum(sum(e.loss_mask[1:]) for e in examples)}


def worker(a) -> None:
    """One run in a child process. Unlike the other benchmarks (_common.start_worker) nothing is
    imported ahead of the run's own code and the libraries keep their progress output, as this
    benchmark has always measured."""
    import torch

    torch.set_num_threads(a.threads)
    files = json.loads(a.files)
    out = Path(a.out)
    if a.profile and a.worker != "eval":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = run_side(a, files, out)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out / "profile.txt").write_text(table)
    else:
        result = run_side(a, files, out)
    result["torch_threads"] = torch.get_num_threads()
    write_result(out, result)


def run_side(a, files: dict, out: Path) -> dict:
    if a.worker == "ours":
        return run_ours(a, files, out)
    if a.worker == "ours-bf16":
        return run_ours(a, files, out, dtype="bfloat16")
    if a.worker == "eval":
        return run_eval(a, files, json.loads(a.adapters))
    return run_trl(a, files, out, a.worker)


# ---------------------------------------------------------------------------------------------
# Driver.


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps for every run")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of both sides (data order, adapter init)")
    p.add_argument("--profile", action="store_true",
                   help="run each training under torch.profiler; top ops in RUN_DIR/profile.txt (slows the runs)")
    add_harness_args(p, "sft_vs_trl", RUNS, default_sides=RUNS[:3], sides_flag="--runs", timing_skip=3,
                     rounds_kept="each run's median reported")
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    work = Path(a.work)
    files = prepare(work, a.size)
    n_params = count_parameters(files["model"])
    print(f"[bench] model {files['model']}: {n_params / 1e6:.1f}M parameters; {a.steps} steps of {BATCH_SIZE}x{SEQ_LENGTH}; "
          f"lr {a.lr}; {a.threads} torch thread(s)", flush=True)
    names = chosen_sides(a.runs, RUNS)
    # The children's environment keeps tqdm on, as this benchmark always has (progress bars inside the clocks).
    env = {"TQDM_DISABLE": None}
    child_args = ["--files", json.dumps(files), "--steps", str(a.steps), "--lr", str(a.lr),
                  "--timing-skip", str(a.timing_skip), "--seed", str(a.seed)] + (["--profile"] if a.profile else [])
    results = run_rounds(__file__, a, names, child_args + ["--adapters", "{}"], work / f"run-{a.size}", env=env)
    adapters = {name: runs[0]["adapter"] for name, runs in results.items()}
    evals = run_child(__file__, "eval", child_args + ["--adapters", json.dumps(adapters)], work / f"run-{a.size}" / "eval",
                      a.threads, env=env)

    rows = []
    for name, runs in results.items():
        losses = runs[0]["losses"]
        rows.append({"run": name,
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                     "tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in runs),
                     "each_round_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs],
                     "each_round_tokens_per_cpu_s": [round(x["tokens_per_cpu_s"], 1) for x in runs],
                     "s_per_step": statistics.median(x["s_per_step"] for x in runs),
                     "wall_s": statistics.median(x["wall_s"] for x in runs),
                     "train_loss_last": sum(losses[-LAST_STEPS:]) / len(losses[-LAST_STEPS:]), "first_loss": losses[0],
                     "eval_loss": evals["eval_loss"][name], "max_rss_mb": max(x["max_rss_mb"] for x in runs),
                     "settings": runs[0].get("settings")})
    ours = next((r for r in rows if r["run"] == "ours"), None)
    print()
    print(f"| run | trained tokens/s (wall) | ours / this | trained tokens per CPU-s | ours / this | s/step | "
          f"end-to-end s | first loss | train loss (last {LAST_STEPS}) | held-out loss | max RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
        cpu_ratio = f"{ours['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}x" if ours else "-"
        print(f"| {r['run']} | {r['tokens_per_s']:.0f} | {ratio} | {r['tokens_per_cpu_s']:.0f} | {cpu_ratio} | "
              f"{r['s_per_step']:.2f} | {r['wall_s']:.1f} | {r['first_loss']:.3f} | {r['train_loss_last']:.3f} | "
              f"{r['eval_loss']:.3f} | {r['max_rss_mb']:.0f} |")
    print(f"\nheld-out loss of the bare base: {evals['eval_loss']['base (no adapter)']:.3f} "
          f"({evals['eval_tokens']} tokens)")
    print_settings({r["run"]: r for r in rows})
    save_summary(work / (f"results-{a.size}.json" if a.seed == 0 else f"results-{a.size}-seed{a.seed}.json"),
                 {"size": a.size, "params": n_params, "steps": a.steps, "lr": a.lr, "threads": a.threads,
                  "seed": a.seed, "rounds": a.rounds, "rows": rows,
                  "base_eval_loss": evals["eval_loss"]["base (no adapter)"], "date": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
