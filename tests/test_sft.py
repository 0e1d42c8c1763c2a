import json
import shutil

import pytest
from safetensors.torch import load_file

from pocketrlhf.cli import main
from pocketrlhf.models.tiny import ARCHITECTURES
from pocketrlhf.stages import sft


def metrics(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", packing=False,
                completion_only=True, seq_length=64, batch_size=8, learning_rate=3e-3, max_steps=30,
                warmup_steps=0, lora_r=8, logging_steps=1, progress=False, seed=0)
    base.update(kw)
    return sft.SFTConfig(**base)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_sft_loss_falls_on_every_precision(tmp_path, llama, sft_file, quantization):
    summary = sft.train(config(llama, sft_file, tmp_path, quantization=quantization, max_steps=25))
    train = metrics(tmp_path)
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert summary["eval_loss"] < 0.6 * train[0]["loss"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json", "adapter/pocketrlhf_adapter.json"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_every_architecture_goes_through_sft_with_packing(tmp_path, tiny_models, sft_file, arch):
    sft.train(config(tiny_models[arch], sft_file, tmp_path, packing=True, completion_only=False, max_steps=15))
    train = metrics(tmp_path)
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]


def test_resumed_run_continues_exactly(tmp_path, llama, sft_file):
    full = tmp_path / "full"
    sft.train(config(llama, sft_file, full, max_steps=6, save_steps=3, save_total_limit=0))
    # A run that died right after checkpoint-3: only the checkpoint (and metrics so far) survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(full)[:5]))
    sft.train(config(llama, sft_file, crashed, max_steps=6, save_steps=3, resume="auto"))
    assert [m["step"] for m in metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(full)]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, llama, sft_file):
    """Token-weighted loss over the whole global batch: 4x2 micro-batches == one batch of 8,
    even though the padded examples have different lengths."""
    sft.train(config(llama, sft_file, tmp_path / "big", batch_size=8, max_steps=4, max_grad_norm=0))
    sft.train(config(llama, sft_file, tmp_path / "accum", batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                     max_grad_norm=0))
    a = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "accum" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_checkpoints_keep_the_limit_and_are_complete(tmp_path, llama, sft_file):
    sft.train(config(llama, sft_file, tmp_path, max_steps=8, save_steps=2, save_total_limit=2))
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    for name in ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt",
                 "trainer_state.json"):
        assert (tmp_path / "checkpoint-6" / name).is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_8bit_adam_trains_and_paged_adam_falls_back_on_cpu(tmp_path, llama, sft_file, caplog):
    sft.train(config(llama, sft_file, tmp_path / "a8", optimizer="adamw_8bit", max_steps=15))
    assert metrics(tmp_path / "a8")[-1]["loss"] < 0.8 * metrics(tmp_path / "a8")[0]["loss"]
    import logging

    logger = logging.getLogger("pocketrlhf")
    logger.addHandler(caplog.handler)
    try:
        sft.train(config(llama, sft_file, tmp_path / "paged", optimizer="paged_adamw", max_steps=2))
    finally:
        logger.removeHandler(caplog.handler)
    assert "paged_adamw pages optimizer state through CUDA unified memory and cannot run on cpu" in caplog.text


