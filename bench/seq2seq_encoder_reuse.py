"""What sharing one encoder pass between roles saves on an encoder-decoder (T5) base.

    OMP_NUM_THREADS=1 python bench/seq2seq_encoder_reuse.py                 # ~13M-parameter T5
    OMP_NUM_THREADS=1 python bench/seq2seq_encoder_reuse.py --size small --steps 2   # a quick check

Two workloads, each in three settings:

* a PPO scoring step (the no-grad passes on a step's rollouts, as ``online.generate_rollouts`` and
  ``ppo.old_policy_pass`` run them): reward adapter + head, policy log-probs, value adapter + head,
  reference log-probs (adapters off), in micro-batches;
* a DPO step with the reference computed in the step: reference (adapters off, no grad), then the
  policy's forward and backward.

Settings: ``all`` (LoRA on encoder and decoder: every role runs its own encoder pass, nothing can
be shared), ``decoder`` (LoRA on the decoder only, ``--adapter-scope decoder``) without
``forward.encoder_reuse`` and with it. ``decoder`` vs ``decoder+reuse`` isolates the saving of
the shared pass (same adapters, same numbers: checked bitwise); ``all`` shows the cost of adapting
the encoder too. Prompts are long and answers short (summarisation-like: the encoder's share of
the work is large), random token ids; the T5 is random-init (pocketrlhf.models.tiny), fp32 on the
CPU. Reported: encoder passes (forward hook on the encoder) and CPU seconds per step, the median
of ``--steps`` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "full": dict(hidden_size=256, layers=4, heads=4, intermediate_size=768, vocab_size=1024),
    "small": dict(hidden_size=64, layers=2, heads=4, intermediate_size=128, vocab_size=320),
}


def build(model_dir: Path, scope: str):
    from pocketrlhf.models.adapters import AdapterSet, attach_adapter, make_peft_config
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.models.policy import hidden_size

    model = load_base(str(model_dir), device="cpu", training=False)
    g = torch.Generator().manual_seed(0)
    for name in ("policy", "reward", "value"):
        model = attach_adapter(model, make_peft_config("lora", r=16, alpha=32), name, scope=scope)
    with torch.no_grad():  # adapters that change the outputs, as trained ones do
        for n, p in model.named_parameters():
            if "lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for n, p in model.named_parameters():
        p.requires_grad_(".policy." in n)
    model.eval()
    torch.manual_seed(0)  # the same heads in every setting
    heads = {k: ScalarHead(hidden_size(model)) for k in ("reward", "value")}
    return model, AdapterSet(model), heads


def rollout_rows(n: int, prompt_len: int, answer_len: int, vocab: int, seed: int, eos: int):
    """[prompt EOS ; answer EOS] rows, right-padded, their response masks; every 2 rows share a prompt."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + answer_len + 2
    ids = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros_like(ids)
    for i in range(0, n, 2):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g)
        for k in range(2):
            answer = torch.randint(3, vocab, (answer_len,), generator=g)
            ids[i + k] = torch.cat([prompt, torch.tensor([eos]), answer, torch.tensor([eos])])
            resp[i + k, prompt_len + 1:] = 1
    return ids, torch.ones_like(ids), resp


def scoring_step(model, adapters, heads, ids, attn, resp, batch: int) -> list[torch.Tensor]:
    from pocketrlhf.models.forward import final_hidden_states, response_logprobs
    from pocketrlhf.models.roles import read_at_last_token

    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            i, a, r = ids[s:s + batch], attn[s:s + batch], resp[s:s + batch]
            with adapters.use("reward"):
                out.append(read_at_last_token(heads["reward"], final_hidden_states(model, i, a, r), a))
            with adapters.use("policy"):
                out.append(response_logprobs(model, i, a, r).logprobs)
            with adapters.use("value"):
                out.append(heads["value"](final_hidden_states(model, i, a, r)))
            with adapters.use(None):
                out.append(response_logprobs(model, i, a, r).logprobs)
    return out


def dpo_step(model, adapters, ids, attn, resp) -> list[torch.Tensor]:
    from pocketrlhf.models.forward import response_logprobs

    with torch.no_grad(), adapters.use(None):
        ref = response_logprobs(model, ids, attn, resp).logprobs.sum(-1)
    with adapters.use("policy"):
        pol = response_logprobs(model, ids, attn, resp).logprobs.sum(-1)
        chosen, rejected = (pol - ref).view(-1, 2).unbind(1)  # rows 2k, 2k+1 answer one prompt
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
        weights = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, weights)
    return [loss.detach(), *grads]


def measure(fn, model, reuse: bool, steps: int) -> tuple[dict, list[torch.Tensor]]:
    from pocketrlhf.models.forward import encoder_reuse, unwrap

    calls = []
    hook = unwrap(model)[1].get_encoder().register_forward_pre_hook(lambda *a: calls.append(1))
    cpu, result = [], None
    for step in range(steps + 1):
        calls.clear()
        start = time.process_time()
        with encoder_reuse(model, enabled=reuse):
            result = fn()
        if step:  # the first is a warm-up
            cpu.append(time.process_time() - start)
    hook.remove()
    return {"encoder_passes": len(calls), "cpu_s": statistics.median(cpu)}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--answer-length", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))

    from pocketrlhf.data import synthetic
    from pocketrlhf.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="encoder_reuse_bench_"))
    model_dir = build_tiny_model(root / "t5", "t5", texts=synthetic.corpus(), **SIZES[args.size])
    config = json.loads((model_dir / "config.json").read_text())  # the tokenizer may have fewer tokens than asked
    vocab, eos = config["vocab_size"], config["eos_token_id"]
    ids, attn, resp = rollout_rows(args.rollouts, args.prompt_length, args.answer_length, vocab, 0, eos)
    pairs = rollout_rows(args.batch, args.prompt_length, args.answer_length, vocab, 1, eos)
    print(f"[bench] T5 {args.size}, {args.rollouts} rollouts in micro-batches of {args.batch}, prompts "
          f"{args.prompt_length} + answers {args.answer_length} tokens, {torch.get_num_threads()} thread(s)", flush=True)
    results: dict = {"args": vars(args)}
    for scope, reuse in (("all", False), ("decoder", False), ("decoder", True)):
        model, adapters, heads = build(model_dir, scope)
        label = scope + ("+reuse" if reuse else "")
        score, score_out = measure(lambda: scoring_step(model, adapters, heads, ids, attn, resp, args.batch), model,
                                   reuse, args.steps)
        dpo, dpo_out = measure(lambda: dpo_step(model, adapters, *pairs), model, reuse, args.steps)
        results[label] = {"ppo_scoring_step": score, "dpo_step": dpo}
        if scope == "decoder":
            results.setdefault("_outputs", []).append((score_out, dpo_out))
        print(f"[bench] {label}: {json.dumps(results[label])}", flush=True)
    (s0, d0), (s1, d1) = results.pop("_outputs")
    results["bitwise_equal_with_reuse"] = all(torch.equal(a, b) for a, b in zip(s0 + d0, s1 + d1))
    for work in ("ppo_scoring_step", "dpo_step"):
        results[f"{work}_speedup_of_reuse"] = (results["decoder"][work]["cpu_s"]
                                               / results["decoder+reuse"][work]["cpu_s"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
