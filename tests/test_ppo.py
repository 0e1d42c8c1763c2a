import json
import shutil

import pytest
import torch

from pocketrlhf.cli import main
from pocketrlhf.data import synthetic
from pocketrlhf.data.tokenize import left_pad
from pocketrlhf.models.forward import response_logprobs
from pocketrlhf.models.generation import generation_config
from pocketrlhf.models.loading import load_base, load_tokenizer
from pocketrlhf.stages import ppo, rm

from conftest import write_jsonl

REWARD = "pocketrlhf.data.synthetic:sentiment_reward"


def config(base, prompts, out, **kw):
    settings = dict(model=str(base), prompts=str(prompts), output_dir=str(out), device="cpu",
                    reward_function=REWARD, max_steps=12, learning_rate=3e-4, rollouts_per_step=24, batch_size=8,
                    gradient_accumulation_steps=1, max_new_tokens=20, kl_coef=0.05, adaptive_kl=False,
                    lr_scheduler="constant", eval_fraction=0.1, progress=False, seed=0)
    settings.update(kw)
    return ppo.PPOConfig(**settings)


def train_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def assert_learns(run_dir):
    """Ground-truth sentiment clearly rises while the KL to the reference stays bounded."""
    m = train_metrics(run_dir)
    before = sum(r["score"] for r in m[:2]) / 2
    after = sum(r["score"] for r in m[-3:]) / 3
    assert after > before + 0.3, (before, after)
    assert max(r["kl"] for r in m) < 20


