"""The per-avatar UNet (paper §4.1, §4.3): pose maps [B,6,R,R] -> Gaussian parameters [B,59,R,R].

A milesial-style UNet with a constant width, max-pool downsampling, bilinear upsampling, 3x3 convs with
bias, and no normalisation layers. Without BatchNorm an avatar's weights are exactly a list of conv
kernels and biases (the paper's Eq. 10), which is what the weight-space diffusion model consumes.
With width 64 and 3 downsamplings it has 15 conv layers and 598,011 parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IN_CHANNELS = 6
OUT_CHANNELS = 59


@dataclass(frozen=True)
class UNetConfig:
    width: int = 64  # hidden channels at every level
    levels: int = 3  # number of 2x downsamplings; the UV resolution must be divisible by 2**levels
    in_channels: int = IN_CHANNELS
    out_channels: int = OUT_CHANNELS
    # Units of the position maps at the input: metres x position_scale. Neighbouring texels are about
    # 1 cm apart, so in metres a texel-sized detail needs first-layer weights ~100x their initial size,
    # which takes tens of thousands of steps to grow; in decimetres and below the UNet reaches the
    # detail of a fitted map in hundreds (README, Fitting). No parameter depends on it.
    position_scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class AvatarUNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        w = config.width

        def double(cin):
            return nn.ModuleList([nn.Conv2d(cin, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)])

        self.inc = double(config.in_channels)
        self.down = nn.ModuleList([double(w) for _ in range(config.levels)])
        self.up = nn.ModuleList([double(2 * w) for _ in range(config.levels)])
        self.outc = nn.Conv2d(w, config.out_channels, 1)

    def conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """The conv layers in forward order with their state-dict prefixes: one diffusion token each."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B,6,R,R] (normals, positions in metres) -> [B,59,R,R] raw Gaussian parameters (channels-last).

        Runs channels-last whatever the input's layout: on the CPU oneDNN's convolutions are faster in it
        (a bf16 training step, forward + backward + Adam, 1.7x at UV 128, one thread), with bf16 results
        equal bit for bit and float32 within 1e-5 of the contiguous layout's (README, Fitting)."""
        return run_unet(self, x.contiguous(memory_format=torch.channels_last), conv_layer)


def conv_layer(conv: nn.Conv2d, h: torch.Tensor, silu: bool) -> torch.Tensor:
    """One conv of the UNet, followed by SiLU where ``silu`` (every conv but the last)."""
    h = conv(h)
    return F.silu(h) if silu else h


def run_unet(unet: AvatarUNet, x: torch.Tensor, layer) -> torch.Tensor:
    """The UNet's forward pass with each conv (+ SiLU) done by ``layer(conv, h, silu)``: :func:`conv_layer`
    for the module itself, a fused kernel for the fast path (hda_backend.avatar.realtime). x: [B,6,R,R]."""
    if unet.config.position_scale != 1.0:
        x = torch.cat([x[:, :3], x[:, 3:] * unet.config.position_scale], 1)

    def block(convs, h):
        for conv in convs:
            h = layer(conv, h, True)
        return h

    skips = [block(unet.inc, x)]
    for convs in unet.down:
        skips.append(block(convs, F.max_pool2d(skips[-1], 2)))
    h = skips.pop()
    for convs in unet.up:
        skip = skips.pop()
        h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        h = block(convs, torch.cat([skip, h], dim=1))
    return layer(unet.outc, h, False)


def init_unet(unet: AvatarUNet, seed: int = 0, out_gain: float = 0.01) -> AvatarUNet:
    """Consistent initialisation (paper §4.1): the same seed gives bit-identical weights on any machine.

    Kaiming-uniform kernels and zero biases drawn from a private generator, so global RNG state does
    not leak in. The output layer is scaled by ``out_gain`` so that a fresh avatar starts close to the
    template-bound Gaussians that the decoder's base values describe.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, conv in unet.conv_layers():
            nn.init.kaiming_uniform_(conv.weight, a=5 ** 0.5, generator=gen)
            conv.bias.zero_()
        unet.outc.weight.mul_(out_gain)
    return unet


def num_parameters(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())
