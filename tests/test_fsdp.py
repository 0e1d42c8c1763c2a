"""FSDP2 under `accelerate launch` on CPU processes (gloo): the frozen 16-bit or 4-bit base and the
adapters in it are sharded per decoder layer (heads stay whole); the run reports what it did and trains exactly what one
process with the same global batch trains. Requested strategies a stage cannot run are refused
before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketrlhf.config import ConfigError
from pocketrlhf.stages import common, sft
from test_distributed import EXAMPLES, ROOT, adapter, assert_same_adapter, train_losses

STEPS = 4


def launch_command(config: str, model, data, out: Path, command: str = "sft", data_flag: str = "--data",
                   launcher: tuple[str, ...] = (), **kw) -> tuple[list[str], dict]:
    """(command line, environment) of a 2-process ``accelerate launch`` of a stage."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / config),
           "--num_processes", "2", "--main_process_port", "0", "--num_cpu_threads_per_process", "1",
           *launcher, "-m", "pocketrlhf", command, "--model", str(model), data_flag, str(data), "--output-dir", str(out),
           "--device", "cpu", "--batch-size", "4", *flags]
    # PYTHONFAULTHANDLER: a process that dies in C++ (SIGABRT, SIGSEGV) prints its Python stacks, which the
    # assertions below show (a gloo worker once aborted with "terminate called without an active exception").
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return cmd, full_env


def launch(*args, **kw) -> subprocess.CompletedProcess:
    cmd, env = launch_command(*args, **kw)
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, its children's children too (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launch_and_kill(after: Path, *args, **kw) -> None:
    """Launches a stage on 2 processes and, as soon as ``after`` exists, kills the launcher and its
    workers with SIGKILL (no handler runs, nothing is flushed). The workers are found by parentage:
    torch's launcher may start them in sessions of their own."""
    import signal
    import tempfile
    import time

    cmd, env = launch_command(*args, **kw)
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + 300
        try:
            while not after.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            workers = _descendants(proc.pid)
            for pid in [proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=60)
        err.seek(0)
        assert after.exists() and proc.returncode == -signal.SIGKILL, (proc.returncode, err.read()[-3000:])
        assert len(workers) >= 2, workers
    for _ in range(500):  # until the killed workers are gone (a zombie left to init counts as gone)
        if not any(_running(pid) for pid in workers):
            return
        time.sleep(0.02)
    raise AssertionError(f"workers {workers} still running after SIGKILL")


def sft_args(**over) -> dict:
    args = dict(quantization="none", packing=False, completion_only=True, seq_length=64, learning_rate=1e-2,
                max_steps=STEPS, max_grad_norm=1.0, lora_r=8, seed=0, progress=False, eval_fraction=0.05,
                logging_steps=1)
    args.update(over)
    return args


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_sft_under_fsdp_matches_one_process(tmp_path, llama, sft_file, quantization):
    """16-bit and 4-bit bases (packed NF4 weights sharded; bitsandbytes restores each gathered
    weight's quantization state from its layer): the same losses and adapter as one process."""
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "fsdp", **sft_args(quantization=quantization))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "distributed: fsdp over 2 processes (gloo)" in proc.stderr
    assert "this process holds" in proc.stderr and "frozen weights (50%)" in proc.stderr
    # The adapter is sharded with its decoder layer (its optimizer state too), not replicated.
    assert "trainable weights (50%)" in proc.stderr and "(0 parameters outside the decoder layers" in proc.stderr
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "one"), device="cpu",
                            batch_size=8, **sft_args(quantization=quantization)))
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["distributed"]["strategy"] == "fsdp" and summary["distributed"]["processes"] == 2
    sharding = summary["distributed"]["sharding"]
    assert "adapters in them sharded" in sharding and "whole on every" not in sharding
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["distributed"]["strategy"] == "single"
    a_loss, b_loss = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one")
    assert [s for s, _ in a_loss] == list(range(1, STEPS + 1))
    assert [x for _, x in a_loss] == pytest.approx([x for _, x in b_loss], rel=1e-4)
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    # 4-bit computes in bf16: a batch split in two rounds a little differently, and Adam turns tiny
    # gradient differences on near-zero coordinates into lr-sized steps: compared as under DDP
    # (tests/test_distributed.py), by the share of coordinates off and the relative norm.
    assert_same_adapter(a, b, quantization, 1e-5 if quantization == "none" else 2e-3)
    assert summary["eval_loss"] == pytest.approx(json.loads((tmp_path / "one" / "summary.json").read_text())["eval_loss"],
                                                 rel=1e-4)
    if quantization == "none":  # written whole, in peft's own format: peft loads it onto the plain base
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama)), str(tmp_path / "fsdp" / "adapter"))
        weights = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert len(weights) == len(a) and all(v.shape == a[k.replace(".default", "")].shape for k, v in weights.items())
        assert all(torch.equal(v, a[k.replace(".default", "")]) for k, v in weights.items())


