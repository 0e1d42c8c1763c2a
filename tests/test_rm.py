import json
import shutil

import pytest
import torch

from pocketrlhf.cli import main
from pocketrlhf.data import synthetic
from pocketrlhf.data.tokenize import collate, TokenExample
from pocketrlhf.models.adapters import attach_adapter, make_peft_config
from pocketrlhf.models.heads import ScalarHead
from pocketrlhf.models.loading import load_base, load_tokenizer
from pocketrlhf.models.roles import ScoreModel, load_reward_adapter
from pocketrlhf.stages import rm

from conftest import write_jsonl


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rm") / "pairs.jsonl", synthetic.preference_rows(600, seed=1))


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", batch_size=16,
                learning_rate=3e-3, max_steps=40, eval_fraction=0.2, lora_r=8, progress=False, logging_steps=5)
    base.update(kw)
    return rm.RMConfig(**base)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, llama, pairs_file):
    out = tmp_path_factory.mktemp("rm_run")
    summary = rm.train(config(llama, pairs_file, out))
    return out, summary


def test_reward_model_ranks_held_out_pairs(trained_rm):
    out, summary = trained_rm
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_accuracy_n"] == summary["eval_pairs"]
    # A fifth of the pairs, rounded to whole prompts (16 prompts share the 600 pairs).
    assert abs(summary["eval_pairs"] - 120) <= 600 / 16 and summary["held_out"]["held_out_prompts"] >= 2
    assert summary["eval_loss"] < 0.69  # better than chance (log 2)
    for name in ("adapter_model.safetensors", "adapter_config.json", "head.safetensors", "tokenizer_config.json"):
        assert (out / "adapter" / name).is_file()
    info = json.loads((out / "adapter" / "pocketrlhf_adapter.json").read_text())
    assert info["stage"] == "rm" and info["reward_std"] > 0 and "reward_mean" in info


@pytest.mark.slow
def test_reward_model_on_a_4bit_base(tmp_path, llama, pairs_file):
    summary = rm.train(config(llama, pairs_file, tmp_path, quantization="4bit"))
    assert summary["eval_accuracy"] >= 0.9


def test_reward_is_read_at_the_eos_and_never_at_padding(llama):
    tok = load_tokenizer(str(llama))
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("lora", r=4))
    torch.manual_seed(0)
    scorer = ScoreModel(model, ScalarHead(64, init="reward")).eval()
    text = tok("the story was great .")["input_ids"]
    with_eos = text + [tok.eos_token_id]
    short = tok("a dull ending .")["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        plain = scorer(*_batch([text], tok))[0]
        ended = scorer(*_batch([with_eos], tok))[0]
        alone = scorer(*_batch([short], tok))[0]
        padded = scorer(*_batch([with_eos + with_eos, short], tok))[1]  # `short` padded by 11 pads
    assert abs(plain - ended) > 1e-4  # the EOS position itself is read
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)  # pads change nothing


def _batch(rows, tok):
    b = collate([TokenExample(r, r) for r in rows], tok.pad_token_id)
    return b["input_ids"], b["attention_mask"]


def test_reward_adapter_shares_the_base_with_the_policy(trained_rm, llama):
    """Loading the reward adapter onto a base that already carries the policy adapter keeps one
    copy of the base weights: same tensors, same storages, no new base parameters."""
    out, _ = trained_rm
    model = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("lora", r=4), "policy")
    base_params = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    storages = {p.untyped_storage().data_ptr() for p in base_params.values()}
    model, reward = load_reward_adapter(model, out / "adapter")
    after = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert set(after) == set(base_params)
    assert {p.untyped_storage().data_ptr() for p in after.values()} == storages
    assert set(model.peft_config) == {"policy", "reward"} and model.active_adapter == "policy"
    tok = load_tokenizer(str(llama))
    good = tok(synthetic.PROMPT.format(title="Red Harbor") + " the story was really great . a superb cast .")
    bad = tok(synthetic.PROMPT.format(title="Red Harbor") + " the story was really awful . a boring cast .")
    ids, mask = _batch([good["input_ids"] + [tok.eos_token_id], bad["input_ids"] + [tok.eos_token_id]], tok)
    scores = reward(ids, mask)
    assert scores[0] > scores[1]  # the trained reward prefers the positive review
    assert model.active_adapter == "policy"  # scoring switched back
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".reward." in n)


def test_score_command_on_pairs_and_texts(tmp_path, trained_rm, capsys):
    out, _ = trained_rm
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(40, seed=7) +
                        [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert main(["score", "--reward-adapter", str(out / "adapter"), "--input", str(pairs), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "scored 40 of 41 pairs" in printed and "identical" in printed
    rows = [json.loads(x) for x in (tmp_path / "pairs.scores.jsonl").read_text().splitlines()]
    assert len(rows) == 41 and rows[-1]["score_chosen"] is None
    assert sum(r["score_chosen"] > r["score_rejected"] for r in rows[:40]) >= 36
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"prompt": "Write a review of the movie Red Harbor.",
                                                   "completion": c} for c in (" a superb cast .", " an awful cast .")])
    assert main(["score", "--reward-adapter", str(out / "adapter"), "--input", str(texts), "--device", "cpu",
                 "--output", str(tmp_path / "t.jsonl")]) == 0
    scored = [json.loads(x)["score"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert scored[0] > scored[1]


def test_rm_resume_continues_exactly(tmp_path, llama, pairs_file):
    full = tmp_path / "full"
    rm.train(config(llama, pairs_file, full, max_steps=4, save_steps=2, logging_steps=1, save_total_limit=0))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    rm.train(config(llama, pairs_file, crashed, max_steps=4, save_steps=2, logging_steps=1, resume="auto"))

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["split"] == "train"]

    assert losses(crashed)[-2:] == losses(full)[2:4]


def test_bad_preference_data_is_a_one_line_error(tmp_path, llama, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "a"}])
    assert main(["rm", "--model", str(llama), "--data", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no usable columns for preference data" in err and err.count("\n") == 1
    assert main(["score", "--reward-adapter", str(tmp_path), "--input", str(bad)]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_shared_prompt_scores_equal_two_row_scores(tiny_models, arch):
    """Each pair as one row (prompt, chosen, rejected; an answer sees only the prompt and itself)
    gives the rewards of the two-row layout, with the prompt computed once."""
    from pocketrlhf.data.formats import PreferencePair, Skipped
    from pocketrlhf.data.tokenize import tokenize_preferences
    from pocketrlhf.models.roles import PairScoreModel

    tok = load_tokenizer(str(tiny_models[arch]))
    model = attach_adapter(load_base(str(tiny_models[arch]), device="cpu"), make_peft_config("lora", r=4))
    torch.manual_seed(0)
    scorer = PairScoreModel(model, ScalarHead(64, init="reward"))
    pairs = [PreferencePair(synthetic.PROMPT.format(title=t), " a superb cast .", " the story was really dull .")
             for t in ("Red Harbor", "Night Train")] + [PreferencePair("Write", " ok .", " a long and boring one .")]
    examples = tokenize_preferences(tok, pairs, None, Skipped())
    two_rows = rm.RewardLoss(tok.pad_token_id, 0.0, share_prompt=False).batch(examples)
    one_row = rm.RewardLoss(tok.pad_token_id, 0.0, share_prompt=True).batch(examples)
    assert one_row["shared_ids"].numel() < two_rows["input_ids"].numel()
    with torch.no_grad():
        torch.testing.assert_close(scorer(one_row), scorer(two_rows), atol=1e-4, rtol=1e-4)
