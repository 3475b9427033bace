"""``hda eval-fit``: quality of fitted avatars on the training views and on held-out ones.

Three splits:
- *train*: training cameras on the training motion (how well the fit reproduces what it saw);
- *novel view*: the subject's held-out cameras (``test_cameras``) on the training motion;
- *novel pose*: every camera on the held-out motion (``test_frames``).

The main score of each view is PSNR and SSIM inside the ground-truth mask's bounding box dilated by
``BOX_DILATION`` pixels: the person, not the background. Full-frame PSNR over the known background (the
usual protocol of avatar papers) is reported beside it; at 256² with a person filling a fifth of the
frame it is 5-7 dB higher for the same render, so it flatters a blurry avatar.
Several avatar files can be compared in one table, e.g. the pose-dependent avatar and its static twin
(``hda fit --static``: the UNet input frozen at the rest pose, i.e. plain LBS of one fixed Gaussian map),
and :func:`comparison_sheet` puts them side by side on held-out-motion frames.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..avatar.model import Avatar
from ..dataset import Subject
from ..images import contact_sheet, error_heat, pad_to, to_uint8
from .losses import psnr, ssim
from .trainer import mask_bounds, render_view

BOX_DILATION = 8  # pixels added on every side of the ground-truth mask's bounding box
SPLITS = ("train", "novel view", "novel pose")


def mask_box(mask: torch.Tensor, dilation: int = BOX_DILATION) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the bounding box of mask > 0.5 grown by ``dilation`` px and clipped to the
    image; the whole image when the mask is empty."""
    height, width = mask.shape
    bounds = mask_bounds(mask)
    if bounds is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = bounds
    return max(0, x0 - dilation), max(0, y0 - dilation), min(width, x1 + dilation), min(height, y1 + dilation)


def evaluation_views(subject: Subject, max_frames: int = 8) -> dict[str, list[tuple[int, int]]]:
    """(camera, frame) pairs of each split, ``max_frames`` frames spread over each motion."""
    def spread(frames):
        if len(frames) <= max_frames:
            return list(frames)
        step = len(frames) / max_frames
        return [frames[int(i * step)] for i in range(max_frames)]

    train_frames = spread(subject.train_frames)
    splits = {"train": [(c, f) for i, f in enumerate(train_frames)
                        for c in subject.train_cameras[i % 3::3]]}
    if subject.test_cameras:
        splits["novel view"] = [(c, f) for c in subject.test_cameras for f in train_frames]
    if subject.test_frames:
        splits["novel pose"] = [(c, f) for c in range(subject.num_cameras) for f in spread(subject.test_frames)]
    return splits


def score_view(render: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, perceptual=None) -> dict:
    """Scores of one render [H,W,3] against its ground truth: box PSNR/SSIM(/LPIPS), full-frame PSNR."""
    x0, y0, x1, y1 = mask_box(mask)
    rgb, gt = render[y0:y1, x0:x1], image[y0:y1, x0:x1]
    scores = {"psnr": float(psnr(rgb, gt)), "ssim": float(ssim(rgb.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None])),
              "psnr_full": float(psnr(render, image))}
    if perceptual is not None:
        scores["lpips"] = float(perceptual(rgb.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]))
    return scores


@torch.no_grad()
def evaluate(subject: Subject, avatar: Avatar, max_frames: int = 8, backend: str = "auto", perceptual=None,
             progress: bool = False) -> dict[str, dict[str, float]]:
    """{split: {"psnr", "ssim", "psnr_full", ("lpips"), "views"}} averaged over the split's views."""
    results = {}
    for split, views in evaluation_views(subject, max_frames).items():
        sums: dict[str, float] = {}
        for cam, frame in tqdm(views, desc=split, disable=not progress):
            full, _ = render_view(avatar, subject, cam, frame, backend=backend)
            for key, value in score_view(full, subject.image(cam, frame), subject.mask(cam, frame), perceptual).items():
                sums[key] = sums.get(key, 0.0) + value
        results[split] = {k: v / len(views) for k, v in sums.items()} | {"views": len(views)}
    return results


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table: one row per (avatar name, evaluate() result); box scores first, full frame beside."""
    splits = [s for s in SPLITS if any(s in r for _, r in rows)]
    metrics = ["psnr", "ssim"] + (["lpips"] if any("lpips" in r.get(s, {}) for _, r in rows for s in splits) else []) \
        + ["psnr_full"]
    names = {"psnr": "PSNR box", "ssim": "SSIM box", "lpips": "LPIPS box", "psnr_full": "PSNR full"}
    header = "| avatar | " + " | ".join(f"{s} {names[m]}" for s in splits for m in metrics) + " |"
    lines = [header, "|" + "---|" * (1 + len(splits) * len(metrics))]
    for name, result in rows:
        cells = [(f"{result[s][m]:.2f}" if m.startswith("psnr") else f"{result[s][m]:.3f}") if s in result else "-"
                 for s in splits for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def comparison_sheet(subject: Subject, avatars: list[tuple[str, Avatar]], count: int = 4, backend: str = "auto"):
    """A PNG-ready sheet of held-out-motion frames (training motion if there is none): one row per view,
    ground truth ("cam f<frame> test"), then each avatar's render (its box PSNR) and its error x4, all
    cropped to the mask's box."""
    frames = subject.test_frames or subject.train_frames
    picks = [(i * 5 % subject.num_cameras, frames[(i * len(frames)) // count]) for i in range(count)]
    tiles, labels = [], []
    for cam, frame in picks:
        image, mask = subject.image(cam, frame), subject.mask(cam, frame)
        x0, y0, x1, y1 = mask_box(mask)
        tiles.append(to_uint8(image[y0:y1, x0:x1]))  # labels stay short: a tile is about 100 px wide
        labels.append(f"{subject.camera_names[cam]} f{subject.frame_names[frame]}{' test' if frame in subject.test_frames else ''}")
        for name, avatar in avatars:
            full, _ = render_view(avatar, subject, cam, frame, backend=backend)
            tiles += [to_uint8(full[y0:y1, x0:x1]), to_uint8(error_heat(full, image)[y0:y1, x0:x1])]
            labels += [f"{name} {score_view(full, image, mask)['psnr']:.1f}dB", "error x4"]
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    return contact_sheet([pad_to(t, height, width) for t in tiles], columns=1 + 2 * len(avatars), labels=labels)
