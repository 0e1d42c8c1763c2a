"""Typed configs for every command: defaults < YAML file < command-line flags.

Each command owns one dataclass. Keys are the same in YAML (``learning_rate: 1e-4``) and on the
command line (``--learning-rate 1e-4`` or ``--learning_rate 1e-4``). Unknown keys are an error
that names the closest valid key. This module imports neither torch nor transformers so that
``--help`` and config errors are instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import yaml

from pocketrlhf.errors import ConfigError
from pocketrlhf.optimizers import OptimizerName
from pocketrlhf.paths import missing_local


def option(default: Any, help: str = "", **extra: Any) -> Any:
    """A dataclass field with help text; mutable defaults are copied per instance."""
    metadata = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Options shared by several commands (mixed into the per-command dataclasses).


@dataclasses.dataclass
class ModelOptions:
    model: str = option("", "base model: a local Hugging Face directory (or a hub id where the network allows)")
    quantization: Literal["none", "8bit", "4bit"] = option(
        "none", "load the frozen base in 16/32-bit, LLM.int8 (8bit) or NF4/FP4 (4bit)"
    )
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type")
    double_quant: bool = option(True, "4-bit: quantize the quantization constants too (QLoRA double quantization)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "4-bit: dtype of the matmuls")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype of the non-quantized weights (auto: bf16/fp16 on GPU, fp32 on CPU)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to run")
    trust_remote_code: bool = option(False, "run Python code shipped with the model (off: safer)")


def adapter_scope_on_causal_lm(scope: str, model: str) -> str:
    """The one-line error for ``--adapter-scope`` other than all on a causal LM (training, loading, plan)."""
    return (f"--adapter-scope {scope} applies to encoder-decoder bases (T5, BART) only: {model} is a causal LM (it "
            "has no encoder); leave it at all")


@dataclasses.dataclass
class AdapterOptions:
    adapter: Literal["lora", "loha", "lokr", "adalora", "ia3", "prompt_tuning", "prefix_tuning"] = option(
        "lora", "peft method trained on the frozen base"
    )
    lora_r: int = option(16, "rank of LoRA/LoHa/LoKr/AdaLoRA")
    lora_alpha: float = option(32.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the adapter input (kept 0 for RL and DPO: log-probs must be exact)")
    target_modules: str = option(
        "all-linear", "comma-separated module names, or all-linear (every linear layer but the output head)"
    )
    adapter_scope: Literal["all", "decoder"] = option(
        "all", "encoder-decoder bases (T5, BART): adapt encoder and decoder (all), or the decoder only (decoder: the "
        "encoder stays the base's, and every role whose adapters leave it so, the reference included, reads one "
        "encoder pass per prompt); causal LMs: all only")
    num_virtual_tokens: int = option(16, "prompt/prefix tuning: number of virtual tokens")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    reentrant_checkpointing: bool = option(
        False, "with --gradient-checkpointing: torch's reentrant checkpoint (what transformers, and so the published "
        "8-bit setups, ran in 2023); on an 8-bit base it also frees the int8 layers' inputs, which bitsandbytes keeps "
        "outside autograd's saved tensors (same gradients; one process only)")
    kbit_upcast: bool = option(
        True, "4/8-bit bases: cast embeddings, output layer and norms to fp32 as peft's prepare_model_for_kbit_training "
        "does (stabler; off keeps them 16-bit and saves memory: see `pocketrlhf plan --kbit-upcast false`)")
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dtype of the adapter weights and their gradients (float32: results as before; bfloat16 as QLoRA "
        "saves 4 B per trained parameter, the AdamW moments stay fp32; float16 has no loss scaling, prefer bfloat16)")


@dataclasses.dataclass
class TrainOptions:
    output_dir: str = option("runs/run", "run directory: config, metrics.jsonl, checkpoints, final adapter")
    seed: int = option(0, "random seed (data order, init, sampling)")
    learning_rate: float = option(2e-4, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("cosine", "schedule after warm-up")
    warmup_steps: int = option(0, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    optimizer: OptimizerName = option(
        "adamw", "optimizer (8-bit and paged ones from bitsandbytes; sophia (SophiaH), lion, adafactor, "
        "schedulefree_adamw and adam_mini from pytorch-optimizer: pip install 'pocketrlhf[optimizers]')"
    )
    adam_eps: float = option(1e-8, "Adam epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    batch_size: int = option(8, "micro-batch size per device")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps (0: derived from epochs)")
    logging_steps: int = option(1, "log metrics every N steps")
    eval_steps: int = option(0, "evaluate every N steps (0: only at the end)")
    save_steps: int = option(0, "checkpoint every N steps (0: only the final adapter)")
    save_total_limit: int = option(2, "keep at most N checkpoints (0: keep all)")
    resume: str = option("", "continue a run: auto (latest checkpoint in output_dir, if any) or a checkpoint path")
    overwrite: bool = option(False, "start over in an output_dir that holds a previous run (its outputs are removed)")
    resume_ignore_config: bool = option(
        False, "resume even though options that change the training differ from the checkpoint's (data, seed, "
        "learning rate, batch shape, model, adapter...); the differences are listed either way")
    skip_nonfinite: bool = option(
        False, "drop what turns NaN/inf and go on, counted as nonfinite_skipped in the metrics (PPO: rollouts with a "
        "non-finite reward; SFT/RM/DPO: micro-batches with a non-finite loss; any stage: steps with a non-finite "
        "gradient norm); off: such a value stops the run with an error naming it")
    report_to: str = option("none", "experiment trackers besides metrics.jsonl, comma-separated: none, tensorboard, "
                            "wandb, trackio (offline: WANDB_MODE=offline, trackio's local store)")
    push_to_hub: str = option("", "after training, upload the adapter folder to this Hugging Face Hub repo id")
    hub_private: bool = option(False, "--push-to-hub: create the repo private")
    progress: bool = option(True, "show a progress bar")


# ---------------------------------------------------------------------------------------------
# Parsing.


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null", ""}):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in choices:
            raise ConfigError(f"{where}: '{value}' is not one of {', '.join(choices)}{_suggest(text, list(choices))}")
        return text
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where}: expected true or false, got '{value}'")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got '{value}'")
        try:
            number = float(value) if isinstance(value, str) and ("e" in value.lower()) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got '{value}'") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got '{value}'")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got '{value}'") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin is list:
        (item_tp,) = get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got '{value}'")
        return [coerce(item_tp, v, where) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got '{value}'")
        return value
    raise ConfigError(f"{where}: unsupported option type {tp}")


# ---------------------------------------------------------------------------------------------
# Validation: one pass over every option before any work (command line, YAML, pipeline sections).


@dataclasses.dataclass(frozen=True)
class Bound:
    """Allowed values of a number: ``low`` <= value <= ``high`` (or < where ``open_low``/``open_high``)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.open_high and value == self.high)))

    def describe(self) -> str:
        if self.high is None:
            return f"must be > {self.low:g}" if self.open_low else f"must be at least {self.low:g}"
        if self.low is None:
            return f"must be < {self.high:g}" if self.open_high else f"must be at most {self.high:g}"
        return f"must be in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


