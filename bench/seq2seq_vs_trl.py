"""pocketrlhf SFT and DPO on an encoder-decoder (T5) base vs a plain transformers + peft loop.

    OMP_NUM_THREADS=1 python bench/seq2seq_vs_trl.py              # ~13M-parameter T5, 30 steps each
    OMP_NUM_THREADS=1 python bench/seq2seq_vs_trl.py --size small --steps 8   # a quick check

trl 1.16's SFTTrainer and DPOTrainer no longer accept encoder-decoder models (no
``is_encoder_decoder`` path is left outside trl.experimental), so the peer is what a user writes
without either: ``AutoModelForSeq2SeqLM`` + peft LoRA, ``model(input_ids, labels=target)`` for SFT,
and for DPO the policy and the reference (adapter disabled) each run on the 2B rows of a batch
(chosen and rejected, the prompt encoded twice), as trl's old encoder-decoder DPO did.

Both sides: the same random-init T5 (gated-gelu, as flan-t5; built locally by
pocketrlhf.models.tiny), fp32 on the CPU, one torch thread, LoRA r=16 alpha=32 on every linear
layer of encoder and decoder, AdamW at the same learning rate, batch 8, the same tokenized
examples (prompt + EOS to the encoder, answer + EOS to the decoder). pocketrlhf runs its stages
(``sft.train``, ``dpo.train`` with the reference computed every step, like the peer). Speed is
measured between the ends of optimizer steps (a global optimizer-step hook, the same clock for
both sides) after ``--skip`` warm-up steps: SFT target tokens/s, DPO pairs/s, per second of
wall-clock and per second of this process's CPU time (steady when other jobs share the machine).
One run each, one after another in this process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "full": dict(hidden_size=256, layers=4, heads=4, intermediate_size=768, vocab_size=1024),
    "small": dict(hidden_size=64, layers=2, heads=4, intermediate_size=128, vocab_size=320),
}
BATCH, LR, R, ALPHA, BETA = 8, 1e-3, 16, 32.0, 0.1


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class StepClock:
    """(wall, CPU) seconds at the end of every optimizer step while it is open."""

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.marks: list[tuple[float, float]] = []
        self.handle = register_optimizer_step_post_hook(
            lambda *_: self.marks.append((time.perf_counter(), time.process_time())))
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()

    def rates(self, units: list[float], skip: int) -> dict:
        """Units per wall / CPU second between the end of step ``skip`` and the end of the last."""
        done = sum(units[skip + 1:])
        (w0, c0), (w1, c1) = self.marks[skip], self.marks[-1]
        return {"per_wall_s": done / (w1 - w0), "per_cpu_s": done / (c1 - c0)}


def ours_sft(model: Path, data: Path, out: Path, steps: int, skip: int) -> dict:
    from pocketrlhf.stages import sft

    counted: list[float] = []
    units = sft.SFTLoss.units
    sft.SFTLoss.units = lambda self, examples: counted.append(units(self, examples)) or counted[-1]
    with StepClock() as clock:
        summary = sft.train(sft.SFTConfig(model=str(model), data=str(data), output_dir=str(out), device="cpu",
                                      packing=False, seq_length=512, batch_size=BATCH, learning_rate=LR,
                                      max_steps=steps, warmup_steps=0, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                      logging_steps=1, progress=False, eval_fraction=0, seed=0, lr_scheduler="constant"))
    sft.SFTLoss.units = units
    return {"tokens": clock.rates(counted, skip), "final_loss": summary["train_loss"]}


def ours_dpo(model: Path, data: Path, out: Path, steps: int, skip: int) -> dict:
    from pocketrlhf.stages import dpo

    with StepClock() as clock:
        summary = dpo.train(dpo.DPOConfig(model=str(model), data=str(data), output_dir=str(out), device="cpu",
                                      batch_size=BATCH, learning_rate=LR, max_steps=steps, warmup_steps=0, lora_r=R,
                                      lora_alpha=ALPHA, lora_dropout=0.0, beta=BETA, logging_steps=1, progress=False,
                                      eval_fraction=0, seed=0, precompute_ref_logprobs=False,
                                      lr_scheduler="constant"))
    return {"pairs": clock.rates([BATCH] * steps, skip), "final_loss": summary["train_loss"],
            "final_accuracy": summary.get("train_accuracy")}


def plain_model(model: Path):
    import peft
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(str(model), dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           task_type="SEQ_2_SEQ_LM")
    policy = peft.get_peft_model(base, lora)
    policy.train()
    return policy, torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR)


def padded(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def plain_sft(model: Path, examples: list[tuple[list[int], list[int]]], steps: int, skip: int, pad: int) -> dict:
    policy, opt = plain_model(model)
    rng = random.Random(0)
    tokens, loss = [], None
    with StepClock() as clock:
        for _ in range(steps):
            batch = rng.sample(examples, BATCH)
            ids, mask = padded([p for p, _ in batch], pad)
            labels, _ = padded([t for _, t in batch], -100)
            loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad()
            tokens.append(float((labels != -100).sum()))
    return {"tokens": clock.rates(tokens, skip), "final_loss": loss.item()}


def sequence_logps(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def plain_dpo(model: Path, pairs: list[tuple[list[int], list[int], list[int]]], steps: int, skip: int,
              pad: int) -> dict:
    policy, opt = plain_model(model)
    rng = random.Random(0)
    loss, accuracy = None, None
    with StepClock() as clock:
        for _ in range(steps):
            batch = rng.sample(pairs, BATCH)
            ids, mask = padded([p for p, _, _ in batch] * 2, pad)
            labels, _ = padded([c for _, c, _ in batch] + [r for _, _, r in batch], -100)
            with torch.no_grad(), policy.disable_adapter():
                ref_c, ref_r = sequence_logps(policy, ids, mask, labels).chunk(2)
            pol_c, pol_r = sequence_logps(policy, ids, mask, labels).chunk(2)
            margin = BETA * ((pol_c - ref_c) - (pol_r - ref_r))
            loss = -torch.nn.functional.logsigmoid(margin).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad()
            accuracy = (margin > 0).float().mean().item()
    return {"pairs": clock.rates([BATCH] * steps, skip), "final_loss": loss.item(),
            "final_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rates")
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))

    from pocketrlhf.data import synthetic
    from pocketrlhf.data.formats import PreferencePair, Skipped
    from pocketrlhf.data.tokenize import tokenize_preferences
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="seq2seq_bench_"))
    model = build_tiny_model(root / "t5", "t5", texts=synthetic.corpus(), **SIZES[args.size])
    sft_rows, pair_rows = synthetic.sft_rows(600, seed=0), synthetic.preference_rows(600, seed=1)
    sft_data, pair_data = write_jsonl(root / "sft.jsonl", sft_rows), write_jsonl(root / "pairs.jsonl", pair_rows)
    tok = load_tokenizer(str(model))
    eos = tok.eos_token_id
    examples = [(tok(r["prompt"])["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos])
                for r in sft_rows]
    prefs = [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in tokenize_preferences(
        tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in pair_rows], None, Skipped())]
    params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(model / "model.safetensors")).values())
    print(f"[bench] T5 {args.size}: {params / 1e6:.1f}M parameters, {args.steps} steps of {BATCH}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    results = {"size": args.size, "parameters": params, "steps": args.steps, "skip": args.skip}
    results["sft_ours"] = ours_sft(model, sft_data, root / "sft", args.steps, args.skip)
    results["sft_plain"] = plain_sft(model, examples, args.steps, args.skip, tok.pad_token_id)
    results["dpo_ours"] = ours_dpo(model, pair_data, root / "dpo", args.steps, args.skip)
    results["dpo_plain"] = plain_dpo(model, prefs, args.steps, args.skip, tok.pad_token_id)
    for clock in ("per_wall_s", "per_cpu_s"):
        results[f"sft_ratio_{clock}"] = results["sft_ours"]["tokens"][clock] / results["sft_plain"]["tokens"][clock]
        results[f"dpo_ratio_{clock}"] = results["dpo_ours"]["pairs"][clock] / results["dpo_plain"]["pairs"][clock]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
