"""A tiny BERT-style text encoder (post-LayerNorm, GELU FFN, mean pooling + L2 norm).

Its exported graph has the same shape as a Hugging Face BERT encoder's (Q/K/V projections,
Reshape to heads, Softmax attention, output projection, FFN), so the passes written for
all-MiniLM-L6-v2 can be tested on it in seconds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TinyEncoder", "tiny_encoder"]


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_up, self.ffn_down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = self.ln1(x + self.attn_out(ctx))
        return self.ln2(x + self.ffn_down(nn.functional.gelu(self.ffn_up(x))))


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 1000, hidden: int = 64, heads: int = 4, layers: int = 2, ffn: int = 128,
                 max_len: int = 128):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.ln(self.word(input_ids) + self.position(pos))
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        m = mask.unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def tiny_encoder(layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 1000, seq: int = 16):
    """Random-init tiny encoder with example (input_ids, attention_mask) of shape [2, seq]."""
    torch.manual_seed(0)
    model = TinyEncoder(vocab, hidden, heads, layers, ffn).eval()
    ids = torch.randint(0, vocab, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, seq // 2:] = 0
    return model, (ids, mask)
