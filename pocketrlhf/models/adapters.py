"""peft adapters on a frozen base: create, save (peft format + tokenizer), load, switch.

Several adapters live on ONE base in memory (policy, reference copy, value, reward). peft's
``set_adapter`` also rewrites requires_grad (it freezes every adapter but the active one), so
switching goes through ``AdapterSet.use`` which switches and then restores our own trainability.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch

from pocketrlhf.errors import ModelLoadError
from pocketrlhf.models.spec import BaseSpec

log = logging.getLogger("pocketrlhf")

ADAPTER_CONFIG = "adapter_config.json"
PROMPT_LEARNING = {"prompt_tuning", "prefix_tuning"}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(path: str | Path) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path``)."""
    if not is_adapter_dir(path):
        raise ModelLoadError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    return cfg.get("base_model_name_or_path") or ""


def adapter_base(adapter_dir: str | Path, override: str = "", flag: str = "--base") -> str:
    """The base model to load an adapter on: ``override`` (the user's ``flag``), else the one it
    was trained on, which must exist here when it is a local path (the hub is never asked)."""
    from pocketrlhf.paths import missing_local

    if override:
        return override
    try:
        base = adapter_base_path(adapter_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {Path(adapter_dir) / ADAPTER_CONFIG}: {e}") from None
    if not base:
        raise ModelLoadError(f"{Path(adapter_dir) / ADAPTER_CONFIG} records no base model (base_model_name_or_path); "
                             f"pass {flag} DIR")
    if missing_local(base):
        raise ModelLoadError(f"adapter {adapter_dir} was trained on {base}, which does not exist here; "
                             f"pass {flag} DIR to use another copy of that base model")
    return base


def make_peft_config(
    method: str,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    target_modules: str = "all-linear",
    num_virtual_tokens: int = 16,
    total_steps: int = 1000,
    task_type: str = "CAUSAL_LM",
):
    import peft

    targets: str | list[str] | None
    if target_modules.strip() in ("", "all-linear"):
        targets = "all-linear"
    else:
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    common = dict(task_type=task_type)
    if method == "lora":
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", **common)
    if method == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets, **common)
    if method == "adalora":
        # AdaLoRA prunes rank on a schedule measured in optimizer steps.
        total = max(total_steps, 3)
        return peft.AdaLoraConfig(
            init_r=r, target_r=max(1, r // 2), lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
            total_step=total, tinit=max(1, total // 10), tfinal=max(1, total // 10), **common,
        )
    if method == "ia3":
        # IA3 also needs to know which targets are feed-forward layers; peft knows them per
        # architecture when targets are left to it.
        ia3_targets = None if targets == "all-linear" else targets
        kwargs = {} if ia3_targets is None else {"target_modules": ia3_targets, "feedforward_modules": []}
        return peft.IA3Config(**kwargs, **common)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, **common)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, **common)
    raise ValueError(f"unknown adapter method '{method}'")


ADAPTER_SCOPES = ("all", "decoder")


def encoder_exclusion(model: torch.nn.Module) -> str:
    """A peft ``exclude_modules`` pattern matching every module of the encoder of ``model`` (a
    transformers encoder-decoder), whatever the family calls it (T5: ``encoder.``, BART:
    ``model.encoder.``; BART's cross-attention ``encoder_attn`` sits in the decoder and stays)."""
    encoder = model.get_encoder()
    prefix = next(name for name, module in model.named_modules() if module is encoder)
    return re.escape(prefix) + r"(\..*)?"


def attach_adapter(model: torch.nn.Module, peft_config, name: str = "default", scope: str = "all"):
    """Add a fresh trainable adapter. ``model`` may be a plain transformers model or a PeftModel.

    The peft task type follows the base: SEQ_2_SEQ_LM on an encoder-decoder (``is_seq2seq``), where
    ``all-linear`` adapts encoder and decoder alike (T5: q, k, v, o, wi_0, wi_1, wo; BART: q/k/v/out_proj,
    fc1, fc2), the output layer excepted. ``scope="decoder"`` keeps the adapter out of the encoder:
    the encoder stays the base's, so every role reads one encoder pass (``forward.encoder_reuse``)."""
    import peft

    from pocketrlhf.models.loading import is_seq2seq

    if scope not in ADAPTER_SCOPES:
        raise ModelLoadError(f"--adapter-scope {scope}: choose one of {', '.join(ADAPTER_SCOPES)}")
    if is_seq2seq(model):
        if peft_config.is_prompt_learning:
            method = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower()
            raise ModelLoadError(f"--adapter {method} is not supported on an encoder-decoder base yet; use lora, "
                                 "loha, lokr, adalora or ia3")
        peft_config.task_type = "SEQ_2_SEQ_LM"
        if scope == "decoder":
            from pocketrlhf.models.forward import unwrap

            peft_config.exclude_modules = encoder_exclusion(unwrap(model)[1])
    elif scope != "all":
        from pocketrlhf.config import adapter_scope_on_causal_lm

        raise ModelLoadError(adapter_scope_on_causal_lm(scope, "this base"))
    try:
        with warnings.catch_warnings():
            # peft reads attributes transformers 5 deprecates: notices no user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            if isinstance(model, peft.PeftModel):
                model.add_adapter(name, peft_config)
                return model
            return peft.get_peft_model(model, peft_config, adapter_name=name)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "not found in the base model" in msg or "Target module" in msg:
            raise ModelLoadError(f"adapter target modules do not exist in this base model: {msg}") from None
        raise
    except TypeError as e:
        if "not supported" in str(e):
            method = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower()
            raise ModelLoadError(f"peft's {method} cannot adapt this architecture's layers ({e}); "
                                 "try --adapter lora, adalora or ia3") from None
        raise


