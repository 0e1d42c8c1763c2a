"""The pytorch-optimizer optimizers: each trains a LoRA (loss falls) on a 16-bit and a 4-bit base, and
a run killed after a checkpoint continues the same trajectory bit for bit."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from pocketrlhf import optimizers
from pocketrlhf.errors import ConfigError
from pocketrlhf.stages import sft

pytest.importorskip("pytorch_optimizer")

EXTRA = sorted(optimizers.EXTRA)
# Learning rates of the same order as AdamW's 3e-3 here; Lion's sign updates want a smaller one.
LR = {"lion": 1e-3}


def metrics(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", packing=False,
                completion_only=True, seq_length=64, batch_size=8, learning_rate=3e-3, max_steps=20,
                warmup_steps=0, lora_r=8, logging_steps=1, progress=False, seed=0, eval_fraction=0.05)
    base.update(kw)
    return sft.SFTConfig(**base)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("name", EXTRA)
def test_each_optimizer_trains_a_lora(tmp_path, llama, sft_file, name, quantization):
    summary = sft.train(config(llama, sft_file, tmp_path, optimizer=name, quantization=quantization,
                               learning_rate=LR.get(name, 3e-3)))
    train = metrics(tmp_path)
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], (name, train[0]["loss"], train[-1]["loss"])
    assert summary["eval_loss"] < 0.8 * train[0]["loss"]


@pytest.mark.parametrize("name", EXTRA)
def test_kill_and_resume_continues_the_same_trajectory(tmp_path, llama, sft_file, name):
    kw = dict(optimizer=name, max_steps=6, save_steps=3, eval_steps=2, learning_rate=LR.get(name, 3e-3))
    full = tmp_path / "full"
    sft.train(config(llama, sft_file, full, save_total_limit=0, **kw))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 4))
    sft.train(config(llama, sft_file, crashed, resume="auto", **kw))
    assert [m["step"] for m in metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(full)]
    assert [m["loss"] for m in metrics(crashed, "eval")] == [m["loss"] for m in metrics(full, "eval")]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sophia_refreshes_its_hessian_with_a_graph_only_when_due():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optimizers.build([p], "sophia", 0.1, 0.0, 1e-8)
    for step in range(12):
        due = optimizers.needs_hessian(opt, step)
        assert due == (step % 10 == 0)
        loss = (p ** 4).sum()  # Hessian diagonal 12 p^2: a Hutchinson estimate needs the gradient's graph
        loss.backward(create_graph=due)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert opt.state[p]["hessian_moment"].abs().sum() > 0
    # A backward without the graph on a Hessian step (a stage that does not ask for it): one clear line.
    fresh = optimizers.build([p], "sophia", 0.1, 0.0, 1e-8)
    (p ** 4).sum().backward()
    with pytest.raises(ConfigError, match="kept no graph for the Hessian estimate"):
        fresh.step()


def test_schedule_free_evaluates_and_saves_the_averaged_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optimizers.build([p], "schedulefree_adamw", 0.1, 0.0, 1e-8)
    for _ in range(5):
        ((p - 1) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    y = p.detach().clone()
    with optimizers.eval_weights(opt):
        x = p.detach().clone()
        assert not torch.equal(x, y)
    assert torch.allclose(p.detach(), y)
    optimizers.to_eval(opt)
    with optimizers.eval_weights(opt):  # already averaged: stays averaged
        pass
    assert torch.allclose(p.detach(), x)


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'pocketrlhf\[optimizers\]'"):
        optimizers.build([torch.nn.Parameter(torch.zeros(2))], "lion", 1e-3, 0.0, 1e-8)


@pytest.mark.parametrize("name", ["adamw", *EXTRA])
def test_the_planners_state_bytes_match_the_real_state(name):
    """LoRA-shaped tensors (rank 16, width 1024): the state an optimizer really keeps after a few
    steps (SophiaH's Hessian included) is what the planner counts, within 10%."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 1024)), torch.nn.Parameter(torch.randn(1024, 16))]
    opt = optimizers.build(params, name, 1e-3, 0.0, 1e-8)
    for _ in range(2):
        loss = sum((p ** 2).sum() for p in params)
        loss.backward(create_graph=name == "sophia")
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    n = sum(p.numel() for p in params)
    assert state == pytest.approx(optimizers.STATE_BYTES[name] * n, rel=0.1)


@pytest.mark.parametrize("setting", [dict(gradient_checkpointing=True), dict(quantization="8bit")])
def test_sophia_hessian_steps_through_checkpointing_and_int8(tmp_path, llama, sft_file, setting):
    """The Hessian step's double backward also runs through recomputed (checkpointed) activations
    and LLM.int8 matmuls."""
    sft.train(config(llama, sft_file, tmp_path, optimizer="sophia", max_steps=12, **setting))
    train = metrics(tmp_path)
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]


@pytest.mark.parametrize("name", ["sophia", "schedulefree_adamw"])
def test_reward_model_and_dpo_train_with_the_added_optimizers(tmp_path, llama, name):
    """RM and DPO share SFT's loop: the Hessian steps and the train/eval switching reach them too
    (the reward card names its stage)."""
    from conftest import write_jsonl

    from pocketrlhf.data import synthetic
    from pocketrlhf.stages import dpo, rm

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(240, seed=1))
    common = dict(data=str(pairs), device="cpu", batch_size=8, learning_rate=3e-3, max_steps=12, eval_fraction=0.2,
                  lora_r=8, progress=False, seed=0, optimizer=name, logging_steps=1)
    rm.train(rm.RMConfig(model=str(llama), output_dir=str(tmp_path / "rm"), **common))
    dpo.train(dpo.DPOConfig(model=str(llama), output_dir=str(tmp_path / "dpo"), **common))
    for stage in ("rm", "dpo"):
        train = metrics(tmp_path / stage)
        assert train[-1]["loss"] < train[0]["loss"], stage
    assert "pipeline_tag: text-classification" in (tmp_path / "rm" / "adapter" / "README.md").read_text()


def test_ppo_refuses_sophia_in_one_line(tmp_path, llama, prompts_file):
    """PPO's and GRPO's updates keep no graph for a Hessian (yet): one clear line before any work."""
    from pocketrlhf.stages import ppo

    cfg = ppo.PPOConfig(model=str(llama), prompts=str(prompts_file), output_dir=str(tmp_path), device="cpu",
                        reward_function="pocketrlhf.data.synthetic:sentiment_reward", max_steps=1, rollouts_per_step=8,
                        batch_size=8, max_new_tokens=8, eval_fraction=0.0, progress=False, seed=0, optimizer="sophia")
    with pytest.raises(ConfigError, match="^--optimizer sophia: ppo does not yet"):
        ppo.train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sophia_on_several_processes_is_refused():
    """Its Hessian estimate is not averaged across processes: replicated adapters would drift apart."""
    from types import SimpleNamespace

    from pocketrlhf.stages import common

    with pytest.raises(ConfigError, match="sophia runs on one process only"):
        common.prepare(SimpleNamespace(num_processes=2), torch.nn.Linear(2, 2), SimpleNamespace(optimizer="sophia"), 1)
