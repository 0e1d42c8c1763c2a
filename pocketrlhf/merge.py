"""Merge a trained adapter into its base: one plain transformers model, saved as safetensors shards.

    pocketrlhf merge --adapter runs/sft/adapter --out models/merged

The base is reloaded in 16/32-bit and the adapter is merged into those weights: merging into
4-bit or 8-bit weights rounds most of the adapter away (peft warns but does it anyway). A base
checkpoint that is itself stored quantized is refused unless ``--dequantize`` asks to merge into
its dequantized weights. With ``--dequantize``, an adapter trained on a quantized-on-load base
(``--quantization 4bit``) is merged into the dequantized weights it was trained against, instead
of the original 16-bit ones.

The output keeps the prompt format the adapter was trained with: the tokenizer gets a matching
chat template, and ``pocketrlhf_adapter.json`` records the format by name for chat and serve.

An encoder-decoder base (T5, BART: ``models.loading.is_seq2seq``) merges the same way, the adapter's
encoder and decoder layers alike; the merged folder loads back as a seq2seq model. Its tokenizer
gets no ChatML template for ``auto``: an encoder reads its input text as it is (see
``data.templates.seq2seq_format``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pocketrlhf.config import option
from pocketrlhf.errors import ConfigError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft methods that add virtual tokens or prompts instead of changing weights: nothing to merge.
NOT_MERGEABLE = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT"}
# Files that would mix a stale checkpoint with the new one if left in an overwritten folder.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


@dataclasses.dataclass
class MergeConfig:
    adapter: str = option("", "trained adapter directory (adapter_config.json + adapter_model.safetensors)")
    out: str = option("", "output directory for the merged model (safetensors shards, config, tokenizer)")
    model: str = option("", "base model to merge into (default: base_model_name_or_path in adapter_config.json)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "dtype of the merged weights (auto: the dtype the base checkpoint was saved in)"
    )
    device: Literal["cpu", "cuda", "auto"] = option("cpu", "where to merge (cpu needs RAM for the 16-bit model)")
    max_shard_size: str = option("5GB", "largest safetensors shard, e.g. 2GB, 500MB")
    dequantize: bool = option(
        False, "merge into dequantized 4/8-bit weights: needed for a base stored quantized; for an adapter trained "
        "with --quantization, merges into the weights it was trained against instead of the original ones"
    )
    overwrite: bool = option(False, "write into a non-empty output directory (stale weight shards are removed)")
    verify: bool = option(True, "compare the merged model's logits with base+adapter on a short probe")
    trust_remote_code: bool = option(False, "run Python code shipped with the base model (off: safer)")
    progress: bool = option(True, "show a progress bar while merging")
    push_to_hub: str = option("", "after merging, upload the merged model folder to this Hugging Face Hub repo id")
    hub_private: bool = option(False, "--push-to-hub: create the repo private")


# ---------------------------------------------------------------------------------------------
# Checks on the inputs, before anything heavy is loaded.


def read_adapter_config(path: str) -> dict:
    if not path:
        raise ConfigError("no adapter given: pass --adapter DIR (a trained adapter directory)")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"adapter directory {path} does not exist")
    if not (p / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p / ADAPTER_CONFIG}: invalid JSON at line {e.lineno} column {e.colno}") from None
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type in NOT_MERGEABLE:
        raise ModelLoadError(
            f"{path} is a {peft_type.lower()} adapter: it prepends learned virtual tokens instead of changing weights, "
            "so there is nothing to merge into the base; use the adapter directory itself with chat or serve"
        )
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"{path} has no {ADAPTER_WEIGHTS} (pocketrlhf loads safetensors only)")
    return cfg


def resolve_base(cfg: MergeConfig) -> str:
    from pocketrlhf.models.adapters import adapter_base

    base = adapter_base(cfg.adapter, cfg.model, flag="--model")
    return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base


def check_output(cfg: MergeConfig, base: str) -> Path:
    if not cfg.out:
        raise ConfigError("no output directory given: pass --out DIR")
    out = Path(cfg.out).expanduser()
    for other, what in ((cfg.adapter, "adapter"), (base, "base model")):
        if Path(other).expanduser().exists() and out.resolve() == Path(other).expanduser().resolve():
            raise ConfigError(f"--out {cfg.out} is the {what} directory; choose a new folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out} is not empty; pass --overwrite to replace the model in it")
    return out


def stored_quantization(base_config) -> str | None:
    """How the base checkpoint's own weights are quantized ("bitsandbytes 4bit", "gptq", ...), or None."""
    q = getattr(base_config, "quantization_config", None)
    if not q:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = str(q.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        bits = "4bit" if q.get("load_in_4bit") or q.get("_load_in_4bit") else "8bit"
        return f"bitsandbytes {bits}"
    return method


def output_dtype(requested: str, base_config) -> str:
    if requested != "auto":
        return requested
    saved = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    name = str(saved).replace("torch.", "") if saved is not None else ""
    return name if name in ("bfloat16", "float16", "float32") else "float32"


# ---------------------------------------------------------------------------------------------
# Prompt formats as Jinja chat templates, so that any tool renders prompts as training did.


def _jinja_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal (same escapes)


def _jinja_format(template: str, var: str) -> str:
    """``"Question: {content}\\n\\n"`` -> ``"Question: " + m['content'] + "\\n\\n"`` (Jinja expression)."""
    placeholder = "{content}" if "{content}" in template else "{system}"
    before, _, after = template.partition(placeholder)
    return " + ".join(p for p in (_jinja_string(before) if before else "", var, _jinja_string(after) if after else "") if p)


def chat_template_jinja(fmt_name: str) -> str:
    """A Jinja chat template that renders exactly like ``data.templates.render(messages, fmt_name)``."""
    from pocketrlhf.data.templates import FORMATS

    fmt = FORMATS[fmt_name]
    llama2 = fmt.name == "llama-2"
    parts = [
        "{%- set ns = namespace(system=" + _jinja_string(fmt.default_system) + ", found=false, turn=0) -%}",
        "{%- for m in messages -%}{%- if m['role'] == 'system' and not ns.found -%}"
        "{%- set ns.system = m['content'] -%}{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}",
    ]
    if not llama2:
        parts.append("{%- if ns.system -%}{{ " + _jinja_format(fmt.system, "ns.system") + " }}{%- endif -%}")
    parts.append("{%- for m in messages -%}{%- if m['role'] != 'system' -%}")
    user = "{{ " + _jinja_format(fmt.user, "m['content']") + " }}"
    if llama2:
        # Llama-2 puts the system block inside the first [INST].
        first = "{{ '[INST] ' + " + _jinja_format(fmt.system, "ns.system") + " + m['content'] + ' [/INST]' }}"
        user = "{%- if ns.turn == 0 and ns.system -%}" + first + "{%- else -%}" + user + "{%- endif -%}"
    parts.append(
        "{%- if m['role'] == 'user' -%}" + user
        + "{%- elif m['role'] == 'assistant' -%}{{ " + _jinja_format(fmt.assistant, "m['content']") + " }}"
        + "{%- else -%}{{ raise_exception('unknown role ' + m['role'] + ' (system, user or assistant)') }}"
        + "{%- endif -%}{%- set ns.turn = ns.turn + 1 -%}{%- endif -%}{%- endfor -%}"
    )
    if fmt.generation_prompt:
        parts.append("{%- if add_generation_prompt -%}{{ " + _jinja_string(fmt.generation_prompt) + " }}{%- endif -%}")
    return "".join(parts)


def set_chat_template(tokenizer, template: str, seq2seq: bool = False) -> str:
    """Give the tokenizer the chat template of the prompt format the adapter was trained with.

    Returns what was done, for the log. ``plain`` has no turns, so the tokenizer is left alone;
    nor is an encoder-decoder's for ``auto`` (it renders the input text as it is).
    """
    from pocketrlhf.data.templates import FORMATS

    if template == "auto" and seq2seq and not getattr(tokenizer, "chat_template", None):
        return "left the tokenizer without a chat template ('auto' on an encoder-decoder renders the input text as it is)"
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "kept the tokenizer's chat template (the adapter was trained with it)"
        # Training rendered 'auto' as ChatML for a tokenizer without a template; keep that.
        tokenizer.chat_template = chat_template_jinja("chatml")
        return "set a ChatML chat template (what 'auto' used for this tokenizer in training)"
    if template in FORMATS and template != "plain":
        tokenizer.chat_template = chat_template_jinja(template)
        return f"set the chat template to the '{template}' format the adapter was trained with"
    return "left the tokenizer's chat template as it is (adapter trained on plain text)"


# ---------------------------------------------------------------------------------------------


def _load_tokenizer_raw(base: str, adapter: str, trust_remote_code: bool):
    """The base's own tokenizer, unchanged (no added pad token: it must match the embedding size)."""
    from transformers import AutoTokenizer

    for source in (base, adapter):
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - try the next source
            continue
    raise ModelLoadError(f"cannot load a tokenizer from the base model {base} or the adapter {adapter}")


def _probe_logits(model, vocab_size: int, seq2seq: bool = False):
    """Logits on a fixed probe; an encoder-decoder reads it in the encoder and scores a second
    probe in the decoder, so that both stacks' adapted layers count."""
    import torch

    ids = (torch.arange(1, 33) * 7919 % max(vocab_size - 1, 1) + 1).unsqueeze(0)
    device = next(model.parameters()).device
    extra = {}
    if seq2seq:
        extra["decoder_input_ids"] = (torch.arange(1, 17) * 104729 % max(vocab_size - 1, 1) + 1).unsqueeze(0).to(device)
    with torch.no_grad():
        return model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), **extra).logits.float().cpu()