def _describe_mismatch(err: Exception, path: str) -> str:
    text = str(err)
    m = re.search(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from checkpoint, "
                  r"the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
    if m:
        return (f"adapter {path} does not match this base model: {m.group(1)} has shape {m.group(2)} in the adapter "
                f"but {m.group(3)} in the base (was it trained on another model?)")
    return f"adapter {path} does not match this base model: {text.splitlines()[0]}"


def load_adapter(model: torch.nn.Module, path: str | Path, name: str = "default", trainable: bool = False):
    """Load a saved peft adapter onto ``model`` (plain or PeftModel); errors clearly on a mismatch."""
    import peft

    path = str(path)
    if not is_adapter_dir(path):
        raise ModelLoadError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{path} has no adapter_model.safetensors (pocketrlhf loads safetensors only)")
    try:
        with warnings_as_errors_for_missing_keys():
            if isinstance(model, peft.PeftModel):
                result = model.load_adapter(path, adapter_name=name, is_trainable=trainable)
            else:
                model = peft.PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=trainable)
                result = None
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(_describe_mismatch(e, path)) from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ModelLoadError(f"adapter {path} does not match this base model: unexpected weights such as {unexpected[0]}")
    return model


@contextlib.contextmanager
def warnings_as_errors_for_missing_keys() -> Iterator[None]:
    """peft only warns when an adapter's weights find no layer to load into; we refuse. Other
    warnings pass through, but for library deprecation notices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        lowered = text.lower()
        if "missing adapter keys" in lowered or ("unexpected" in lowered and "key" in lowered):
            raise ValueError(text)
        if issubclass(w.category, FutureWarning):
            continue  # as in attach_adapter: deprecations raised inside peft
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def save_adapter(model, path: str | Path, name: str = "default", tokenizer=None) -> Path:
    """Write one adapter in peft's format (adapter_config.json + adapter_model.safetensors) plus tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Under FSDP with sharded adapters, stages.common.whole_trainable has gathered them whole here.
    whole = getattr(model, "_pocketrlhf_full_state", None)
    model.save_pretrained(str(path), selected_adapters=[name], safe_serialization=True,
                          **({"state_dict": whole} if whole is not None else {}))
    nested = path / name
    if name != "default" and nested.is_dir():
        # peft nests non-default adapters in a sub-folder; keep one adapter per directory.
        for f in nested.iterdir():
            f.replace(path / f.name)
        nested.rmdir()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class AdapterSet:
    """Switch the active adapter of a PeftModel without peft touching requires_grad."""

    def __init__(self, model):
        self.model = model
        self._layers: tuple[int, list] | None = None  # (adapter count, LoRA-style layers) for fast disabling

    def _snapshot(self) -> list[tuple[torch.nn.Parameter, bool]]:
        return [(p, p.requires_grad) for p in self.model.parameters()]

    def _plain_layers(self) -> list | None:
        """The tuner layers when every adapter is LoRA-style (flag-switched in each layer, no
        virtual tokens, no modules_to_save copies) and none is merged; else None."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        configs = getattr(self.model, "peft_config", {})
        if any(c.is_prompt_learning or c.is_adaption_prompt for c in configs.values()):
            return None
        if self._layers is None or self._layers[0] != len(configs):  # a new adapter may wrap new layers
            found = [m for m in self.model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
            plain = not any(isinstance(m, AuxiliaryTrainingWrapper) for m in found)
            self._layers = (len(configs), found if plain else None)
        layers = self._layers[1]
        if layers is None or any(m.merged for m in layers):
            return None
        return layers

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the body with adapter ``name`` active, or with every adapter disabled when None."""
        if name is None:
            layers = self._plain_layers()
            if layers is None or any(m.disable_adapters for m in layers):
                if layers and all(m.disable_adapters for m in layers):  # already off (nested): nothing to do
                    yield
                    return
                with self.model.disable_adapter():
                    yield
                return
            # What peft's disable_adapter does for LoRA, without its model-wide status scan (two
            # passes over every module and parameter, per call: a third of a small model's reference
            # pass) and without touching requires_grad (nothing runs through disabled adapters).
            was_disabled = getattr(self.model, "_adapters_disabled", False)
            for m in layers:
                m._disable_adapters = True
            self.model._adapters_disabled = True
            try:
                yield
            finally:
                for m in layers:
                    m._disable_adapters = False
                self.model._adapters_disabled = was_disabled
            return
        previous = self.model.active_adapter
        if previous == name:
            yield
            return
        flags = self._snapshot()
        self.model.set_adapter(name)
        for p, flag in flags:
            p.requires_grad_(flag)
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            for p, flag in flags:
                p.requires_grad_(flag)


