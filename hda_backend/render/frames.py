"""Rendering an avatar's Gaussians to RGBA images, one frame at a time or over a motion."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..avatar.gaussians import SH_DEGREE, Gaussians
from ..body import pose_body
from ..avatar.model import Avatar
from ..images import contact_sheet, save_png, to_uint8, unpremultiply
from ..motion import Motion
from ..rotations import quat_to_matrix
from .camera import follow_cameras
from .rasterize import rasterize

SHADINGS = ("flat", "clay")
CLAY_COLOUR = (0.92, 0.85, 0.78)  # warm grey, the albedo of the clay preview


def clay_colors(g: Gaussians, viewmat: torch.Tensor) -> torch.Tensor:
    """Grey clay shading lit from the camera: [N,3] colours from each Gaussian's surface normal.

    An untrained avatar is a uniform grey; shading by the Gaussians' own normals (the third axis of
    their rotation, the template normal at init) shows its shape, a preview a TD can read.
    """
    normals = quat_to_matrix(g.quats)[..., :, 2]
    campos = torch.linalg.inv(viewmat)[:3, 3]
    to_cam = torch.nn.functional.normalize(campos - g.means, dim=-1)
    lambert = (normals * to_cam).sum(-1).abs()
    return (0.25 + 0.65 * lambert)[:, None].expand(-1, 3) * lambert.new_tensor(CLAY_COLOUR)


def render_gaussians(g: Gaussians, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
                     background=None, shading: str = "flat", backend: str = "auto",
                     render_mode: str = "RGB", sh_degree: int = SH_DEGREE) -> tuple[torch.Tensor, torch.Tensor]:
    """One camera: Gaussians of one avatar (no batch dim) -> (colors [H,W,3(+1)], alpha [H,W,1]).

    ``sh_degree`` limits the SH bands evaluated (a fit's warm-up renders low degrees first)."""
    if shading == "clay":
        colors, sh_degree = clay_colors(g, viewmat), None
    else:
        colors = g.sh
    bg = None if background is None else torch.as_tensor(background, dtype=torch.float32, device=g.means.device)[None]
    out, alpha, _ = rasterize(g.means, g.quats, g.scales, g.opacities, colors, viewmat[None], K[None],
                              width, height, sh_degree=sh_degree, backgrounds=bg, render_mode=render_mode,
                              backend=backend)
    return out[0], alpha[0]


@torch.no_grad()
def render_motion(avatar: Avatar, motion: Motion, out_dir: str | Path, size: int, camera: str = "orbit",
                  fov_deg: float = 30.0, shading: str = "flat", backend: str = "auto",
                  progress: bool = True) -> list[Path]:
    """Render every frame of ``motion`` as RGBA PNGs ``frame_0000.png``... plus ``contact_sheet.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(avatar.parameters()).device
    poses, transl = motion.poses.to(device), motion.transl.to(device)
    joints = pose_body(avatar.body, poses, transl=transl).joints.cpu()
    viewmats, Ks = (t.to(device) for t in follow_cameras(joints, camera, size, fov_deg))
    paths, tiles = [], []
    for f in tqdm(range(motion.num_frames), desc=f"render {motion.name}", unit="frame", disable=not progress):
        g = avatar(poses[f:f + 1], transl[f:f + 1]).index(0)
        rgb, alpha = render_gaussians(g, viewmats[f], Ks[f], size, size, shading=shading, backend=backend)
        rgba = unpremultiply(rgb, alpha)
        paths.append(save_png(out_dir / f"frame_{f:04d}.png", rgba))
        tiles.append(to_uint8(rgba))
    step = max(1, len(tiles) // 8)
    picks = list(range(0, len(tiles), step))[:8]
    sheet = contact_sheet([tiles[i] for i in picks], columns=min(4, len(picks)), labels=[f"frame {i}" for i in picks])
    sheet.save(out_dir / "contact_sheet.png")
    return paths
