"""``hda synth``: render a dataset of synthetic subjects in the capture format of :mod:`hda_backend.dataset`.

Per subject: attributes from the subject's seed, the clothed person (:mod:`.person`), a training and a
held-out motion, a ring of calibrated cameras at two heights, and lights; the meta files
(``cameras.json``, ``smplx/<frame>.npz``, ``subject.json``) are written first, then the images that are
not done yet are rendered by Blender in a subprocess (:mod:`.blender_render`), then ``subject.png``.
An image counts as done when it and its mask both exist and decode at the right size; files are only
ever created by renaming a finished temporary file, and stale temporaries are removed on the next run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import replacing, write_text
from ..body import JOINT_INDEX as J
from ..body import POSE_PARTS, load_body
from ..errors import HDAError
from ..render.camera import look_at
from .face import face_fields
from .person import Deformer, build_parts, sample_attributes, subject_motion, subject_seed

FORMAT = "hda-capture"
FORMAT_VERSION = 1
NUM_BETAS = 16
DEFAULT_BACKGROUND = (1.0, 1.0, 1.0)
RING_RADIUS = 3.2          # metres from the stage centre
CAMERA_HEIGHTS = (0.9, 2.3)  # metres above the floor, alternating around the ring
FILL = 0.47                # the body stays within this fraction of the half image from the centre


@dataclass
class SynthOptions:
    subjects: int
    cameras: int
    frames: int
    size: int
    seed: int
    out: Path
    samples: int = 16
    background: tuple = DEFAULT_BACKGROUND


def split_frames(frames: int) -> tuple[int, int]:
    """Training and held-out frame counts: a quarter of the frames (at least one) for the test motion."""
    n_test = 0 if frames < 2 else max(1, frames // 4)
    return frames - n_test, n_test


def frame_names(n: int) -> list[str]:
    return [f"{i:04d}" for i in range(n)]


def camera_names(n: int) -> list[str]:
    return [f"cam{i:02d}" for i in range(n)]


def test_cameras(k: int) -> list[int]:
    """Suggested held-out cameras: every 4th (3, 7, ...); with fewer than 4 cameras the last one."""
    if k >= 4:
        return list(range(3, k, 4))
    return [k - 1] if k >= 2 else []


def camera_rig(k: int, size: int, points: np.ndarray, floor_y: float, azimuth0: float, heights=CAMERA_HEIGHTS):
    """K cameras on a ring around the points' centre, alternating between two heights, all looking at
    the middle of the body; one focal length for all, chosen so every point stays inside the frame.
    Returns viewmats [K,4,4] (world->camera, OpenCV) and Ks [K,3,3]."""
    lo, hi = points.min(0), points.max(0)
    centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2])
    views = []
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for i in range(k):
        az = azimuth0 + 2 * math.pi * i / k
        height = floor_y + heights[i % len(heights)]
        eye = torch.tensor([centre[0] + RING_RADIUS * math.sin(az), height, centre[2] + RING_RADIUS * math.cos(az)])
        views.append(look_at(eye, torch.tensor(centre), up))
    views = torch.stack(views).numpy()
    cam = np.einsum("kij,nj->kni", views[:, :3, :3], points) + views[:, None, :3, 3]
    extent = np.abs(cam[..., :2] / cam[..., 2:3]).max()
    focal = FILL * size / extent
    K = np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    return views, np.repeat(K[None], k, 0)


def _check_png(path: Path, size: int, mode: str) -> bool:
    try:
        with Image.open(path) as im:
            if im.size != (size, size) or im.mode != mode:
                return False
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _write_npz(path: Path, **arrays) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _mesh_volume(v: np.ndarray, f: np.ndarray) -> float:
    return float(abs(np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum()) / 6.0)


def plan_subject(body, seed: int, cameras: int, frames: int, size: int, samples: int, background,
                 motion=None, rig=None) -> dict:
    """Everything about one subject except its images: attributes, motion, geometry, cameras, lights.
    ``motion`` (poses [F,55,3], transl [F,3]) replaces the subject's own motion, and ``rig`` (azimuth of
    the first camera, heights above the floor) its ring (the subject cards use both)."""
    attrs = sample_attributes(seed, NUM_BETAS)
    n_train, n_test = split_frames(frames)
    poses, transl = subject_motion(body, attrs, n_train, n_test) if motion is None else motion
    rest_body, parts = build_parts(body, attrs)
    deformer = Deformer(body, attrs, parts)
    body_verts, joints, part_verts = deformer.pose(poses, transl)
    floor_y = float(rest_body[:, 1].min())
    points = np.concatenate([body_verts[:, ::5].reshape(-1, 3)] + [p[:, ::5].reshape(-1, 3) for p in part_verts])
    light = attrs["light"]
    if rig is None:
        viewmats, Ks = camera_rig(cameras, size, points, floor_y, light["camera_azimuth"])
    else:
        viewmats, Ks = camera_rig(cameras, size, points, floor_y, rig[0], rig[1])
    faces = body.faces.numpy()
    attrs = dict(attrs)
    attrs["height_m"] = round(float(rest_body[:, 1].max() - rest_body[:, 1].min()), 4)
    attrs["weight_kg"] = round(_mesh_volume(rest_body, faces) * 985.0, 2)
    rest_joints = body.J_regressor.double().numpy() @ rest_body
    fields = face_fields(rest_body, faces, attrs["face"], source=str(body.path))
    return dict(attrs=attrs, rest_joints=rest_joints, face_fields=fields, poses=poses, transl=transl, joints=joints,
                rest_body=rest_body, parts=parts,
                body_verts=body_verts, part_verts=part_verts, viewmats=viewmats, Ks=Ks, floor_y=floor_y,
                n_train=n_train, n_test=n_test, faces=faces, seed=seed, size=size, samples=samples,
                background=tuple(float(x) for x in background))


def _scene_spec(plan: dict, out_dir: Path, todo: list[tuple[int, int]]):
    attrs, parts = plan["attrs"], plan["parts"]
    rest = plan["rest_body"]
    jr = plan["rest_joints"]
    face = attrs["face"]
    materials = {"skin": {"colour": attrs["skin"]["colour"], "roughness": 0.55,
                          "face": {"iris": face["iris_colour"], "lips": face["lips"]["colour"],
                                   "brow": face["brow"]["colour"]}}}
    logo_centre = [0.0, float(0.5 * (jr[J["spine3"], 1] + jr[J["neck"], 1]) - 0.06), float(jr[J["spine3"], 2] + 0.03)]
    for key in ("top", "bottom"):
        garment = attrs[key]
        materials[key] = {"colour": garment["colour"], "pattern": garment["pattern"], "fabric": garment["fabric"],
                          "seam_colour": garment["seam_colour"], "roughness": 0.85, "logo_centre": logo_centre}
    shoes = attrs["shoes"]
    materials["shoes"] = {"colour": shoes["colour"], "roughness": 0.6, "sole": shoes["sole"],
                          "sole_y": plan["floor_y"] + 0.012 + shoes["sole_height"],
                          "toe_cap": shoes["toe_cap"], "laces": shoes["laces"],
                          "foot": {"x": float(abs(jr[J["left_foot"], 0])), "ankle_z": float(jr[J["left_ankle"], 2]),
                                   "toe_z": float(jr[J["left_foot"], 2]), "floor_y": plan["floor_y"]}}
    materials["hair"] = {"colour": attrs["hair"]["colour"], "roughness": 0.45, "strands": True}
    arrays = {"body/faces": plan["faces"].astype(np.int32), "body/rest": rest.astype(np.float32),
              "body/frames": plan["body_verts"].astype(np.float32)}
    fields = plan["face_fields"]
    objects = [{"name": "body", "material": "skin", "attributes": sorted(fields)}]
    for key, value in fields.items():
        arrays[f"body/attr/{key}"] = value
    for part, verts in zip(parts, plan["part_verts"]):
        arrays[f"{part.name}/faces"] = part.faces.astype(np.int32)
        arrays[f"{part.name}/rest"] = part.rest.astype(np.float32)
        arrays[f"{part.name}/frames"] = verts.astype(np.float32)
        for key, value in part.attributes.items():
            arrays[f"{part.name}/attr/{key}"] = np.asarray(value, np.float32)
        objects.append({"name": part.name, "material": part.material, "attributes": sorted(part.attributes)})
    light = attrs["light"]
    az, el = light["key_azimuth"], light["key_elevation"]
    key = [math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)]
    fill = [-math.sin(az + 0.6) * 0.8, 0.35, -math.cos(az + 0.6) * 0.8]
    n_frames, k = plan["poses"].shape[0], len(plan["Ks"])
    spec = {
        "width": plan["size"], "height": plan["size"], "samples": plan["samples"], "seed": plan["seed"],
        "background": list(plan["background"]), "ambient": [0.32, 0.32, 0.34],
        "lights": [{"towards": key, "strength": light["key_strength"], "angle": math.radians(1.5)},
                   {"towards": fill, "strength": 0.6, "angle": math.radians(20)}],
        "materials": materials, "objects": objects,
        "cameras": [{"name": name, "K": plan["Ks"][i].tolist(), "R": plan["viewmats"][i, :3, :3].tolist(),
                     "t": plan["viewmats"][i, :3, 3].tolist()} for i, name in enumerate(camera_names(k))],
        "frames": frame_names(n_frames), "todo": [list(x) for x in todo], "out_dir": str(out_dir),
    }
    return spec, arrays


def write_meta(plan: dict, out_dir: Path, name: str) -> None:
    """cameras.json, smplx/<frame>.npz and subject.json (all small, rewritten identically on resume)."""
    k, size = len(plan["Ks"]), plan["size"]
    cams = {cam: {"K": plan["Ks"][i].tolist(), "R": plan["viewmats"][i, :3, :3].tolist(),
                  "t": plan["viewmats"][i, :3, 3].tolist(), "width": size, "height": size}
            for i, cam in enumerate(camera_names(k))}
    write_text(out_dir / "cameras.json", json.dumps(cams, indent=1))
    poses = plan["poses"].numpy().astype(np.float32)
    transl = plan["transl"].numpy().astype(np.float32)
    betas = np.array(plan["attrs"]["betas"], np.float32)
    for f, frame in enumerate(frame_names(poses.shape[0])):
        fields = {key: poses[f, s].reshape(-1) for key, s in POSE_PARTS.items()}
        _write_npz(out_dir / "smplx" / f"{frame}.npz", betas=betas, transl=transl[f], **fields)
    frames = frame_names(poses.shape[0])
    subject = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "seed": plan["seed"],
        "width": size, "height": size, "background": list(plan["background"]),
        "cameras": camera_names(k), "frames": frames,
        "train_frames": list(range(plan["n_train"])),
        "test_frames": list(range(plan["n_train"], plan["n_train"] + plan["n_test"])),
        "test_cameras": test_cameras(k),
        "body": {"model": "hda_body (bundled)", "num_betas": NUM_BETAS},
        "renderer": {"engine": "Blender Cycles (CPU)", "blender": "5.0", "samples": plan["samples"],
                     "denoiser": "OpenImageDenoise", "mask": "render alpha"},
        "attributes": plan["attrs"],
    }
    write_text(out_dir / "subject.json", json.dumps(subject, indent=1))


def pending_images(out_dir: Path, cameras: int, frames: int, size: int) -> list[tuple[int, int]]:
    """(camera, frame) pairs whose image or mask is missing or unreadable; removes stale temporaries."""
    for folder in ("images", "masks"):
        for tmp in (out_dir / folder).glob("*/*.tmp"):
            tmp.unlink(missing_ok=True)
    todo = []
    for f, frame in enumerate(frame_names(frames)):
        for c, cam in enumerate(camera_names(cameras)):
            image, mask = out_dir / "images" / cam / f"{frame}.png", out_dir / "masks" / cam / f"{frame}.png"
            if not (_check_png(image, size, "RGB") and _check_png(mask, size, "L")):
                todo.append((c, f))
    return todo


def run_blender(work: Path, total: int, progress) -> None:
    """Run the Blender subprocess on work/scene.*, advancing ``progress`` per finished image."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = work / "blender.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hda_backend.studio.blender_render", str(work)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=root)
        try:
            for line in proc.stdout:
                if line.startswith("HDA-DONE"):
                    progress(1)
        finally:
            code = proc.wait()
    if code != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        last = lines[-1] if lines else "no output"
        raise HDAError(f"{work.parent}: Blender render failed with exit status {code} ({last}); log kept in {log}")