def test_gradient_checkpointing_under_fsdp_matches_one_process(tmp_path, llama, sft_file):
    """--gradient-checkpointing with the adapters sharded: backward recomputes each layer's forward,
    which gathers the layer (and its adapter shard) again; the same losses and adapter as one process."""
    args = sft_args(gradient_checkpointing=True, eval_fraction=0)
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "fsdp", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "trainable weights (50%)" in proc.stderr
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "one"), device="cpu",
                            batch_size=8, **args))
    assert [x for _, x in train_losses(tmp_path / "fsdp")] == pytest.approx([x for _, x in train_losses(tmp_path / "one")],
                                                                          rel=1e-4)
    assert_same_adapter(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"), "none", 1e-5)


def test_adapters_updated_by_a_bitsandbytes_optimizer_stay_whole_under_fsdp(tmp_path, llama, sft_file):
    """bitsandbytes' optimizers (adamw_8bit, paged ones, AdamW on 16-bit adapters) run fused
    kernels on plain tensors, not on FSDP's sharded DTensors: with them the adapters stay whole on
    every process (the base is still sharded), and the run trains and checkpoints as before."""
    from types import SimpleNamespace as NS

    assert common.shards_adapters(NS(optimizer="adamw", adapter_dtype="float32"))
    assert common.shards_adapters(NS(optimizer="lion", adapter_dtype="bfloat16"))
    for cfg in (NS(optimizer="adamw", adapter_dtype="bfloat16"), NS(optimizer="adamw_8bit", adapter_dtype="float32"),
                NS(optimizer="paged_adamw", adapter_dtype="float32")):
        assert not common.shards_adapters(cfg), cfg
    args = sft_args(adapter_dtype="bfloat16", eval_fraction=0, save_steps=2)
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "fsdp", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "frozen weights (50%)" in proc.stderr and "trainable weights (100%)" in proc.stderr
    assert "the trained adapters stay whole on every process" in proc.stderr
    losses = [x for _, x in train_losses(tmp_path / "fsdp")]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    saved = adapter(tmp_path / "fsdp")
    assert saved and all(v.dtype == torch.bfloat16 for v in saved.values())
    assert (tmp_path / "fsdp" / "checkpoint-2" / "optimizer.pt").is_file()
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["distributed"]["strategy"] == "fsdp"
    assert "the trained adapters whole on every process" in summary["distributed"]["sharding"]


@pytest.mark.parametrize("env,stage,supported,message", [
    ({}, "sft", common.OFFLINE_STRATEGIES, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "sft", common.OFFLINE_STRATEGIES, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "sft", common.OFFLINE_STRATEGIES, "set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "dpo",
     common.OFFLINE_STRATEGIES, "fsdp_offload_params: true"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "rm",
     common.OFFLINE_STRATEGIES, "fsdp_cpu_ram_efficient_loading: true"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}, "sft",
     common.OFFLINE_STRATEGIES, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "fp16"}, "dpo",
     common.OFFLINE_STRATEGIES, "mixed_precision: fp16 is not supported under FSDP: it needs loss scaling"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "fp8"}, "ppo",
     common.ONLINE_STRATEGIES, "mixed_precision: fp8 is not supported under FSDP; use bf16"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "ppo", common.ONLINE_STRATEGIES, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "grpo",
     common.ONLINE_STRATEGIES, "fsdp_offload_params: true"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "sft", common.OFFLINE_STRATEGIES, "sft does not run under DeepSpeed"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "grpo", common.ONLINE_STRATEGIES, "accelerate's megatron lm"),
])
def test_requested_strategies_are_run_or_refused(env, stage, supported, message):
    if message is None:
        assert common.check_strategy(stage, supported, env) == ("fsdp" if env else "")
        return
    with pytest.raises(ConfigError, match=message):
        common.check_strategy(stage, supported, env)


