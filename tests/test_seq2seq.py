"""Encoder-decoder bases (T5 as flan-t5, BART): the one log-prob function, sampling, and every
training stage on them, in 16-bit and quantized."""

import json

import pytest
import torch

from pocketrlhf.models.adapters import AdapterSet, attach_adapter, make_peft_config
from pocketrlhf.models.forward import (final_hidden_states, group_hidden_states, output_logits, pair_hidden_states,
                                       response_logprobs)
from pocketrlhf.models.loading import load_base, load_tokenizer

PROMPTS = ["Write a review of the movie Night Train.", "a dull ending .", "the story"]
ANSWERS = ["the story was really great .", "bad", "a good movie with a great story and wonderful actors ."]


def rows(tok, prompts, answers, side="right"):
    """[prompt ; answer EOS] rows padded on ``side``, and their response mask."""
    pairs = [(tok(p)["input_ids"], tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
             for p, a in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, a) in enumerate(pairs):
        start = 0 if side == "right" else width - len(p) - len(a)
        ids[i, start:start + len(p) + len(a)] = torch.tensor(p + a)
        attn[i, start:start + len(p) + len(a)] = 1
        resp[i, start + len(p):start + len(p) + len(a)] = 1
    return pairs, ids, attn, resp


def perturbed_lora(model, name="default", seed=0, scale=0.3, scope="all"):
    """A LoRA (on encoder and decoder, or the decoder only: ``scope``) whose B matrices are not
    zero, so that it changes the outputs."""
    model = attach_adapter(model, make_peft_config("lora", r=4, alpha=8), name, scope=scope)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def direct(model, pairs):
    """Per row: transformers' own log p(answer | prompt), and its decoder's last-layer state after
    the whole answer (EOS included)."""
    from pocketrlhf.models.forward import decoder_start_id, unwrap

    start = decoder_start_id(unwrap(model)[1])
    lps, states = [], []
    for p, a in pairs:
        out = model(input_ids=torch.tensor([p]), labels=torch.tensor([a]))
        lps.append(torch.log_softmax(out.logits.float(), -1)[0].gather(-1, torch.tensor(a)[:, None])[:, 0])
        after = model(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([[start] + a]), output_hidden_states=True)
        states.append(after.decoder_hidden_states[-1][0])
    return lps, states


@pytest.mark.parametrize("arch,quantization", [("t5", "none"), ("t5", "4bit"), ("bart", "none"), ("bart", "8bit")])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logprobs_equal_the_models_own_token_by_token(tiny_t5, tiny_bart, arch, quantization, side):
    """Our log-probs of [prompt ; answer] rows are transformers' ``model(input_ids=prompt,
    labels=answer)`` ones, with an adapter on encoder and decoder; the last real position holds
    the decoder state after EOS (where rewards and values are read)."""
    path = str(tiny_t5 if arch == "t5" else tiny_bart)
    tok = load_tokenizer(path)
    model = perturbed_lora(load_base(path, quantization, device="cpu", training=False))
    model.eval()
    pairs, ids, attn, resp = rows(tok, PROMPTS, ANSWERS, side)
    with torch.no_grad():
        out = response_logprobs(model, ids, attn, resp, return_hidden=True)
        want, states = direct(model, pairs)
    tol = 1e-4 if quantization == "none" else 2e-2  # bnb computes in bfloat16: batch shapes round differently
    for i in range(len(pairs)):
        torch.testing.assert_close(out.logprobs[i][resp[i].bool()], want[i], atol=tol, rtol=tol)
        last = int(attn[i].nonzero().max())
        torch.testing.assert_close(out.hidden[i, last].float(), states[i][-1].float(), atol=tol, rtol=tol)
    assert (out.logprobs[~resp.bool()] == 0).all()


def test_t5_with_a_tied_output_layer_rescales_before_it(tmp_path):
    """transformers 5.23's T5 multiplies the decoder output by d_model**-0.5 before a tied output
    layer (``scale_decoder_outputs``): our logits must do the same."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    assert cfg.scale_decoder_outputs
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5", safe_serialization=True)
    model = load_base(str(tmp_path / "t5"), device="cpu", training=False)
    prompt, answer = [5, 6, 7, 1], [9, 10, 1]
    ids, attn = torch.tensor([prompt + answer]), torch.ones(1, 7, dtype=torch.long)
    resp = torch.tensor([[0] * 4 + [1] * 3])
    with torch.no_grad():
        ours = response_logprobs(model, ids, attn, resp).logprobs[0, 4:]
        logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0]
        hidden = final_hidden_states(model, ids, attn, resp)
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None])[:, 0]
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output_logits(model, hidden[0, 3:6]), logits, atol=1e-4, rtol=1e-4)


def count_encoder_rows(model):
    """A list that receives the batch size of every encoder call."""
    from pocketrlhf.models.forward import unwrap

    calls = []
    unwrap(model)[1].get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return calls


def test_a_pair_and_a_group_run_their_prompt_through_the_encoder_once(tiny_t5):
    from pocketrlhf.data.formats import Skipped, PreferencePair
    from pocketrlhf.data.tokenize import collate_preferences, tokenize_preferences

    tok = load_tokenizer(str(tiny_t5))
    model = perturbed_lora(load_base(str(tiny_t5), device="cpu", training=False))
    calls = count_encoder_rows(model)
    examples = tokenize_preferences(tok, [PreferencePair(p, a, b) for p, a, b in zip(PROMPTS, ANSWERS, ANSWERS[::-1])],
                                    None, Skipped())
    batch = collate_preferences(examples, tok.pad_token_id)
    with torch.no_grad():
        shared = pair_hidden_states(model, batch)
        assert calls == [3]  # 3 prompts for 6 rows
        for row in range(6):  # each row alone: the same states
            one = final_hidden_states(model, batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1],
                                      batch["response_mask"][row:row + 1])
            torch.testing.assert_close(shared[row:row + 1], one, atol=1e-5, rtol=1e-5)
        calls.clear()
        prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
        pairs, ids, attn, resp = rows(tok, prompts, ANSWERS + ANSWERS[::-1])
        lengths = torch.tensor([len(p) for p, _ in pairs])
        grouped = group_hidden_states(model, ids, attn, lengths, group_size=3)
        assert calls == [2]
        torch.testing.assert_close(grouped, final_hidden_states(model, ids, attn, resp), atol=1e-5, rtol=1e-5)


def test_every_adapter_gets_its_own_encoder_pass(tiny_t5):
    """Policy, reward and adapters-off differ in the encoder too: each call encodes under the
    adapter active then, and matches transformers run under that adapter."""
    tok = load_tokenizer(str(tiny_t5))
    model = perturbed_lora(load_base(str(tiny_t5), device="cpu", training=False), "policy", seed=1)
    model = perturbed_lora(model, "reward", seed=2)
    pairs, ids, attn, resp = rows(tok, PROMPTS, ANSWERS)
    adapters = AdapterSet(model)
    encoded, seen = {}, {}
    for name in ("policy", "reward", None):
        with adapters.use(name), torch.no_grad():
            encoded[name] = model.get_encoder()(input_ids=torch.tensor([pairs[0][0]])).last_hidden_state
            seen[name] = response_logprobs(model, ids, attn, resp).logprobs
            want, _ = direct(model, pairs)
        for i in range(len(pairs)):
            torch.testing.assert_close(seen[name][i][resp[i].bool()], want[i], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(encoded["policy"], encoded["reward"]) and not torch.allclose(encoded["policy"], encoded[None])
    assert not torch.allclose(seen["policy"], seen["reward"]) and not torch.allclose(seen["policy"], seen[None])


def test_rows_that_cannot_be_split_are_clear_errors(tiny_t5):
    tok = load_tokenizer(str(tiny_t5))
    model = load_base(str(tiny_t5), device="cpu", training=False)
    _, ids, attn, resp = rows(tok, PROMPTS, ANSWERS)
    with pytest.raises(ValueError, match="needs the response mask"):
        final_hidden_states(model, ids, attn)
    with pytest.raises(ValueError, match="needs a prompt .* in every row"):
        response_logprobs(model, ids, attn, attn)


def test_sampling_returns_answers_like_a_causal_lm(tiny_t5, tmp_path):
    """Response ids without the decoder start token, each row from its own seed whatever the batch,
    greedy answers the argmax of our own log-probs, and no generation_config.json field leaks in."""
    import shutil

    from pocketrlhf.models.generation import sample

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(no_repeat_ngram_size=1, min_new_tokens=5, forced_bos_token_id=7)
    (folder / "generation_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    model = load_base(str(folder), device="cpu", training=False)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    together = sample(model, tok, prompts, 6, 1.0, row_seeds=[3, 4, 5])
    alone = [sample(model, tok, [p], 6, 1.0, row_seeds=[s])[0] for p, s in zip(prompts, [3, 4, 5])]
    assert together == alone
    greedy = sample(model, tok, prompts, 6, 0.0)
    for p, a in zip(prompts, greedy):
        assert 1 <= len(a) <= 6 and a[0] != 7
        ids = torch.tensor([p + a])
        resp = torch.tensor([[0] * len(p) + [1] * len(a)])
        with torch.no_grad():
            hidden = final_hidden_states(model, ids, torch.ones_like(ids), resp)
            best = output_logits(model, hidden[0, len(p) - 1:len(p) + len(a) - 1]).argmax(-1)
        assert best.tolist() == a


# ---------------------------------------------------------------------------------------------
# The stages on an encoder-decoder base.


def stage_metrics(run_dir, split="train"):
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["split"] == split]


@pytest.fixture(scope="module")
def seq2seq_data(tmp_path_factory):
    from pocketrlhf.data import synthetic

    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("seq2seq_data")
    return {"sft": write_jsonl(root / "sft.jsonl", synthetic.sft_rows(200, seed=0)),
            "pairs": write_jsonl(root / "pairs.jsonl", synthetic.preference_rows(320, seed=1)),
            "prompts": write_jsonl(root / "prompts.jsonl", synthetic.prompt_rows(64, seed=2)),
            "text": write_jsonl(root / "text.jsonl", [{"text": "a plain document ."}] * 20)}


@pytest.mark.parametrize("arch,quantization", [("t5", "none"), ("t5", "4bit"), ("bart", "none")])
def test_sft_trains_input_to_target(tmp_path, tiny_t5, tiny_bart, seq2seq_data, arch, quantization):
    from pocketrlhf.stages import sft

    summary = sft.train(sft.SFTConfig(
        model=str(tiny_t5 if arch == "t5" else tiny_bart), data=str(seq2seq_data["sft"]), output_dir=str(tmp_path),
        device="cpu", quantization=quantization, packing=False, seq_length=64, batch_size=8, learning_rate=3e-3,
        max_steps=12, warmup_steps=0, lora_r=8, logging_steps=1, progress=False, eval_fraction=0.1))
    losses = [m["loss"] for m in stage_metrics(tmp_path)]
    assert losses[-1] < 0.8 * losses[0] and summary["eval_loss"] < 0.8 * losses[0]
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["task_type"] == "SEQ_2_SEQ_LM"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "AutoPeftModelForSeq2SeqLM" in card and "CausalLM" not in card and "text2text-generation" in card


def test_packing_is_off_by_default_and_refused_when_asked_for(tmp_path, tiny_t5, seq2seq_data, capsys):
    import yaml

    from pocketrlhf.cli import main

    common = ["sft", "--model", str(tiny_t5), "--data", str(seq2seq_data["sft"]), "--device", "cpu", "--max-steps", "1",
              "--no-progress"]
    assert main(common + ["--output-dir", str(tmp_path / "asked"), "--packing"]) != 0
    assert "--packing does not apply to an encoder-decoder base" in capsys.readouterr().err
    assert main(common + ["--output-dir", str(tmp_path / "default")]) == 0
    saved = yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())
    assert saved["packing"] is False  # the run's saved config says what ran


@pytest.mark.parametrize("options,message", [
    (dict(data="text"), "rows have no prompt .*an encoder-decoder base reads input -> target"),
    (dict(template="chatml"), "prompt format 'chatml' needs a decoder-only chat template"),
])
def test_what_has_no_meaning_for_seq2seq_is_a_one_line_error(tmp_path, tiny_t5, seq2seq_data, options, message):
    from pocketrlhf.errors import PocketError
    from pocketrlhf.stages import sft

    settings = dict(model=str(tiny_t5), data=str(seq2seq_data["sft"]), output_dir=str(tmp_path), device="cpu",
                    packing=False, max_steps=1, progress=False)
    settings.update(options)
    if "data" in options:
        settings["data"] = str(seq2seq_data[options["data"]])
    with pytest.raises(PocketError, match=message):
        sft.train(sft.SFTConfig(**settings))


@pytest.mark.parametrize("arch,quantization", [("t5", "none"), ("t5", "8bit"), ("bart", "none")])
def test_reward_model_ranks_held_out_pairs(tmp_path, tiny_t5, tiny_bart, seq2seq_data, arch, quantization):
    """The reward is read at the decoder's state after EOS; ``score`` reads it there too."""
    from pocketrlhf.stages import rm

    summary = rm.train(rm.RMConfig(model=str(tiny_t5 if arch == "t5" else tiny_bart), data=str(seq2seq_data["pairs"]), output_dir=str(tmp_path / "rm"),
                                   device="cpu", quantization=quantization, batch_size=16, learning_rate=3e-3, max_steps=20, eval_fraction=0.2,
                                   lora_r=8, progress=False, logging_steps=5))
    assert summary["eval_accuracy"] >= 0.75, summary["eval_accuracy"]
    scored = rm.score(rm.ScoreConfig(reward_adapter=str(tmp_path / "rm" / "adapter"), input=str(seq2seq_data["pairs"]),
                                     output=str(tmp_path / "scores.jsonl"), device="cpu"))
    assert scored["accuracy"] >= 0.75
    from pocketrlhf.errors import DataError

    with pytest.raises(DataError, match="rows without a prompt .* encoder-decoder reward model"):
        rm.score(rm.ScoreConfig(reward_adapter=str(tmp_path / "rm" / "adapter"), input=str(seq2seq_data["text"]),
                                output=str(tmp_path / "text.jsonl"), device="cpu"))


@pytest.mark.parametrize("arch,quantization,scope", [("t5", "none", "all"), ("t5", "4bit", "all"), ("bart", "none", "all"),
                                                    ("t5", "none", "decoder")])
def test_dpo_raises_implicit_accuracy(tmp_path, tiny_t5, tiny_bart, seq2seq_data, arch, quantization, scope, caplog):
    """Also with a decoder-only adapter and the reference run in every step: the policy then reads
    the reference's encoder pass."""
    import logging

    from pocketrlhf.stages import dpo

    caplog.set_level(logging.INFO, logger="pocketrlhf")
    summary = dpo.train(dpo.DPOConfig(model=str(tiny_t5 if arch == "t5" else tiny_bart), data=str(seq2seq_data["pairs"]), output_dir=str(tmp_path),
                                      device="cpu", quantization=quantization, batch_size=8, learning_rate=3e-3,
                                      max_steps=15, eval_fraction=0.2, lora_r=8, progress=False, seed=0,
                                      logging_steps=1, adapter_scope=scope, precompute_ref_logprobs=scope == "all"))
    shared = "encoder passes: one for policy, reference (the base's encoder)"
    assert (shared in caplog.text) == (scope == "decoder"), caplog.text[-2000:]
    rows = stage_metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter is its reference
    assert summary["eval_accuracy"] >= 0.75 and summary["eval_loss"] < 0.6, summary


LETTERS = '''
def letters(completions):
    """Share of the answer's characters that are ASCII letters: a rule a random base can climb."""
    return [sum(c.isascii() and c.isalpha() for c in t) / max(1, len(t)) for t in completions]
'''


@pytest.fixture(scope="module")
def letters_reward(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "rules.py"
    path.write_text(LETTERS)
    return f"{path}:letters"


@pytest.mark.parametrize("quantization,scope", [("none", "all"), ("4bit", "all"), ("none", "decoder")])
def test_ppo_raises_a_rule_reward_with_a_value_head_on_decoder_states(tmp_path, tiny_t5, seq2seq_data,
                                                                      letters_reward, quantization, scope):
    """Rollouts sampled from the decoder, log-probs and values recomputed in the row layout: the
    first minibatch of every step is exactly on-policy (ratio 1, approx KL 0), the KL to the
    reference starts at 0, and the held-out score rises. With a decoder-only policy the reference
    (adapters off) reads the old policy pass's encoder output."""
    from pocketrlhf.stages import ppo

    summary = ppo.train(ppo.PPOConfig(
        model=str(tiny_t5), prompts=str(seq2seq_data["prompts"]), output_dir=str(tmp_path), device="cpu",
        quantization=quantization, reward_function=letters_reward, max_steps=6, learning_rate=1e-2, rollouts_per_step=32, batch_size=16,
        gradient_accumulation_steps=1, max_new_tokens=4, ppo_epochs=2, kl_coef=0.05, adaptive_kl=False,
        lr_scheduler="constant", eval_fraction=0.25, eval_at_start=True, progress=False, seed=0, lora_r=8,
        adapter_scope=scope))
    rows = stage_metrics(tmp_path)
    # 2 micro-batches a step. Scope decoder: the policy's encoder is the frozen base's, so the old policy
    # pass encodes them, the reference reads them, and so may the 2 epochs x 2 shuffled micro-batches of
    # the update (when they hold the same prompts). Scope all: only the reference's passes go through.
    passes = [(r["encoder_passes"], r["encoder_passes_reused"]) for r in rows]
    assert all(run + reused == (8 if scope == "decoder" else 2) for run, reused in passes), passes
    assert all(reused >= 2 for _, reused in passes) if scope == "decoder" else passes[0] == (2, 0)
    assert rows[0]["kl"] == 0.0
    assert all(r["first_ratio"] == pytest.approx(1.0, abs=1e-5) and abs(r["first_approxkl"]) < 1e-6 for r in rows)
    assert summary["eval_score"] > summary["eval_start_score"] + 0.1, summary
    assert sum(r["score"] for r in rows[-2:]) / 2 > rows[0]["score"] + 0.15
    assert (tmp_path / "value" / "head.safetensors").is_file()


def test_grpo_on_a_4bit_base(tmp_path, tiny_t5, seq2seq_data, letters_reward):
    from pocketrlhf.stages import grpo

    summary = grpo.train(grpo.GRPOConfig(
        model=str(tiny_t5), prompts=str(seq2seq_data["prompts"]), output_dir=str(tmp_path), device="cpu",
        quantization="4bit", reward_function=[letters_reward], num_generations=4, prompts_per_step=8,
        max_new_tokens=4, learning_rate=1e-2, lr_scheduler="constant", max_steps=10, progress=False, lora_r=8,
        batch_size=32, gradient_accumulation_steps=1, eval_fraction=0.25, eval_at_start=True))
    rows = stage_metrics(tmp_path)
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_score"] > summary["eval_start_score"] + 0.1, summary


def test_dpo_loss_on_a_batch_equals_the_formula_by_hand(tiny_t5):
    """The stage's loss on one batch == -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with
    the sequence log-probs taken from transformers' own forward (labels = the answer), policy with
    its adapter, reference with adapters off."""
    from pocketrlhf.data.formats import PreferencePair, Skipped
    from pocketrlhf.stages import dpo

    tok = load_tokenizer(str(tiny_t5))
    model = perturbed_lora(load_base(str(tiny_t5), device="cpu"), scale=0.1)
    cfg = dpo.DPOConfig(model=str(tiny_t5), data="unused", beta=0.3)
    examples = dpo.tokenize(tok, [PreferencePair(p, a, b) for p, a, b in zip(PROMPTS, ANSWERS, ANSWERS[::-1][:2] + ["x"])],
                            None, Skipped())
    stage = dpo.DPOLoss(cfg, tok.pad_token_id, dpo.PairLogps(model), AdapterSet(model), None, share_prompt=False)
    loss, metrics = stage.loss(stage.logps, stage.batch(examples))

    def sequence_logp(prompt, answer):
        logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).sum()

    by_hand = 0.0
    for e in examples:
        policy = [sequence_logp(e.prompt_ids, e.chosen_ids), sequence_logp(e.prompt_ids, e.rejected_ids)]
        with model.disable_adapter(), torch.no_grad():
            ref = [sequence_logp(e.prompt_ids, e.chosen_ids), sequence_logp(e.prompt_ids, e.rejected_ids)]
        by_hand = by_hand - torch.nn.functional.logsigmoid(0.3 * ((policy[0] - ref[0]) - (policy[1] - ref[1])))
    assert abs(loss.item() - by_hand.item()) < 1e-4 and abs(loss.item() - 3 * 0.6931) > 1e-3
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "encoder" in n)