def test_tensorboard_reporting(tmp_path, llama, sft_file):
    sft.train(config(llama, sft_file, tmp_path, max_steps=2, report_to="tensorboard"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_runs_sft_from_yaml_with_flag_overrides(tmp_path, llama, sft_file):
    (tmp_path / "run.yaml").write_text(f"model: {llama}\ndata: {sft_file}\nmax_steps: 50\nbatch_size: 4\n"
                                       "device: cpu\nprogress: false\n")
    assert main(["sft", "--config", str(tmp_path / "run.yaml"), "--max-steps", "2",
                 "--output-dir", str(tmp_path / "out")]) == 0
    resolved = (tmp_path / "out" / "config.yaml").read_text()
    assert "max_steps: 2\n" in resolved and "batch_size: 4\n" in resolved
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n', r"bad.jsonl:2: malformed JSON line"),
    ('{"question_text": "a", "answer": "b"}\n', r"bad.jsonl: no usable columns for SFT data"),
    ('{"prompt": "a", "completion": 1}\n', r"bad.jsonl: row 1: column 'completion' must be a string, got int"),
    ('{"prompt": "a", "completion": ""}\n', r"bad.jsonl: no usable rows \(1 rows with an empty completion \(row 1\) skipped\)"),
    ("", r"bad.jsonl: the dataset is empty"),
])
def test_bad_input_is_a_one_line_error(tmp_path, llama, capsys, content, message):
    import re

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(["sft", "--model", str(llama), "--data", str(bad), "--output-dir", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ")
    assert re.search(message, err), err


def test_too_little_data_for_one_step(tmp_path, llama, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    code = main(["sft", "--model", str(llama), "--data", str(small), "--output-dir", str(tmp_path / "o"),
                 "--batch-size", "8", "--device", "cpu", "--no-packing"])
    assert code == 2 and "fewer than one step's 8" in capsys.readouterr().err


def test_adapter_records_the_prompt_format_really_used(tmp_path, llama):
    from conftest import write_jsonl

    msgs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello ."}]}
            for i in range(40)]
    data = write_jsonl(tmp_path / "chat.jsonl", msgs)
    sft.train(config(llama, data, tmp_path / "run", max_steps=1, eval_fraction=0))
    info = json.loads((tmp_path / "run" / "adapter" / "pocketrlhf_adapter.json").read_text())
    assert info["template"] == "auto"  # messages are rendered with the chat template (ChatML here)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, llama, sft_file, quantization):
    plain = config(llama, sft_file, tmp_path / "plain", quantization=quantization, max_steps=4, eval_fraction=0)
    checkpointed = config(llama, sft_file, tmp_path / "gc", quantization=quantization, max_steps=4, eval_fraction=0,
                          gradient_checkpointing=True)
    sft.train(plain)
    sft.train(checkpointed)
    a = [m["loss"] for m in metrics(tmp_path / "plain")]
    b = [m["loss"] for m in metrics(tmp_path / "gc")]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_bf16_weights_and_fp4_quantization_train(tmp_path, llama, sft_file):
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.models.quantization import linear4bit_modules

    fp4 = load_base(str(llama), "4bit", quant_type="fp4", compute_dtype="float32", device="cpu")
    assert {m.weight.quant_type for _, m in linear4bit_modules(fp4)} == {"fp4"}
    sft.train(config(llama, sft_file, tmp_path / "fp4", quantization="4bit", quant_type="fp4", max_steps=15))
    assert metrics(tmp_path / "fp4")[-1]["loss"] < 0.7 * metrics(tmp_path / "fp4")[0]["loss"]
    sft.train(config(llama, sft_file, tmp_path / "bf16", dtype="bfloat16", max_steps=15))
    assert metrics(tmp_path / "bf16")[-1]["loss"] < 0.7 * metrics(tmp_path / "bf16")[0]["loss"]


def test_kbit_upcast_off_keeps_16bit_weights_16bit(tmp_path, llama, sft_file):
    import torch

    from pocketrlhf.models.policy import build_policy

    for upcast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        cfg = config(llama, sft_file, tmp_path, quantization="4bit", dtype="bfloat16", kbit_upcast=upcast)
        model = build_policy(cfg)
        assert model.get_input_embeddings().weight.dtype == dtype
        assert model.get_output_embeddings().weight.dtype == dtype
    sft.train(config(llama, sft_file, tmp_path / "run", quantization="4bit", dtype="bfloat16", kbit_upcast=False,
                     max_steps=15))
    assert metrics(tmp_path / "run")[-1]["loss"] < 0.7 * metrics(tmp_path / "run")[0]["loss"]


def test_a_fresh_run_never_mixes_with_a_previous_one(tmp_path, llama, sft_file, capsys):
    sft.train(config(llama, sft_file, tmp_path, max_steps=2, eval_fraction=0))
    args = ["sft", "--model", str(llama), "--data", str(sft_file), "--output-dir", str(tmp_path), "--device", "cpu",
            "--max-steps", "3", "--no-progress", "--batch-size", "4", "--no-packing"]
    assert main(args) == 2
    assert "already holds a run (metrics.jsonl); pass --resume auto to continue it or --overwrite" in \
        capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]  # only the new run's steps