def drop_quantized_loading_steps(model) -> None:
    """transformers records how it converted checkpoint tensors while loading and replays them in
    reverse when saving; the steps that deserialized quantized tensors cannot be reversed (and no
    longer apply once the weights are dequantized), so forget them."""
    steps = getattr(model, "_weight_conversions", None)
    if not steps:
        return
    kept = []
    for step in steps:
        try:
            step.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(step)
    model._weight_conversions = kept or None


def _install(tmp: Path, out: Path) -> None:
    """Move the finished merge into ``out``; in an existing folder, stale weight files go first."""
    # transformers writes shards readable by their owner only (0600); give them the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    for shard in tmp.glob("*.safetensors"):
        shard.chmod(0o666 & ~umask)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        return
    for pattern in WEIGHT_FILES:
        for stale in out.glob(pattern):
            stale.unlink()
    for f in tmp.iterdir():
        target = out / f.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    tmp.rmdir()


def run(cfg: MergeConfig) -> dict:
    import torch
    from transformers import AutoConfig

    from pocketrlhf.cards import write_card
    from pocketrlhf.hub import check_repo_id, push_after_training
    from pocketrlhf.logs import log, setup_logging
    from pocketrlhf.models.adapters import load_adapter, read_adapter_info, recorded_spec, write_adapter_info
    from pocketrlhf.models.heads import HEAD_FILE
    from pocketrlhf.models.loading import is_seq2seq, load_base
    from pocketrlhf.models.spec import BaseSpec
    from pocketrlhf.plan import parse_memory

    setup_logging()
    if cfg.push_to_hub:
        check_repo_id(cfg.push_to_hub)  # before the merge, not after it
    adapter_cfg = read_adapter_config(cfg.adapter)
    adapter = Path(cfg.adapter).expanduser().resolve()
    shard_bytes = parse_memory(cfg.max_shard_size, "--max-shard-size")
    base = resolve_base(cfg)
    out = check_output(cfg, base)
    info = read_adapter_info(adapter)

    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one clear message for every loading failure
        raise ModelLoadError(f"cannot read the base model's config from {base}: {str(e).splitlines()[0]}") from None
    stored_q = stored_quantization(base_config)
    dtype = output_dtype(cfg.dtype, base_config)
    # The base as the adapter was trained on it (quantization, 4-bit type, double quantization),
    # here in the output dtype and on this machine.
    trained = (recorded_spec(adapter) or BaseSpec(base)).replace(path=base, dtype=dtype, device=cfg.device,
                                                                  trust_remote_code=cfg.trust_remote_code)
    trained_q = trained.quantization
    if stored_q and not cfg.dequantize:
        raise ModelLoadError(
            f"base model {base} is stored quantized ({stored_q}); merging into quantized weights rounds the adapter "
            "away. Point --model at the original 16-bit checkpoint, or pass --dequantize to merge into its "
            f"dequantized weights (saved in {dtype})"
        )

    # Training-mode loading keeps bitsandbytes' CPU 4-bit layers off the inference kernel, whose
    # repacked layout dequantize() would misread.
    if stored_q:
        log.info("loading %s (%s) and dequantizing it to %s", base, stored_q, dtype)
        model = load_base(trained.replace(quantization="none"), training=True)
    elif cfg.dequantize and trained_q in ("4bit", "8bit"):
        log.info("loading %s in %s as the adapter was trained, then dequantizing it to %s", base, trained.describe(), dtype)
        model = load_base(trained, training=True)
    else:
        if trained_q in ("4bit", "8bit"):
            log.info("the adapter was trained on a %s-quantized base; merging into the original %s weights "
                     "(--dequantize merges into the dequantized weights it saw instead)", trained_q, dtype)
        elif cfg.dequantize:
            log.info("--dequantize: neither the base nor the adapter's training was quantized; nothing to dequantize")
        log.info("loading %s in %s", base, dtype)
        model = load_base(trained.replace(quantization="none"), training=False)
    if getattr(model, "hf_quantizer", None) is not None:
        try:
            model = model.dequantize(dtype=getattr(torch, dtype))
        except (NotImplementedError, ValueError) as e:
            raise ModelLoadError(f"cannot dequantize {base}: {str(e).splitlines()[0]}") from None
        drop_quantized_loading_steps(model)
    model.eval()
    seq2seq = is_seq2seq(model)

    model = load_adapter(model, adapter)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    before = _probe_logits(model, vocab, seq2seq) if cfg.verify else None
    log.info("merging %s adapter %s", str(adapter_cfg.get("peft_type", "")).lower(), adapter)
    try:
        merged = model.merge_and_unload(progressbar=cfg.progress, safe_merge=True)  # not in-place: assign
    except (AttributeError, NotImplementedError, TypeError) as e:
        raise ModelLoadError(f"peft cannot merge {adapter}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise ModelLoadError(f"merging {adapter} failed: {str(e).splitlines()[0]}") from None
    merged.config.use_cache = True

    summary: dict = {"out": str(out), "base_model": base, "dtype": dtype}
    if before is not None:
        after = _probe_logits(merged, vocab, seq2seq)
        diff, scale = (after - before).abs().max().item(), before.abs().max().item()
        summary["max_logit_diff"] = diff
        tolerance = 1e-3 if dtype == "float32" else 3e-2
        if diff > tolerance * max(scale, 1.0):
            log.warning("merged logits differ from base+adapter by up to %.4g (largest logit %.4g): check the output",
                        diff, scale)
        else:
            log.info("check: merged logits match base+adapter (max |difference| %.3g, largest logit %.3g)", diff, scale)

    tmp = out.parent / f".{out.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log.info("saving to %s (shards of at most %s)", out, cfg.max_shard_size)
        merged.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        tokenizer = _load_tokenizer_raw(base, str(adapter), cfg.trust_remote_code)
        template = info.get("template", "auto")
        log.info("tokenizer: %s", set_chat_template(tokenizer, template, seq2seq))
        tokenizer.save_pretrained(str(tmp))
        if (adapter / HEAD_FILE).is_file():
            # A reward/value adapter is "adapter + scalar head": the head stays next to the merged model.
            shutil.copy2(adapter / HEAD_FILE, tmp / HEAD_FILE)
            log.info("copied the scalar head (%s) next to the merged model", HEAD_FILE)
        # The merged folder is a plain model: the base spec of the adapter's training stays behind.
        kept = {k: v for k, v in info.items() if k != "base"}
        write_adapter_info(tmp, **{**kept, "template": template, "merged_from": str(adapter), "base_model": base,
                                   "merged_dtype": dtype, "dequantized": bool(stored_q or (cfg.dequantize and trained_q != "none"))})
        run_dir = adapter.parent if (adapter.parent / "summary.json").is_file() else None  # the adapter's training run
        write_card(tmp, stage=info.get("stage", "sft"), run_dir=run_dir, where=str(out))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    summary["shards"] = len(shards)
    print(f"merged model written to {out} ({len(shards)} safetensors shard(s), {dtype})")
    if cfg.push_to_hub:
        summary["pushed"] = push_after_training(out, cfg.push_to_hub, cfg.hub_private)
    return summary
