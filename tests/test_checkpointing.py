"""--reentrant-checkpointing: the same gradients as the default (non-reentrant) checkpointing on an
8-bit base, and refused where it is untested (several processes). Its memory: tests/test_plan.py."""

from __future__ import annotations

import pytest
import torch

from pocketrlhf.errors import ConfigError


def gradients(model_dir: str, reentrant: bool, kbit_upcast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages.sft import SFTConfig

    torch.manual_seed(0)
    cfg = SFTConfig(model=model_dir, device="cpu", dtype="bfloat16", quantization="8bit", lora_r=8,
                    gradient_checkpointing=True, reentrant_checkpointing=reentrant, kbit_upcast=kbit_upcast,
                    target_modules="q_proj,v_proj")
    model = build_policy(cfg)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:  # B starts at zero: give A a gradient too
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    loss = -(LMWithHeads(model)(ids, mask, mask)["logprobs"] * mask).sum() / mask.sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kbit_upcast", [True, False])
def test_reentrant_checkpointing_gives_the_same_gradients(llama, kbit_upcast):
    loss, grads = gradients(str(llama), reentrant=False, kbit_upcast=kbit_upcast)
    loss_r, grads_r = gradients(str(llama), reentrant=True, kbit_upcast=kbit_upcast)
    assert loss_r == loss and grads_r.keys() == grads.keys() and len(grads) == 8  # A and B of q, v in 2 layers
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_r[name], g, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused_on_several_processes(llama, monkeypatch):
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages.sft import SFTConfig

    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch / torchrun set for every process
    cfg = SFTConfig(model=str(llama), device="cpu", gradient_checkpointing=True, reentrant_checkpointing=True)
    with pytest.raises(ConfigError, match="--reentrant-checkpointing runs on one process only"):
        build_policy(cfg)


def test_ppo_on_an_8bit_base_with_reentrant_checkpointing_starts_on_policy(tmp_path, llama, prompts_file):
    """The trl+peft 20B setup's path (bench/published_setups.py) on a tiny model: 8-bit base without
    the k-bit upcast, value head on the policy, reference = adapters off, reentrant checkpointing.
    It runs, starts exactly on policy, and the update moved the policy (lora_B starts at zero, so
    gradients flowed back through the recomputed layers)."""
    import json

    from pocketrlhf.stages import ppo

    ppo.train(ppo.PPOConfig(model=str(llama), prompts=str(prompts_file), output_dir=str(tmp_path), device="cpu",
                            reward_function="pocketrlhf.data.synthetic:sentiment_reward", max_steps=1,
                            rollouts_per_step=8, batch_size=4, max_new_tokens=8, quantization="8bit",
                            kbit_upcast=False, gradient_checkpointing=True, reentrant_checkpointing=True,
                            eval_fraction=0, progress=False, seed=0))
    (step,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"]
    assert step["kl"] == 0.0 and step["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = [t for n, t in trained.items() if "lora_B" in n]
    assert b and all(t.abs().sum() > 0 for t in b)