@pytest.mark.parametrize("scope", ["all", "decoder"])
def test_the_pipeline_runs_every_stage_on_a_t5_base(tmp_path, tiny_t5, seq2seq_data, scope):
    """sft (packing off without being told), rm, ppo with the reward adapter and a value adapter on
    the decoder, dpo and the evaluation (sampling, KL to the SFT adapter, reward-model scores).
    With ``adapter_scope: decoder`` every stage's adapter leaves the encoder alone, and PPO's
    policy, reference, reward and value read one encoder pass per micro-batch."""
    from safetensors import safe_open

    from pocketrlhf.pipeline import Pipeline, PipelineConfig

    from test_pipeline import tiny_pipeline

    data = {k: str(v) for k, v in seq2seq_data.items()}
    cfg = tiny_pipeline(tiny_t5, data, tmp_path / "run", adapter_scope=scope)
    cfg["sft"].pop("packing")
    cfg["ppo"]["value_model"] = "adapter"  # a value adapter of its own, started from the reward model
    Pipeline(PipelineConfig(**cfg)).run()
    for stage in ("sft", "rm", "ppo", "dpo"):
        with safe_open(str(tmp_path / "run" / stage / "adapter" / "adapter_model.safetensors"), "pt") as f:
            assert any(k.startswith("base_model.model.encoder.") for k in f.keys()) == (scope == "all"), stage
    if scope == "decoder":  # 8 rollouts in 2 micro-batches: the reward's pass serves old policy, value, reference
        assert all(r["encoder_passes_reused"] >= 6 for r in stage_metrics(tmp_path / "run" / "ppo"))
    results = json.loads((tmp_path / "run" / "evaluation" / "results.json").read_text())
    assert set(results) == {"base", "sft", "ppo", "dpo"}
    # (2 tiny PPO steps: the sampled KL estimate of a policy that moved little may come out slightly negative)
    assert results["sft"]["kl_to_sft"] == 0.0 and (results["ppo"]["kl_to_sft"] > 0 if scope == "all"
                                                   else results["ppo"]["kl_to_sft"] != 0)
    assert all(0 <= row["eos_fraction"] <= 1 and "reward_model_score" in row for row in results.values())
    assert json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())["train_loss"] > 0
    first = stage_metrics(tmp_path / "run" / "ppo")[0]
    assert first["first_ratio"] == pytest.approx(1.0, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["loha", "ia3", "adalora"])
