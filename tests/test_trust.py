"""Numbers a user can trust: held-out sets that share no prompt with training, intervals beside
accuracies, warnings on a chance-level or overfit reward model and on length-driven reward gains,
and rollouts that ignore a model folder's generation_config.json."""

import itertools
import json
import random
import shutil

import pytest
import torch

from pocketrlhf.algorithms.stats import describe_accuracy, pearson, wilson_interval
from pocketrlhf.data import synthetic
from pocketrlhf.data.rows import group_ids, read_rows, split_holdout
from pocketrlhf.diagnostics import reward_hacking_warnings, reward_model_warnings
from pocketrlhf.stages import ppo, rm

from conftest import write_jsonl

# ---------------------------------------------------------------------------------------------
# Pure pieces, on hand-made numbers.


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)  # upper end z^2 / (n + z^2) when nothing succeeded
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2), abs=1e-6)
    low, high = wilson_interval(90, 100)
    assert 0.82 < low < 0.83 and 0.94 < high < 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert describe_accuracy(0.5, 10) == "0.500 (95% interval 0.24-0.76, n=10)"
    assert describe_accuracy(None, None).startswith("n/a")


def test_pearson_on_hand_made_points():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None


def test_rows_sharing_a_prompt_or_a_qid_form_one_group():
    keys = [["a", 1], ["b", 2], ["a", 3], ["c", 2], ["d", 4], ["e", 3]]
    # a joins rows 0 and 2, qid 3 joins 2 and 5, qid 2 joins 1 and 3; row 4 is alone.
    assert group_ids(keys) == [0, 1, 0, 1, 2, 0]


def test_held_out_rows_never_share_a_group_with_training_rows():
    rng = random.Random(0)
    groups = [g for g in range(40) for _ in range(rng.randint(1, 10))]
    items = list(range(len(groups)))
    train, held = split_holdout(items, 0.2, seed=3, groups=groups)
    assert held and sorted(train + held) == items
    assert not {groups[i] for i in train} & {groups[i] for i in held}
    assert abs(len(held) - 0.2 * len(items)) <= 10  # whole groups, as close to the fraction as they allow
    assert split_holdout(items, 0.2, seed=3, groups=[0] * len(items)) == (items, [])  # one prompt: nothing to hold out


def test_unique_prompts_split_as_they_always_did():
    from pocketrlhf.stages.common import epoch_order

    items = list(range(50))
    order = epoch_order(50, 7, epoch=-1)
    train, held = split_holdout(items, 0.1, seed=7)
    assert sorted(held) == sorted(order[:5]) and len(train) == 45


@pytest.mark.parametrize("kind", ["SFT", "preference", "prompt"])
def test_every_stage_holds_out_whole_prompts(tmp_path, llama, kind):
    from pocketrlhf.data.formats import preference_pairs, prompts, sft_pairs
    from pocketrlhf.models.loading import load_tokenizer

    rows = {"SFT": synthetic.sft_rows(300, seed=0), "preference": synthetic.preference_rows(300, seed=1),
            "prompt": synthetic.prompt_rows(300, seed=2)}[kind]
    parse = {"SFT": sft_pairs, "preference": preference_pairs, "prompt": prompts}[kind]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    got = read_rows(kind, parse, str(data), "", 0.2, 0, "plain", load_tokenizer(str(llama)))

    def prompt_of(row):
        return row if isinstance(row, str) else row.prompt

    assert got.held_out and not {prompt_of(r) for r in got.train} & {prompt_of(r) for r in got.held_out}
    assert got.split["held_out_prompts"] >= 1 and "whole groups by prompt" in got.split["held_out_from"]
    assert len(got.train) + len(got.held_out) == 300


def test_a_qid_column_groups_rows_whose_prompts_differ(tmp_path, llama):
    from pocketrlhf.data.formats import preference_pairs
    from pocketrlhf.models.loading import load_tokenizer

    # Two phrasings of each question (as after an edit), tied together by their qid only.
    rows = [{"qid": q, "prompt": f"question {q} take {i % 2}", "chosen": "a good answer .", "rejected": "a bad one ."}
            for q in range(30) for i in range(4)]
    got = read_rows("preference", preference_pairs, str(write_jsonl(tmp_path / "p.jsonl", rows)), "", 0.2, 0, "plain",
                    load_tokenizer(str(llama)))
    question = lambda row: row.prompt.split(" take ")[0]  # noqa: E731
    assert not {question(r) for r in got.train} & {question(r) for r in got.held_out}
    assert "qid" in got.split["held_out_from"]


