"""Prompt encoders: text -> [B, text_len, text_dim] states for the DiT's `text_embedder`.

* "bytes" (built in, no weights to download): UTF-8 bytes of the prompt, each mapped through a fixed random
  feature table (seeded, so identical on every machine) with a sinusoidal position code; zero-padded to
  `text_len` like Wan pads its T5 states.  The DiT's `text_embedder` learns on top of it.
* "t5": a transformers T5/UMT5 encoder and tokenizer loaded from a local directory (Wan's umt5-xxl layout).

Runs once per session. Knows nothing of video.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TEXT_ENCODERS = ("bytes", "t5")


class BytePromptEncoder:
    def __init__(self, text_dim: int, text_len: int, seed: int = 20260101):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(256, text_dim, generator=generator) / math.sqrt(text_dim)
        position = torch.arange(text_len, dtype=torch.float64)[:, None]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(0, text_dim, 2, dtype=torch.float64) / text_dim)
        code = torch.zeros(text_len, text_dim, dtype=torch.float64)
        code[:, 0::2] = torch.sin(position * freqs)
        code[:, 1::2] = torch.cos(position * freqs)[:, : text_dim // 2]
        self.position = (code * 0.1).float()
        self.text_dim, self.text_len = text_dim, text_len

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for row, prompt in enumerate(prompts):
            ids = torch.tensor(list(prompt.encode("utf-8"))[: self.text_len], dtype=torch.long)
            out[row, : len(ids)] = self.table[ids] + self.position[: len(ids)]
        return out


class T5PromptEncoder:
    def __init__(self, path: str | Path, text_len: int, device="cpu"):
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory {str(path)!r} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.text_len, self.device = text_len, device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_len,
                               return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state
        return states * batch["attention_mask"][..., None].to(states.dtype)


def build_prompt_encoder(kind: str, text_dim: int, text_len: int, path: str | None = None, device="cpu"):
    if kind == "bytes":
        return BytePromptEncoder(text_dim, text_len)
    if kind == "t5":
        if not path:
            raise ValueError("text_encoder='t5' needs a local model directory (text_encoder_path)")
        return T5PromptEncoder(path, text_len, device)
    raise ValueError(f"text_encoder={kind!r} is unknown; allowed: {', '.join(TEXT_ENCODERS)}")
