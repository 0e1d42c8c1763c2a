"""Optimizers by name: the AdamW variants (torch, bitsandbytes) and a few from the maintained
pytorch-optimizer package (an optional extra: ``pip install 'pocketrlhf[optimizers]'``).

What this file owns besides construction is what those optimizers ask of a training loop:

- SophiaH estimates the Hessian diagonal with Hutchinson's trick, ``autograd.grad(grads, params, z)``,
  which needs the gradients to carry their graph: the backward of every micro-batch of a step that
  refreshes the estimate (every ``update_period`` steps) runs with ``create_graph=True``
  (``needs_hessian``). Those steps hold the graph of the gradients too (more memory, slower).
- Schedule-free AdamW trains on one sequence of weights (y) and evaluates on another (x, the
  average): ``eval_weights`` switches to x around evaluation and saving and back after, the same way
  in a run and in its resumption, so a resumed run continues bit for bit (``after_resume``).
- Adam-mini wants named parameters (it treats embeddings and attention blocks specially); LoRA
  parameters are none of those, so each tensor gets one second-moment scalar: half AdamW's state.

Must not import training code (stages): the planner reads ``STATE_BYTES``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Iterator, Literal

from pocketrlhf.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where an optimizer is built: config.py reads the names without it
    import torch

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sophia", "lion", "adafactor",
                        "schedulefree_adamw", "adam_mini"]
# Our name -> the class in pytorch_optimizer.
EXTRA = {"sophia": "SophiaH", "lion": "Lion", "adafactor": "AdaFactor", "schedulefree_adamw": "ScheduleFreeAdamW",
         "adam_mini": "AdamMini"}
INSTALL = "pip install 'pocketrlhf[optimizers]'"
# Optimizer state, bytes per trained parameter (fp32 state unless said): the planner's table.
STATE_BYTES = {
    "adamw": 8.0, "paged_adamw": 8.0,  # two moments
    "sophia": 12.0,  # momentum, Hessian moment, and the latest Hessian estimate
    "lion": 4.0,  # one momentum
    "adafactor": 2.25,  # bf16 momentum + a factored second moment (rows + columns: 4/r bytes for LoRA at rank r=16)
    "schedulefree_adamw": 8.0,  # z and the second moment (no first moment)
    "adam_mini": 4.0,  # the first moment; one second-moment scalar per tensor
}


def uses_bitsandbytes(name: str, adapter_dtype: str = "float32") -> bool:
    """Whether ``build`` makes a bitsandbytes optimizer for adapters of ``adapter_dtype``: the 8-bit
    and paged ones, and AdamW on 16-bit weights. Their fused kernels take plain tensors only, not
    FSDP's sharded DTensors."""
    return name in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit") or (name == "adamw" and adapter_dtype != "float32")


def build(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, eps: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (paged ones are resolved by the caller)."""
    import torch

    kwargs = dict(lr=lr, weight_decay=weight_decay, eps=eps)
    if name == "adamw" and any(p.dtype != torch.float32 for p in params):
        import bitsandbytes as bnb

        # 16-bit adapters (--adapter-dtype): torch's AdamW would keep its moments in the weights'
        # dtype, where 0.999 * v rounds back to v; bitsandbytes' 32-bit AdamW keeps fp32 moments
        # for any weight dtype and updates the weight in place (no fp32 master copy, as QLoRA).
        return bnb.optim.AdamW(params, optim_bits=32, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
        return cls(params, **kwargs)
    if name not in EXTRA:
        raise ConfigError(f"unknown optimizer '{name}' (one of {', '.join(OptimizerName.__args__)})")
    try:
        import pytorch_optimizer
    except ImportError:
        raise ConfigError(f"--optimizer {name} needs the pytorch-optimizer package: {INSTALL}") from None
    cls = getattr(pytorch_optimizer, EXTRA[name])
    if name == "sophia":
        # Every step that refreshes the Hessian backpropagates with create_graph=True; the loop drops the
        # gradients (set_to_none) after each step, which is the cycle torch warns about.
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        # p clips m/h per element at 1, as in the Sophia paper: lr is then the largest step per element,
        # as with Adam, and the learning rates of AdamW runs carry over. (The package's default, 0.01 with
        # lr 0.06, is the same bound spelled differently.) eps here is a floor on h, not Adam's epsilon.
        return _guarded_sophia(cls)(params, lr=lr, weight_decay=weight_decay, p=1.0)
    if name == "lion":
        return cls(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        # The given learning rate, not Adafactor's own relative step size: the schedule stays ours.
        return cls(params, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False,
                   warmup_init=False)
    if name == "schedulefree_adamw":
        return cls(params, lr=lr, weight_decay=weight_decay, eps=eps)
    # adam_mini builds its groups from named_parameters(): our trained tensors, under neutral names.
    named = torch.nn.Module()
    named.trained = torch.nn.ParameterList(params)
    return cls(named, lr=lr, weight_decay=weight_decay, eps=eps)


def _guarded_sophia(cls: type) -> type:
    class SophiaH(cls):
        """SophiaH that names the problem when a Hessian step finds gradients without their graph (a
        stage whose backward does not ask for it) instead of autograd's bare error."""

        def step(self, closure=None, hessian=None):
            if closure is None and hessian is None and self.param_groups[0].get("step", 0) % self.update_period == 0:
                grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
                if grads and all(grad.grad_fn is None for grad in grads):
                    raise ConfigError("--optimizer sophia: this stage's backward kept no graph for the Hessian estimate "
                                      "(sft, rm and dpo keep it; ppo does not yet): choose another optimizer")
            return super().step(closure, hessian)

    return SophiaH


def needs_hessian(optimizer: torch.optim.Optimizer, step: int) -> bool:
    """Whether the backward passes of optimizer step ``step`` (0-based) must keep their graph: the
    steps where SophiaH refreshes its Hessian estimate (it decides from its own step counter)."""
    if type(optimizer).__name__ != "SophiaH" or not hasattr(optimizer, "update_period"):
        return False
    done = optimizer.param_groups[0].get("step", 0)
    return done % optimizer.update_period == 0


def hessian_pass(due: bool):
    """Where the forward and backward of a Hessian step run: PyTorch's fused attention kernels (flash,
    memory-efficient) have no second derivative, so such steps use the math kernel (slower, more memory)."""
    if not due:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.param_groups[0]


@contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Schedule-free optimizers: the averaged weights inside (to evaluate or save), the training ones
    after. Other optimizers: nothing happens."""
    if not is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield  # nothing to switch, or already on the averaged weights (after to_eval): stay there
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def to_eval(optimizer: torch.optim.Optimizer) -> None:
    """For the end of training: the weights evaluated and saved last are the averaged ones."""
    if is_schedule_free(optimizer):
        optimizer.eval()


def after_resume(optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint saved inside ``eval_weights`` holds the averaged weights and an optimizer state
    marked as evaluating: switch back to the training weights, as the interrupted run did."""
    if is_schedule_free(optimizer):
        optimizer.train()
