"""``hda info``: what a file is, in a few lines."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import HDAError


def describe(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise HDAError(f"file not found: {path}")
    if path.name.endswith(".safetensors"):
        return _describe_safetensors(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise HDAError(f"{path}: not a readable .npz file ({exc})") from None
        if "v_template" in keys:
            return _describe_body(path)
        if keys & {"poses", "body_pose"}:
            return _describe_motion(path)
        raise HDAError(f"{path}: an .npz with fields {sorted(keys)[:8]}, expected a body model or a motion")
    raise HDAError(f"{path}: unknown file type, expected *.hda.safetensors, a body .npz or a motion .npz")


def _describe_safetensors(path: Path) -> str:
    from .avatar.io import read_avatar_file

    metadata, tensors = read_avatar_file(path)
    unet = json.loads(metadata.get("unet", "{}"))
    params = sum(t.numel() for t in tensors.values())
    return "\n".join([
        f"{path}: HDA avatar (format {metadata['format']} v{metadata['format_version']})",
        f"  origin:     {metadata.get('origin') or 'unknown'}",
        f"  body:       {metadata.get('body_id')} (sha256 {str(metadata.get('body_sha256'))[:12]})",
        f"  UV:         {metadata.get('uv_res')}x{metadata.get('uv_res')}",
        f"  UNet:       width {unet.get('width')}, {unet.get('levels')} downsamplings, "
        f"{len(tensors) // 2} conv layers, {params:,} parameters",
        f"  gaussians:  {metadata.get('gaussians')}",
    ])


def _describe_body(path: Path) -> str:
    from .body import load_body
    from .uvmap import uv_layout

    body = load_body(path, num_betas=300)
    height = float(body.v_template[:, 1].max() - body.v_template[:, 1].min())
    coverage = uv_layout(body, 128).num_texels / 128 ** 2
    return "\n".join([
        f"{path}: SMPL-X-format body '{body.body_id}' (sha256 {body.sha256[:12]})",
        f"  mesh:       {body.num_vertices} vertices, {body.faces.shape[0]} faces, {body.vt.shape[0]} UV vertices",
        f"  skeleton:   55 SMPL-X joints; height of the mean shape {height:.2f} m",
        f"  shape:      {body.num_betas} components; pose correctives: {'yes' if body.posedirs is not None else 'none'}",
        f"  UV atlas:   {coverage:.0%} of a 128x128 map covered",
    ])


def _describe_motion(path: Path) -> str:
    from .motion import load_motion_npz

    motion = load_motion_npz(path)
    return (f"{path}: motion, {motion.num_frames} frames at {motion.fps:g} fps "
            f"({motion.num_frames / motion.fps:.1f} s), 55 SMPL-X joints")
