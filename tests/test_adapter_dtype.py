"""--adapter-dtype: 16-bit adapter weights and gradients as QLoRA trained them, fp32 AdamW moments;
training follows the fp32 curve, resumes exactly, and the saved adapter loads and merges."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pocketrlhf.cli import main
from pocketrlhf.stages import sft


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", packing=False,
                completion_only=True, seq_length=64, batch_size=8, learning_rate=3e-3, max_steps=20,
                warmup_steps=0, lora_r=8, logging_steps=1, progress=False, seed=0)
    base.update(kw)
    return sft.SFTConfig(**base)


def losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in rows if m["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama, sft_file):
    root = tmp_path_factory.mktemp("adapter_dtype")
    for dtype in ("float32", "bfloat16"):
        sft.train(config(llama, sft_file, root / dtype, adapter_dtype=dtype))
    return root


def test_bf16_adapters_learn_like_fp32_ones(runs):
    fp32, bf16 = losses(runs / "float32"), losses(runs / "bfloat16")
    assert len(fp32) == len(bf16) == 20
    assert bf16[-1] < 0.6 * bf16[0]  # it learns...
    for a, b in zip(fp32, bf16):  # ...along the fp32 curve (measured: within 0.2% at every step)
        assert b == pytest.approx(a, rel=0.01)
    assert fp32 != bf16  # and it really ran in another precision
    saved = load_file(str(runs / "bfloat16" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(runs / "float32" / "adapter" / "adapter_model.safetensors")).values()} \
        == {torch.float32}


@pytest.mark.parametrize("dtype,optimizer,state_dtype", [
    ("bfloat16", "adamw", torch.float32), ("float16", "adamw", torch.float32), ("bfloat16", "adamw_8bit", torch.uint8),
    ("float32", "adamw", torch.float32)])
def test_weights_and_gradients_take_the_dtype_and_adam_moments_stay_fp32(llama, dtype, optimizer, state_dtype):
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages import common

    # r=64: A and B reach bitsandbytes' min_8bit_size (4096 elements), under which 8-bit AdamW keeps fp32 state.
    cfg = sft.SFTConfig(model=str(llama), device="cpu", lora_r=64, adapter_dtype=dtype, optimizer=optimizer)
    model = build_policy(cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {getattr(torch, dtype)}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32}  # the base is untouched
    opt = common.build_optimizer(trained, cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW) == (dtype == "float32" and optimizer == "adamw")
    ids = torch.randint(1, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert {p.grad.dtype for p in trained} == {getattr(torch, dtype)}
    before = [p.detach().clone() for p in trained]
    opt.step()
    assert any((p != b).any() for p, b in zip(trained, before))
    for p in trained:
        states = [v for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq", "state1", "state2")]
        assert len(states) == 2 and {s.dtype for s in states} == {state_dtype if p.numel() >= 4096 else torch.float32}
    assert any(p.numel() >= 4096 for p in trained)


def test_bf16_run_resumes_exactly(tmp_path, llama, sft_file):
    full = tmp_path / "full"
    sft.train(config(llama, sft_file, full, max_steps=6, save_steps=3, save_total_limit=0, adapter_dtype="bfloat16"))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    kept = (full / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("".join(line + "\n" for line in kept if json.loads(line)["step"] <= 3))
    sft.train(config(llama, sft_file, crashed, max_steps=6, save_steps=3, resume="auto", adapter_dtype="bfloat16"))
    assert losses(crashed) == losses(full)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_adapter_loads_as_a_frozen_role_and_merges(runs, llama, tmp_path):
    from pocketrlhf.models.adapters import load_adapter
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.models.policy import add_frozen_adapter, build_policy

    adapter = runs / "bfloat16" / "adapter"
    # A frozen role beside a bf16 trained adapter takes its dtype: a reference copied from the
    # policy's starting adapter is that adapter, bit for bit.
    cfg = sft.SFTConfig(model=str(llama), device="cpu", lora_r=8, adapter_dtype="bfloat16", init_adapter=str(adapter))
    model = add_frozen_adapter(build_policy(cfg), adapter, "reference")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in saved.items():
        for role in ("default", "reference"):
            name = key.replace(".weight", f".{role}.weight")
            assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], value), name
    assert not any(p.requires_grad for n, p in params.items() if ".reference." in n)

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reference = load_adapter(load_base(str(llama), device="cpu", training=False), adapter)
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)  # ...and the merge keeps that change


def test_ppo_roles_share_the_adapter_dtype_and_start_on_policy(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    """PPO with bf16 adapters: policy (from the SFT adapter), reference (the same adapter, frozen)
    and value adapter are all bf16, so the first step is exactly on policy (KL 0, ratio 1)."""
    from pocketrlhf.stages import ppo

    cfg = ppo.PPOConfig(model=str(pretrained_llama), prompts=str(prompts_file), output_dir=str(tmp_path),
                        device="cpu", reward_function="pocketrlhf.data.synthetic:sentiment_reward",
                        sft_adapter=str(sft_adapter), value_model="adapter", adapter_dtype="bfloat16", max_steps=1,
                        rollouts_per_step=16, batch_size=8, max_new_tokens=16, temperature=0.7, eval_fraction=0,
                        progress=False, seed=0)
    roles = ppo.build_roles(cfg, total_steps=1)
    dtypes = {}
    for name, p in roles.model.named_parameters():
        for role in ("policy", "reference", "value"):
            if f".{role}." in name:
                dtypes.setdefault(role, set()).add(p.dtype)
    assert dtypes == {role: {torch.bfloat16} for role in ("policy", "reference", "value")}
    assert {p.dtype for p in roles.trainable} == {torch.bfloat16, torch.float32}  # adapters, and the fp32 value head
    ppo.train(cfg)
    (step,) = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if m["split"] == "train"]
    assert step["kl"] == 0.0
    assert step["first_ratio"] == pytest.approx(1.0, abs=1e-6)