COUNT = Bound(1)
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, open_low=True)
FRACTION = Bound(0, 1, open_high=True)
UNIT = Bound(0, 1)

# Bounds by option name; "Class.option" where one command means something else by the same name.
# Every float must also be finite, bounded or not.
BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(("batch_size", "gradient_accumulation_steps", "rollouts_per_step", "generation_batch_size",
                     "ppo_epochs", "lora_r", "num_virtual_tokens", "seq_length", "max_length", "max_prompt_length",
                     "max_new_tokens", "max_tokens", "logging_steps", "samples", "stats_pairs",
                     "max_body_bytes"), COUNT),
    **dict.fromkeys(("max_steps", "warmup_steps", "eval_steps", "save_steps", "save_total_limit", "weight_decay",
                     "max_grad_norm", "samples_to_log", "side_by_side", "top_k", "reward_clip", "kl_coef",
                     "vf_coef", "target_kl", "workers", "max_chars", "max_queue"), NON_NEGATIVE),
    **dict.fromkeys(("learning_rate", "adam_eps", "epochs", "lora_alpha", "beta", "cliprange", "cliprange_value",
                     "kl_target", "kl_horizon", "repetition_penalty", "temperature"), POSITIVE),
    **dict.fromkeys(("eval_fraction", "lora_dropout"), FRACTION),
    **dict.fromkeys(("gamma", "lam"), UNIT),
    "top_p": Bound(0, 1, open_low=True),
    "label_smoothing": Bound(0, 0.5, open_high=True),
    "port": Bound(0, 65535),
    "ChatConfig.temperature": NON_NEGATIVE,  # 0: greedy decoding (PPO and evaluation divide logits by it)
}

