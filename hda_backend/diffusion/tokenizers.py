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

``principal`` projections (``principal`` = k > 0; ``set_principal_projections``) are fixed before training
and tied: each group's W_out [n, k] is the top-k principal directions V of its pieces in the normalised
training set times one scale c per group, and reading is W_outᵀ / c², so that the k coefficients have unit
RMS. A layer's output then reaches every direction along which the training avatars differ (up to k of
them) at the size of tied projections, k values per weight. Between the coefficients and the transformer
sit two small learned maps per group, ``head_in`` [width, k] and ``head_out`` [k, width]:

- ``head_in`` starts as the map that sends every layer's coefficients of a training avatar to the same
  vector, the avatar's coordinates in the joint principal directions of the whole set. Tokens of one person
  then agree across layers from the first step, which the transformer's attention (one value map for all
  token pairs) needs to pool every layer's noisy view of that person; learned projections must find such a
  shared frame by training.
- ``head_out`` starts at zero, so the untrained denoiser predicts the normalised mean, 0. It also lets a
  token say how far from the mean it lies, which the final LayerNorm's fixed RMS would not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HDAError
from . import TOKENIZERS
from .weights import LayerSpec


def _principal_rows(m: torch.Tensor, k: int) -> torch.Tensor:
    """m: [R, n] -> [k', n]: its top k' <= k right singular vectors (rows), those with a nonzero singular value.

    Through the smaller Gram matrix; each vector's sign makes its largest entry positive (deterministic).
    """
    rows = m.shape[0] <= m.shape[1]
    values, vectors = torch.linalg.eigh(m @ m.T if rows else m.T @ m)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = int((values > values[0].clamp(min=0) * 1e-10).sum().clamp(max=k))
    v = (vectors[:, :keep].T @ m) / values[:keep].sqrt()[:, None] if rows else vectors[:, :keep].T
    return v * torch.sign(v[torch.arange(keep), v.abs().argmax(dim=1)])[:, None]