def test_first_step_is_exactly_on_policy(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    """Before any update: KL to the reference is 0, and the first minibatch has ratio 1 and
    approx KL 0 even at temperature 0.7 with an SFT adapter trained with LoRA dropout 0.1
    (dropout, temperature or padding mismatches would all break this)."""
    ppo.train(config(pretrained_llama, prompts_file, tmp_path, sft_adapter=str(sft_adapter), max_steps=1,
                     temperature=0.7, eval_fraction=0))
    (step,) = train_metrics(tmp_path)
    assert step["kl"] == 0.0
    assert step["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert step["first_approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "value" / "head.safetensors").is_file()


def test_rollout_sampling_matches_the_forward_log_probs(tiny_models):
    """Generation is pure sampling at temperature T: its processed scores equal our forward
    log-probs / T, on left-padded batches of an absolute-position model (GPT-2)."""
    path = tiny_models["gpt2"]
    tok = load_tokenizer(str(path))
    model = load_base(str(path), device="cpu", training=False).eval()
    prompts = [tok("Write a review of the movie Night Train.")["input_ids"], tok("a dull")["input_ids"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    cfg = generation_config(tok, model, max_new_tokens=6, temperature=0.7)
    cfg.eos_token_id = None  # sample all 6 tokens so every position is compared
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, output_scores=True,
                             return_dict_in_generate=True)
        full = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
        ours = response_logprobs(model, full, full_mask, temperature=0.7).logprobs[:, -6:]
    theirs = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, full[:, ids.shape[1] + t, None]).squeeze(-1)
                          for t, s in enumerate(out.scores)], dim=1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ppo_raises_the_ground_truth_with_a_rule_reward(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    summary = ppo.train(config(pretrained_llama, prompts_file, tmp_path, sft_adapter=str(sft_adapter)))
    assert_learns(tmp_path)
    assert summary["eval_score"] > 0.3
    assert (tmp_path / "samples.jsonl").is_file()


@pytest.mark.slow
def test_ppo_on_a_4bit_base(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    ppo.train(config(pretrained_llama, prompts_file, tmp_path, sft_adapter=str(sft_adapter), quantization="4bit",
                     eval_fraction=0))
    assert_learns(tmp_path)


@pytest.mark.slow
def test_ppo_with_the_reward_adapter_from_rm(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(500, seed=1))
    rm_summary = rm.train(rm.RMConfig(model=str(pretrained_llama), data=str(pairs), sft_adapter=str(sft_adapter),
                                      output_dir=str(tmp_path / "rm"), device="cpu", batch_size=16, learning_rate=3e-3,
                                      max_steps=40, eval_fraction=0.2, progress=False))
    assert rm_summary["eval_accuracy"] >= 0.9
    out = tmp_path / "ppo"
    ppo.train(config(pretrained_llama, prompts_file, out, sft_adapter=str(sft_adapter), reward_function="",
                     reward_adapter=str(tmp_path / "rm" / "adapter"), value_model="adapter", eval_fraction=0))
    m = train_metrics(out)
    assert sum(r["score"] for r in m[-3:]) / 3 > sum(r["score"] for r in m[:2]) / 2 + 0.5  # reward-model score
    from pocketrlhf.evaluate import generate_answers

    prompts = [synthetic.PROMPT.format(title=t) for t in synthetic.TITLES] * 3
    truth = {}
    for name, adapter in (("sft", sft_adapter), ("ppo", out / "adapter")):
        answers, _ = generate_answers(pretrained_llama, adapter, prompts, max_new_tokens=20)
        truth[name] = sum(synthetic.sentiment_score(a) for a in answers) / len(answers)
    assert truth["ppo"] > truth["sft"] + 0.3, truth  # the ground truth rises too
    assert (out / "value" / "adapter_model.safetensors").is_file()  # the separate value adapter


def test_one_copy_of_the_base_holds_every_role(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    """policy, reference (SFT copy), value adapter and reward adapter: base storages as in a
    plain load, and the extra bytes are only the adapters and heads."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(64, seed=1))
    rm.train(rm.RMConfig(model=str(pretrained_llama), data=str(pairs), output_dir=str(tmp_path / "rm"),
                         device="cpu", batch_size=16, max_steps=1, eval_fraction=0, progress=False))
    plain = load_base(str(pretrained_llama), device="cpu")
    plain_storages = {p.untyped_storage().nbytes() for p in plain.parameters()}
    plain_bytes = sum(p.untyped_storage().nbytes() for p in plain.parameters())
    cfg = config(pretrained_llama, prompts_file, tmp_path / "ppo", sft_adapter=str(sft_adapter), reward_function="",
                 reward_adapter=str(tmp_path / "rm" / "adapter"), value_model="adapter")
    roles = ppo.build_roles(cfg, total_steps=1)
    assert set(roles.model.peft_config) == {"policy", "reference", "reward", "value"}
    base = {id(p.untyped_storage()): p for n, p in roles.model.named_parameters() if not _adapter_param(n)}
    assert len(base) == len(list(plain.parameters()))
    assert sum(p.untyped_storage().nbytes() for p in base.values()) == plain_bytes
    assert {p.untyped_storage().nbytes() for p in base.values()} == plain_storages
    total = sum(p.numel() for p in roles.model.parameters())
    adapters = sum(p.numel() for n, p in roles.model.named_parameters() if _adapter_param(n))
    assert total - adapters == sum(p.numel() for p in plain.parameters())  # nothing of the base twice
    trainable = {n.split(".")[-2] for n, p in roles.model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "value"}


def _adapter_param(name: str) -> bool:
    return any(f".{a}." in name for a in ("policy", "reference", "reward", "value"))


def test_gradient_checkpointing_stays_on_after_frozen_adapters_load(pretrained_llama, sft_adapter, prompts_file,
                                                                    tmp_path):
    """peft's load_adapter(is_trainable=False) (here: the reference) puts the model in eval mode,
    where transformers skips checkpointing: each layer must still run twice (forward, recompute)."""
    cfg = config(pretrained_llama, prompts_file, tmp_path, sft_adapter=str(sft_adapter), gradient_checkpointing=True)
    roles = ppo.build_roles(cfg, total_steps=1)
    calls = []
    # transformers checkpoints a decoder layer's forward: its MLP starts again when backward recomputes
    # it (a pre-hook: recomputation stops early, before the MLP's forward hooks would run).
    roles.model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    module = ppo.ActorCritic(roles.model, roles.value_head, shared_trunk=True)
    with roles.adapters.use("policy"):
        out = module(ids, mask, mask, 1.0)
        (out["logprobs"].sum() + out["values"].sum()).backward()
    assert len(calls) == 2


def test_kill_and_resume_continues_the_same_trajectory(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    full = tmp_path / "full"
    ppo.train(config(pretrained_llama, prompts_file, full, sft_adapter=str(sft_adapter), max_steps=4, save_steps=2,
                     save_total_limit=0, eval_fraction=0, rollouts_per_step=16, adaptive_kl=True))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    ppo.train(config(pretrained_llama, prompts_file, crashed, sft_adapter=str(sft_adapter), max_steps=4, save_steps=2,
                     eval_fraction=0, rollouts_per_step=16, adaptive_kl=True, resume="auto"))
    keys = ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "entropy")
    resumed = [{k: r[k] for k in keys} for r in train_metrics(crashed)]
    original = [{k: r[k] for k in keys} for r in train_metrics(full)][2:]
    assert [r["step"] for r in train_metrics(crashed)] == [3, 4]
    assert resumed == original


def test_reward_configuration_errors(tmp_path, pretrained_llama, prompts_file, capsys):
    base = ["ppo", "--model", str(pretrained_llama), "--prompts", str(prompts_file), "--device", "cpu",
            "--output-dir", str(tmp_path)]
    assert main(base) == 2
    assert "exactly one of --reward-adapter DIR or --reward-function" in capsys.readouterr().err
    assert main(base + ["--reward-function", "no_such_module_xyz:fn"]) == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err
    assert main(base + ["--reward-function", "pocketrlhf.data.synthetic:nope"]) == 2
    assert "has no function nope" in capsys.readouterr().err
    assert main(base + ["--reward-function", REWARD, "--rollouts-per-step", "7", "--max-prompt-length", "2"]) == 2
    assert "no prompt fits max_prompt_length=2" in capsys.readouterr().err


def test_seeded_sampling_is_exact_sampling_and_independent_of_batching(llama):
    """Rollouts sample with the Gumbel-max trick from per-row seeded streams: the samples follow
    softmax(logits / T) as torch's own multinomial sampling does, and a row's answer does not
    depend on the batch it was generated in."""
    from pocketrlhf.models.generation import row_seed, sample

    tok = load_tokenizer(str(llama))
    model = load_base(str(llama), device="cpu", training=False)
    prompt = tok("Write a review of the movie Night Train.")["input_ids"]
    n = 3000
    firsts = torch.tensor([o[0] for o in sample(model, tok, [prompt] * n, max_new_tokens=1, temperature=0.7,
                                                  batch_size=1000, row_seeds=[row_seed(0, i) for i in range(n)])])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / 0.7, -1)
    reference = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(0))

    def tv(samples):
        return 0.5 * (torch.bincount(samples, minlength=len(probs)).float() / n - probs).abs().sum().item()

    assert tv(firsts) < 1.5 * tv(reference) + 0.01
    seeds = [row_seed(1, i) for i in range(4)]
    together = sample(model, tok, [prompt] * 4, max_new_tokens=8, temperature=0.7, batch_size=4, row_seeds=seeds)
    apart = sample(model, tok, [prompt] * 4, max_new_tokens=8, temperature=0.7, batch_size=1, row_seeds=seeds)
    assert together == apart and len({tuple(a) for a in together}) > 1
    with pytest.raises(ValueError, match="no top-k/top-p"):
        sample(model, tok, [prompt], max_new_tokens=1, top_p=0.9, row_seeds=[1])


def test_counter_uniform_is_uniform_independent_and_deterministic():
    from pocketrlhf.models.generation import counter_uniform

    seeds = torch.arange(256, dtype=torch.int64) * 7919 + 3
    u = counter_uniform(seeds, 0, 1000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.histc(u.float(), bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.005
    assert torch.equal(counter_uniform(seeds[5:6], 0, 1000), u[5:6])  # a row does not depend on the others
    nxt = counter_uniform(seeds, 1, 1000)
    assert abs(torch.corrcoef(torch.stack([u.flatten(), nxt.flatten()]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()) < 0.01
