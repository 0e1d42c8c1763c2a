"""The output-layer kernel of response_logprobs (log_softmax over chunks of rows, optional logits
recomputation in backward): values, entropy and gradients equal a plain full-logits computation."""

import pytest
import torch

from pocketrlhf.models import forward
from pocketrlhf.models.adapters import attach_adapter, make_peft_config
from pocketrlhf.models.loading import load_base


@pytest.fixture(scope="module")
def policy(llama):
    torch.manual_seed(0)
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("lora", r=4))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter (and its gradients' path) non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def reference(model, ids, response_mask, temperature):
    """log p(x_t | x_<t) and entropy from the model's own full logits, in float64."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    keep = response_mask[:, 1:].double()
    zero = torch.zeros(ids.shape[0], 1, dtype=torch.float64)
    return torch.cat([zero, lp * keep], 1), torch.cat([zero, ent * keep], 1)


def trainable_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("recompute", [False, True])
def test_logprobs_entropy_and_gradients_match_full_logits(policy, monkeypatch, temperature, recompute):
    if recompute:  # the large-vocabulary path: small chunks whose logits are recomputed in backward
        monkeypatch.setattr(forward, "_RECOMPUTE_LOGITS_ABOVE", 0)
        monkeypatch.setattr(forward, "_CHUNK_ROWS", 7)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    response = torch.ones_like(ids)
    response[:, :5] = 0  # a prompt: no log-probs there

    out = forward.response_logprobs(policy, ids, mask, response, temperature=temperature, return_entropy=True)
    (out.logprobs * torch.linspace(0.5, 1.5, ids.shape[1])).sum().backward()
    ours = trainable_grads(policy)

    ref_lp, ref_ent = reference(policy, ids, response, temperature)
    (ref_lp * torch.linspace(0.5, 1.5, ids.shape[1]).double()).sum().backward()
    theirs = trainable_grads(policy)

    assert torch.allclose(out.logprobs.double(), ref_lp, atol=1e-5)
    assert torch.allclose(out.entropy.double(), ref_ent, atol=1e-5)
    assert not out.entropy.requires_grad
    assert (out.logprobs[:, :5] == 0).all() and (out.logprobs[:, 5:] < 0).all()
    assert any(g.abs().max() > 1e-3 for g in theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-3)