DATA = "a data file or folder, or a hub dataset id org/name"
ADAPTER = "an adapter folder"
MODEL = "a local Hugging Face model folder"
SERVED = "a model or adapter directory"
# Options naming something that must exist before any work: (kind, what it should be). Kinds:
# "data" and "model" also accept hub ids (pocketrlhf.paths), "local" does not; None: the command
# checks it itself, with its own words (plan reads only config.json, merge names the adapter).
PATHS: dict[str, tuple[str, str] | None] = {
    **dict.fromkeys(("data", "eval_data", "prompts", "eval_prompts", "input"), ("data", DATA)),
    **dict.fromkeys(("sft_adapter", "reward_adapter", "init_adapter", "policies"), ("local", ADAPTER)),
    **dict.fromkeys(("model", "base"), ("model", MODEL)),
    **dict.fromkeys(("ChatConfig.model", "ServeConfig.model"), ("model", SERVED)),
    "reward_function": ("function", "a Python file"),
    "stackexchange": ("data", "a Posts.xml dump, a folder holding one, or a paired dataset"),
    "PlanConfig.model": None,
    "PipelineConfig.data": None,  # the options of the data stage, not a dataset
}

# Options a command cannot run without, by config class (the pipeline supplies them to its stages).
REQUIRED: dict[str, tuple[str, ...]] = {
    "SFTConfig": ("model", "data"),
    "RMConfig": ("model", "data"),
    "DPOConfig": ("model", "data"),
    "PPOConfig": ("model", "prompts"),
    "EvaluationConfig": ("model", "prompts", "sft_adapter"),
}
_REQUIRED_WHAT = {"model": MODEL, "data": "a data file or folder", "prompts": "a prompts file or folder",
                  "sft_adapter": "the SFT adapter folder"}


def _rule(table: dict, cls: type, name: str) -> Any:
    return table.get(f"{cls.__name__}.{name}", table.get(name))


def _missing_path(kind: str, value: str) -> str | None:
    """The part of ``value`` that should exist and does not, or None."""
    if kind == "function":  # file.py:function; module:function is imported later
        target = value.rpartition(":")[0]
        return target if target.endswith(".py") and not Path(target).expanduser().is_file() else None
    if kind == "local":
        return None if Path(value).expanduser().exists() else value
    return value if missing_local(value, dataset=kind == "data") else None


def check_paths(cfg: Any, label: Callable[[str], str], names: typing.Iterable[str] | None = None) -> None:
    """Every path option (or those in ``names``) that must exist does, else one ConfigError naming it."""
    fields_ = config_fields(type(cfg))
    for name in fields_ if names is None else [n for n in names if n in fields_]:
        rule = _rule(PATHS, type(cfg), name)
        value = getattr(cfg, name)
        if rule is None or not value:
            continue
        kind, what = rule
        for item in value.values() if isinstance(value, dict) else [value]:
            missing = _missing_path(kind, str(item)) if isinstance(item, (str, Path)) and str(item) else None
            if missing:
                where = label(name)
                raise ConfigError(f"{where + ' ' if where else ''}{missing} does not exist (expected {what})")


def validate(cfg: Any, label: Callable[[str], str], paths: bool = True, required: bool = True) -> None:
    """One pass over a built config: number ranges, paths that must exist, then required options.

    ``label(name)`` says where an option came from (``--batch-size``, ``run.yaml: sft: batch_size``,
    or "" for a positional), so the one-line error points at what to change.
    """
    cls = type(cfg)
    for name in config_fields(cls):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label(name)} must be a finite number, got {value}")
        bound = _rule(BOUNDS, cls, name)
        if bound is not None and not bound.allows(value):
            raise ConfigError(f"{label(name)} {bound.describe()}, got {value}")
    if paths:
        check_paths(cfg, label)
    for name in REQUIRED.get(cls.__name__, ()) if required else ():
        if not getattr(cfg, name):
            raise ConfigError(f"{label(name)} is required ({_REQUIRED_WHAT[name]})")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def from_dict(cls: type, data: dict, source: str = "config", base: Any = None, check_paths: bool = True) -> Any:
    """Build (or update ``base``) from a mapping, checking every key and value (``validate``).

    ``check_paths=False`` leaves out the existence of paths: a pipeline wires each stage to the
    outputs of the stages before it, which do not exist yet when every section is checked.
    """
    cfg = _build(cls, data, source, base)
    validate(cfg, lambda name: f"{source}: {name}", paths=check_paths)
    return cfg