def contact_sheet_for(out_dir: Path, cameras: int, frames: int, n_train: int) -> None:
    from ..images import contact_sheet, save_png

    cams = sorted(set(np.linspace(0, cameras - 1, min(cameras, 4)).round().astype(int).tolist()))
    picks = sorted(set(np.linspace(0, n_train - 1, min(n_train, 3)).round().astype(int).tolist()))
    if frames > n_train:
        picks.append(frames - 1 if frames - n_train == 1 else n_train + (frames - n_train) // 2)
    images, labels = [], []
    names_c, names_f = camera_names(cameras), frame_names(frames)
    for f in picks:
        for c in cams:
            with Image.open(out_dir / "images" / names_c[c] / f"{names_f[f]}.png") as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(f"{names_c[c]} {names_f[f]}{' test' if f >= n_train else ''}")
    sheet = contact_sheet(images, columns=len(cams), labels=labels)
    save_png(out_dir / "subject.png", np.asarray(sheet))


def synth_subject(body, out_dir: Path, seed: int, opts: SynthOptions, progress=lambda n: None,
                  keep_work: bool = False) -> dict:
    """Render (or finish rendering) one subject into out_dir; returns timing information."""
    start = time.perf_counter()
    plan = plan_subject(body, seed, opts.cameras, opts.frames, opts.size, opts.samples, opts.background)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_meta(plan, out_dir, out_dir.name)
    todo = pending_images(out_dir, opts.cameras, opts.frames, opts.size)
    progress(opts.cameras * opts.frames - len(todo))
    render_s = 0.0
    if todo:
        work = out_dir / "_work"
        work.mkdir(exist_ok=True)
        spec, arrays = _scene_spec(plan, out_dir, todo)
        _write_npz(work / "scene.npz", **arrays)
        write_text(work / "scene.json", json.dumps(spec))
        t0 = time.perf_counter()
        run_blender(work, len(todo), progress)
        render_s = time.perf_counter() - t0
        left = pending_images(out_dir, opts.cameras, opts.frames, opts.size)
        if left:
            raise HDAError(f"{out_dir}: Blender finished but {len(left)} images are missing, "
                           f"e.g. images/{camera_names(opts.cameras)[left[0][0]]}/{frame_names(opts.frames)[left[0][1]]}.png")
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if todo or not (out_dir / "subject.png").is_file():
        contact_sheet_for(out_dir, opts.cameras, opts.frames, plan["n_train"])
    return {"rendered": len(todo), "seconds": time.perf_counter() - start, "render_seconds": render_s}


def synth(opts: SynthOptions, quiet: bool = False) -> list[Path]:
    """Render opts.subjects subjects into opts.out/subject_000, ...; resumes where a run stopped."""
    from tqdm import tqdm

    body = load_body(None, NUM_BETAS)
    if body.num_betas < NUM_BETAS:
        raise HDAError(f"body model {body.path}: {body.num_betas} shape components, the studio needs {NUM_BETAS}")
    opts.out.mkdir(parents=True, exist_ok=True)
    total = opts.subjects * opts.cameras * opts.frames
    paths = []
    with tqdm(total=total, unit="img", desc="hda synth", disable=quiet, dynamic_ncols=True) as bar:
        for i in range(opts.subjects):
            out_dir = opts.out / f"subject_{i:03d}"
            info = synth_subject(body, out_dir, subject_seed(opts.seed, i), opts, progress=bar.update)
            if info["rendered"] and not quiet:
                per = info["render_seconds"] / info["rendered"]
                bar.write(f"{out_dir.name}: {info['rendered']} images in {info['seconds']:.1f} s "
                          f"({per:.2f} s per image, {per * opts.cameras:.2f} s per frame of {opts.cameras} cameras)")
            paths.append(out_dir)
    return paths
