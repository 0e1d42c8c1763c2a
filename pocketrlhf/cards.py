"""Model cards: the README.md the Hugging Face Hub shows, beside every saved adapter and merged model.

A card opens with the Hub's YAML metadata (base_model, library_name, pipeline_tag, tags), then says
how the folder was made (the resolved config, the data, the steps, the final and held-out metrics,
read from the run folder's config.yaml and summary.json) and how to load it (pocketrlhf, peft,
transformers). ``base_model`` is written only when the base is a Hub id: the Hub refuses a card whose
base_model is not one, and a local path means nothing to a reader anyway (the body names it).

Must not import training code (stages).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
# The options a reader wants first; the whole resolved config follows in a folded block.
SUMMARY_KEYS = ("model", "quantization", "quant_type", "adapter", "lora_r", "lora_alpha", "lora_dropout",
                "target_modules", "optimizer", "learning_rate", "lr_scheduler", "warmup_steps", "batch_size",
                "gradient_accumulation_steps", "epochs", "max_steps", "seq_length", "packing", "completion_only",
                "template", "loss_type", "beta", "init_kl_coef", "target_kl", "seed")
DATA_KEYS = ("data", "eval_data", "prompts", "eval_prompts", "sft_adapter", "reward_adapter")
PIPELINE_TAG = {"rm": "text-classification"}  # the others generate text
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _read_yaml(path: Path) -> dict:
    try:
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def metadata(base: str, stage: str, peft_type: str | None, merged: bool, seq2seq: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if is_hub_id(base):
        meta["base_model"] = base
    if not merged:
        meta["library_name"] = "peft"
    else:
        meta["library_name"] = "transformers"
    meta["pipeline_tag"] = PIPELINE_TAG.get(stage, "text2text-generation" if seq2seq else "text-generation")
    tags = ["pocketrlhf", stage] + ([peft_type.lower()] if peft_type else []) + (["merged"] if merged else [])
    meta["tags"] = list(dict.fromkeys(t for t in tags if t))
    return meta


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _training_section(stage: str, config: dict, summary: dict) -> list[str]:
    lines = ["## Training", ""]
    if not config and not summary:
        return lines + ["No run folder was found beside this one: its training is not recorded here.", ""]
    lines += [f"Trained with `pocketrlhf {stage}`" + (f" for {summary['steps']} optimizer steps." if "steps" in summary
                                                      else "."), ""]
    data = [(k, config[k]) for k in DATA_KEYS if config.get(k)]
    counts = [(k, summary[k]) for k in ("train_examples", "eval_examples", "train_sequences", "eval_sequences",
                                         "train_pairs", "eval_pairs", "prompts") if isinstance(summary.get(k), int)]
    if data or counts:
        lines += ["### Data", ""] + [f"- {k}: `{v}`" for k, v in data] + [f"- {k}: {v}" for k, v in counts] + [""]
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in dict(counts) and k != "steps"}
    final = {k: v for k, v in numbers.items() if not k.startswith("eval_")}
    held_out = {k: v for k, v in numbers.items() if k.startswith("eval_")}
    if final or held_out:
        lines += ["### Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final.items()]
        lines += [f"| {k} (held out) | {_fmt(v)} |" for k, v in held_out.items()] + [""]
    chosen = [(k, config[k]) for k in SUMMARY_KEYS if k in config and config[k] not in ("", None)]
    if chosen:
        lines += ["### Configuration", "", "| option | value |", "|---|---|"]
        lines += [f"| {k} | `{_fmt(v)}` |" for k, v in chosen] + [""]
        lines += ["<details><summary>The whole resolved config (config.yaml)</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return lines


def _usage_section(where: str, base: str, stage: str, merged: bool, quantization: str,
                   family: str = "CausalLM") -> list[str]:
    """``family``: the transformers/peft class suffix (CausalLM, or Seq2SeqLM for an encoder-decoder)."""
    load_4bit = " --load-4bit" if quantization == "4bit" else (" --load-8bit" if quantization == "8bit" else "")
    lines = ["## How to use it", "", "With pocketrlhf:", "", "```bash"]
    if stage == "rm" and not merged:
        lines += [f"pocketrlhf score --reward-adapter {where} --input pairs.jsonl"]
    else:
        lines += [f"pocketrlhf chat {where}{load_4bit}"]
    lines += ["```", ""]
    if merged:
        lines += ["With transformers:", "", "```python", f"from transformers import AutoModelFor{family}, AutoTokenizer",
                  "", f'model = AutoModelFor{family}.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]
        return lines
    lines += ["With peft (the base model is read from adapter_config.json):", "", "```python",
              f"from peft import AutoPeftModelFor{family}", "from transformers import AutoTokenizer", "",
              f'model = AutoPeftModelFor{family}.from_pretrained("{where}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
              "With transformers (its peft integration puts the adapter on the base):", "", "```python",
              f"from transformers import AutoModelFor{family}", "",
              f'model = AutoModelFor{family}.from_pretrained("{base}")', f'model.load_adapter("{where}")', "```", ""]
    if stage == "rm":
        lines += ["The reward is a scalar head (head.safetensors) on the last token's hidden state: "
                  "`pocketrlhf score` applies it; peft and transformers load the adapter alone.", ""]
    return lines


def card_text(folder: Path, stage: str, run_dir: Path | None = None, where: str | None = None) -> str:
    """The card of ``folder`` (an adapter, or a merged model when it has no adapter_config.json);
    ``where`` is how the snippets name it (a Hub repo id; default the folder)."""
    folder = Path(folder)
    adapter_cfg = _read_json(folder / "adapter_config.json")
    info = _read_json(folder / "pocketrlhf_adapter.json")
    merged = not adapter_cfg
    stage = info.get("stage", stage)
    base = info.get("base_model") or adapter_cfg.get("base_model_name_or_path") or ""
    config = _read_yaml(run_dir / "config.yaml") if run_dir else {}
    summary = _read_json(run_dir / "summary.json") if run_dir else {}
    quantization = (info.get("base") or {}).get("quantization") or config.get("quantization", "none")
    where = where or str(folder)
    # An encoder-decoder adapter records peft's SEQ_2_SEQ_LM task; a merged one its config.json.
    seq2seq = (adapter_cfg.get("task_type") == "SEQ_2_SEQ_LM"
               or bool(_read_json(folder / "config.json").get("is_encoder_decoder")))
    meta = metadata(base, stage, adapter_cfg.get("peft_type"), merged, seq2seq)
    kind = "merged model" if merged else f"{adapter_cfg.get('peft_type', 'LoRA')} adapter"
    title = f"{stage.upper()} {kind}"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"A {kind} trained by [pocketrlhf](https://pypi.org/project/pocketrlhf/) ({stage} stage) on "
             f"`{base or 'an unrecorded base'}`" + (f" loaded {quantization}" if quantization not in ("", "none") else "")
             + ".", ""]
    if info.get("template"):
        lines += [f"Prompt format: `{info['template']}` (pocketrlhf chat and serve use it by themselves).", ""]
    if info.get("merged_from"):
        lines += [f"Merged from the adapter `{info['merged_from']}` into `{base}` ({info.get('merged_dtype', '')}).", ""]
    lines += _training_section(stage, config, summary)
    lines += _usage_section(where, base, stage, merged, quantization if not merged else "none",
                            "Seq2SeqLM" if seq2seq else "CausalLM")
    return "\n".join(lines)


def write_card(folder: str | Path, stage: str, run_dir: str | Path | None = None, where: str | None = None) -> Path:
    """README.md in ``folder``; ``where``: the folder's final place when it is written elsewhere first."""
    path = Path(folder) / CARD
    path.write_text(card_text(Path(folder), stage, Path(run_dir) if run_dir else None, where))
    return path


def read_metadata(text: str) -> dict:
    """The YAML header of a card (what the Hub reads)."""
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def retarget(text: str, folder: str | Path, repo_id: str) -> str:
    """The card as uploaded: its snippets load from the Hub repo instead of the local folder."""
    return text.replace(f'"{folder}"', f'"{repo_id}"').replace(f" {folder}\n", f" {repo_id}\n").replace(
        f" {folder} ", f" {repo_id} ")