def test_reward_model_warnings_fire_on_chance_and_overfitting_and_stay_silent_on_a_good_model():
    assert reward_model_warnings(0.95, 200, train_accuracy=0.97) == []
    chance = reward_model_warnings(0.54, 48)
    assert len(chance) == 1 and "not better than chance" in chance[0] and "n=48" in chance[0]
    overfit = reward_model_warnings(0.70, 400, train_accuracy=0.99)
    assert len(overfit) == 1 and "overfitting" in overfit[0]
    assert "no held-out accuracy" in reward_model_warnings(None, 0)[0]


def test_reward_hacking_warning_on_a_score_gain_with_a_length_shift():
    shorter = reward_hacking_warnings("ppo", score=2.8, sft_score=0.4, length=20, sft_length=47)
    assert len(shorter) == 1 and "57% shorter" in shorter[0]
    assert reward_hacking_warnings("ppo", score=2.8, sft_score=0.4, length=45, sft_length=47) == []
    assert reward_hacking_warnings("ppo", score=0.1, sft_score=0.4, length=20, sft_length=47) == []  # no gain
    eos = reward_hacking_warnings("ppo", 2.0, 0.0, 40, 40, eos_fraction=0.1, sft_eos_fraction=0.9)
    assert len(eos) == 1 and "end with EOS" in eos[0]


# ---------------------------------------------------------------------------------------------
# A reward model on labels that are pure noise, with several pairs per prompt.


