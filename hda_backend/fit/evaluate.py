"""``hda eval-fit``: held-out quality of fitted avatars.

Two splits:
- *novel view*: the subject's held-out cameras (``test_cameras``) on the training motion;
- *novel pose*: every camera on the held-out motion (``test_frames``).
Each view is scored twice: ``psnr_full`` on the whole image over the known background (the usual
protocol of avatar papers), and ``psnr``/``ssim``/``lpips`` on the crop around the ground-truth mask (the
crop the fitter trains on), where the background cannot inflate the number: at 256² with a person filling
a fifth of the frame, the crop PSNR is about 7 dB below the full-image one for the same render.
Several avatar files can be compared in one table, e.g. the pose-dependent avatar and its static
baseline (``hda fit --static``: the UNet input frozen at the rest pose, i.e. plain LBS of one fixed
Gaussian map).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..avatar.model import Avatar
from ..dataset import Subject
from .losses import psnr, ssim
from .trainer import crop_box, render_view


def evaluation_views(subject: Subject, max_frames: int = 8) -> dict[str, list[tuple[int, int]]]:
    def spread(frames):
        if len(frames) <= max_frames:
            return list(frames)
        step = len(frames) / max_frames
        return [frames[int(i * step)] for i in range(max_frames)]

    splits = {}
    if subject.test_cameras:
        splits["novel view"] = [(c, f) for c in subject.test_cameras for f in spread(subject.train_frames)]
    if subject.test_frames:
        splits["novel pose"] = [(c, f) for c in range(subject.num_cameras) for f in spread(subject.test_frames)]
    return splits


@torch.no_grad()
def evaluate(subject: Subject, avatar: Avatar, margin: float = 0.1, max_frames: int = 8,
             backend: str = "auto", perceptual=None, progress: bool = False) -> dict[str, dict[str, float]]:
    """{split: {"psnr_full", "psnr", "ssim", ("lpips"), "views"}} averaged over the split's views."""
    results = {}
    for split, views in evaluation_views(subject, max_frames).items():
        sums: dict[str, float] = {}
        for cam, frame in tqdm(views, desc=split, disable=not progress):
            x0, y0, x1, y1 = crop_box(subject.mask(cam, frame), margin)
            full, _ = render_view(avatar, subject, cam, frame, backend=backend)
            image = subject.image(cam, frame)
            rgb, gt = full[y0:y1, x0:x1], image[y0:y1, x0:x1]
            scores = {"psnr_full": float(psnr(full, image)), "psnr": float(psnr(rgb, gt)),
                      "ssim": float(ssim(rgb.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]))}
            if perceptual is not None:
                scores["lpips"] = float(perceptual(rgb.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]))
            for key, value in scores.items():
                sums[key] = sums.get(key, 0.0) + value
        results[split] = {k: v / len(views) for k, v in sums.items()} | {"views": len(views)}
    return results


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table: one row per (avatar name, evaluate() result)."""
    splits = [s for s in ("novel view", "novel pose") if any(s in r for _, r in rows)]
    metrics = ["psnr_full", "psnr", "ssim"] + (["lpips"] if any("lpips" in r.get(s, {}) for _, r in rows for s in splits) else [])
    names = {"psnr_full": "PSNR full", "psnr": "PSNR crop", "ssim": "SSIM crop", "lpips": "LPIPS crop"}
    header = "| avatar | " + " | ".join(f"{s} {names[m]}" for s in splits for m in metrics) + " |"
    lines = [header, "|" + "---|" * (1 + len(splits) * len(metrics))]
    for name, result in rows:
        cells = [f"{result[s][m]:.2f}" if m.startswith("psnr") else f"{result[s][m]:.3f}"
                 for s in splits for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