@pytest.mark.parametrize("case", ["fsdp1", "grpo-8bit", "8bit"])
def test_a_strategy_the_stage_cannot_run_is_refused_before_any_work(tmp_path, llama, sft_file, case):
    """Real two-process launches: once, FSDP configs ran as plain DDP without a word."""
    out = tmp_path / "out"
    if case == "grpo-8bit":
        # Refused before the model or the prompts are read.
        proc = launch("cpu_fsdp.yaml", llama, sft_file, out, command="grpo", data_flag="--prompts",
                      reward_function="pocketrlhf.data.synthetic:exact_match", max_steps=1, quantization="8bit")
        expected = "error: FSDP cannot shard an 8-bit base"
    elif case == "fsdp1":
        proc = launch("cpu_fsdp.yaml", llama, sft_file, out, launcher=("--fsdp_version", "1"), max_steps=1)
        expected = "error: the accelerate config asks for FSDP version 1"
    else:
        proc = launch("cpu_fsdp.yaml", llama, sft_file, out, quantization="8bit", max_steps=1)
        expected = "error: FSDP cannot shard an 8-bit base"
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-8000:]
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_preference_stages_under_fsdp_match_one_process(tmp_path, pretrained_llama, sft_adapter, command):
    """rm (trainable head next to the adapter) and dpo (the reference is the frozen SFT adapter,
    switched to on the sharded model every micro-batch) under FSDP equal one process. 7 held-out
    pairs over 2 processes x 4: one process runs an extra forward that counts for nothing."""
    from safetensors.torch import load_file

    from pocketrlhf.data import synthetic
    from pocketrlhf.stages import dpo, rm

    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(56, seed=3))
    args = dict(max_steps=STEPS, learning_rate=1e-2, max_grad_norm=0.0, lora_r=8, seed=0, progress=False,
                eval_fraction=0.125, logging_steps=1, sft_adapter=str(sft_adapter))
    if command == "dpo":
        args["precompute_ref_logprobs"] = False
    proc = launch("cpu_fsdp.yaml", pretrained_llama, pairs, tmp_path / "fsdp", command=command, **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "distributed: fsdp over 2 processes (gloo)" in proc.stderr
    stage, config = (rm, rm.RMConfig) if command == "rm" else (dpo, dpo.DPOConfig)
    # The same global batch as 4 x 2 accumulated, so that the reward statistics (batched by
    # --batch-size, padding included) are batched alike too.
    stage.train(config(model=str(pretrained_llama), data=str(pairs), output_dir=str(tmp_path / "one"), device="cpu",
                       batch_size=4, gradient_accumulation_steps=2, **args))
    fsdp_run, one = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one")
    assert [x for _, x in fsdp_run] == pytest.approx([x for _, x in one], rel=1e-4)
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k
    s_fsdp, s_one = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fsdp", "one"))
    assert s_fsdp["distributed"]["strategy"] == "fsdp"
    assert s_fsdp["eval_loss"] == pytest.approx(s_one["eval_loss"], rel=1e-4)
    assert s_fsdp["eval_accuracy"] == s_one["eval_accuracy"]
    if command == "rm":
        head_a = load_file(str(tmp_path / "fsdp" / "adapter" / "head.safetensors"))
        head_b = load_file(str(tmp_path / "one" / "adapter" / "head.safetensors"))
        assert (head_a["linear.weight"] - head_b["linear.weight"]).abs().max().item() < 1e-4
        assert s_fsdp["reward_mean"] == pytest.approx(s_one["reward_mean"], rel=1e-4, abs=1e-5)


def one_process(command: str, model, data, out: Path, data_flag: str = "--data", mixed_precision: str = "no",
                **kw) -> subprocess.CompletedProcess:
    """A stage in a process of its own, as `accelerate launch` with one process and
    ``mixed_precision`` would run it (accelerate reads the setting from the environment)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    cmd = [sys.executable, "-m", "pocketrlhf", command, "--model", str(model), data_flag, str(data), "--output-dir",
           str(out), "--device", "cpu", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               ACCELERATE_MIXED_PRECISION=mixed_precision,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["sft", "dpo", "sft-4bit"])
def test_bf16_mixed_precision_under_fsdp_matches_one_process(tmp_path, pretrained_llama, sft_file, sft_adapter,
                                                              command):
    """accelerate's mixed_precision: bf16 under FSDP on a 16-bit (bf16) base with LoRA (fp32
    adapters), and on a 4-bit base (sft): float weights gathered in bf16, gradients reduced in
    fp32, the forward under the autocast one process gets from accelerate. The losses equal one
    process's with the same setting within bf16 rounding, and fall."""
    from pocketrlhf.data import synthetic

    from conftest import write_jsonl

    if command.startswith("sft"):
        # 4-bit: packed NF4 weights are not cast (not floating point); LoRA and norms are.
        base = dict(quantization="4bit") if command == "sft-4bit" else dict(dtype="bfloat16")
        data, args = sft_file, sft_args(max_steps=6, eval_fraction=0, max_grad_norm=0.0, **base)
    else:
        data = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(56, seed=3))
        args = dict(dtype="bfloat16", max_steps=6, learning_rate=1e-2, max_grad_norm=0.0, lora_r=8, seed=0,
                    progress=False, eval_fraction=0, logging_steps=1, sft_adapter=str(sft_adapter),
                    precompute_ref_logprobs=False)
    model = pretrained_llama
    stage = command.split("-")[0]
    proc = launch("cpu_fsdp.yaml", model, data, tmp_path / "fsdp", command=stage, launcher=("--mixed_precision", "bf16"),
                  **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["distributed"]["strategy"] == "fsdp" and summary["distributed"]["mixed_precision"] == "bf16"
    assert "fsdp: mixed precision bf16 (autocast" in proc.stderr
    proc = one_process(stage, model, data, tmp_path / "one", mixed_precision="bf16", **dict(args, batch_size=8))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    fsdp_run, one = ([x for _, x in train_losses(tmp_path / n)] for n in ("fsdp", "one"))
    # bf16 keeps 8 bits of mantissa: a batch split over two processes rounds a little differently,
    # and Adam at lr 1e-2 grows it (seen after 6 steps of sft: 0.5% apart on the bf16 base, 2.6% on
    # the 4-bit one, whose fp32 run without mixed precision matches to 1e-4; dpo on the bf16 base:
    # 3.0% with two torch threads per process, whose sums round in another order again).
    assert fsdp_run == pytest.approx(one, rel=5e-2)
    assert min(fsdp_run[-2:]) < fsdp_run[0] - 0.05


def _crash_copy(full: Path, crashed: Path, step: int) -> None:
    """What survives a run killed right after checkpoint-``step``: the checkpoint and the metrics so far."""
    import shutil

    crashed.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", crashed / f"checkpoint-{step}")
    shutil.copy(full / "config.yaml", crashed / "config.yaml")
    shutil.copy(full / ".pocketrlhf-run", crashed / ".pocketrlhf-run")
    kept = [line for line in (full / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step + 1]
    (crashed / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def test_fsdp_checkpoints_resume_on_another_number_of_processes(tmp_path, llama, sft_file):
    """Adapters and optimizer state are whole on every process, so a checkpoint written by 2 FSDP
    processes continues on 1 process and one written by 1 process continues under FSDP, the same
    global batch split differently (--batch-size changes with the processes: --resume-ignore-config)."""
    args = sft_args(save_steps=2, save_total_limit=0, eval_fraction=0.0)
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "fsdp", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "one"), device="cpu",
                            batch_size=8, **args))
    # 2 FSDP processes -> 1 process.
    _crash_copy(tmp_path / "fsdp", tmp_path / "to_one", 2)
    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "to_one"), device="cpu",
                            batch_size=8, resume="auto", resume_ignore_config=True, **args))
    # 1 process -> 2 FSDP processes. Without a new --batch-size the global batch would double: refused.
    _crash_copy(tmp_path / "one", tmp_path / "to_fsdp", 2)
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "to_fsdp", resume="auto", **dict(args, batch_size=8))
    assert proc.returncode != 0
    assert "error: the checkpoint was trained with 8 sequences per step on 1 process(es), now 16 on 2" in proc.stderr
    proc = launch("cpu_fsdp.yaml", llama, sft_file, tmp_path / "to_fsdp", resume="auto", resume_ignore_config="true",
                  **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    reference = train_losses(tmp_path / "one")
    for name in ("fsdp", "to_one", "to_fsdp"):
        run = train_losses(tmp_path / name)
        assert [s for s, _ in run] == list(range(1, STEPS + 1)), name
        assert [x for _, x in run] == pytest.approx([x for _, x in reference], rel=1e-4), name
        a, b = adapter(tmp_path / name), adapter(tmp_path / "one")
        for k in b:
            assert (a[k] - b[k]).abs().max().item() < 1e-5, (name, k)


def test_plan_per_process_under_fsdp(tmp_path):
    """pocketrlhf plan --processes N --strategy fsdp: the base lines are 1/N, plus the gathered layers;
    what the stages refuse, the planner refuses."""
    from pocketrlhf import plan as P
    from test_plan import LLAMA2_7B, write_config

    shape = P.model_shape(P.read_config(str(write_config(tmp_path, LLAMA2_7B))))

    def lines(**kw):
        setup = P.plan_memory(shape, P.PlanConfig(model="unused", cuda_context="0GB", **kw)).setups[0]
        return {line.key: line.bytes for line in setup.lines}, setup

    ddp, ddp_setup = lines(processes=4)
    fsdp, fsdp_setup = lines(processes=4, strategy="fsdp")
    assert fsdp["base_linear"] == pytest.approx(ddp["base_linear"] / 4)
    assert fsdp["base_other"] == pytest.approx(ddp["base_other"] / 4)
    assert "fsdp_gathered" not in ddp and 1e9 < fsdp["fsdp_gathered"] < 2e9  # 4 x the 262M-parameter output layer
    assert fsdp_setup.peak < ddp_setup.peak - 8e9  # 3/4 of 13.5 GB of bf16 weights saved
    adapter_lines = [k for k in ddp if k.startswith("policy_")]
    assert {"policy_weights", "policy_grads", "policy_optimizer"} <= set(adapter_lines)
    for key in adapter_lines:  # the adapter, its gradients and AdamW state are sharded with the layers
        assert fsdp[key] == pytest.approx(ddp[key] / 4), key
    # ... except under a bitsandbytes optimizer, which keeps the trained adapters whole (common.shards_adapters)
    paged_ddp, _ = lines(processes=4, optimizer="paged_adamw")
    paged_fsdp, _ = lines(processes=4, strategy="fsdp", optimizer="paged_adamw")
    for key in adapter_lines:
        assert paged_fsdp[key] == pytest.approx(paged_ddp[key]), key
    assert paged_fsdp["base_linear"] == pytest.approx(paged_ddp["base_linear"] / 4)
    with pytest.raises(ConfigError, match="--strategy fsdp"):
        lines(processes=2, strategy="fsdp", quantization="8bit")
    ppo_ddp, _ = lines(processes=2, stage="ppo")
    ppo_fsdp, _ = lines(processes=2, stage="ppo", strategy="fsdp")  # one sharded base serves every role
    assert ppo_fsdp["base_linear"] == pytest.approx(ppo_ddp["base_linear"] / 2)


def _online_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_ppo_under_fsdp_matches_one_process(tmp_path, pretrained_llama, sft_adapter, prompts_file, quantization):
    """Every role on the one sharded base: rollouts generated on it (each process steps until both
    are done), the reference (the frozen SFT adapter), the reward adapter and a trainable value
    adapter switched to on the wrapped model. Scores, KL and the final policy and value adapters
    equal one process's with the same global batch."""
    from safetensors.torch import load_file

    from pocketrlhf.data import synthetic
    from pocketrlhf.stages import ppo, rm

    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(32, seed=1))
    rm.train(rm.RMConfig(model=str(pretrained_llama), data=str(pairs), sft_adapter=str(sft_adapter),
                         output_dir=str(tmp_path / "rm"), device="cpu", batch_size=16, learning_rate=3e-3,
                         max_steps=2, eval_fraction=0, progress=False))
    args = dict(sft_adapter=str(sft_adapter), reward_adapter=str(tmp_path / "rm" / "adapter"), value_model="adapter",
                max_steps=2, rollouts_per_step=8, ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3, eval_fraction=0.02,
                seed=0, progress=False, lr_scheduler="constant", quantization=quantization)
    proc = launch("cpu_fsdp.yaml", pretrained_llama, prompts_file, tmp_path / "fsdp", command="ppo",
                  data_flag="--prompts", gradient_accumulation_steps=1, **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "distributed: fsdp over 2 processes (gloo)" in proc.stderr and "frozen weights (5" in proc.stderr
    assert "trainable weights (5" in proc.stderr  # the policy and value adapters sharded (the value head whole)
    ppo.train(ppo.PPOConfig(model=str(pretrained_llama), prompts=str(prompts_file), output_dir=str(tmp_path / "one"),
                            device="cpu", batch_size=4, gradient_accumulation_steps=2, **args))
    s_fsdp, s_one = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fsdp", "one"))
    assert s_fsdp["distributed"]["strategy"] == "fsdp"
    tol = dict(rel=1e-4, abs=1e-6) if quantization == "none" else dict(rel=2e-2, abs=2e-3)
    rows = {n: _online_rows(tmp_path / n) for n in ("fsdp", "one")}
    assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["one"]] == [1, 2, 2]  # 2 steps, 1 eval
    for a, b in zip(rows["fsdp"], rows["one"]):
        for key in ("score", "kl", "response_length"):  # (the losses logged are the main process's share)
            assert a[key] == pytest.approx(b[key], **tol), (a["split"], key)
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    assert_same_adapter(a, b, quantization, 1e-4 if quantization == "none" else 2e-3)
    value_a, value_b = (load_file(str(tmp_path / n / "value" / "adapter_model.safetensors")) for n in ("fsdp", "one"))
    for k in value_b:
        assert (value_a[k] - value_b[k]).abs().max().item() < (1e-4 if quantization == "none" else 1e-2), k
    # The reward adapter really ran on the sharded model: its scores are not those of a rule.
    assert len({round(r["score"], 6) for r in rows["one"]}) > 1


