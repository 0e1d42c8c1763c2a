import json
import math
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pocketrlhf.cli import main
from pocketrlhf.data import synthetic
from pocketrlhf.data.formats import PreferencePair, Skipped, preference_pairs
from pocketrlhf.models.adapters import AdapterSet, attach_adapter, make_peft_config
from pocketrlhf.models.forward import supports_attention_bias
from pocketrlhf.models.loading import load_base, load_tokenizer
from pocketrlhf.stages import dpo, sft

from conftest import write_jsonl

LOG2_F32 = -torch.nn.functional.logsigmoid(torch.zeros(())).item()  # the loss when policy == reference


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", synthetic.preference_rows(240, seed=1))


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, llama, sft_file):
    out = tmp_path_factory.mktemp("sft_run")
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(out), device="cpu", packing=False,
                            completion_only=True, seq_length=64, batch_size=8, learning_rate=3e-3, max_steps=6,
                            lora_r=8, progress=False))
    return out / "adapter"


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", batch_size=8, learning_rate=3e-3,
                max_steps=30, eval_fraction=0.2, lora_r=8, progress=False, seed=0)
    base.update(kw)
    return dpo.DPOConfig(**base)


def metrics(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def perturbed(model, adapter="default", seed=0):
    """Give an adapter's LoRA B matrices random values, so the policy differs from its reference."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.normal_(0, 0.05)
    return model


# ---------------------------------------------------------------------------------------------
# Training works.


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_dpo_raises_held_out_preference_accuracy(tmp_path, llama, pairs_file, quantization):
    summary = dpo.train(config(llama, pairs_file, tmp_path, quantization=quantization))
    first = metrics(tmp_path)[0]
    # Fresh adapter == base == reference at the first step (the cached reference was computed in
    # other batches, so equal up to rounding): no preference yet.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(first["margin"]) < 1e-5
    # A fifth of the 240 pairs, rounded to whole prompts (16 prompts share them).
    assert summary["eval_pairs"] + summary["train_pairs"] == 240 and abs(summary["eval_pairs"] - 48) <= 240 / 16
    assert summary["eval_accuracy"] >= 0.85 and summary["eval_loss"] < 0.4
    assert summary["eval_rewards/chosen"] > summary["eval_rewards/rejected"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    info = json.loads((tmp_path / "adapter" / "pocketrlhf_adapter.json").read_text())
    assert info["stage"] == "dpo" and info["template"] == "plain" and info["reference"] == "base"
    assert {"loss", "rewards/chosen", "rewards/rejected", "accuracy", "margin"} <= set(metrics(tmp_path, "eval")[-1])


def test_sft_adapter_is_the_starting_point_and_a_frozen_reference(tmp_path, llama, pairs_file, sft_adapter):
    # The reference runs in every step (no cache): the same batch, the same code path as the policy.
    cfg = config(llama, pairs_file, tmp_path, sft_adapter=str(sft_adapter), max_steps=8, precompute_ref_logprobs=False)
    model, _, reference = dpo.build_model(cfg, total_steps=8)
    assert reference == "reference"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert any(".reference." in n for n, _ in model.named_parameters())

    summary = dpo.train(cfg)
    first = metrics(tmp_path)[0]
    # The policy IS the reference at step 0: rewards and KL are exactly zero, not merely small.
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["margin"] == 0.0
    assert first["loss"] == LOG2_F32
    assert metrics(tmp_path)[-1]["margin"] > 0.5 and summary["eval_accuracy"] >= 0.75
    start = load_file(str(sft_adapter / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert start.keys() == trained.keys() and any((start[k] != trained[k]).any() for k in start)
    assert json.loads((tmp_path / "adapter" / "pocketrlhf_adapter.json").read_text())["reference"] == str(sft_adapter)


# ---------------------------------------------------------------------------------------------
# The numbers are trl's.


def trl_trainer(tmp_path, model, tokenizer, **peft):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=4)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(synthetic.preference_rows(4, seed=3)),
                      processing_class=tokenizer, **peft)


def compare_with_trl(trainer, model, tokenizer, stage: dpo.DPOLoss, loss_type: str, label_smoothing: float = 0.0):
    """trl's own collator and loss on the same token ids vs ours; returns both metric dicts."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = synthetic.preference_rows(6, seed=5)
    pairs, _ = preference_pairs(Dataset.from_list(rows), "rows", "plain", tokenizer)
    examples = dpo.tokenize(tokenizer, pairs, 512, Skipped())
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in examples])
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], label_smoothing
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
    theirs = {k: v[-1] for k, v in trainer._metrics[mode].items()}

    stage.cfg.loss_type, stage.cfg.label_smoothing = loss_type, label_smoothing
    batch = stage.batch(examples)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])  # the very same tokens
    with torch.no_grad():
        loss, sums = stage.loss(stage.logps, batch)
    n = len(examples)
    ours = {"loss": loss.item() / n, **{k: v.item() / n for k, v in sums.items()}}
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-4)
    assert ours["rewards/chosen"] == pytest.approx(theirs["rewards/chosen"], abs=1e-4)
    assert ours["rewards/rejected"] == pytest.approx(theirs["rewards/rejected"], abs=1e-4)
    assert ours["margin"] == pytest.approx(theirs["rewards/margins"], abs=1e-4)
    assert ours["accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=1e-6)
    return ours, theirs


def test_loss_and_rewards_equal_trl_dpo_trainer(tmp_path, llama):
    """Fresh adapter, reference = adapters disabled, in trl and here; the policy is perturbed so the
    numbers are not trivially log 2 and 0."""
    tokenizer = load_tokenizer(str(llama))
    trainer = trl_trainer(tmp_path, load_base(str(llama), device="cpu"), tokenizer,
                          peft_config=make_peft_config("lora", r=8))
    model = perturbed(trainer.model)
    stage = dpo.DPOLoss(dpo.DPOConfig(beta=0.1), tokenizer.pad_token_id, dpo.PairLogps(model), AdapterSet(model),
                        None, share_prompt=True)
    for loss_type, smoothing in [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]:
        ours, _ = compare_with_trl(trainer, model, tokenizer, stage, loss_type, smoothing)
        assert ours["rewards/chosen"] != 0 and ours["loss"] != pytest.approx(math.log(2), abs=1e-3)


def test_frozen_sft_copy_reference_equals_trl(tmp_path, llama, pairs_file, sft_adapter):
    """trl, handed a PeftModel with a trained adapter, makes a frozen "ref" copy of it; ours is the
    "reference" adapter loaded from the same SFT folder."""
    tokenizer = load_tokenizer(str(llama))
    model, adapters, reference = dpo.build_model(config(llama, pairs_file, tmp_path, sft_adapter=str(sft_adapter)), 10)
    trainer = trl_trainer(tmp_path, model, tokenizer)
    assert "ref" in trainer.model.peft_config
    perturbed(trainer.model, "default")
    stage = dpo.DPOLoss(dpo.DPOConfig(beta=0.1), tokenizer.pad_token_id, dpo.PairLogps(trainer.model),
                        AdapterSet(trainer.model), reference, share_prompt=True)
    ours, _ = compare_with_trl(trainer, trainer.model, tokenizer, stage, "sigmoid")
    assert ours["rewards/chosen"] != 0


def test_shared_prompt_row_gives_the_two_row_log_probs(tiny_models, llama):
    """Prompt + chosen + rejected in one row (rejected sees the prompt only, positions restart)
    equals two separate rows, on every architecture, with an empty prompt too."""
    from datasets import Dataset

    for arch, path in tiny_models.items():
        tok = load_tokenizer(str(path))
        model = perturbed(attach_adapter(load_base(str(path), device="cpu"), make_peft_config("lora", r=8)))
        assert supports_attention_bias(model), arch
        pairs, _ = preference_pairs(Dataset.from_list(synthetic.preference_rows(5, seed=2)), "rows", "plain", tok)
        pairs.append(PreferencePair("", "a great story .", "a bad film with a dull ending ."))
        examples = dpo.tokenize(tok, pairs, 512, Skipped())
        logps = dpo.PairLogps(model)
        batches = [dpo.DPOLoss(dpo.DPOConfig(), tok.pad_token_id, logps, None, None, share).batch(examples)
                   for share in (False, True)]
        assert "shared_ids" in batches[1] and batches[1]["shared_ids"].numel() < batches[0]["input_ids"].numel()
        with torch.no_grad():
            two_rows, one_row = logps(batches[0]), logps(batches[1])
        assert (two_rows - one_row).abs().max() < 1e-4, arch
    prompt_tuned = attach_adapter(load_base(str(llama), device="cpu"), make_peft_config("prompt_tuning"))
    assert not supports_attention_bias(prompt_tuned)  # virtual tokens: falls back to two rows


# ---------------------------------------------------------------------------------------------
# Reference cache and resume.


def test_precomputed_reference_resume_and_cache_reuse(tmp_path, llama, pairs_file):
    live = tmp_path / "live"
    dpo.train(config(llama, pairs_file, live, max_steps=6, precompute_ref_logprobs=False))
    full = tmp_path / "full"
    summary = dpo.train(config(llama, pairs_file, full, max_steps=6, save_steps=3, save_total_limit=0,
                               precompute_ref_logprobs=True))
    cache = full / dpo.REFERENCE_CACHE
    with safe_open(str(cache), "pt") as f:
        assert set(f.keys()) == {"train_chosen", "train_rejected", "eval_chosen", "eval_rejected"}
        assert f.get_tensor("train_chosen").shape == (summary["train_pairs"],) and len(f.metadata()["key"]) == 64
        assert f.get_tensor("eval_chosen").shape == (summary["eval_pairs"],)
    # The cached reference gives the live reference's numbers (batches differ, so not bit for bit).
    assert [m["loss"] for m in metrics(full)] == pytest.approx([m["loss"] for m in metrics(live)], abs=1e-4)

    # A run that died right after checkpoint-3: the checkpoint, the metrics so far and the cache survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    shutil.copy2(cache, crashed / dpo.REFERENCE_CACHE)
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(full)[:5]))
    stamp = (crashed / dpo.REFERENCE_CACHE).stat().st_mtime_ns
    dpo.train(config(llama, pairs_file, crashed, max_steps=6, save_steps=3, resume="auto",
                     precompute_ref_logprobs=True))
    assert (crashed / dpo.REFERENCE_CACHE).stat().st_mtime_ns == stamp  # reused, not recomputed
    assert [m["step"] for m in metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(full)]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Other data in the same folder: the cache no longer matches and is rebuilt.
    other = write_jsonl(tmp_path / "other.jsonl", synthetic.preference_rows(100, seed=7))
    other_summary = dpo.train(config(llama, other, crashed, max_steps=1, precompute_ref_logprobs=True, overwrite=True))
    with safe_open(str(crashed / dpo.REFERENCE_CACHE), "pt") as f:
        assert f.get_tensor("train_chosen").shape == (other_summary["train_pairs"],) != (summary["train_pairs"],)


