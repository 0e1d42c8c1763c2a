"""Compare policies on held-out prompts: the base, the SFT policy and the RLHF policies (PPO, DPO),
all as adapters on ONE base in memory.

For each model: mean reward-model score, win rate against the SFT policy under the reward model,
KL to the reference (the SFT policy) on its own samples, EOS rate, length, an optional ground
truth (a rule-based reward function), and a few answers side by side.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pocketrlhf.algorithms.ppo import sequence_kl
from pocketrlhf.algorithms.stats import pearson, wilson_interval
from pocketrlhf.config import ModelOptions, option
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.diagnostics import reward_hacking_warnings
from pocketrlhf.errors import ConfigError
from pocketrlhf.logs import log, setup_logging
from pocketrlhf.models.spec import BaseSpec


@dataclasses.dataclass
class EvaluationConfig(ModelOptions):
    output_dir: str = option("runs/evaluation", "where results.json, samples.jsonl and evaluation.md go")
    prompts: str = option("", "held-out prompts (prompt / question / messages column)")
    template: TemplateName = option("plain", "prompt format the policies were trained with")
    sft_adapter: str = option("", "the SFT policy (also the reference for KL)")
    policies: dict = option({}, "name: adapter directory of each policy to compare, e.g. {ppo: runs/ppo/adapter}")
    reward_adapter: str = option("", "reward adapter + head from `pocketrlhf rm` (scores and win rates)")
    reward_function: str = option("", "optional ground truth: module:function or file.py:function")
    samples: int = option(64, "number of held-out prompts")
    max_new_tokens: int = option(64, "answer length limit")
    temperature: float = option(1.0, "sampling temperature")
    max_prompt_length: int = option(256, "prompts longer than this are skipped")
    batch_size: int = option(32, "prompts per generate() / forward call")
    side_by_side: int = option(4, "prompts whose answers are shown side by side in evaluation.md")
    seed: int = option(0, "sampling seed (the same for every model)")


def _sequence_batch(prompt_ids: list[list[int]], answers: list[list[int]], pad_id: int, device):
    from pocketrlhf.data.tokenize import TokenExample, collate

    batch = collate([TokenExample(p + a, [0] * len(p) + [1] * len(a)) for p, a in zip(prompt_ids, answers)], pad_id)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device)


@torch.no_grad()
def _kl_to_reference(model, adapters, name, reference, ids, attn, mask, temperature) -> torch.Tensor:
    from pocketrlhf.models.forward import response_logprobs

    with adapters.use(name):
        own = response_logprobs(model, ids, attn, mask, temperature).logprobs
    with adapters.use(reference):
        ref = response_logprobs(model, ids, attn, mask, temperature).logprobs
    return sequence_kl(own, ref, mask)


def evaluate(cfg: EvaluationConfig) -> dict:
    from pocketrlhf.data.formats import prompt_rows
    from pocketrlhf.data.loading import load_records
    from pocketrlhf.data.tokenize import encode
    from pocketrlhf.models.adapters import AdapterSet, load_adapter, spec_mismatch
    from pocketrlhf.models.generation import row_seed, sample
    from pocketrlhf.data.templates import check_seq2seq_template
    from pocketrlhf.models.loading import is_seq2seq, load_base, load_tokenizer
    from pocketrlhf.models.roles import load_reward_adapter, load_reward_function, rule_reward

    setup_logging()
    if not cfg.prompts or not cfg.sft_adapter:
        raise ConfigError("evaluation needs prompts and an SFT adapter")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    if is_seq2seq(cfg.model):
        check_seq2seq_template(cfg.template)
    rows, _ = prompt_rows(load_records(cfg.prompts), cfg.prompts, cfg.template, tok)
    encoded = [(encode(tok, r.prompt, special=True), r.columns) for r in rows]
    encoded = [(ids, columns) for ids, columns in encoded if len(ids) <= cfg.max_prompt_length][:cfg.samples]
    prompt_ids = [ids for ids, _ in encoded]
    # the data's other columns (an `answer`...) reach the ground-truth function as keyword arguments
    columns = {k: [c[k] for _, c in encoded] for k in (encoded[0][1] if encoded else {})}
    spec = BaseSpec.from_config(cfg)
    for path in (cfg.sft_adapter, *cfg.policies.values(), cfg.reward_adapter):
        mismatch = spec_mismatch(path, spec) if path else None
        if mismatch:
            log.warning("%s (--quantization, --quant-type, --double-quant)", mismatch)
    model = load_base(spec, training=False)
    model = load_adapter(model, cfg.sft_adapter, name="sft")
    for name, path in cfg.policies.items():
        model = load_adapter(model, path, name=name)
    reward = None
    if cfg.reward_adapter:
        model, reward = load_reward_adapter(model, cfg.reward_adapter, name="reward")
    truth = rule_reward(load_reward_function(cfg.reward_function), cfg.reward_function) if cfg.reward_function else None
    missing = [c for c in getattr(truth, "needs", ()) if c not in columns]
    if missing:
        raise ConfigError(f"reward function {cfg.reward_function} needs the column {', '.join(missing)}, which "
                          f"{cfg.prompts} does not have")
    model.eval()
    adapters = AdapterSet(model)
    device = next(model.parameters()).device
    contenders = {"base": None, "sft": "sft", **{name: name for name in cfg.policies}}
    results: dict[str, dict] = {}
    answers_text: dict[str, list[str]] = {}
    rm_scores: dict[str, torch.Tensor] = {}
    lengths: dict[str, list[float]] = {}
    for name, adapter in contenders.items():
        with adapters.use(adapter):
            # Every model answers prompt i from the same random stream: common random numbers make
            # the comparison less noisy than independent samples would.
            answers = sample(model, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature, batch_size=cfg.batch_size,
                             row_seeds=[row_seed(cfg.seed, i) for i in range(len(prompt_ids))])
        ids, attn, mask = _sequence_batch(prompt_ids, answers, tok.pad_token_id, device)
        lengths[name] = [float(len(a)) for a in answers]
        row = {"prompts": len(answers),
               "eos_fraction": sum(bool(a) and a[-1] == tok.eos_token_id for a in answers) / len(answers),
               "mean_length": sum(lengths[name]) / len(answers)}
        kl = torch.cat([_kl_to_reference(model, adapters, adapter, "sft", ids[i:i + cfg.batch_size],
                                         attn[i:i + cfg.batch_size], mask[i:i + cfg.batch_size], cfg.temperature)
                        for i in range(0, len(answers), cfg.batch_size)])
        row["kl_to_sft"] = kl.mean().item()
        answers_text[name] = tok.batch_decode(answers, skip_special_tokens=True)
        prompts_text = tok.batch_decode(prompt_ids, skip_special_tokens=True)
        if reward is not None:
            rm_scores[name] = torch.cat([reward(ids[i:i + cfg.batch_size], attn[i:i + cfg.batch_size],
                                                response_mask=mask[i:i + cfg.batch_size])
                                         for i in range(0, len(answers), cfg.batch_size)])
            row["reward_model_score"] = rm_scores[name].mean().item()
        if truth is not None:
            row["ground_truth"] = truth(ids, attn, prompts_text, answers_text[name], columns=columns).mean().item()
        results[name] = row
    if reward is not None:
        for name in results:
            wins = (rm_scores[name] > rm_scores["sft"]).float() + 0.5 * (rm_scores[name] == rm_scores["sft"]).float()
            results[name]["win_rate_vs_sft"] = wins.mean().item()
            results[name]["win_rate_vs_sft_ci95"] = list(wilson_interval(wins.sum().item(), len(wins)))
    warnings = length_diagnostics(results, rm_scores, lengths)
    for warning in warnings:
        log.warning("%s", warning)
    prompts_text = tok.batch_decode(prompt_ids, skip_special_tokens=True)
    with (out_dir / "samples.jsonl").open("w") as f:
        for i, p in enumerate(prompts_text):
            f.write(json.dumps({"prompt": p, **{name: answers_text[name][i] for name in results}}) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "evaluation.md").write_text(markdown(results, prompts_text, answers_text, cfg.side_by_side, warnings))
    log.info("evaluation of %s on %d prompts written to %s", ", ".join(results), len(prompt_ids), out_dir)
    return results


def length_diagnostics(results: dict[str, dict], rm_scores: dict[str, torch.Tensor],
                       lengths: dict[str, list[float]]) -> list[str]:
    """Fill each model's length shift against SFT and the correlation of its reward-model scores with
    answer length; warnings where a score gain comes with a large length shift."""
    warnings = []
    sft = results["sft"]
    for name, row in results.items():
        row["length_vs_sft"] = row["mean_length"] / sft["mean_length"] if sft["mean_length"] else None
        if name in rm_scores:
            row["score_length_correlation"] = pearson(rm_scores[name].tolist(), lengths[name])
            if name not in ("base", "sft"):
                warnings += reward_hacking_warnings(name, row["reward_model_score"], sft["reward_model_score"],
                                                    row["mean_length"], sft["mean_length"], row["eos_fraction"],
                                                    sft["eos_fraction"])
    if rm_scores:
        pooled = pearson([x for name in rm_scores for x in rm_scores[name].tolist()],
                         [x for name in rm_scores for x in lengths[name]])
        if pooled is not None and abs(pooled) > 0.5:
            warnings.append(f"reward-model scores correlate with answer length (r = {pooled:+.2f} over every model's "
                            "answers): a policy can raise its score by changing length alone")
    return warnings


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def markdown(results: dict[str, dict], prompts: list[str], answers: dict[str, list[str]], shown: int,
             warnings: list[str] = ()) -> str:
    metrics = list(dict.fromkeys(k for row in results.values() for k in row))
    lines = ["## evaluation", "", "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(m)) for m in metrics) + " |")
    n = next(iter(results.values()), {}).get("prompts", 0)
    lines += ["", f"{n} held-out prompts; intervals are 95% (Wilson)."]
    if warnings:
        lines += ["", "### warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", "### answers side by side", ""]
    for i in range(min(shown, len(prompts))):
        lines.append(f"**{prompts[i].strip()}**\n")
        lines += [f"- {name}: {answers[name][i].strip()!r}" for name in results]
        lines.append("")
    return "\n".join(lines)


def run(cfg: EvaluationConfig) -> dict:
    return evaluate(cfg)


def generate_answers(base: str | Path, adapter: str | Path | None, prompts: list[str], quantization: str = "none",
                     max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, device: str = "cpu",
                     batch_size: int = 32) -> tuple[list[str], list[bool]]:
    """Decoded answers to already-formatted ``prompts``, and whether each ended with EOS."""
    from pocketrlhf.models.adapters import load_adapter
    from pocketrlhf.models.generation import sample
    from pocketrlhf.models.loading import load_base, load_tokenizer

    tok = load_tokenizer(str(base))
    model = load_base(str(base), quantization=quantization, device=device, training=False)
    if adapter is not None:
        model = load_adapter(model, adapter)
    torch.manual_seed(seed)  # sampling draws from torch's global generator only
    outs = sample(model, tok, [tok(p)["input_ids"] for p in prompts], max_new_tokens=max_new_tokens,
                  temperature=temperature, batch_size=batch_size)
    ended = [bool(o) and o[-1] == tok.eos_token_id for o in outs]
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs], ended
