"""Shared fixtures: tiny models built once per session from configs, and synthetic data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pocketrlhf.data import synthetic  # noqa: E402
from pocketrlhf.models.tiny import ARCHITECTURES, build_tiny_model  # noqa: E402


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per architecture of the factory, tokenizer trained on the review task."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch, texts=synthetic.corpus(), vocab_size=320, seed=0)
            for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A tiny encoder-decoder as flan-t5 (gated-gelu, untied output layer), review-task tokenizer
    that ends encoder inputs with EOS; the decoder starts with the pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("seq2seq") / "t5", "t5", texts=synthetic.corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    """A tiny BART (learned positions, tied output layer); the decoder starts with EOS."""
    return build_tiny_model(tmp_path_factory.mktemp("seq2seq") / "bart", "bart", texts=synthetic.corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def odd_llama(tmp_path_factory) -> Path:
    """A llama whose MLP width (176) is not a multiple of 64: bitsandbytes' CPU 4-bit inference
    kernel cannot hold it."""
    return build_tiny_model(tmp_path_factory.mktemp("odd") / "llama176", "llama", texts=synthetic.corpus(),
                            vocab_size=320, intermediate_size=176)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", synthetic.sft_rows(400, seed=0))


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory) -> Path:
    """A tiny llama that has read unlabelled reviews (full-weight LM training): it writes words,
    like the pretrained base a user starts from. SFT then teaches the prompt format."""
    from pocketrlhf.models.tiny import pretrain_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("pretrained") / "llama", "llama", texts=synthetic.corpus(),
                            vocab_size=320, seed=0)
    return pretrain_tiny_model(path, synthetic.pretraining_texts(), steps=150)


@pytest.fixture(scope="session")
def sft_adapter(tmp_path_factory, pretrained_llama) -> Path:
    """An SFT adapter on the pretrained tiny llama: answers review prompts, ends with EOS."""
    from pocketrlhf.stages import sft

    root = tmp_path_factory.mktemp("sft_policy")
    data = write_jsonl(root / "sft.jsonl", synthetic.sft_rows(1200, seed=0))
    sft.train(sft.SFTConfig(model=str(pretrained_llama), data=str(data), output_dir=str(root / "run"), device="cpu",
                            packing=False, completion_only=True, seq_length=64, batch_size=16, learning_rate=3e-3,
                            max_steps=80, progress=False, logging_steps=20, lora_r=8, lora_dropout=0.1))
    return root / "run" / "adapter"


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", synthetic.prompt_rows(300, seed=2))


def teach_adapter(base: Path, out: Path, template: str, pairs: list[tuple[str, str]], steps: int = 80, lr: float = 1e-2,
                  train: bool = True) -> Path:
    """A LoRA that has memorised a few replies (a real adapter dir: peft files + pocketrlhf_adapter.json),
    in a plain loop independent of the training stages. On an encoder-decoder base (T5, BART) the
    prompt, rendered in ``template`` as serving renders it, is the encoder's input and the reply +
    EOS the decoder's target."""
    import torch

    from pocketrlhf.data.templates import completion_text, prompt_text, seq2seq_format
    from pocketrlhf.data.tokenize import encode, tokenize_pair
    from pocketrlhf.models.adapters import attach_adapter, make_peft_config, save_adapter, write_adapter_info
    from pocketrlhf.models.loading import is_seq2seq, load_base, load_tokenizer

    tok = load_tokenizer(str(base))
    torch.manual_seed(0)  # the adapter's initialisation must not depend on which tests ran before
    model = attach_adapter(load_base(str(base), device="cpu", training=True), make_peft_config("lora", r=8, alpha=16))
    if is_seq2seq(str(base)):
        fmt = seq2seq_format(template, tok)
        examples = [(torch.tensor([encode(tok, prompt_text(p, fmt, tok), special=True)]),
                     torch.tensor([encode(tok, completion_text(c, fmt, tok), special=False) + [tok.eos_token_id]]))
                    for p, c in pairs]
    else:
        examples = [(ids, ids) for ids in (torch.tensor([tokenize_pair(tok, prompt_text(p, template, tok), c, False).input_ids])
                                           for p, c in pairs)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    for _ in range(steps if train else 0):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in examples)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, out, tokenizer=tok)
    write_adapter_info(out, stage="sft", template=template, base_model=str(base))
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """A tiny base that names the first of three digits right about half the time (pretrained on
    noisy lines), training and held-out prompts with an ``answer`` column (grpo's verifiable task)."""
    from pocketrlhf.models.tiny import pretrain_tiny_model

    root = tmp_path_factory.mktemp("digits")
    model = build_tiny_model(root / "model", "llama", texts=synthetic.digits_pretraining_texts(500), vocab_size=300)
    pretrain_tiny_model(model, synthetic.digits_pretraining_texts(3000), steps=300)
    train, held_out = synthetic.digits_split()
    return {"model": model, "prompts": write_jsonl(root / "train.jsonl", synthetic.digits_rows(train)),
            "held_out": write_jsonl(root / "held_out.jsonl", synthetic.digits_rows(held_out))}


def serve_in_background(cfg, api_key: str = "", timeout: float = 90):
    """A real uvicorn server on loopback for ``cfg`` (a ServeConfig), returned once /health says
    the model is loaded; ``.engine`` is its Engine, ``.votes`` its feedback file. Stop it with ``.stop()``."""
    import time

    import httpx

    from pocketrlhf.serve.api import BackgroundServer, create_app
    from pocketrlhf.serve.engine import Engine, parse_adapters

    app = create_app(lambda: Engine.load(cfg, parse_adapters(cfg.adapters), max_batch=cfg.max_batch), cfg, api_key=api_key)
    srv = BackgroundServer(app)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            srv.stop()
            raise TimeoutError(f"{srv.url} not ready after {timeout}s")
        time.sleep(0.05)
    srv.app, srv.engine = app, app.state.pocket.engine
    srv.votes = Path(cfg.feedback_file) if cfg.feedback_file else None
    return srv