def test_other_peft_methods_adapt_encoder_and_decoder(tiny_t5, method):
    tok = load_tokenizer(str(tiny_t5))
    model = attach_adapter(load_base(str(tiny_t5), device="cpu", training=False), make_peft_config(method, r=4))
    assert any(".encoder." in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(".decoder." in n for n, p in model.named_parameters() if p.requires_grad)
    pairs, ids, attn, resp = rows(tok, PROMPTS, ANSWERS)
    model.eval()
    with torch.no_grad():
        ours = response_logprobs(model, ids, attn, resp).logprobs
        want, _ = direct(model, pairs)
    for i in range(len(pairs)):
        torch.testing.assert_close(ours[i][resp[i].bool()], want[i], atol=1e-4, rtol=1e-4)


def test_dpo_on_a_t5_under_fsdp_matches_one_process(tmp_path, tiny_t5, seq2seq_data):
    """Encoder and decoder blocks sharded over 2 CPU processes; each pair's prompt encoded once
    under the policy and again with adapters off (the reference): the same losses and adapter as
    one process with the same global batch."""
    from pocketrlhf.stages import dpo

    from conftest import write_jsonl
    from test_distributed import adapter, train_losses
    from test_fsdp import launch

    rows = [json.loads(line) for line in seq2seq_data["pairs"].read_text().splitlines()[:56]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = dict(max_steps=3, learning_rate=1e-2, max_grad_norm=0.0, lora_r=8, seed=0, progress=False,
                eval_fraction=0.125, logging_steps=1, precompute_ref_logprobs=False)
    proc = launch("cpu_fsdp.yaml", tiny_t5, pairs, tmp_path / "fsdp", command="dpo", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: fsdp over 2 processes (gloo)" in proc.stderr and "frozen weights (50%)" in proc.stderr
    dpo.train(dpo.DPOConfig(model=str(tiny_t5), data=str(pairs), output_dir=str(tmp_path / "one"), device="cpu",
                            batch_size=4, gradient_accumulation_steps=2, **args))
    assert [x for _, x in train_losses(tmp_path / "fsdp")] == pytest.approx(
        [x for _, x in train_losses(tmp_path / "one")], rel=1e-4)
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys() and any("encoder" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k


# ---------------------------------------------------------------------------------------------
# One encoder pass for the roles whose adapters leave the encoder the base's (forward.encoder_reuse).


def scoped_lora(model, name, scope, seed, scale=0.3):
    return perturbed_lora(model, name, seed, scale, scope)


def role_outputs(model, adapters, roles, ids, attn, resp, trained="policy"):
    """Each role's no-grad log-probs, then the trained adapter's log-probs with gradient and the
    gradient of their sum over its weights."""
    out = {}
    with torch.no_grad():
        for role in roles:
            with adapters.use(role):
                out[role] = response_logprobs(model, ids, attn, resp, return_hidden=True)
    with adapters.use(trained):
        loss = response_logprobs(model, ids, attn, resp).logprobs.sum()
        weights = [p for n, p in model.named_parameters() if f".{trained}." in n]
        grads = torch.autograd.grad(loss, weights)
    return out, loss.detach(), grads


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_decoder_only_adapters_share_one_encoder_pass_exactly(tiny_t5, quantization):
    """Policy, reward and value adapters on the decoder only, reference with adapters off: within
    encoder_reuse the encoder runs once for all of them, the policy's training forward included
    (its encoder is frozen), and every number, gradients too, is bitwise the one without reuse."""
    from pocketrlhf.models.forward import encoder_reuse, unwrap

    tok = load_tokenizer(str(tiny_t5))
    model = load_base(str(tiny_t5), quantization, device="cpu", training=False)
    for seed, name in enumerate(("policy", "reward", "value")):
        model = scoped_lora(model, name, "decoder", seed)
    for n, p in model.named_parameters():
        p.requires_grad_(".policy." in n)  # what trains: the policy only
    model.eval()
    adapters = AdapterSet(model)
    calls = count_encoder_rows(model)
    _, ids, attn, resp = rows(tok, PROMPTS + PROMPTS[:1], ANSWERS + ANSWERS[1:2])
    roles = ("policy", None, "reward", "value")
    plain, plain_loss, plain_grads = role_outputs(model, adapters, roles, ids, attn, resp)
    assert calls == [3] * 5  # each call encodes the 3 distinct prompts
    calls.clear()
    with encoder_reuse(model) as cache:
        shared, shared_loss, shared_grads = role_outputs(model, adapters, roles, ids, attn, resp)
    assert calls == [3] and (cache.runs, cache.reused) == (1, 4)
    assert unwrap(model)[1]._pocketrlhf_encoder_cache is None  # the scope ends with its body
    for role in roles:
        assert torch.equal(shared[role].logprobs, plain[role].logprobs) and torch.equal(shared[role].hidden,
                                                                                      plain[role].hidden)
    assert torch.equal(shared_loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(shared_grads, plain_grads))
    assert not torch.equal(plain["policy"].logprobs, plain[None].logprobs)  # the adapters do change the outputs


def test_an_adapter_in_the_encoder_gets_its_own_pass(tiny_t5):
    """A policy adapter on encoder and decoder: its encoder differs from the base's, so the
    reference (adapters off) and a decoder-only reward share one pass, the policy runs its own,
    and, being trained, runs it again in every call with gradient (which reaches its encoder
    weights); every number equals the path without reuse."""
    from pocketrlhf.models.forward import describe_encoder_sharing, encoder_class, encoder_reuse, unwrap

    tok = load_tokenizer(str(tiny_t5))
    model = scoped_lora(load_base(str(tiny_t5), device="cpu", training=False), "policy", "all", 1)
    model = scoped_lora(model, "reward", "decoder", 2)
    model = scoped_lora(model, "critic", "all", 3)  # frozen, on the encoder too
    for n, p in model.named_parameters():
        p.requires_grad_(".policy." in n)
    model.eval()
    adapters = AdapterSet(model)
    lm = unwrap(model)[1]
    with adapters.use("policy"):
        assert encoder_class(lm) == (frozenset({"policy"}), False)
    with adapters.use("critic"):
        assert encoder_class(lm) == (frozenset({"critic"}), True)
    for role in (None, "reward"):
        with adapters.use(role):
            assert encoder_class(lm) == (frozenset(), True)  # the trainable policy's weights are idle there
    assert describe_encoder_sharing(model, {"policy": "policy", "reference": None, "reward": "reward", "critic": "critic"},
                                    {"policy"}) == (
        "encoder passes: one for reference, reward (the base's encoder); one for policy (adapter 'policy' acts in the "
        "encoder; trained: run anew in every call); one for critic (adapter 'critic' acts in the encoder) "
        "(--adapter-scope decoder keeps adapters out of the encoder)")
    _, ids, attn, resp = rows(tok, PROMPTS, ANSWERS)
    roles = ("policy", None, "reward", "critic", "critic")
    plain, plain_loss, plain_grads = role_outputs(model, adapters, roles, ids, attn, resp)
    calls = count_encoder_rows(model)
    with encoder_reuse(model) as cache:
        shared, shared_loss, shared_grads = role_outputs(model, adapters, roles, ids, attn, resp)
        with torch.no_grad(), adapters.use("policy"):  # trainable encoder: never kept, never reused
            response_logprobs(model, ids, attn, resp)
    # policy, base (reference + reward), critic (twice, once run), policy with grad, policy again
    assert len(calls) == 5 and (cache.runs, cache.reused) == (2, 2)
    for role in roles:
        assert torch.equal(shared[role].logprobs, plain[role].logprobs)
    assert torch.equal(shared_loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(shared_grads, plain_grads))
    names = [n for n, p in model.named_parameters() if ".policy." in n]
    assert any(g.abs().sum() > 0 for n, g in zip(names, shared_grads) if ".encoder." in n)
    assert not torch.allclose(plain["policy"].hidden, plain[None].hidden)


def test_adapter_scope_decoder_leaves_the_encoder_alone_and_is_refused_on_causal_bases(tiny_t5, tiny_bart, llama):
    from pocketrlhf.errors import ModelLoadError
    from pocketrlhf.models.forward import encoder_adapters

    for path in (tiny_t5, tiny_bart):
        for method in ("lora", "ia3", "loha"):
            model = attach_adapter(load_base(str(path), device="cpu", training=False), make_peft_config(method, r=4),
                                   scope="decoder")
            adapted = [n for n, p in model.named_parameters() if p.requires_grad]
            assert adapted and all(".decoder." in n for n in adapted), (path.name, method)
            assert encoder_adapters(model) == set()
        if path == tiny_bart:  # the decoder's cross-attention reads the encoder but belongs to the decoder
            assert any("encoder_attn" in n for n in adapted)
    with pytest.raises(ModelLoadError, match="--adapter-scope decoder applies to encoder-decoder bases"):
        attach_adapter(load_base(str(llama), device="cpu", training=False), make_peft_config("lora"), scope="decoder")


def test_adapter_scope_decoder_on_a_causal_base_is_a_one_line_error(tmp_path, llama, seq2seq_data, capsys):
    from pocketrlhf.cli import main

    code = main(["sft", "--model", str(llama), "--data", str(seq2seq_data["sft"]), "--device", "cpu", "--max-steps", "1",
                 "--no-progress", "--output-dir", str(tmp_path), "--adapter-scope", "decoder"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "--adapter-scope decoder applies to encoder-decoder bases (T5, BART) only" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.fixture(scope="module")
def decoder_only_adapters(tmp_path_factory, tiny_t5, seq2seq_data):
    """An SFT adapter and a reward adapter + head trained with --adapter-scope decoder (a few steps)."""
    from pocketrlhf.stages import rm, sft

    root = tmp_path_factory.mktemp("decoder_only")
    common = dict(model=str(tiny_t5), device="cpu", adapter_scope="decoder", max_steps=3, lora_r=8, progress=False,
                  eval_fraction=0.0, batch_size=8, learning_rate=3e-3)
    sft.train(sft.SFTConfig(data=str(seq2seq_data["sft"]), output_dir=str(root / "sft"), packing=False, seq_length=64,
                            **common))
    rm.train(rm.RMConfig(data=str(seq2seq_data["pairs"]), output_dir=str(root / "rm"), **common))
    return {"sft": root / "sft" / "adapter", "rm": root / "rm" / "adapter"}


@pytest.mark.parametrize("group_size", [1, 2])
def test_a_ppo_scoring_step_encodes_each_batch_once_for_every_role(tiny_t5, seq2seq_data, decoder_only_adapters,
                                                                   group_size):
    """PPO with a decoder-only policy (a copy of a decoder-only SFT adapter), its frozen copy as the
    reference, a decoder-only reward adapter and a value adapter started from it: the reward's
    encoder pass of each micro-batch serves the old policy, the value and the reference (GRPO's
    policy and reference passes too), with the numbers of the path without reuse."""
    from pocketrlhf.models.forward import describe_encoder_sharing, encoder_reuse
    from pocketrlhf.stages import online, ppo

    tok = load_tokenizer(str(tiny_t5))
    cfg = ppo.PPOConfig(model=str(tiny_t5), device="cpu", sft_adapter=str(decoder_only_adapters["sft"]),
                        reward_adapter=str(decoder_only_adapters["rm"]), value_model="adapter", adapter_scope="decoder",
                        batch_size=4, max_new_tokens=5, lora_r=8)
    roles = ppo.build_roles(cfg, 10)
    assert roles.reference == ppo.REFERENCE and roles.value_adapter == ppo.VALUE
    line = describe_encoder_sharing(roles.model, online.model_roles(roles))
    assert line == "encoder passes: one for policy, reference, reward, value (the base's encoder)"
    module = ppo.PPO(cfg).trained_module(roles)
    prompts = online.Prompts([tok(p)["input_ids"] for p in PROMPTS * 2 + ["good"] * 2], [{}] * 8)
    seeds = list(range(8 * group_size))
    calls = count_encoder_rows(roles.model)
    with encoder_reuse(roles.model) as cache:
        r = online.generate_rollouts(cfg, roles, tok, prompts, seeds, group_size=group_size)
        batches = cache.runs  # the reward adapter's passes, one per micro-batch
        assert batches == len(online.micro_batches(8 * group_size, cfg.batch_size, group_size)) and cache.reused == 0
        calls.clear()
        old = ppo.old_policy_pass(cfg, roles, module, r)
        grpo_policy = online.adapter_logprobs(cfg, roles, r, ppo.POLICY)
        assert calls == [] and cache.reused == 4 * batches  # old policy + value, reference, GRPO's policy pass
    want = ppo.old_policy_pass(cfg, roles, module, r)
    assert len(calls) == 3 * batches  # without reuse: policy, value and reference encode every micro-batch
    for k in want:
        assert torch.equal(old[k], want[k]), k
    assert torch.equal(grpo_policy, online.adapter_logprobs(cfg, roles, r, ppo.POLICY))
    scores = roles.reward.sources[0].score(r.input_ids, r.attention_mask, None, None, None, 1, r.prompt_lengths)
    assert torch.allclose(scores.float(), r.raw_scores, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dpo_policy_reads_the_reference_encoder_pass(tiny_t5, checkpointing):
    """A decoder-only DPO adapter, reference with adapters off, reference log-probs computed in the
    step: one encoder pass per batch for both, loss and gradients bitwise those without reuse
    (with gradient checkpointing too, whose recomputation reads the shared encoder output)."""
    from pocketrlhf.data.formats import PreferencePair, Skipped
    from pocketrlhf.stages import dpo

    tok = load_tokenizer(str(tiny_t5))
    base = load_base(str(tiny_t5), device="cpu")
    if checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert base.is_gradient_checkpointing
    model = scoped_lora(base, "default", "decoder", 0, scale=0.1)
    model.train()
    cfg = dpo.DPOConfig(model=str(tiny_t5), data="unused", beta=0.3)
    examples = dpo.tokenize(tok, [PreferencePair(p, a, b) for p, a, b in zip(PROMPTS, ANSWERS, ANSWERS[::-1][:2] + ["x"])],
                            None, Skipped())
    stage = dpo.DPOLoss(cfg, tok.pad_token_id, dpo.PairLogps(model), AdapterSet(model), None, share_prompt=False)
    batch = stage.batch(examples)
    weights = [p for p in model.parameters() if p.requires_grad]
    calls = count_encoder_rows(model)
    results = {}
    for reuse in (True, False):
        stage.reuse_encoder = reuse
        calls.clear()
        loss, _ = stage.loss(stage.logps, batch)
        results[reuse] = (loss.detach(), torch.autograd.grad(loss, weights), len(calls))
    assert results[True][2] == 1 and results[False][2] == 2
    assert torch.equal(results[True][0], results[False][0]) and abs(results[True][0].item() - 3 * 0.6931) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