def load_adapter_weights(model, directory: str | Path, name: str = "default") -> None:
    """Overwrite adapter ``name``'s weights from a saved adapter folder (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication

    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
    # Adapters sharded by FSDP: each process copies its own part of the whole saved weight.
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    with implicit_replication() if sharded else contextlib.nullcontext():
        result = set_peft_model_state_dict(model, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ModelLoadError(f"{directory}: weights do not fit adapter '{name}' ({result.unexpected_keys[0]})")


ADAPTER_INFO = "pocketrlhf_adapter.json"


def write_adapter_info(directory: str | Path, **info) -> None:
    """What chat/serve/PPO need to use an adapter as it was trained (stage, prompt format, base)."""
    (Path(directory) / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str))


def read_adapter_info(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_spec(directory: str | Path, **overrides) -> BaseSpec | None:
    """How the base was loaded when this adapter was trained (None if it does not say)."""
    return BaseSpec.from_record(read_adapter_info(directory), **overrides)


def spec_mismatch(directory: str | Path, used: BaseSpec) -> str | None:
    """A warning when ``used`` quantizes the base otherwise than the adapter's training did."""
    recorded = recorded_spec(directory)
    if recorded is None:
        return None
    fields = ("quantization",) + (("quant_type", "double_quant") if recorded.quantization == used.quantization == "4bit"
                                  else ())
    if all(getattr(recorded, f) == getattr(used, f) for f in fields):
        return None
    return (f"adapter {directory} was trained on a {recorded.describe()} base but is used on a {used.describe()} one: "
            "its outputs may differ from training")


# ---------------------------------------------------------------------------------------------
# A lighter LoRA forward


def _lora_kind(module) -> str | None:
    """'dense' for peft's lora.Linear, 'bnb' for its 8/4-bit bitsandbytes layers (which cast the
    LoRA output to the base's dtype before adding it), None for any other tuner layer."""
    from peft.tuners.lora import layer as lora_layer

    if type(module) is lora_layer.Linear:
        return "dense"
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # pragma: no cover - bitsandbytes absent
        return None
    kinds = tuple(getattr(lora_bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(lora_bnb, n))
    return "bnb" if kinds and type(module) in kinds else None


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain LoRA linear layer of ``model`` a lighter forward; returns how many.

    peft runs ``result + lora_B(lora_A(dropout(x))) * scaling``: three submodule calls and two
    elementwise passes over the layer's full output (the scaling and the add, and the scaling
    again in backward), plus its per-call checks. With one active adapter and no dropout this
    runs ``x A^T`` and then ``result + scaling * (x A^T) B^T`` as ONE addmm (the add and the
    scaling inside the matrix product; its backward scales only the rank-r products): the same
    sum up to float rounding, two fewer passes over every adapted layer's output in forward and
    one in backward. Adapters stay separate from the base weights (nothing is merged). Anything
    else (adapters disabled or merged, several active, dropout on, DoRA and other variants, a
    LoRA bias, mixed-adapter batches, autocast) goes through peft's own forward."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer) or getattr(module, "_pocketrlhf_fused", False):
            continue
        kind = _lora_kind(module)
        if kind is None:
            continue
        module.forward = _fused_forward(module, module.forward, kind)
        module._pocketrlhf_fused = True
        count += 1
    return count


def _fused_forward(module, peft_forward, kind: str):
    from torch.nn.functional import linear

    def forward(x, *args, **kwargs):
        if module.disable_adapters and not module.merged_adapters and not args and not kwargs:
            return module.base_layer(x)  # adapters off (a reference pass): the base alone
        name = module.active_adapter  # a name, or a list of names after set_adapter
        if not isinstance(name, str) and len(name) == 1:
            name = name[0]
        if (args or kwargs or module.disable_adapters or module.merged_adapters or not isinstance(name, str)
                or name not in module.lora_A or name in module.lora_variant or module.lora_bias.get(name)
                or torch.is_autocast_enabled(x.device.type)):
            return peft_forward(x, *args, **kwargs)
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, torch.nn.Identity) and dropout.training and dropout.p > 0:
            return peft_forward(x, *args, **kwargs)
        a, b, scaling = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
        result = module.base_layer(x)
        if getattr(module, "cast_input_dtype_enabled", True) and x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = linear(x, a)
        if result.dtype == h.dtype:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
            return flat.view(result.shape)
        delta = linear(h, b) * scaling  # peft's order of operations when the base computes in another dtype
        return result + delta.to(result.dtype) if kind == "bnb" else (result + delta).to(result.dtype)

    return forward