class Tokenizer(nn.Module):
    """A tokenizer from ``pieces``: (start, length, projection, layer index, chunk index) per token.

    Tokens sharing a projection form a group, handled by one gather and one matmul; tokens are ordered
    by group (the embeddings, not the order, tell the transformer where a token comes from).
    """

    def __init__(self, spec: LayerSpec, width: int, pieces: list[tuple[int, int, int, int, int]],
                 projection_sizes: list[int], tied: bool = False, principal: int = 0):
        super().__init__()
        self.tied = tied or principal > 0
        self.principal = principal
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
        if principal:  # c per group and the heads (module docstring); only files of principal models hold them
            self.register_buffer("proj_scale", torch.ones(len(projection_sizes)))
            self.head_in = nn.ModuleList([nn.Linear(principal, width, bias=False) for _ in projection_sizes])
            self.head_out = nn.ModuleList([nn.Linear(width, principal, bias=False) for _ in projection_sizes])
            for lin in self.head_out:
                nn.init.zeros_(lin.weight)
        if not self.tied:
            self.proj_in = nn.ModuleList([nn.Linear(n, width, bias=False) for n in projection_sizes])
        self.proj_out = nn.ModuleList([nn.Linear(principal or width, n, bias=False) for n in projection_sizes])
        for lin in self.proj_out:
            nn.init.zeros_(lin.weight)
            lin.weight.requires_grad_(not principal)
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
        """The input projection of group ``proj``: [width, n] (W_outᵀ when tied; principal groups read through
        ``_read``, never as a [width, n] matrix)."""
        return self.proj_out[proj].weight.T if self.tied else self.proj_in[proj].weight

    def _read(self, pieces: torch.Tensor, proj: int) -> torch.Tensor:
        """pieces [B, G, n] -> [B, G, width]: ``w_in`` applied (principal: through the k coefficients)."""
        if self.principal:
            coefficients = pieces @ self.proj_out[proj].weight / self.proj_scale[proj] ** 2
            return coefficients @ self.head_in[proj].weight.T
        return pieces @ self.w_in(proj).T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] -> projected pieces [B, L, width] (linear in x; no embeddings)."""
        return torch.cat([self._read(p, proj) for p, (proj, _) in zip(self.split(x), self.group_sizes)], dim=1)

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
            token = h[:, first:first + count]
            pieces.append(self.proj_out[proj](self.head_out[proj](token) if self.principal else token))
            first += count
        return self.merge(pieces)

    @torch.no_grad()
    def set_principal_projections(self, z: torch.Tensor) -> None:
        """z: [N, D] normalised training set -> W_out [n, k] := c·Vᵀ (frozen) and head_in (module docstring).

        V [k, n]: the top k right singular vectors of the group's pieces stacked over avatars and tokens
        [N·G, n] (uncentred: z is centred per coordinate already); directions without variance stay zero
        columns. c² is the mean variance along the kept directions. head_in is the least-squares map from
        each token's coefficients to its avatar's first ``width`` joint principal coordinates (unit variance).
        Deterministic up to each vector's sign, which is fixed by making its largest entry positive.
        """
        if not self.principal:
            raise ValueError("set_principal_projections: the tokenizer was not made with principal > 0")
        z64 = z.to(torch.float64)
        person = z64 @ _principal_rows(z64, self.width).T  # [N, r]: coordinates along the joint directions
        person = person / person.pow(2).mean(0).sqrt().clamp(min=1e-30)
        for pieces, (proj, count) in zip(self.split(z), self.group_sizes):
            m = pieces.reshape(-1, pieces.shape[-1]).to(torch.float64)  # [N·G, n]
            v = _principal_rows(m, self.principal)  # [k', n]
            coefficients = m @ v.T  # [N·G, k']
            scale = coefficients.pow(2).mean().sqrt() if len(v) else torch.tensor(1.0, dtype=m.dtype)
            coefficients = coefficients / scale
            weight = self.proj_out[proj].weight
            weight.zero_()
            weight[:, :len(v)] = (scale * v.T).to(weight.dtype)
            self.proj_scale[proj] = scale.to(self.proj_scale.dtype)
            target = person.repeat_interleave(count, dim=0)  # the rows of m are [avatar, token] in order
            head = torch.linalg.lstsq(coefficients, target, driver="gelsd").solution  # [k', r]
            weight = self.head_in[proj].weight  # [width, k]
            weight.zero_()
            weight[:person.shape[1], :len(v)] = head.T.to(weight.dtype)

    @torch.no_grad()
    def composites(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(token indices [k], C [width, width])] with project(decode(h))[:, i] = h[:, i] @ C.T for those tokens.

        ``decode`` then ``project`` is linear token by token: C = W_in[:, :n] @ W_out[:n] for a piece of n
        values (the padding of a short piece is dropped by ``merge``). Sampling runs DDIM on the projected
        pieces with these width x width maps instead of going through all D weights at every step.
        """
        out = []
        for proj, n, tokens in self._pieces_by_length():
            if self.principal:  # through the k x k Gram matrix: never a [width, n] matrix
                c = self.head_in[proj].weight @ self._gram(proj, n) @ self.head_out[proj].weight
            else:
                c = self.w_in(proj)[:, :n] @ self.proj_out[proj].weight[:n]
            out.append((tokens, c))
        return out

    @torch.no_grad()
    def noise_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(token indices [k], F [width, width])] with F Fᵀ = W_in[:, :n] W_in[:, :n]ᵀ for those tokens.

        ``project(z)`` of z ~ N(0, I_D) is, token by token, N(0, W_in W_inᵀ) and independent across tokens
        (they read disjoint values), so ``reproject(u, noise_factors())`` with u ~ N(0, I) [B, L, width] has
        its law: DDIM's fresh noise for η > 0 without drawing and projecting D values per step. F is the
        symmetric square root (eigh, so a singular W_in W_inᵀ is fine).
        """
        out = []
        for proj, n, tokens in self._pieces_by_length():
            if self.principal:  # W_in = head_in · W_outᵀ / c²
                head = self.head_in[proj].weight.to(torch.float64)
                cov = head @ self._gram(proj, n).to(torch.float64) @ head.T / self.proj_scale[proj].double() ** 2
            else:
                w_in = self.w_in(proj)[:, :n].to(torch.float64)
                cov = w_in @ w_in.T
            values, vectors = torch.linalg.eigh(cov)
            factor = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
            out.append((tokens, factor.to(self.proj_out[proj].weight.dtype)))
        return out

    def _pieces_by_length(self) -> list[tuple[int, int, torch.Tensor]]:
        """[(projection, piece length n, token indices)]: the tokens that share one map (a short last chunk
        reads fewer values than the others of its group)."""
        out, first = [], 0
        for proj, count in self.group_sizes:
            by_length: dict[int, list[int]] = {}
            for i in range(first, first + count):
                by_length.setdefault(self.token_lengths[i], []).append(i)
            device = self.proj_out[proj].weight.device
            out += [(proj, n, torch.tensor(tokens, device=device)) for n, tokens in by_length.items()]
            first += count
        return out

    def _gram(self, proj: int, n: int) -> torch.Tensor:
        """Principal group ``proj``, pieces of n values: W_out[:n]ᵀ W_out[:n] / c² [k, k] (the identity on the
        kept directions for full pieces, up to the file's precision)."""
        w = self.proj_out[proj].weight[:n]
        return w.T @ w / self.proj_scale[proj] ** 2

    @staticmethod
    def reproject(h: torch.Tensor, composites: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """h: [B, L, width] -> project(decode(h)) [B, L, width], through ``composites()`` (or any such
        per-token maps, e.g. ``noise_factors()``)."""
        out = torch.empty_like(h)
        for tokens, c in composites:
            out[:, tokens] = h[:, tokens] @ c.T
        return out


def layer_tokenizer(spec: LayerSpec, width: int, tied: bool = False, principal: int = 0) -> Tokenizer:
    pieces = [(layer.offset, layer.length, i, i, 0) for i, layer in enumerate(spec.layers)]
    return Tokenizer(spec, width, pieces, spec.lengths, tied, principal)


def flat1d_tokenizer(spec: LayerSpec, width: int, chunk_size: int, tied: bool = False,
                     principal: int = 0) -> Tokenizer:
    n = math.ceil(spec.dim / chunk_size)
    pieces = [(i * chunk_size, min(chunk_size, spec.dim - i * chunk_size), 0, 0, i) for i in range(n)]
    return Tokenizer(spec, width, pieces, [chunk_size], tied, principal)


def layer_chunked_tokenizer(spec: LayerSpec, width: int, chunk_size: int, tied: bool = False,
                            principal: int = 0) -> Tokenizer:
    pieces, sizes = [], []
    for i, layer in enumerate(spec.layers):
        size = min(chunk_size, layer.length)
        sizes.append(size)
        for c in range(math.ceil(layer.length / size)):
            start = c * size
            pieces.append((layer.offset + start, min(size, layer.length - start), i, i, c))
    return Tokenizer(spec, width, pieces, sizes, tied, principal)


def make_tokenizer(kind: str, spec: LayerSpec, width: int, chunk_size: int, tied: bool = False,
                   principal: int = 0) -> Tokenizer:
    if kind == "layer":
        return layer_tokenizer(spec, width, tied, principal)
    if kind == "flat1d":
        return flat1d_tokenizer(spec, width, chunk_size, tied, principal)
    if kind == "layer_chunked":
        return layer_chunked_tokenizer(spec, width, chunk_size, tied, principal)
    raise HDAError(f"tokenizer {kind!r}: expected one of {', '.join(TOKENIZERS)}")