# ---------------------------------------------------------------------------------------------
# The command line and bad input.


def run_cli(capsys, *args):
    code = main(["dpo", "--device", "cpu", "--no-progress", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_cli_runs_dpo(tmp_path, llama, pairs_file, capsys):
    code, _ = run_cli(capsys, "--model", llama, "--data", pairs_file, "--output-dir", tmp_path, "--max-steps", 2,
                      "--loss-type", "ipo", "--beta", 0.5)
    assert code == 0 and [m["step"] for m in metrics(tmp_path)] == [1, 2]
    assert "beta: 0.5\n" in (tmp_path / "config.yaml").read_text()


def test_identical_answers_are_skipped_and_counted(tmp_path, llama):
    rows = synthetic.preference_rows(20, seed=4)
    rows += [{"prompt": "Write a review.", "chosen": "a fun story .", "rejected": "a fun story ."}] * 2
    rows += [{"prompt": "Write a review.", "chosen": "", "rejected": "a dull story ."}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    summary = dpo.train(config(llama, data, tmp_path / "out", max_steps=1, eval_fraction=0))
    assert summary["train_pairs"] == 20
    assert summary["skipped"] == {"pairs whose two answers are identical": 2, "rows with an empty chosen": 1}
    # Implicit prompts (chosen/rejected only): identical texts are caught after tokenization.
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": r["prompt"] + " " + r["chosen"],
                                                           "rejected": r["prompt"] + " " + r["rejected"]}
                                                          for r in rows[:20]] + [{"chosen": "same text .",
                                                                                  "rejected": "same text ."}])
    summary = dpo.train(config(llama, implicit, tmp_path / "out2", max_steps=1, eval_fraction=0))
    assert summary["train_pairs"] == 20 and summary["skipped"] == {"pairs whose two answers are identical": 1}