def test_ppo_under_fsdp_killed_after_a_checkpoint_resumes_the_same_trajectory(tmp_path, pretrained_llama,
                                                                              sft_adapter, prompts_file):
    """kill -9 of both FSDP processes (and the launcher) right after checkpoint-1 of 4, then
    --resume auto on 2 processes: the policy and the trainable value adapter, Adam's state, the
    adaptive KL controller and the rollouts' random streams come back, so every logged number and
    both final adapters equal the uninterrupted run's."""
    from safetensors.torch import load_file

    args = dict(sft_adapter=str(sft_adapter), reward_function="pocketrlhf.data.synthetic:sentiment_reward",
                value_model="adapter", max_steps=4, rollouts_per_step=8, ppo_epochs=1, max_new_tokens=8,
                learning_rate=1e-3, eval_fraction=0, seed=0, progress=False, lr_scheduler="constant",
                adaptive_kl=True, save_steps=1, save_total_limit=0, gradient_accumulation_steps=1)
    run = (pretrained_llama, prompts_file)
    proc = launch("cpu_fsdp.yaml", *run, tmp_path / "full", command="ppo", data_flag="--prompts", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    killed = tmp_path / "killed"
    launch_and_kill(killed / "checkpoint-1", "cpu_fsdp.yaml", *run, killed, command="ppo", data_flag="--prompts",
                    **args)
    assert not (killed / "summary.json").exists() and not (killed / "checkpoint-4").exists()
    proc = launch("cpu_fsdp.yaml", *run, killed, command="ppo", data_flag="--prompts", resume="auto", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert "resuming from" in proc.stderr
    full, resumed = ([r for r in _online_rows(tmp_path / n) if r["split"] == "train"] for n in ("full", "killed"))
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [1, 2, 3, 4]
    keys = ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "entropy", "response_length")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in full]
    assert len({r["kl_coef"] for r in full}) > 1  # the controller's state mattered
    for name in ("adapter", "value"):
        a, b = (load_file(str(tmp_path / n / name / "adapter_model.safetensors")) for n in ("killed", "full"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_grpo_under_fsdp_matches_one_process_and_resumes(tmp_path, digits):
    """grpo with the raw base as its reference (adapters switched off on the sharded model), a
    fresh adapter (each process is seeded differently: it starts from the first process's) and a
    rule reward; held-out evaluation on every process. The same adapter as one process, and a run
    killed after its checkpoint resumes under FSDP, and on one process, to the same adapter."""
    from pocketrlhf.stages import grpo

    args = dict(reward_function="pocketrlhf.data.synthetic:exact_match", max_steps=2, num_generations=4,
                prompts_per_step=4, max_new_tokens=4, learning_rate=1e-3, seed=0, progress=False,
                lr_scheduler="constant", lora_r=8, beta=0.1, eval_prompts=str(digits["held_out"]), save_steps=1,
                save_total_limit=0)
    proc = launch("cpu_fsdp.yaml", digits["model"], digits["prompts"], tmp_path / "fsdp", command="grpo",
                  data_flag="--prompts", gradient_accumulation_steps=2, **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    grpo.train(grpo.GRPOConfig(model=str(digits["model"]), prompts=str(digits["prompts"]),
                               output_dir=str(tmp_path / "one"), device="cpu", batch_size=4,
                               gradient_accumulation_steps=4, **dict(args, reward_function=[args["reward_function"]])))
    rows = {n: _online_rows(tmp_path / n) for n in ("fsdp", "one")}
    assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["one"]] == [0, 1, 2, 2]  # eval at 0 and 2
    for a, b in zip(rows["fsdp"], rows["one"]):
        for key in ("score", "kl", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["split"], key)
    assert rows["one"][-1]["kl"] > 0  # the reference pass ran (adapters off), and the policy moved from it
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    assert_same_adapter(a, b, "none", 1e-4)
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["distributed"]["strategy"] == "fsdp"

    _crash_copy(tmp_path / "fsdp", tmp_path / "again", 1)
    _crash_copy(tmp_path / "fsdp", tmp_path / "to_one", 1)
    proc = launch("cpu_fsdp.yaml", digits["model"], digits["prompts"], tmp_path / "again", command="grpo",
                  data_flag="--prompts", gradient_accumulation_steps=2, resume="auto", **args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    grpo.train(grpo.GRPOConfig(model=str(digits["model"]), prompts=str(digits["prompts"]),
                               output_dir=str(tmp_path / "to_one"), device="cpu", batch_size=4,
                               gradient_accumulation_steps=4, resume="auto", resume_ignore_config=True,
                               **dict(args, reward_function=[args["reward_function"]])))
    for name in ("again", "to_one"):
        resumed = _online_rows(tmp_path / name)
        assert [r["step"] for r in resumed] == [0, 1, 2, 2], name
        for x, y in zip(resumed, rows["fsdp"]):
            assert x["score"] == pytest.approx(y["score"], rel=1e-4, abs=1e-6), name
        assert_same_adapter(adapter(tmp_path / name), a, "none", 1e-4)


def test_a_failing_reward_function_does_not_skip_the_reward_adapters_forward():
    """Under FSDP the reward adapter's forward is collective: a reward function failing on one
    process must not make that process skip it (the others would wait in it forever); the
    function's error is raised after it, and stop_together stops every process."""
    import torch

    from pocketrlhf.errors import RewardFunctionError
    from pocketrlhf.stages import online

    calls = []

    def adapter(*args):
        calls.append("adapter")
        return torch.zeros(2)

    def failing(*args):
        raise RewardFunctionError("boom")

    rewards = online.Rewards([online.RewardSource("module:f", 1.0, failing),
                              online.RewardSource("rm", 1.0, adapter, uses_model=True)])
    assert rewards.uses_model
    with pytest.raises(RewardFunctionError, match="boom"):
        rewards(None, None, ["p", "q"], ["a", "b"], {}, 1, None)
    assert calls == ["adapter"]
    total, parts = online.Rewards([online.RewardSource("module:g", 2.0, lambda *a: torch.ones(2)),
                                   online.RewardSource("rm", 1.0, adapter, uses_model=True)])(
        None, None, ["p", "q"], ["a", "b"], {}, 1, None)
    assert list(parts) == ["module:g", "rm"] and total.tolist() == [2.0, 2.0]  # the order of the sources kept


def test_the_memory_tracker_follows_storages_freed_by_resizing():
    """FSDP2 frees a gathered layer with storage.resize_(0) and gathers it again into the same
    storage at a new address: counted per storage at its size of the moment, not as a new storage
    each time while the old one still counts whole (what bench/fsdp_memory.py once measured)."""
    from pocketrlhf.measure import LiveTensors

    with LiveTensors(follow_resizes=True) as live:
        x = torch.zeros(1000)  # 4000 bytes
        held = []
        for _ in range(3):
            x.untyped_storage().resize_(0)  # freed, as FSDP2 frees a layer after its forward
            held.append(torch.ones(10))  # 40 bytes kept, and an op: the count is taken at each op
            assert live.current == 40 * len(held)
            x.untyped_storage().resize_(4000)  # gathered again (at an address the allocator picks)
            x.fill_(1.0)
            assert live.current == 4000 + 40 * len(held)
    assert live.peak == 4000 + 120
    # (The default count keeps x counted while it is freed, and counts it again whenever the
    # allocator gives it another address: not asserted here, that depends on the allocator.)
