"""The stateful avatar: a UNet bound to a body's UV layout (like smplx's nn.Module over lbs.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..body import BodyModel, check_pose, pose_body
from ..precision import autocast
from ..uvmap import global_transform, local_pose, pose_maps, uv_layout
from .gaussians import GaussianConfig, Gaussians, bind_texels, decode, gather_texels
from .unet import AvatarUNet, UNetConfig, init_unet


class Avatar(nn.Module):
    """pose θ -> UV pose maps -> UNet -> skinned 3D Gaussians.

    Only the UNet holds learnable weights; the body, the UV layout and the texel binding are fixed
    buffers shared by every avatar of the same body and UV resolution.
    """

    def __init__(self, body: BodyModel, uv_res: int, unet_config: UNetConfig = UNetConfig(),
                 gaussian_config: GaussianConfig = GaussianConfig(), static: bool = False):
        super().__init__()
        self.body = body
        self.uv_res = uv_res
        # A static avatar sees the rest pose whatever the pose: plain LBS of one fixed Gaussian map,
        # the baseline the pose-dependent model is measured against.
        self.static = static
        self._rest = None  # rest-pose maps, computed once for a static avatar
        self.gaussian_config = gaussian_config
        self.layout = uv_layout(body, uv_res)
        self.binding = bind_texels(body, self.layout, gaussian_config)
        self.unet = AvatarUNet(unet_config)
        # The UNet's arithmetic (see ``hda_backend.precision``): "float32", or "bfloat16" autocast. Only
        # the UNet runs in it; skinning and decoding stay float32.
        self.precision = "float32"

    @classmethod
    def from_init(cls, body: BodyModel, uv_res: int, unet_config: UNetConfig, gaussian_config: GaussianConfig,
                  seed: int = 0, static: bool = False) -> "Avatar":
        """A consistently initialised avatar: the same seed gives the same weights for every subject."""
        avatar = cls(body, uv_res, unet_config, gaussian_config, static)
        init_unet(avatar.unet, seed)
        return avatar

    def _apply(self, fn, recurse=True):
        # nn.Module.to / cuda / cpu end here: the body, UV layout and texel binding are plain tensors
        # (shared, frozen dataclasses), moved with the UNet so that no call copies them to its device.
        super()._apply(fn, recurse)
        self.body, self.layout, self.binding = self.body.apply(fn), self.layout.apply(fn), self.binding.apply(fn)
        self._rest = None
        return self

    @property
    def num_gaussians(self) -> int:
        return self.layout.num_texels

    def _rest_maps(self, like: torch.Tensor) -> torch.Tensor:
        if self._rest is None or self._rest.device != like.device:
            self._rest, _ = self.pose_inputs(torch.zeros(1, 55, 3, device=like.device))
        return self._rest.expand_as(like)

    def pose_inputs(self, pose: torch.Tensor):
        """pose [B,55,3] -> (maps [B,6,R,R], template posed without global orientation)."""
        return pose_maps(self.body, self.layout, pose)

    def forward(self, pose, transl=None, input_pose=None) -> Gaussians:
        """pose: [B,55,3] axis-angle (or [B,165]); transl: [B,3] or None -> Gaussians with batch B.

        input_pose: [B,55,3], the pose the UNet sees when it should differ from the one the Gaussians
        are skinned into (fitting jitters it so that the UNet varies smoothly with pose)."""
        device = next(self.unet.parameters()).device
        pose = check_pose(pose).to(device)
        maps, posed = self.pose_inputs(pose)
        if self.static:
            maps = self._rest_maps(maps)
        elif input_pose is not None:
            maps, _ = self.pose_inputs(check_pose(input_pose).to(device))
        with autocast(self.precision, device)():
            out = self.unet(maps)
        raw = gather_texels(out.float(), self.binding)
        return self.skin(raw, pose, transl, posed)

    def skin(self, raw: torch.Tensor, pose: torch.Tensor, transl=None, posed=None) -> Gaussians:
        """Per-texel raw parameters [B,M,59] (or [M,59] for every pose) -> Gaussians posed by ``pose``
        [B,55,3]; ``posed``: the template already posed by :meth:`pose_inputs` for that pose, if at hand.
        The UNet's output takes this path, and so do maps fitted directly (``fit.appearance``)."""
        device = raw.device
        pose = check_pose(pose).to(device)
        if posed is None:
            posed = pose_body(self.body, local_pose(pose))
        if raw.ndim == 2:
            raw = raw.expand(pose.shape[0], -1, -1)
        transforms = global_transform(self.body, pose, transl)[:, None] @ posed.transforms
        return decode(raw, self.binding, posed.rest_vertices, transforms, self.gaussian_config)
