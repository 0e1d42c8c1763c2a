"""Several processes (accelerate launch, DDP over gloo on the CPU) train the same adapter as one
process given the same global batch: the SFT loss is normalised by the global token count, so
splitting a batch across processes must not change the gradient."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketrlhf.stages import sft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "accelerate"
STEPS = 4


def train_args(quantization: str) -> dict:
    # Padded batches with completion-only loss: the two processes' shares hold different numbers
    # of trained tokens, which is what the global normalisation has to get right.
    return dict(quantization=quantization, packing=False, completion_only=True, seq_length=64, learning_rate=1e-2,
                max_steps=STEPS, max_grad_norm=0.0, lora_r=8, seed=0, progress=False, eval_fraction=0.05)


def launch_two_processes(model, data, out: Path, device: str, command: str = "sft", data_flag: str = "--data",
                         **kw) -> subprocess.CompletedProcess:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "cpu_ddp.yaml"),
           "--num_processes", "2", "--main_process_port", "0", "--num_cpu_threads_per_process", "1",
           "-m", "pocketrlhf", command, "--model", str(model), data_flag, str(data), "--output-dir", str(out),
           "--device", device, "--batch-size", "4", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)


def assert_same_adapter(a: dict, b: dict, quantization: str, tolerance: float) -> None:
    """Adapters of two runs that took the same steps: equal within ``tolerance`` on a 16-bit base;
    on a quantized one (rounding differs with the batch split, and Adam turns tiny gradient
    differences on near-zero coordinates into lr-sized steps) by the share of coordinates off and
    the relative norm."""
    for k in a:
        diff = a[k] - b[k]
        if quantization == "none":
            assert diff.abs().max().item() < tolerance, k
        else:
            assert (diff.abs() > tolerance).float().mean().item() < 0.01, k
            assert (diff.norm() / b[k].norm()).item() < 0.02, k
    # LoRA B starts at zero: the comparison means something only if training moved it far past the tolerance.
    assert max(t.abs().max().item() for k, t in b.items() if "lora_B" in k) > 5 * tolerance


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("quantization,tolerance", [
    ("none", 1e-5),
    # LLM.int8 picks outlier columns per batch and 4-bit computes in bf16, so split batches round a
    # little differently, and Adam turns tiny gradient differences on near-zero coordinates into
    # lr-sized steps: a few coordinates move by up to ~1e-2 (seen: 0.2% of one tensor's past 2e-3,
    # 0.7% relative norm). A wrong global batch (4 vs 8, 4-bit) moves 97% of them, 85% relative norm.
    pytest.param("8bit", 2e-3, marks=pytest.mark.slow),
    ("4bit", 2e-3),
])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, llama, sft_file, quantization, tolerance):
    # "auto" on a machine without a GPU is the case that once left every process training alone.
    device = "cpu" if torch.cuda.is_available() else "auto"
    proc = launch_two_processes(llama, sft_file, tmp_path / "ddp", device, **train_args(quantization))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "one"), device="cpu",
                            batch_size=8, **train_args(quantization)))

    # One record per step (only the main process writes), with the single-process losses.
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert [s for s, _ in ddp] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ddp, one):
        assert a == pytest.approx(b, rel=1e-4)
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    assert_same_adapter(a, b, quantization, tolerance)
    # Both processes evaluated their share of the held-out set; the reduced loss is the one-process loss.
    summary_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary_ddp["eval_loss"] == pytest.approx(summary_one["eval_loss"], rel=1e-4)
    assert summary_ddp["distributed"]["strategy"] == "ddp" and summary_ddp["distributed"]["processes"] == 2
    assert "distributed: ddp over 2 processes (gloo)" in proc.stderr


def test_accelerate_cpu_flag_with_several_processes_is_a_clear_error(tmp_path, llama, sft_file):
    """Without mpirun, `accelerate launch --cpu --num_processes 2` starts ONE process; training on
    would silently halve the global batch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pocketrlhf", "sft", "--model", str(llama),
           "--data", str(sft_file), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: accelerate launch --cpu --num_processes N starts one process unless mpirun is set up; "
            "use --config_file examples/accelerate/cpu_ddp.yaml") in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name,kind", [
    ("cpu_ddp.yaml", "MULTI_GPU"), ("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("cpu_fsdp.yaml", "FSDP"),
    ("deepspeed_zero2.yaml", "DEEPSPEED"), ("deepspeed_zero3.yaml", "DEEPSPEED"),
])
def test_example_accelerate_configs_parse(name, kind):
    """Parsed; cpu_ddp.yaml and cpu_fsdp.yaml also run in tests (test_distributed.py, test_fsdp.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / name))
    assert str(config.distributed_type).endswith(kind)
    assert config.num_processes == 2


def test_ppo_on_two_processes_matches_one_process(tmp_path, pretrained_llama, sft_adapter, prompts_file):
    """PPO on 2 processes: each samples half of every step's rollouts (each rollout from its own
    seeded random stream, so the same answers as on one process), advantages are whitened over
    all of them and losses are normalised by the global token count: the policy adapter and the
    value head after 2 steps equal those of one process taking the whole batch."""
    from pocketrlhf.stages import ppo

    common = dict(sft_adapter=str(sft_adapter), reward_function="pocketrlhf.data.synthetic:sentiment_reward", max_steps=2,
                  rollouts_per_step=8, ppo_epochs=2, max_new_tokens=12, learning_rate=1e-3, eval_fraction=0,
                  adaptive_kl=True, seed=0, progress=False, lr_scheduler="constant")
    proc = launch_two_processes(pretrained_llama, prompts_file, tmp_path / "ddp", "cpu", command="ppo",
                                data_flag="--prompts", gradient_accumulation_steps=1, **common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    # One process: the same 8 rollouts per step as one minibatch (4 x 2 micro-batches).
    ppo.train(ppo.PPOConfig(model=str(pretrained_llama), prompts=str(prompts_file), output_dir=str(tmp_path / "one"),
                            device="cpu", batch_size=4, gradient_accumulation_steps=2, **common))
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "one")}
    for a, b in zip(rows["ddp"], rows["one"]):
        for key in ("score", "kl", "kl_coef", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k
    assert max(t.abs().max().item() for t in b.values()) > 1e-2  # training moved the weights
    head_a = load_file(str(tmp_path / "ddp" / "value" / "head.safetensors"))
    head_b = load_file(str(tmp_path / "one" / "value" / "head.safetensors"))
    assert (head_a["linear.weight"] - head_b["linear.weight"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_preference_stages_on_two_processes_match_one_process(tmp_path, llama, command):
    """The reward model and DPO go through the same shared loop: each process takes half of every
    global batch of pairs, and the loss is the mean over the global batch's pairs."""
    from pocketrlhf.data import synthetic
    from pocketrlhf.stages import dpo, rm

    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(48, seed=3))
    common = dict(max_steps=STEPS, learning_rate=1e-2, max_grad_norm=0.0, lora_r=8, seed=0, progress=False,
                  eval_fraction=0.0, logging_steps=1)
    proc = launch_two_processes(llama, pairs, tmp_path / "ddp", "cpu", command=command, **common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    stage, config = (rm, rm.RMConfig) if command == "rm" else (dpo, dpo.DPOConfig)
    stage.train(config(model=str(llama), data=str(pairs), output_dir=str(tmp_path / "one"), device="cpu",
                       batch_size=8, **common))

    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert [s for s, _ in ddp] == list(range(1, STEPS + 1))
    assert [a for _, a in ddp] == pytest.approx([b for _, b in one], rel=1e-4)
    assert one[-1][1] < one[0][1]  # it learned something, so the comparison is not of two untouched adapters
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k
    if command == "rm":
        head_a = load_file(str(tmp_path / "ddp" / "adapter" / "head.safetensors"))
        head_b = load_file(str(tmp_path / "one" / "adapter" / "head.safetensors"))
        assert (head_a["linear.weight"] - head_b["linear.weight"]).abs().max().item() < 1e-4


def test_grpo_on_two_processes_matches_one_process(tmp_path, digits):
    """grpo on 2 processes: each samples the groups of half the step's prompts (every completion
    from its own seeded stream), group advantages need no other process, and the token-mean loss
    is normalised by the global token count: the adapter equals one process's."""
    from pocketrlhf.stages import grpo

    common = dict(reward_function="pocketrlhf.data.synthetic:exact_match", max_steps=2, num_generations=4,
                  prompts_per_step=4, max_new_tokens=4, learning_rate=1e-3, eval_fraction=0, seed=0, progress=False,
                  lr_scheduler="constant", lora_r=8)
    proc = launch_two_processes(digits["model"], digits["prompts"], tmp_path / "ddp", "cpu", command="grpo",
                                data_flag="--prompts", gradient_accumulation_steps=2, **common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    one = dict(common, reward_function=[common["reward_function"]])
    grpo.train(grpo.GRPOConfig(model=str(digits["model"]), prompts=str(digits["prompts"]),
                               output_dir=str(tmp_path / "one"), device="cpu", batch_size=4,
                               gradient_accumulation_steps=4, **one))
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "one")}
    assert len(rows["ddp"]) == len(rows["one"]) == 2
    for a, b in zip(rows["ddp"], rows["one"]):
        for key in ("score", "kl", "response_length", "zero_variance_groups"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k
    assert max(t.abs().max().item() for t in b.values()) > 1e-3  # training moved the weights


def test_a_failure_on_one_process_stops_every_process(tmp_path, digits):
    """A reward that fails on process 1 only: process 0 must not wait forever for it."""
    reward = tmp_path / "rank_reward.py"
    reward.write_text("import os\n\ndef f(completions, answer):\n"
                      "    bad = os.environ.get('RANK') == '1'\n"
                      "    return [float('nan') if bad else 1.0 for _ in completions]\n")
    proc = launch_two_processes(digits["model"], digits["prompts"], tmp_path / "ddp", "cpu", command="grpo",
                                data_flag="--prompts", reward_function=f"{reward}:f", max_steps=2, num_generations=2,
                                prompts_per_step=2, max_new_tokens=2, eval_fraction=0, progress=False)
    assert proc.returncode != 0
    assert "returned nan" in proc.stderr and "another process stopped" in proc.stderr
    assert not (tmp_path / "ddp" / "adapter").exists()