def _build(cls: type, data: dict, source: str, base: Any = None) -> Any:
    fields_ = config_fields(cls)
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields_:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(name, list(fields_))}")
        values[name] = coerce(fields_[name].type, value, f"{source}: {name}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_args(cls: type, argv: list[str], positional: tuple[str, ...] = ()) -> Any:
    """``[positional...] [--config FILE] [--key value | --key=value | --flag | --no-flag]...``"""
    fields_ = config_fields(cls)
    flags: dict[str, Any] = {}
    positionals: list[str] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            positionals.append(arg)
            i += 1
            continue
        key, eq, inline = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name == "config":
            if not eq and i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file")
            config_file = inline if eq else argv[i + 1]
            i += 1 if eq else 2
            continue
        negated = False
        if name not in fields_ and name.startswith("no_") and name[3:] in fields_:
            name, negated = name[3:], True
        if name not in fields_:
            close = difflib.get_close_matches(name, list(fields_), n=1, cutoff=0.5)
            hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        tp, _ = _strip_optional(fields_[name].type)
        if tp is bool and not eq:
            nxt = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if not negated and nxt in _TRUE | _FALSE:
                flags[name] = coerce(bool, nxt, f"--{key}")
                i += 2
            elif not negated and nxt and not nxt.startswith("--") and len(positionals) >= len(positional):
                # No positional is left to fill, so the word can only have been meant as the flag's value.
                raise ConfigError(f"--{key}: expected true or false, got '{argv[i + 1]}'")
            else:
                flags[name] = not negated
                i += 1
            continue
        if eq:
            raw = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            raw = argv[i + 1]
            i += 2
        value = coerce(fields_[name].type, raw, f"--{key}")
        if get_origin(tp) is list and isinstance(flags.get(name), list):
            value = flags[name] + value  # a list option given twice (--reward-function a --reward-function b)
        flags[name] = value
    if len(positionals) > len(positional):
        extra = positionals[len(positional)]
        raise ConfigError(f"unexpected argument '{extra}'")
    for name, value in zip(positional, positionals):
        if name == "config":  # `pocketrlhf pipeline run.yaml`: the positional is the YAML file itself
            config_file = value
            continue
        flags[name] = coerce(fields_[name].type, value, name)
    cfg = cls()
    from_yaml: set[str] = set()
    if config_file:
        data = read_yaml(config_file)
        from_yaml = {str(k).replace("-", "_") for k in data}
        cfg = _build(cls, data, str(config_file), base=cfg)
    values = dataclasses.asdict(cfg)
    values.update(flags)
    try:
        result = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    given = dict(zip(positional, positionals))

    def label(name: str) -> str:
        if name in given:
            return ""  # a positional: its value alone reads best ("runs/x does not exist ...")
        if name in from_yaml and name not in flags:
            return f"{config_file}: {name}"
        return flag(name)

    validate(result, label)
    if config_file:
        result._config_file = str(config_file)  # lets commands name the file in later errors
    result._given = frozenset(flags) | frozenset(from_yaml)
    return result


def given_options(cfg: Any) -> frozenset[str]:
    """The options a user set on the command line or in the YAML file (empty for a config built in
    code): a default that does not apply may be changed with a note, a choice made must not be."""
    return getattr(cfg, "_given", frozenset())


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))


def help_text(cls: type, command: str, summary: str, positional: tuple[str, ...] = ()) -> str:
    lines = [f"usage: pocketrlhf {command} {' '.join(p.upper() for p in positional)} [--config FILE] [--option value ...]".replace("  ", " "),
             "", summary, "", "options (also valid as YAML keys, with underscores):"]
    for name, f in config_fields(cls).items():
        tp, _ = _strip_optional(f.type)
        if get_origin(tp) is Literal:
            kind = "|".join(get_args(tp))
        else:
            kind = getattr(tp, "__name__", str(tp))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{name.replace('_', '-'):<28} {kind:<18} default: {default!r}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
