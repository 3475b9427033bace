"""Weight vector [B, D] <-> transformer tokens [B, L, width], three ways (paper §4.2 and its ablation).

- ``layer`` (the paper's Eq. 11-13, default): one token per conv layer (its flattened kernel ⊕ bias), each
  projected by its own linear map, since layers differ in size, plus a learned layer embedding.
- ``flat1d`` (the paper's ablation, as in G.pt's flat split / p-diff): the whole vector zero-padded and cut
  into equal chunks of ``chunk_size``, one shared projection, a learned chunk-position embedding.
- ``layer_chunked`` (G.pt's ``chunk_within_layer``): each layer cut into chunks of at most ``chunk_size``
  (the last one zero-padded), so no token mixes layers; one projection per layer shared by its chunks,
  plus a layer embedding and a chunk-within-layer embedding.

Every tokenizer is a deterministic, parameter-free ``split`` / ``merge`` (vector <-> zero-padded pieces
per projection) around learned projections. ``merge(split(x)) == x`` exactly; the padding never reaches the
output. Projections have no bias (as HyperDiffusion); output projections start at zero, so the untrained
denoiser predicts the normalised mean, 0 (G.pt's choice).

``tied`` projections read each piece with the transpose of the matrix that writes it (project = W_outᵀ,
decode = W_out): half the parameters, so twice the token width (twice the rank of each layer's output) in
the same model size. The per-layer projections are nearly all of a layer-token model's parameters.
Measured worse than untied projections of half the width (README, stage 2), so not the default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HDAError
from . import TOKENIZERS
from .weights import LayerSpec



class Tokenizer(nn.Module):
    """A tokenizer from ``pieces``: (start, length, projection, layer index, chunk index) per token.

    Tokens sharing a projection form a group, handled by one gather and one matmul; tokens are ordered
    by group (the embeddings, not the order, tell the transformer where a token comes from).
    """

    def __init__(self, spec: LayerSpec, width: int, pieces: list[tuple[int, int, int, int, int]],
                 projection_sizes: list[int], tied: bool = False):
        super().__init__()
        self.tied = tied
        self.dim = spec.dim
        self.width = width
        groups: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for p in pieces:
            groups.setdefault(p[2], []).append(p)
        ordered = [p for _, members in sorted(groups.items()) for p in members]
        self.group_sizes = [(proj, len(members)) for proj, members in sorted(groups.items())]
        self.token_lengths = [p[1] for p in ordered]
        # gather_<g>: [G*n] positions in x ⊕ [0] (index D is the zero used for padding).
        gathers = []
        flat_positions = []  # where each output value lands in the concatenated group outputs
        base = 0
        for proj, members in sorted(groups.items()):
            n = projection_sizes[proj]
            index = torch.full((len(members), n), self.dim, dtype=torch.long)
            for row, (start, length, *_rest) in enumerate(members):
                index[row, :length] = torch.arange(start, start + length)
                flat_positions.append((start, base + row * n, length))
            gathers.append(index.reshape(-1))
            base += len(members) * n
        # merge: value d of x sits at concatenated-output position scatter[d].
        scatter = torch.empty(self.dim, dtype=torch.long)
        for start, pos, length in flat_positions:
            scatter[start:start + length] = torch.arange(pos, pos + length)
        for g, index in enumerate(gathers):
            self.register_buffer(f"gather_{g}", index, persistent=False)
        self.register_buffer("scatter", scatter, persistent=False)
        if not tied:
            self.proj_in = nn.ModuleList([nn.Linear(n, width, bias=False) for n in projection_sizes])
        self.proj_out = nn.ModuleList([nn.Linear(width, n, bias=False) for n in projection_sizes])
        for lin in self.proj_out:
            nn.init.zeros_(lin.weight)
        self.register_buffer("layer_index", torch.tensor([p[3] for p in ordered]), persistent=False)
        self.register_buffer("chunk_index", torch.tensor([p[4] for p in ordered]), persistent=False)
        self.layer_emb = nn.Parameter(torch.zeros(max(p[3] for p in pieces) + 1, width))
        self.chunk_emb = nn.Parameter(torch.zeros(max(p[4] for p in pieces) + 1, width))
        nn.init.normal_(self.layer_emb, std=0.02)
        nn.init.normal_(self.chunk_emb, std=0.02)

    @property
    def num_tokens(self) -> int:
        return sum(count for _, count in self.group_sizes)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, D] -> per projection group, pieces [B, G, n] (short pieces zero-padded to n)."""
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
        return [padded[:, getattr(self, f"gather_{g}")].view(x.shape[0], count, -1)
                for g, (_, count) in enumerate(self.group_sizes)]

    def merge(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Per group pieces [B, G, n] -> x [B, D] (padding dropped); the inverse of ``split``."""
        flat = torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)
        return flat[:, self.scatter]

    def w_in(self, proj: int) -> torch.Tensor:
        """The input projection of group ``proj``: [width, n] (W_outᵀ when tied)."""
        return self.proj_out[proj].weight.T if self.tied else self.proj_in[proj].weight

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] -> projected pieces [B, L, width] (linear in x; no embeddings)."""
        return torch.cat([p @ self.w_in(proj).T for p, (proj, _) in zip(self.split(x), self.group_sizes)], dim=1)

    def embed(self, projected: torch.Tensor) -> torch.Tensor:
        """projected: [B, L, width] -> tokens [B, L, width], with the layer and chunk embeddings added.

        No LayerNorm here (HyperDiffusion has one): it would divide out each token's magnitude, and with it
        how far along a direction of the data a noisy vector lies. The pre-norm blocks see normalised copies.
        """
        return projected + self.layer_emb[self.layer_index] + self.chunk_emb[self.chunk_index]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] -> tokens [B, L, width]."""
        return self.embed(self.project(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, L, width] -> x [B, D]."""
        pieces, first = [], 0
        for proj, count in self.group_sizes:
            pieces.append(self.proj_out[proj](h[:, first:first + count]))
            first += count
        return self.merge(pieces)

    @torch.no_grad()
    def composites(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(token indices [k], C [width, width])] with project(decode(h))[:, i] = h[:, i] @ C.T for those tokens.

        ``decode`` then ``project`` is linear token by token: C = W_in[:, :n] @ W_out[:n] for a piece of n
        values (the padding of a short piece is dropped by ``merge``). Sampling runs DDIM on the projected
        pieces with these width x width maps instead of going through all D weights at every step.
        """
        out, first = [], 0
        for proj, count in self.group_sizes:
            w_in, w_out = self.w_in(proj), self.proj_out[proj].weight
            by_length: dict[int, list[int]] = {}
            for i in range(first, first + count):
                by_length.setdefault(self.token_lengths[i], []).append(i)
            for n, tokens in by_length.items():
                out.append((torch.tensor(tokens, device=w_in.device), w_in[:, :n] @ w_out[:n]))
            first += count
        return out

    @torch.no_grad()
    def noise_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(token indices [k], F [width, width])] with F Fᵀ = W_in[:, :n] W_in[:, :n]ᵀ for those tokens.

        ``project(z)`` of z ~ N(0, I_D) is, token by token, N(0, W_in W_inᵀ) and independent across tokens
        (they read disjoint values), so ``reproject(u, noise_factors())`` with u ~ N(0, I) [B, L, width] has
        its law: DDIM's fresh noise for η > 0 without drawing and projecting D values per step. F is the
        symmetric square root (eigh, so a singular W_in W_inᵀ is fine).
        """
        out, first = [], 0
        for proj, count in self.group_sizes:
            w_in = self.w_in(proj).to(torch.float64)
            by_length: dict[int, list[int]] = {}
            for i in range(first, first + count):
                by_length.setdefault(self.token_lengths[i], []).append(i)
            for n, tokens in by_length.items():
                values, vectors = torch.linalg.eigh(w_in[:, :n] @ w_in[:, :n].T)
                factor = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
                out.append((torch.tensor(tokens, device=w_in.device), factor.to(self.proj_out[proj].weight.dtype)))
            first += count
        return out

    @staticmethod
    def reproject(h: torch.Tensor, composites: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """h: [B, L, width] -> project(decode(h)) [B, L, width], through ``composites()`` (or any such
        per-token maps, e.g. ``noise_factors()``)."""
        out = torch.empty_like(h)
        for tokens, c in composites:
            out[:, tokens] = h[:, tokens] @ c.T
        return out


def layer_tokenizer(spec: LayerSpec, width: int, tied: bool = False) -> Tokenizer:
    pieces = [(layer.offset, layer.length, i, i, 0) for i, layer in enumerate(spec.layers)]
    return Tokenizer(spec, width, pieces, spec.lengths, tied)


def flat1d_tokenizer(spec: LayerSpec, width: int, chunk_size: int, tied: bool = False) -> Tokenizer:
    n = math.ceil(spec.dim / chunk_size)
    pieces = [(i * chunk_size, min(chunk_size, spec.dim - i * chunk_size), 0, 0, i) for i in range(n)]
    return Tokenizer(spec, width, pieces, [chunk_size], tied)


def layer_chunked_tokenizer(spec: LayerSpec, width: int, chunk_size: int, tied: bool = False) -> Tokenizer:
    pieces, sizes = [], []
    for i, layer in enumerate(spec.layers):
        size = min(chunk_size, layer.length)
        sizes.append(size)
        for c in range(math.ceil(layer.length / size)):
            start = c * size
            pieces.append((layer.offset + start, min(size, layer.length - start), i, i, c))
    return Tokenizer(spec, width, pieces, sizes, tied)


def make_tokenizer(kind: str, spec: LayerSpec, width: int, chunk_size: int, tied: bool = False) -> Tokenizer:
    if kind == "layer":
        return layer_tokenizer(spec, width, tied)
    if kind == "flat1d":
        return flat1d_tokenizer(spec, width, chunk_size, tied)
    if kind == "layer_chunked":
        return layer_chunked_tokenizer(spec, width, chunk_size, tied)
    raise HDAError(f"tokenizer {kind!r}: expected one of {', '.join(TOKENIZERS)}")
