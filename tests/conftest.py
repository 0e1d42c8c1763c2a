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
def odd_llama(tmp_path_factory) -> Path:
    """A llama whose MLP width (176) is not a multiple of 64: bitsandbytes' CPU 4-bit inference
    kernel cannot hold it."""
    return build_tiny_model(tmp_path_factory.mktemp("odd") / "llama176", "llama", texts=synthetic.corpus(),
                            vocab_size=320, intermediate_size=176)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", synthetic.sft_rows(400, seed=0))