def test_stack_exchange_pairs_train_with_stackllama_prompts(tmp_path, llama):
    rows = [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]}
            for r in synthetic.preference_rows(16, seed=6)]
    summary = dpo.train(config(llama, write_jsonl(tmp_path / "se.jsonl", rows), tmp_path / "out", max_steps=1,
                               eval_fraction=0))
    assert summary["train_pairs"] == 16 and summary["template"] == "stackllama"
    info = json.loads((tmp_path / "out" / "adapter" / "pocketrlhf_adapter.json").read_text())
    assert info["template"] == "stackllama"  # what chat and serve will format prompts with


@pytest.mark.parametrize("content,message", [
    ('{"question": "a", "answer": "b"}\n', r"bad.jsonl: no usable columns for preference data"),
    ("", r"bad.jsonl: the dataset is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}\n' * 3,
     r"bad.jsonl: no usable preference pairs \(3 pairs whose two answers are identical \(rows 1, 2, 3\) skipped\)"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}\n', r"bad.jsonl: row 1: column 'rejected' must be a string, got int"),
])
def test_bad_data_is_a_one_line_error(tmp_path, llama, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code, err = run_cli(capsys, "--model", llama, "--data", bad, "--output-dir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], r"--beta must be > 0"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], r"--label-smoothing applies to the sigmoid and robust"),
    (["--label-smoothing", "0.5"], r"--label-smoothing must be in \[0, 0.5\)"),
    (["--loss-type", "kto"], r"--loss-type: 'kto' is not one of sigmoid, robust, hinge, ipo"),
    (["--sft-adapter", "{tmp}"], r"is not an adapter directory \(no adapter_config.json\)"),
])
def test_bad_options_are_one_line_errors(tmp_path, llama, pairs_file, capsys, flags, message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, err = run_cli(capsys, "--model", llama, "--data", pairs_file, "--output-dir", tmp_path / "out", *flags)
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ")
    assert re.search(message, err), err


def test_gradient_checkpointing_stays_on_with_the_frozen_reference(pretrained_llama, sft_adapter, tmp_path):
    """peft's load_adapter(is_trainable=False) (the reference copy) puts the model in eval mode,
    where transformers does not checkpoint: build_model must leave it in training mode."""
    model, _, reference = dpo.build_model(dpo.DPOConfig(model=str(pretrained_llama), sft_adapter=str(sft_adapter),
                                                        device="cpu", gradient_checkpointing=True), total_steps=1)
    assert reference == "reference" and model.training
    assert all(m.training for m in model.modules())
    assert model.get_base_model().is_activation_checkpointing
