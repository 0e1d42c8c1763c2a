"""models.adapters.fuse_lora_layers: a lighter forward for plain LoRA layers (one addmm for the
low-rank update), the same outputs and gradients as peft's forward up to float rounding; peft's
own forward wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

from pocketrlhf.models.adapters import AdapterSet, attach_adapter, fuse_lora_layers, make_peft_config
from pocketrlhf.models.forward import response_logprobs
from pocketrlhf.models.loading import load_base


def _model(path, quantization: str = "none", dtype: str = "auto", dropout: float = 0.0, scale: float = 32.0):
    model = attach_adapter(load_base(str(path), quantization, device="cpu", dtype=dtype),
                           make_peft_config("lora", r=4, alpha=scale, dropout=dropout), "policy")
    model = attach_adapter(model, make_peft_config("lora", r=4, alpha=scale, dropout=dropout), "other")
    model.set_adapter("policy")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and ".policy." in name)
    return model


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
    attn = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    resp = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    return ids, attn, resp


def _logprobs_and_grads(model):
    ids, attn, resp = _batch()
    model.zero_grad(set_to_none=True)
    lp = response_logprobs(model, ids, attn, resp).logprobs
    (lp * resp).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


@pytest.mark.parametrize("quantization,dtype,scale,tolerance", [
    ("none", "auto", 32.0, 1e-5),  # scaling 8 (a power of two)
    ("none", "auto", 12.0, 1e-5),  # scaling 3
    ("none", "bfloat16", 32.0, 2e-2),  # bf16 base, fp32 adapter: the update is added in fp32 as peft does
    ("4bit", "auto", 32.0, 1e-4),
])
def test_fused_lora_gives_peft_numbers(digits, quantization, dtype, scale, tolerance):
    model = _model(digits["model"], quantization, dtype, scale=scale)
    before, grads_before = _logprobs_and_grads(model)
    kind = type(next(m for n, m in model.named_modules() if n.endswith("q_proj")))
    calls, peft_forward = [], kind.forward
    kind.forward = lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k)
    try:
        layers = fuse_lora_layers(model)
        assert layers == 2 * 7  # the 7 linears of each of the 2 decoder layers, once (the second adapter wraps none)
        assert fuse_lora_layers(model) == 0  # already done
        after, grads_after = _logprobs_and_grads(model)
    finally:
        kind.forward = peft_forward
    assert not calls  # every layer ran the fused forward
    assert grads_before.keys() == grads_after.keys() and len(grads_after) == 2 * 7 * 2
    assert torch.allclose(after, before, atol=tolerance), (after - before).abs().max()
    for name, g in grads_before.items():
        # Rounding is relative to the gradient's scale (a tiny entry of a large gradient moves by
        # more than 1e-3 of itself when two threads sum in another order).
        assert torch.allclose(grads_after[name], g, rtol=1e-3, atol=tolerance * 0.1 * max(1.0, g.abs().max().item())), \
            name
    adapters = AdapterSet(model)
    with torch.no_grad(), adapters.use(None):  # adapters off: the base alone
        off = response_logprobs(model, *_batch()).logprobs
    with torch.no_grad(), adapters.use("other"):  # switching adapters still switches them
        other = response_logprobs(model, *_batch()).logprobs
    plain = load_base(str(digits["model"]), quantization, device="cpu", dtype=dtype)
    with torch.no_grad():
        assert torch.allclose(off, response_logprobs(plain, *_batch()).logprobs, atol=1e-6)
    assert not torch.allclose(other, after, atol=1e-3) and not torch.allclose(off, after, atol=1e-3)


def test_fused_lora_leaves_what_it_does_not_cover_to_peft(digits):
    """Dropout on while training, several active adapters, merged adapters: peft's forward runs."""
    from peft.tuners.lora import Linear

    calls = []
    peft_forward = Linear.forward
    Linear.forward = lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k)
    try:
        model = _model(digits["model"], dropout=0.5)
        fuse_lora_layers(model)  # falls back to the forward peft's layers have now, which counts its calls
        ids, attn, resp = _batch()
        model.train()
        response_logprobs(model, ids, attn, resp)
        assert calls  # dropout is active: peft's forward (which applies it)
        calls.clear()
        model.eval()
        with torch.no_grad():
            fused = response_logprobs(model, ids, attn, resp).logprobs
        assert not calls  # dropout off in eval: the fused forward
        model.base_model.set_adapter(["policy", "other"])
        with torch.no_grad():
            both = response_logprobs(model, ids, attn, resp).logprobs
        assert calls and not torch.allclose(both, fused, atol=1e-4)  # two active adapters: peft's sum of both
        calls.clear()
        model.base_model.set_adapter("policy")
        model.merge_adapter(["policy"])
        with torch.no_grad():
            merged = response_logprobs(model, ids, attn, resp).logprobs
        assert calls and torch.allclose(merged, fused, atol=1e-5)  # merged (fp32 here): peft's base-only forward
    finally:
        Linear.forward = peft_forward
