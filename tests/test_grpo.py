"""`pocketrlhf grpo` on a verifiable task: a tiny base that names the first of three digits right
about half the time (pretrained on noisy lines), exact-match reward from the data's `answer`
column, held-out digit triples never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketrlhf.data import synthetic
from pocketrlhf.errors import ConfigError, RewardFunctionError
from pocketrlhf.stages import grpo, online
from conftest import write_jsonl

EXACT = "pocketrlhf.data.synthetic:exact_match"


def config(digits, out: Path, **overrides) -> grpo.GRPOConfig:
    settings = dict(model=str(digits["model"]), prompts=str(digits["prompts"]), eval_prompts=str(digits["held_out"]),
                    output_dir=str(out), device="cpu", reward_function=[EXACT], num_generations=8, prompts_per_step=8,
                    max_new_tokens=4, learning_rate=5e-4, lr_scheduler="constant", max_steps=30, progress=False,
                    lora_r=8, batch_size=64, gradient_accumulation_steps=1)
    settings.update(overrides)
    return grpo.GRPOConfig(**settings)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.parametrize("quantization,advantage", [("none", "grpo"), ("4bit", "grpo"), ("none", "rloo")])
def test_grpo_raises_held_out_exact_match(tmp_path, digits, quantization, advantage):
    summary = grpo.train(config(digits, tmp_path / "run", quantization=quantization, advantage=advantage))
    before, after = summary["eval_start_score"], summary["eval_score"]
    assert 0.25 < before < 0.65  # the base is right about half the time on unseen triples
    assert after > before + 0.25 and after > 0.75, (before, after)
    first = metrics(tmp_path / "run")[0]
    assert first["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the base: KL 0 before any update
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_reinforce_pp_and_options_run_and_log(tmp_path, digits):
    summary = grpo.train(config(digits, tmp_path / "run", advantage="reinforce_pp", max_steps=3, num_iterations=2,
                                loss_aggregation="sequence", epsilon_high=0.28, mask_truncated_completions=True,
                                mask_zero_variance_groups=True, eval_at_start=False, batch_size=16,
                                gradient_accumulation_steps=2))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3 and summary["steps"] == 3
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)  # first minibatch of the first pass
    assert {"zero_variance_groups", "truncated_masked", "kl", "clipfrac", "loss"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_group_prompt_sharing_gives_the_same_logprobs(digits):
    """The G completions of a prompt with the prompt computed once == G separate rows."""
    from pocketrlhf.models.forward import response_logprobs
    from pocketrlhf.models.loading import load_base

    prompt = [5, 6, 7, 8]
    responses = [[9, 10], [11], [12, 13, 14], [15, 16], [17], [18, 19, 20]]  # two groups of 3
    rows = [prompt + r for r in responses[:3]] + [[21, 22] + r for r in responses[3:]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    plens = torch.tensor([4, 4, 4, 2, 2, 2])
    resp = attn.clone()
    for i, p in enumerate(plens.tolist()):
        resp[i, :p] = 0
    for quantization, tolerance in (("none", 1e-5), ("8bit", 1e-3), ("4bit", 1e-3)):
        model = load_base(str(digits["model"]), quantization, device="cpu", training=quantization != "none")
        with torch.no_grad():
            separate = response_logprobs(model, ids, attn, resp).logprobs
            shared = online.rows_logprobs(model, ids, attn, resp, plens, 1.0, 3, share=True).logprobs
        assert (separate != 0).sum() == resp[:, 1:].sum()
        assert torch.allclose(shared, separate, atol=tolerance), (quantization, (shared - separate).abs().max())


def test_answers_sharing_openings_are_laid_out_once_with_the_separate_rows_numbers(digits):
    """Identical answers and answers with a common opening are one prefix tree in the group row:
    each shared token once, and log-probs and LoRA gradients equal those of separate rows."""
    from pocketrlhf.models.adapters import attach_adapter, fuse_lora_layers, make_peft_config
    from pocketrlhf.models.forward import group_hidden_states, group_layout, response_logprobs
    from pocketrlhf.models.loading import load_base

    groups = [([5, 6, 7, 8], [[9, 10, 11], [9, 10, 11], [9, 12], [9, 10, 11, 13]]),  # a copy, a fork, a longer one
              ([21, 22], [[30], [31, 32], [30], [31, 33, 34]]),
              ([23, 24, 25], [[26], [27], [28], [29]])]  # nothing shared
    rows = [prompt + answer for prompt, answers in groups for answer in answers]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    plens = torch.tensor([len(prompt) for prompt, answers in groups for _ in answers])
    resp = attn.clone()
    for i, p in enumerate(plens.tolist()):
        resp[i, :p] = 0
    layout = group_layout(ids, attn, plens, 4)
    # prompt + own tokens: 4 + 3 + 0 + 1 + 1, 2 + 1 + 2 + 0 + 2, 3 + 4 x 1
    assert layout.length == 9 and (layout.ids != 0).sum(1).tolist() == [9, 7, 7]
    for quantization, tolerance, grad_tolerance in (("none", 1e-5, 1e-5), ("4bit", 1e-3, 3e-2)):
        model = attach_adapter(load_base(str(digits["model"]), quantization, device="cpu", training=True),
                               make_peft_config("lora", r=4, alpha=8))
        fuse_lora_layers(model)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        weights = torch.randn(ids.shape)  # a different weight on every token: any mix-up of rows shows
        results = []
        for hidden in (None, group_hidden_states(model, ids, attn, plens, 4, layout)):  # None: separate rows
            logprobs = response_logprobs(model, ids, attn, resp, hidden=hidden).logprobs
            model.zero_grad()
            (logprobs * weights).sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((logprobs.detach(), grads))
        (separate, separate_grads), (shared, shared_grads) = results
        assert (separate != 0).sum() == resp[:, 1:].sum()
        assert torch.allclose(shared, separate, atol=tolerance), (quantization, (shared - separate).abs().max())
        # relative to the largest gradient entry; a 4-bit layer computes in bf16, so its rounding shows more
        gap = max(float((a - b).abs().max()) for a, b in zip(shared_grads, separate_grads))
        assert gap <= grad_tolerance * max(float(b.abs().max()) for b in separate_grads), (quantization, gap)
        assert sum(g.abs().sum() for g in shared_grads) > 0


def test_group_layout_of_random_answers_is_their_prefix_tree():
    """Random answers over 3 tokens (many shared openings, some repeats, different lengths): the
    group row holds prompt + one slot per node of the answers' prefix tree, and every row's hidden
    states equal its separate row's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocketrlhf.models.forward import final_hidden_states, group_hidden_states, group_layout

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rows, plens, nodes = [], [], []
    for _ in range(5):
        prompt = torch.randint(3, 40, (int(torch.randint(1, 6, ())),)).tolist()
        answers = [torch.randint(0, 3, (int(torch.randint(1, 7, ())),)).tolist() for _ in range(6)]
        nodes.append(len(prompt) + len({tuple(a[:k]) for a in answers for k in range(1, len(a) + 1)}))
        rows += [prompt + a for a in answers]
        plens += [len(prompt)] * 6
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    plens = torch.tensor(plens)
    layout = group_layout(ids, attn, plens, 6)
    assert layout.length == max(nodes) and (layout.slot_owner != -2).sum(1).tolist() == nodes
    with torch.no_grad():
        separate = final_hidden_states(model, ids, attn)
        shared = group_hidden_states(model, ids, attn, plens, 6, layout)
    assert torch.allclose(shared[attn.bool()], separate[attn.bool()], atol=1e-5)


