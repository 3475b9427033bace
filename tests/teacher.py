"""A capture-format subject rendered from a known "teacher" avatar with the project's rasterizer.

Fast (no Blender) and exact: an avatar evaluated against its own renders must score near-perfectly,
and a student fitted to them must approach the teacher.
"""

import json
import math

import numpy as np
import torch
from PIL import Image

from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body
from hda_backend.config import load_config
from hda_backend.motion import procedural
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians

BACKGROUND = (0.1, 0.2, 0.3)


def teacher_avatar(seed=11, config=None):
    config = config or load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # visible colour structure for the student to learn
        avatar.unet.outc.weight[11:14].normal_(0, 0.5, generator=gen)
        avatar.unet.outc.bias[11:14] = torch.tensor([0.4, -0.1, -0.3])
    return avatar


@torch.no_grad()
def write_teacher_subject(root, avatar=None, cameras=4, size=64, train=4, test=2, name="teacher"):
    avatar = avatar or teacher_avatar()
    root.mkdir(parents=True, exist_ok=True)
    poses = torch.cat([procedural("wave", train).poses, procedural("squat", test).poses])
    transl = torch.zeros(len(poses), 3)
    frames = [f"{i:04d}" for i in range(len(poses))]
    cams = [f"cam{c:02d}" for c in range(cameras)]
    K = intrinsics(size, size, 40.0)
    meta_cams = {}
    for c, cam in enumerate(cams):
        angle = 2 * math.pi * c / cameras
        eye = torch.tensor([3.2 * math.sin(angle), -0.3 + (0.8 if c % 2 else -0.2), 3.2 * math.cos(angle)])
        view = look_at(eye, torch.tensor([0.0, -0.3, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
        meta_cams[cam] = {"K": K.tolist(), "R": view[:3, :3].tolist(), "t": view[:3, 3].tolist(),
                          "width": size, "height": size}
        for f, frame in enumerate(frames):
            g = avatar(poses[f:f + 1], transl[f:f + 1]).index(0)
            rgb, alpha = render_gaussians(g, view, K, size, size, background=BACKGROUND)
            for folder, array in (("images", rgb), ("masks", alpha[..., 0])):
                (root / folder / cam).mkdir(parents=True, exist_ok=True)
                pixels = (array.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
                Image.fromarray(pixels).save(root / folder / cam / f"{frame}.png")
    (root / "smplx").mkdir(exist_ok=True)
    for f, frame in enumerate(frames):
        p = poses[f].numpy()
        np.savez(root / "smplx" / f"{frame}.npz", betas=np.zeros(16), global_orient=p[0], body_pose=p[1:22].reshape(-1),
                 jaw_pose=p[22], leye_pose=p[23], reye_pose=p[24], left_hand_pose=p[25:40].reshape(-1),
                 right_hand_pose=p[40:].reshape(-1), transl=transl[f].numpy())
    (root / "cameras.json").write_text(json.dumps(meta_cams))
    (root / "subject.json").write_text(json.dumps({
        "format": "hda-capture", "format_version": 1, "name": name, "seed": 0, "width": size, "height": size,
        "background": list(BACKGROUND), "cameras": cams, "frames": frames,
        "train_frames": list(range(train)), "test_frames": list(range(train, train + test)),
        "test_cameras": [cameras - 1], "attributes": {"teacher": True}}))
    return root
