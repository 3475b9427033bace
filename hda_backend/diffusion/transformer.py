"""The denoiser: noisy normalised weights x_t [B, D] and timestep t [B] -> predicted clean weights x0 [B, D].

Tokens from a tokenizer (tokenizers.py), plus one timestep token (the sinusoidal embedding of t through a
small MLP, appended as in HyperDiffusion and paper Eq. 12), go through a pre-norm transformer encoder
(self-attention + feed-forward blocks); a final LayerNorm, then the tokenizer's per-token output
projections give x0 (the timestep token is not decoded).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizers import make_tokenizer
from .weights import LayerSpec


@dataclass(frozen=True)
class DenoiserConfig:
    tokenizer: str = "layer"  # layer | flat1d | layer_chunked
    chunk_size: int = 4096  # values per token for flat1d / layer_chunked
    width: int = 512  # token width (model dimension)
    blocks: int = 12
    heads: int = 16
    ffn: int = 2048  # hidden size of each block's feed-forward layer
    dropout: float = 0.0
    tied: bool = False  # tied input/output projections (tokenizers.py)
    principal: int = 0  # k > 0: fixed projections onto k principal directions (tokenizers.py), set in training

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: [B] (integer steps) -> [B, dim] = [cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, width] -> [B, L, width]."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.attn_out(a.transpose(1, 2).reshape(b, n, w)), self.dropout, self.training)
        return x + self.ffn(self.norm2(x))


class WeightDenoiser(nn.Module):
    def __init__(self, spec: LayerSpec, config: DenoiserConfig):
        super().__init__()
        self.config = config
        self.tokenizer = make_tokenizer(config.tokenizer, spec, config.width, config.chunk_size, config.tied,
                                        config.principal)
        self.time_mlp = nn.Sequential(nn.Linear(config.width, config.width), nn.SiLU(),
                                      nn.Linear(config.width, config.width))
        self.blocks = nn.ModuleList([Block(config.width, config.heads, config.ffn, config.dropout)
                                     for _ in range(config.blocks)])
        self.norm_out = nn.LayerNorm(config.width)

    def hidden(self, projected: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """projected: [B, L, width] (tokenizer.project of x_t); t: [B] -> final hidden tokens [B, L, width]."""
        time = self.time_mlp(timestep_embedding(t, self.config.width))[:, None]
        h = torch.cat([self.tokenizer.embed(projected), time], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm_out(h[:, :-1])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: [B, D] noisy normalised weights; t: [B] long timesteps -> x0 prediction [B, D]."""
        return self.tokenizer.decode(self.hidden(self.tokenizer.project(x_t), t))