def test_kill_and_resume_continues_the_same_trajectory(tmp_path, digits):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    grpo.train(config(digits, full, max_steps=4, save_steps=2, eval_at_start=False))
    grpo.train(config(digits, crashed, max_steps=2, save_steps=2, eval_at_start=False))  # "killed" after step 2
    (crashed / "summary.json").unlink()
    grpo.train(config(digits, crashed, max_steps=4, save_steps=2, eval_at_start=False, resume="auto"))
    a, b = metrics(full), metrics(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["score"] == y["score"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_bad_input_is_a_one_line_error(tmp_path, digits):
    with pytest.raises(ConfigError, match="at least 2"):
        grpo.train(config(digits, tmp_path / "a", num_generations=1))
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "1 2 3 :"}] * 20)
    with pytest.raises(ConfigError, match="needs the column answer"):
        grpo.train(config(digits, tmp_path / "b", prompts=str(no_answer), eval_prompts=""))
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def broken(completions, answer):\n    raise KeyError('boom')\n"
                   "def short(completions, **kwargs):\n    return [1.0]\n")
    with pytest.raises(RewardFunctionError, match=r"bad_reward.py:broken raised KeyError"):
        grpo.train(config(digits, tmp_path / "c", reward_function=[f"{bad}:broken"], max_steps=1))
    with pytest.raises(RewardFunctionError, match=r"short returned 1 scores for 64 responses"):
        grpo.train(config(digits, tmp_path / "d", reward_function=[f"{bad}:short"], max_steps=1))
    with pytest.raises(ConfigError, match="reward-weights has 2 numbers for 1 rewards"):
        grpo.train(config(digits, tmp_path / "e", reward_weights=[1.0, 0.5]))
    assert not (tmp_path / "c" / "adapter").exists() and not (tmp_path / "d" / "adapter").exists()


