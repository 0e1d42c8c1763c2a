"""`pocketrlhf serve` under concurrent streaming clients: continuous batching vs one request at a time, one run.

    OMP_NUM_THREADS=1 python bench/serve_throughput.py                 # llama, hidden 256, 4 layers
    OMP_NUM_THREADS=1 python bench/serve_throughput.py --size tiny     # a quick check of the script
    OMP_NUM_THREADS=1 python bench/serve_throughput.py --arch t5       # an encoder-decoder (T5 as flan-t5)

Setups (two servers in one child process, same model and adapters; each case runs on one, then
the other, round after round, so that a change in a shared machine's load hits both alike):
  * one-at-a-time: ``--max-batch 1``, the engine as it was before batching: one request at a time
    through transformers' ``generate`` (requests queue on the one worker);
  * batched: ``--max-batch 8``: the requests in flight decode together, requests joining and
    leaving between steps, adapters mixed in one forward pass.

With ``--arch t5`` the model is a T5 (encoder and decoder of that size each) and the adapters
use the ``plain`` prompt format (an encoder-decoder has no chat template).

Each child serves the base and two LoRA adapters over real HTTP (uvicorn on 127.0.0.1) and, for
1, 4 and 8 concurrent clients, with the same adapter for every client ("same") or adapters
round-robin over adapter a, adapter b and the base ("mixed"), starts the clients together; each
streams one chat completion (pure sampling at T=1, its own seed, ``--max-tokens`` tokens: a
random-weight model rarely emits EOS, so each reply has the full length). Measured: aggregate
tokens/s (all completion tokens / wall time from the first request to the last [DONE]) and time
to first token (request sent -> first content delta, mean over clients). Each case runs
``--rounds`` times per setup after one warm-up request pair; the best round is kept (the
machine is shared), all rounds are in result.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, run_child, write_result  # noqa: E402

SIZES = {"tiny": dict(hidden_size=64, layers=2, heads=4), "small": dict(hidden_size=256, layers=4, heads=8)}
SETUPS = {"one-at-a-time": 1, "batched": 8}


def build(out: Path, size: str, arch: str = "llama") -> tuple[Path, Path, Path]:
    """A random ``arch`` model and two random LoRA adapters on it (cached in ``out``)."""
    import torch

    from pocketrlhf.data import synthetic
    from pocketrlhf.models.adapters import attach_adapter, make_peft_config, save_adapter, write_adapter_info
    from pocketrlhf.models.loading import load_base, load_tokenizer
    from pocketrlhf.models.tiny import build_tiny_model

    prefix = "" if arch == "llama" else f"{arch}-"
    base = out / f"{arch}-{size}"
    adapters = (out / f"a-{prefix}{size}", out / f"b-{prefix}{size}")
    if all((p / "adapter_config.json").is_file() for p in adapters):
        return base, *adapters
    build_tiny_model(base, arch, texts=synthetic.corpus(), vocab_size=320, seed=0, **SIZES[size])
    tok = load_tokenizer(str(base))
    for i, path in enumerate(adapters):
        torch.manual_seed(i + 1)
        model = attach_adapter(load_base(str(base), device="cpu"), make_peft_config("lora", r=8, alpha=16))
        with torch.no_grad():  # LoRA's B starts at zero: make each adapter really change the answers
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        save_adapter(model, path, tokenizer=tok)
        write_adapter_info(path, stage="sft", template="chatml" if arch == "llama" else "plain", base_model=str(base))
    return base, *adapters


def stream_one(url: str, model: str, seed: int, max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": f"tell me about movie number {seed}"}],
            "temperature": 1.0, "seed": seed, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": (first or time.perf_counter()) - sent, "tokens": tokens, "end": time.perf_counter()}


def one_case(url: str, clients: int, names: list[str], max_tokens: int, seed0: int) -> dict:
    results: list[dict] = [{} for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(i):
        start.wait()
        results[i] = stream_one(url, names[i % len(names)], seed0 + i, max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - t0
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.mean(r["ttft"] for r in results), "ttft_max_s": max(r["ttft"] for r in results)}


def worker(a: argparse.Namespace) -> None:
    import torch

    from pocketrlhf.serve.api import BackgroundServer, ServeConfig, create_app
    from pocketrlhf.serve.engine import Engine, parse_adapters

    torch.set_num_threads(a.threads)
    base, ad_a, ad_b = build(Path(a.models), a.size, a.arch)
    servers = {}
    for setup, max_batch in SETUPS.items():
        cfg = ServeConfig(model=str(ad_a), name="a", adapters=f"b={ad_b}", device="cpu", max_batch=max_batch,
                          max_queue=64, max_tokens=a.max_tokens, web=False, feedback_file="")
        app = create_app(lambda cfg=cfg: Engine.load(cfg, parse_adapters(cfg.adapters), cfg.name,
                                                     max_batch=cfg.max_batch), cfg)
        server = BackgroundServer(app)
        while app.state.pocket.engine is None:
            if app.state.pocket.error:
                raise SystemExit(app.state.pocket.error)
            time.sleep(0.05)
        servers[setup] = (server, app.state.pocket.engine)
    base_id = next(iter(servers["batched"][1].models))
    mixes = {"same": ["a"], "mixed": ["a", "b", base_id]}
    for server, _ in servers.values():
        one_case(server.url, 2, ["a", "b"], 8, 999)  # warm-up: first-call costs are not what is compared
    cases: dict[str, dict] = {setup: {} for setup in SETUPS}
    for mix, names in mixes.items():
        for clients in a.clients:
            rounds: dict[str, list] = {setup: [] for setup in SETUPS}
            for r in range(a.rounds):  # the setups alternate, so a change in the machine's load hits both
                for setup, (server, _) in servers.items():
                    rounds[setup].append(one_case(server.url, clients, names, a.max_tokens, 1000 * r))
            for setup, results in rounds.items():
                best = max(results, key=lambda x: x["tokens_per_s"])
                best["ttft_mean_s"] = min(x["ttft_mean_s"] for x in results)
                best["rounds_tokens_per_s"] = [round(x["tokens_per_s"], 2) for x in results]
                cases[setup][f"{mix}/{clients}"] = best
                print(f"{setup} {mix} {clients} clients: {best['tokens_per_s']:.1f} tokens/s, "
                      f"ttft {best['ttft_mean_s'] * 1000:.0f} ms", flush=True)
    for server, engine in servers.values():
        server.stop()
        engine.close()
    write_result(Path(a.out), {setup: {"max_batch": servers[setup][1].max_batch, "cases": cases[setup]}
                               for setup in SETUPS})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--arch", choices=["llama", "t5"], default="llama", help="the served base: a causal LM or an encoder-decoder")
    p.add_argument("--clients", default="1,4,8", help="concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="default: runs/bench/serve_throughput (llama), serve_throughput_t5 (t5)")
    p.add_argument("--worker", choices=["both"], help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.clients = [int(c) for c in str(a.clients).split(",") if c]
    a.out = a.out or str(ROOT / "runs" / "bench" / ("serve_throughput" + ("" if a.arch == "llama" else f"_{a.arch}")))
    if a.worker:
        worker(a)
        return
    out = Path(a.out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    args = ["--size", a.size, "--arch", a.arch, "--clients", ",".join(map(str, a.clients)), "--max-tokens", str(a.max_tokens),
            "--rounds", str(a.rounds), "--models", str(models)]
    results = run_child(__file__, "both", args, out / "both", a.threads)
    one, batched = results["one-at-a-time"]["cases"], results["batched"]["cases"]
    print("\n| clients | adapters | one-at-a-time tokens/s | batched tokens/s | speed-up | TTFT one-at-a-time | TTFT batched |")
    print("|---|---|---|---|---|---|---|")
    for key in one:
        mix, clients = key.split("/")
        o, b = one[key], batched[key]
        print(f"| {clients} | {mix} | {o['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
              f"**{b['tokens_per_s'] / o['tokens_per_s']:.2f}x** | {o['ttft_mean_s'] * 1000:.0f} ms | "
              f"{b['ttft_mean_s'] * 1000:.0f} ms |")
    (out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