def noisy_pairs(n_prompts: int = 40, answers: int = 4, seed: int = 0) -> list[dict]:
    """Stack-Exchange-shaped pairs: every prompt has its own answers, ranked by a random score
    (consistent within the prompt, as votes are, but unrelated to the text)."""
    vocab = sorted({w for t in synthetic.corpus() for w in t.split() if w.isalpha()})
    rng = random.Random(seed)
    rows, seen = [], set()
    for q in range(n_prompts):
        prompt = f"question {q}: " + " ".join(rng.sample(vocab, 3)) + " ?"
        ranked = []
        while len(ranked) < answers:
            text = " ".join(rng.sample(vocab, 3))
            if text not in seen:
                seen.add(text)
                ranked.append((text, rng.random()))
        for (a, score_a), (b, score_b) in itertools.combinations(ranked, 2):
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            rows.append({"qid": q, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def rm_config(llama, out, **kw):
    settings = dict(model=str(llama), output_dir=str(out), device="cpu", batch_size=16, learning_rate=3e-3,
                    max_steps=120, lora_r=16, progress=False, logging_steps=50)
    return rm.RMConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("noise")
    rows = noisy_pairs()
    grouped = rm.train(rm_config(llama, root / "grouped", data=str(write_jsonl(root / "pairs.jsonl", rows)),
                                 eval_fraction=0.2))
    # What a per-pair split did: a random fifth of the PAIRS held out, their prompts seen in training.
    k = len(rows) // 5
    per_pair = rm.train(rm_config(llama, root / "per_pair", data=str(write_jsonl(root / "train.jsonl", rows[k:])),
                                  eval_data=str(write_jsonl(root / "eval.jsonl", rows[:k]))))
    return root, grouped, per_pair


@pytest.mark.slow
def test_noise_labels_give_chance_held_out_accuracy_where_a_per_pair_split_flatters(noise_runs):
    _, grouped, per_pair = noise_runs
    low, high = grouped["eval_accuracy_ci95"]
    assert low <= 0.5 <= high and grouped["eval_accuracy_n"] == grouped["eval_pairs"] > 30
    assert grouped["held_out"]["held_out_prompts"] >= 5 and "qid" in grouped["held_out"]["held_out_from"]
    # The per-pair split measures memory: far above chance on the very same kind of data.
    assert per_pair["eval_accuracy_ci95"][0] > 0.5
    assert per_pair["eval_accuracy"] - grouped["eval_accuracy"] > 0.15
    assert per_pair["held_out"]["prompts_shared_with_training"] > 0
    assert any("not better than chance" in w for w in grouped["warnings"])
    assert any("overfitting" in w for w in grouped["warnings"])


@pytest.mark.slow
def test_ppo_warns_before_optimising_a_chance_level_reward_model(noise_runs, trained_good_rm):
    root, _, _ = noise_runs
    warnings = ppo.reward_adapter_warnings(str(root / "grouped" / "adapter"))
    assert any("PPO will optimise noise" in w for w in warnings)
    assert ppo.reward_adapter_warnings(str(trained_good_rm / "adapter")) == []
    info = json.loads((root / "grouped" / "adapter" / "pocketrlhf_adapter.json").read_text())
    assert info["eval_accuracy_n"] > 30 and len(info["eval_accuracy_ci95"]) == 2


@pytest.fixture(scope="module")
def trained_good_rm(tmp_path_factory, llama):
    out = tmp_path_factory.mktemp("good_rm")
    data = write_jsonl(out / "pairs.jsonl", synthetic.preference_rows(600, seed=1))
    summary = rm.train(rm_config(llama, out / "run", data=str(data), eval_fraction=0.2, max_steps=40))
    assert summary["warnings"] == [] and summary["eval_accuracy_ci95"][0] > 0.8
    return out / "run"


def test_pipeline_holds_out_the_prepared_evaluation_split(tmp_path, llama):
    """With a data stage, rm and dpo are scored on the evaluation split: questions (qids) that the
    reward split never holds."""
    from pocketrlhf.pipeline import Pipeline, PipelineConfig

    pairs = [{"qid": q, "question": f"question {q}", "response_j": "good", "response_k": "bad"} for q in range(200)]
    cfg = PipelineConfig(model=str(llama), output_dir=str(tmp_path / "run"), device="cpu",
                         stackexchange=str(write_jsonl(tmp_path / "paired.jsonl", pairs)),
                         stages=["data", "sft", "rm", "dpo", "ppo"], ppo={"reward_function": "pocketrlhf.data.synthetic:sentiment_reward"})
    pipeline = Pipeline(cfg)
    pipeline.run_stage("data")
    rm_cfg, dpo_cfg = pipeline.stage_config("rm"), pipeline.stage_config("dpo")
    evaluation = str(tmp_path / "run" / "data" / "evaluation")
    assert rm_cfg.eval_data == dpo_cfg.eval_data == pipeline.stage_config("sft").eval_data == evaluation
    assert pipeline.stage_config("ppo").eval_prompts == evaluation
    from pocketrlhf.data.loading import load_records

    reward_qids = set(load_records(rm_cfg.data)["qid"])
    held_qids = set(load_records(rm_cfg.eval_data)["qid"])
    assert held_qids and reward_qids and not reward_qids & held_qids


# ---------------------------------------------------------------------------------------------
# Rollouts are pure samples whatever the model folder's generation_config.json says.


def test_rollouts_ignore_the_model_folders_generation_config(tmp_path, llama):
    from pocketrlhf.models.generation import folder_generation_settings, row_seed, sample
    from pocketrlhf.models.loading import load_base, load_tokenizer

    shaped = tmp_path / "shaped"
    shutil.copytree(llama, shaped)
    tok = load_tokenizer(str(llama))
    word = tok(" the", add_special_tokens=False)["input_ids"][0]
    settings = {"min_new_tokens": 12, "no_repeat_ngram_size": 2, "suppress_tokens": [word],
                "bad_words_ids": [[tok(" was", add_special_tokens=False)["input_ids"][0]]],
                "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    (shaped / "generation_config.json").write_text(json.dumps(settings))
    plain = load_base(str(llama), device="cpu", training=False)
    with_file = load_base(str(shaped), device="cpu", training=False)
    assert set(folder_generation_settings(with_file)) == {"min_new_tokens", "no_repeat_ngram_size", "suppress_tokens",
                                                         "bad_words_ids"}
    prompts = [tok(r["prompt"])["input_ids"] for r in synthetic.prompt_rows(16, seed=5)]
    seeds = [row_seed(0, 1, i) for i in range(len(prompts))]
    # The file does change what transformers' own generate() samples...
    torch.manual_seed(0)
    raw_plain = plain.generate(input_ids=torch.tensor([prompts[0]]), do_sample=True, max_new_tokens=20)
    torch.manual_seed(0)
    raw_file = with_file.generate(input_ids=torch.tensor([prompts[0]]), do_sample=True, max_new_tokens=20)
    assert raw_plain.tolist() != raw_file.tolist()
    # ...but not what a rollout or any other sampling path samples.
    for kwargs in ({"row_seeds": seeds}, {"top_p": 0.9}, {"temperature": 0.0}):
        outs = []
        for model in (plain, with_file):
            torch.manual_seed(0)
            outs.append(sample(model, tok, prompts, max_new_tokens=20, **kwargs))
        assert outs[0] == outs[1]
    assert with_file.generation_config.min_new_tokens == 12  # the folder's settings are restored afterwards


def test_a_prompt_holding_most_rows_never_becomes_most_of_the_hold_out():
    groups = [0] * 95 + [1] * 5
    for seed in range(6):
        train, held = split_holdout(list(range(100)), 0.05, seed=seed, groups=groups)
        assert len(held) <= 10 and len(train) >= 90