def test_several_weighted_rewards_are_logged_each(tmp_path, digits):
    extra = tmp_path / "length_reward.py"
    extra.write_text("def short(prompts, completions):\n    return [-len(c) / 10 for c in completions]\n")
    grpo.train(config(digits, tmp_path / "run", reward_function=[EXACT, f"{extra}:short"], reward_weights=[1.0, 0.5],
                      max_steps=2, eval_at_start=False))
    row = metrics(tmp_path / "run")[0]
    assert f"reward/{EXACT}" in row and f"reward/{extra}:short" in row
    assert row["score"] == pytest.approx(row[f"reward/{EXACT}"] + 0.5 * row[f"reward/{extra}:short"], abs=1e-5)


def test_cli_accepts_repeated_reward_functions():
    from pocketrlhf.config import parse_args

    cfg = parse_args(grpo.GRPOConfig, ["--reward-function", "a.py:f", "--reward-function", "b.py:g",
                                       "--reward-weights", "1,0.5"])
    assert cfg.reward_function == ["a.py:f", "b.py:g"] and cfg.reward_weights == [1.0, 0.5]


def test_reward_adapter_mixed_with_a_rule_and_prompt_sharing_changes_no_number(tmp_path, digits):
    """A reward adapter from `rm` beside the exact-match rule: each logged on its own, and scoring
    the G completions with the prompt computed once per group gives the same rewards, log-probs
    and update as G separate rows."""
    from pocketrlhf.stages import rm

    train, _ = synthetic.digits_split()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": synthetic.digits_prompt(t), "chosen": f" {t[0]}",
                                                    "rejected": f" {(t[0] + 1) % 10}"} for t in train[:64]])
    rm.train(rm.RMConfig(model=str(digits["model"]), data=str(pairs), output_dir=str(tmp_path / "rm"), device="cpu",
                         batch_size=16, max_steps=3, eval_fraction=0, progress=False))
    reward_adapter = str(tmp_path / "rm" / "adapter")
    rows = {}
    for share in (True, False):
        grpo.train(config(digits, tmp_path / f"share_{share}", reward_adapter=reward_adapter, reward_weights=[1.0, 0.5],
                          share_prompt=share, max_steps=2, eval_at_start=False, eval_prompts="", eval_fraction=0,
                          batch_size=16, gradient_accumulation_steps=4))
        rows[share] = metrics(tmp_path / f"share_{share}")
    for a, b in zip(rows[True], rows[False]):
        assert a[f"reward/{reward_adapter}"] == pytest.approx(b[f"reward/{reward_adapter}"], abs=1e-5)
        assert a[f"reward/{EXACT}"] == b[f"reward/{EXACT}"]
        for key in ("score", "kl", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_a_failing_final_evaluation_keeps_the_trained_adapter(tmp_path, digits):
    """A reward that turns NaN on the held-out prompts only: training ends, the adapter is saved,
    and the summary says what failed (nothing of the run is lost to the evaluation)."""
    rows = synthetic.digits_rows(synthetic.digits_split()[0])
    train = write_jsonl(tmp_path / "train.jsonl", [dict(r, poison=0) for r in rows])
    held = write_jsonl(tmp_path / "held.jsonl", [dict(r, poison=1) for r in rows[:8]])
    reward = tmp_path / "poisoned.py"
    reward.write_text("def f(completions, answer, poison):\n"
                      "    return [float('nan') if p else float(c.strip() == a) for c, a, p in zip(completions, answer, poison)]\n")
    summary = grpo.train(config(digits, tmp_path / "run", prompts=str(train), eval_prompts=str(held), max_steps=1,
                                reward_function=[f"{reward}:f"], eval_at_start=False))
    assert "eval_error" in summary and "returned nan" in summary["eval_error"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_error"] == summary["eval_error"]


def test_repeated_held_out_prompts_are_evaluated_once(tmp_path, digits):
    from pocketrlhf.models.loading import load_tokenizer

    rows = synthetic.digits_rows(synthetic.digits_split()[1][:5])
    held = write_jsonl(tmp_path / "held.jsonl", rows * 3)  # pair data repeats a question once per pair
    cfg = config(digits, tmp_path / "run", eval_prompts=str(held))
    _, evals, report = online.prepare_prompts(cfg, load_tokenizer(str(digits["model"])))
    assert len(evals) == 5 and report["skipped"]["eval prompts repeated (evaluated once)"] == 10


def test_kl_in_the_reward_moves_grpo_advantages():
    """--kl-in reward with grpo: beta x the sequence KL comes off each score before the group
    statistics (it used to be ignored)."""
    cfg = grpo.GRPOConfig(num_generations=2, beta=0.5, kl_in="reward", scale_rewards="none")
    scores = torch.tensor([1.0, 1.0])
    mask = torch.ones(2, 3)
    kl = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert grpo.advantages_of(cfg, scores, mask, None, lambda x: x).tolist() == [0.0, 0.0]
    assert grpo.advantages_of(cfg, scores, mask, kl, lambda x: x).tolist() == [0.5, -0.5]


def test_sharing_the_prompt_only_where_it_pays():
    attn = torch.ones(4, 12)
    assert online.sharing_pays(attn, torch.tensor([10] * 4), 4)  # long prompt, short answers: one row
    assert not online.sharing_pays(attn, torch.tensor([2] * 4), 4)  # short prompt, long answers: separate rows
    assert online.sharing_pays(attn, torch.tensor([2] * 4), 4, shared_length=12)  # the same answer 4 times: one row


def test_sft_start_with_a_real_sampling_pass_has_ratio_one_and_kl_zero(tmp_path, digits):
    """Policy = copy of an SFT adapter, reference = its frozen copy, two iterations (so the
    no-grad pass of the sampling policy runs): before the first update the ratio is 1 and the
    KL to the reference 0, measured, not by construction."""
    from conftest import teach_adapter

    sft_dir = teach_adapter(digits["model"], tmp_path / "sft", "plain", [("1 2 3 :", " 1"), ("4 5 6 :", " 4")],
                            steps=5)
    grpo.train(config(digits, tmp_path / "run", sft_adapter=str(sft_dir), num_iterations=2, max_steps=1,
                      eval_at_start=False, batch_size=16, gradient_accumulation_steps=2))
    row = metrics(tmp_path / "run")[0]
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert row["kl"] == pytest.approx(0.0, abs=1e-5)
    assert row["ratio"] != 1.0  # later minibatches moved away from the sampling policy


def test_schedule_free_optimizer_resumes_exactly(tmp_path, digits):
    """grpo with schedule-free AdamW (evaluated and checkpointed on its averaged weights): a run
    resumed from such a checkpoint continues the same trajectory and saves the same adapter."""
    pytest.importorskip("pytorch_optimizer")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    settings = dict(optimizer="schedulefree_adamw", max_steps=4, save_steps=2, eval_at_start=False, learning_rate=1e-3)
    grpo.train(config(digits, full, **settings))
    grpo.train(config(digits, crashed, **dict(settings, max_steps=2)))
    (crashed / "summary.json").unlink()
    grpo.train(config(digits, crashed, **settings, resume="auto"))
    assert [r["score"] for r in metrics(full)] == [r["score"] for r in metrics(crashed)]
    from safetensors.torch import load_file

    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_rollout_decoding_drops_finished_rows_and_samples_what_generate_samples(digits):
    """Seeded rollouts run in generation.seeded_decode (finished answers leave the batch and its
    KV cache); token for token what transformers' generate samples with the same seeded noise,
    with answers ending at different steps and left-padded prompts of different lengths, through
    an active LoRA adapter."""
    from pocketrlhf.models import generation
    from pocketrlhf.models.adapters import attach_adapter, make_peft_config
    from pocketrlhf.models.loading import load_base, load_tokenizer

    tok = load_tokenizer(str(digits["model"]))
    model = attach_adapter(load_base(str(digits["model"]), device="cpu"), make_peft_config("lora", r=4), "policy")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = [tok(t)["input_ids"] for t in ["1 2 3 :", "4 5 6 :", "7 : 8 9 0 :", "0 0 :"] for _ in range(4)]
    seeds = [generation.row_seed(5, i) for i in range(len(prompts))]
    assert generation._can_decode_here(model) is not None
    fast = generation.sample(model, tok, prompts, 8, 1.0, batch_size=16, row_seeds=seeds)
    calls = []
    original = model.generate
    model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        generation._can_decode_here, saved = (lambda m: None), generation._can_decode_here
        slow = generation.sample(model, tok, prompts, 8, 1.0, batch_size=16, row_seeds=seeds)
    finally:
        generation._can_decode_here = saved
        model.generate = original
    assert calls and fast == slow
    assert len({len(r) for r in fast}) > 1 and any(r[-1] == tok.eos_token_id for r in fast)



@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_rollouts_compute_each_prompt_once_and_sample_the_same_tokens(digits, quantization):
    """The G completions of one prompt share its prefill (one row per distinct prompt, its KV cache
    and logits copied to every completion): the same tokens as a prefill of every row, on a 16-bit
    and a 4-bit base through a LoRA adapter, with left-padded prompts of different lengths."""
    from pocketrlhf.models import generation
    from pocketrlhf.models.adapters import attach_adapter, make_peft_config
    from pocketrlhf.models.forward import unwrap
    from pocketrlhf.models.loading import load_base, load_tokenizer

    tok = load_tokenizer(str(digits["model"]))
    base = load_base(str(digits["model"]), quantization, device="cpu")
    model = attach_adapter(base, make_peft_config("lora", r=4), "policy")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    texts = ["1 2 3 :", "7 : 8 9 0 :", "4 5 6 :", "0 0 :"]
    prompts = [tok(t)["input_ids"] for t in texts for _ in range(4)] + [tok("1 2 3 :")["input_ids"]]
    seeds = [generation.row_seed(7, i) for i in range(len(prompts))]
    _, lm = unwrap(model)
    prefill_rows = []
    hook = lm.register_forward_pre_hook(lambda m, a, k: prefill_rows.append(k["input_ids"].shape), with_kwargs=True)
    try:
        shared = generation.sample(model, tok, prompts, 8, 1.0, batch_size=32, row_seeds=seeds)
        first_shared = prefill_rows[0]
        prefill_rows.clear()
        every_row = generation.distinct_prompts
        generation.distinct_prompts = lambda p: (p, torch.arange(len(p)))
        try:
            separate = generation.sample(model, tok, prompts, 8, 1.0, batch_size=32, row_seeds=seeds)
        finally:
            generation.distinct_prompts = every_row
    finally:
        hook.remove()
    assert first_shared[0] == 4 and prefill_rows[0][0] == len(prompts)  # 4 distinct prompts prefilled, not 17
    assert shared == separate
    assert len({tuple(r) for r in shared}) > len(texts)  # the copies of a prompt still answer differently


def test_sharing_weighs_linear_work_against_attention(digits):
    """With the model's linear work per token counted, a long prompt before long answers is
    shared (it saves (G-1) prompts of every linear layer); answers long enough that the one row's
    attention outgrows that saving are not."""
    from pocketrlhf.models.loading import load_base

    model = load_base(str(digits["model"]), device="cpu")
    ratio = online.linear_cost_per_pair(model)
    cfg = model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert ratio == (cfg.hidden_size * (2 * cfg.hidden_size + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size) / (
        2 * cfg.hidden_size)
    plens = torch.tensor([50] * 8)
    attn = torch.ones(8, 90)  # 50-token prompt, 40-token answers: 370 tokens in one row against 8 x 90
    assert not online.sharing_pays(attn, plens, 8)  # attention alone: the row's 370^2 pairs look dearer
    assert online.sharing_pays(attn, plens, 8, ratio)
    long_answers = torch.ones(8, int(50 + 40 * ratio))
    assert not online.sharing_pays(long_answers, plens, 8, ratio)
