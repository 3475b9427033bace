"""People for the capture studio: attributes sampled from a seed, clothed geometry on the bundled body,
and its pose-dependent deformation.

Everything is built on the body shaped by the subject's betas, in the body frame (+Y up, facing +Z,
metres). Garments, shoes and hair are shells offset from the skin (tops, trousers, shorts, shoes,
hair) or loose generated tubes (skirts and the skirt of a dress). They are skinned with the body's
LBS weights, plus a pose-dependent fold field that plain LBS cannot produce: folds on the inside of
each bending joint (elbows, knees, hips, shoulders, spine) whose amplitude follows the bend angle, and
drape folds on skirts that deepen as the hips move. All of it is deterministic given the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..body import JOINT_INDEX as J
from ..body import BodyModel, pose_body, skin_points, vertex_normals
from ..motion import BUILTIN, procedural

# --- palettes (sRGB 0..1) ----------------------------------------------------------------------------

SKIN_TONES = [  # light to deep, roughly the Monk skin tone scale
    (0.965, 0.929, 0.894), (0.953, 0.906, 0.859), (0.918, 0.855, 0.757), (0.839, 0.733, 0.631),
    (0.769, 0.624, 0.482), (0.655, 0.498, 0.369), (0.541, 0.388, 0.275), (0.427, 0.294, 0.204),
    (0.325, 0.212, 0.145), (0.220, 0.145, 0.106),
]
HAIR_COLOURS = [(0.08, 0.06, 0.05), (0.20, 0.13, 0.08), (0.38, 0.25, 0.14), (0.62, 0.47, 0.28),
                (0.85, 0.72, 0.48), (0.55, 0.22, 0.10), (0.70, 0.70, 0.68), (0.15, 0.15, 0.17)]
CLOTH_COLOURS = [(0.90, 0.90, 0.88), (0.12, 0.12, 0.14), (0.15, 0.22, 0.45), (0.60, 0.10, 0.12),
                 (0.15, 0.42, 0.25), (0.90, 0.75, 0.20), (0.45, 0.45, 0.48), (0.85, 0.45, 0.15),
                 (0.45, 0.25, 0.55), (0.30, 0.55, 0.75), (0.80, 0.55, 0.60), (0.55, 0.45, 0.30),
                 (0.25, 0.32, 0.22), (0.95, 0.60, 0.65), (0.20, 0.35, 0.40), (0.70, 0.20, 0.35)]
IRIS_COLOURS = [(0.23, 0.14, 0.08), (0.35, 0.22, 0.10), (0.12, 0.07, 0.04), (0.30, 0.42, 0.55),
                (0.35, 0.45, 0.28), (0.45, 0.35, 0.18)]
GREY_HAIR = (0.74, 0.74, 0.72)
TOPS = ("tshirt", "longsleeve", "tank", "dress")
BOTTOMS = ("pants", "shorts", "skirt")
PATTERNS = ("solid", "stripes", "checks", "logo", "dots", "camo")
FABRICS = ("cotton", "denim", "knit", "satin")
HAIR_STYLES = ("bald", "buzz", "short", "bob", "long", "curly", "bun")
SHOES = ("sneakers", "boots", "flats")
SLEEVES = {"tank": 0.0, "tshirt": 0.3, "longsleeve": 0.93}
LIBRARY = tuple(BUILTIN)  # every built-in clip is on the SMPL-X skeleton in the body frame

ARM_JOINTS = [16, 18, 20] + list(range(25, 40)) + [17, 19, 21] + list(range(40, 55))
LEG_JOINTS = [1, 4, 7, 10, 2, 5, 8, 11]
HEAD_JOINTS = [15, 22, 23, 24]


def subject_seed(dataset_seed: int, index: int) -> int:
    """The seed of subject ``index`` of a dataset made with ``--seed dataset_seed``."""
    return int(np.random.SeedSequence([int(dataset_seed), int(index)]).generate_state(1)[0] & 0x7FFFFFFF)


def _colour(rng, avoid=None):
    choices = [c for c in CLOTH_COLOURS if avoid is None or np.abs(np.subtract(c, avoid)).sum() > 0.4]
    return tuple(float(x) for x in choices[rng.integers(len(choices))])


def _pattern(rng, base):
    kind = PATTERNS[rng.choice(len(PATTERNS), p=[0.2, 0.25, 0.2, 0.13, 0.12, 0.1])]
    pattern = {"kind": kind, "colour2": _colour(rng, avoid=base)}
    if kind == "stripes":
        pattern.update(period=float(rng.uniform(0.03, 0.09)), axis=["horizontal", "vertical"][int(rng.random() < 0.25)],
                       duty=float(rng.uniform(0.3, 0.6)))
    elif kind == "checks":
        pattern.update(period=float(rng.uniform(0.035, 0.08)))
    elif kind == "logo":
        pattern.update(size=float(rng.uniform(0.09, 0.16)), points=int(rng.integers(3, 8)),
                       inner=float(rng.uniform(0.35, 0.7)), rotation=float(rng.uniform(0, 2 * math.pi)))
    elif kind == "dots":  # polka dots on a jittered grid (Voronoi cells), radius a fraction of the cell
        pattern.update(period=float(rng.uniform(0.025, 0.06)), radius=float(rng.uniform(0.2, 0.38)))
    elif kind == "camo":  # blotches of two more colours from thresholded noise
        pattern.update(period=float(rng.uniform(0.08, 0.16)), colour3=_colour(rng, avoid=pattern["colour2"]))
    return pattern


def _garment(rng, colour, pattern):
    """Colour, pattern, fabric (a weave or knit and its sheen) and seams of one garment."""
    fabric = FABRICS[rng.choice(len(FABRICS), p=[0.45, 0.2, 0.2, 0.15])]
    return {"colour": colour, "pattern": pattern, "fabric": fabric,
            "seam_colour": tuple(float(c) * 0.55 for c in colour) if rng.random() < 0.7 else _colour(rng, avoid=colour)}


def _skin(rng):
    """A continuous tone along the scale (``tone_index`` the nearest step), with a warm, neutral or olive undertone."""
    position = rng.uniform(0, len(SKIN_TONES) - 1)
    index, t = int(position), position - int(position)
    lo, hi = np.array(SKIN_TONES[index]), np.array(SKIN_TONES[min(index + 1, len(SKIN_TONES) - 1)])
    colour = lo + t * (hi - lo)
    index = int(round(position))
    undertone = ["warm", "neutral", "olive"][rng.integers(3)]
    colour = colour * {"warm": (1.03, 0.99, 0.96), "neutral": (1.0, 1.0, 1.0), "olive": (0.98, 1.01, 0.95)}[undertone]
    return {"tone_index": index, "colour": tuple(float(c) for c in np.clip(colour, 0, 1)), "undertone": undertone}


def _face(rng, skin: dict) -> dict:
    """Eyes, brows and lips (see :mod:`.face`): sizes in metres, colours sRGB."""
    lip = np.array(skin["colour"]) * (0.72, 0.52, 0.52) + (0.06, 0.0, 0.01)
    return {"iris_colour": IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], "iris_radius": float(rng.uniform(0.0045, 0.006)),
            "brow": {"thickness": float(rng.uniform(0.007, 0.012)), "arch": float(rng.uniform(0.0, 0.006)),
                     "length": float(rng.uniform(0.042, 0.056))},
            "lips": {"width": float(rng.uniform(0.04, 0.052)), "fullness": float(rng.uniform(0.7, 1.35)),
                     "colour": tuple(float(c) for c in np.clip(lip * rng.uniform(0.85, 1.1), 0, 1))}}


def sample_attributes(seed: int, num_betas: int = 16) -> dict:
    """The appearance and motions of one subject as JSON-ready values (colours sRGB in [0,1])."""
    rng = np.random.default_rng(int(seed))
    betas = np.clip(rng.normal(0.0, 1.0, num_betas), -2.5, 2.5)
    betas[0] = float(np.clip(rng.normal(0.0, 1.1), -2.5, 2.5))  # component 0 is mostly height
    betas[1:4] = np.clip(betas[1:4] * 1.3, -3.0, 3.0)  # wider builds: the next components carry girth
    age = int(rng.integers(18, 81))
    skin = _skin(rng)
    hair_style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=[0.07, 0.12, 0.24, 0.18, 0.17, 0.12, 0.1])]
    top_kind = TOPS[rng.choice(len(TOPS), p=[0.35, 0.3, 0.15, 0.2])]
    top_colour = _colour(rng)
    top = {"kind": top_kind, **_garment(rng, top_colour, _pattern(rng, top_colour)),
           "sleeve": float(np.clip(SLEEVES.get(top_kind, [0.0, 0.3, 0.6][rng.integers(3)]) + rng.uniform(-0.05, 0.05), 0.0, 0.95)),
           "looseness": float(rng.uniform(0.6, 1.4)), "neckline": ["crew", "scoop", "v"][rng.integers(3)]}
    if top_kind == "dress":
        bottom = {"kind": "skirt", **{k: top[k] for k in ("colour", "pattern", "fabric", "seam_colour")},
                  "length": float(rng.uniform(0.35, 0.85)), "flare": float(rng.uniform(0.08, 0.35))}
    else:
        kind = BOTTOMS[rng.choice(len(BOTTOMS), p=[0.55, 0.25, 0.2])]
        colour = _colour(rng, avoid=top_colour)
        pattern = _pattern(rng, colour) if rng.random() < 0.35 else {"kind": "solid", "colour2": colour}
        bottom = {"kind": kind, **_garment(rng, colour, pattern)}
        if kind == "pants":
            bottom["length"] = float(rng.uniform(0.85, 0.97))
        elif kind == "shorts":
            bottom["length"] = float(rng.uniform(0.2, 0.5))
        else:
            bottom.update(length=float(rng.uniform(0.3, 0.8)), flare=float(rng.uniform(0.05, 0.35)))
    shoe_kind = SHOES[rng.integers(len(SHOES))]
    shoes = {"kind": shoe_kind, "colour": _colour(rng), "sole": [(0.95, 0.95, 0.93), (0.1, 0.1, 0.1)][rng.integers(2)],
             "sole_height": float(rng.uniform(0.012, 0.03) if shoe_kind != "flats" else 0.008),
             "toe_cap": _colour(rng) if rng.random() < 0.4 else None,
             "laces": shoe_kind != "flats" and bool(rng.random() < 0.8)}
    _, test = rng.choice(len(LIBRARY), size=2, replace=False)
    test_phase = float(rng.uniform(0, 1))
    motions = {
        "test": {"clip": LIBRARY[int(test)], "phase": test_phase},
        "yaw": float(rng.uniform(-0.6, 0.6)),
        "finger_curl": float(rng.uniform(0.1, 0.5)),
    }
    light = {"key_azimuth": float(rng.uniform(-1.0, 1.0)), "key_elevation": float(rng.uniform(0.7, 1.1)),
             "key_strength": float(rng.uniform(3.0, 4.5)), "camera_azimuth": float(rng.uniform(0, 2 * math.pi))}
    fold_phase = float(rng.uniform(0, 2 * math.pi))
    # Training motion: every other clip of the library, in a random order, each from a random phase.
    # A UNet that saw one clip cannot learn how appearance follows pose; the test clip stays unseen.
    others = [LIBRARY[i] for i in rng.permutation(len(LIBRARY)) if i != int(test)]
    motions["train"] = [{"clip": clip, "phase": float(rng.uniform(0, 1))} for clip in others]
    # Hair greys with age: none before 35, all by 80 (the fraction mixed towards grey).
    grey = float(np.clip((age - 35) / 45 + rng.normal(0, 0.15), 0, 1))
    hair_colour = np.array(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))])
    hair_colour = tuple(float(c) for c in hair_colour + grey * (np.array(GREY_HAIR) - hair_colour))
    hair = {"style": hair_style, "colour": hair_colour, "grey": grey, "length": float(rng.uniform(0.05, 0.25)),
            "volume": float(rng.uniform(0.8, 1.8)), "clump_seed": int(rng.integers(2 ** 31))}
    face = _face(rng, skin)
    face["brow"]["colour"] = tuple(float(c) for c in np.array(hair_colour) * 0.6)
    return {
        "betas": [float(b) for b in betas], "age": age, "skin": skin, "face": face, "hair": hair,
        "top": top, "bottom": bottom, "shoes": shoes, "motions": motions, "light": light,
        "fold_phase": fold_phase,
    }


# --- motions -------------------------------------------------------------------------------------------

def sample_clip(name: str, frames: int, phase: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``frames`` poses spread over one cycle of a built-in clip, starting at ``phase`` (0..1)."""
    cycle = max(4 * frames, 60)
    motion = procedural(name, cycle)
    idx = [(int(round(phase * cycle)) + (i * cycle) // frames) % cycle for i in range(frames)]
    return motion.poses[idx].clone(), motion.transl[idx].clone()


def training_motion(clips: list[dict], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``frames`` poses over several clips ([{"clip", "phase"}, ...]), as evenly as they divide, each
    clip's share spread over its cycle; the clips' translations are made to start where the previous
    clip ended, so the subject stays in the middle of the ring."""
    share = [frames // len(clips) + (i < frames % len(clips)) for i in range(len(clips))]
    poses, transl = [], []
    for clip, n in zip(clips, share):
        if n:
            p, t = sample_clip(clip["clip"], n, clip["phase"])
            poses.append(p)
            transl.append(t - t[:1] * torch.tensor([1.0, 0.0, 1.0]))
    return torch.cat(poses), torch.cat(transl)


def subject_motion(body: BodyModel, attrs: dict, n_train: int, n_test: int):
    """poses [F,55,3] and transl [F,3] of the training then the held-out test frames, turned by the
    subject's yaw about the pelvis, with relaxed fingers."""
    m = attrs["motions"]
    p1, t1 = training_motion(m["train"], n_train)
    p2, t2 = sample_clip(m["test"]["clip"], n_test, m["test"]["phase"]) if n_test else (p1[:0], t1[:0])
    poses, transl = torch.cat([p1, p2]), torch.cat([t1, t2])
    curl = m["finger_curl"]
    for i in range(15):  # finger flexion: left -Z, right +Z (thumbs less)
        scale = 0.4 if i >= 12 else 1.0
        poses[:, 25 + i, 2] += -curl * scale
        poses[:, 40 + i, 2] += curl * scale
    # Turn the whole motion about the vertical through the pelvis: R_root' = Ry R_root and
    # transl' = Ry (transl + j0) - j0, since the root rotates about the rest pelvis joint j0.
    betas = torch.tensor(attrs["betas"], dtype=torch.float32)
    j0 = (body.J_regressor[0] @ (body.v_template + body.shapedirs @ betas))
    yaw = m["yaw"]
    ry = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    root = _rotvec_to_matrix(poses[:, 0])
    poses[:, 0] = _matrix_to_rotvec(ry @ root)
    transl = (transl + j0) @ ry.T - j0
    return poses, transl


def _rotvec_to_matrix(r: torch.Tensor) -> torch.Tensor:
    from smplx.lbs import batch_rodrigues

    return batch_rodrigues(r.reshape(-1, 3).double()).float().reshape(r.shape[:-1] + (3, 3))


def _matrix_to_rotvec(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    cos = ((m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.acos(cos)
    axis = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    s = torch.sin(angle)
    safe = s.abs() > 1e-6
    out = torch.where(safe[..., None], axis / (2 * torch.where(safe, s, torch.ones_like(s)))[..., None] * angle[..., None],
                      0.5 * axis)
    return out.float()


# --- geometry ------------------------------------------------------------------------------------------

@dataclass
class Part:
    """One mesh of the person: rest positions (before offset), faces, skinning weights, and how it
    deforms. ``material`` names an entry of the scene's materials."""

    name: str
    material: str
    rest: np.ndarray        # [N,3] float64, on the shaped body (or the generated surface)
    normals: np.ndarray     # [N,3] offset/fold direction in rest space
    faces: np.ndarray       # [M,3] int
    weights: np.ndarray     # [N,55]
    thickness: np.ndarray   # [N] offset along normals, metres
    fold_scale: float = 0.0  # 0: no joint folds
    skirt: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)  # per-vertex fields [N] the shaders read, by name


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.zeros_like(v)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _subdivide(faces: np.ndarray, arrays: list[np.ndarray]):
    """Split every triangle into four at its edge midpoints; per-vertex arrays are averaged."""
    n = arrays[0].shape[0]
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges.sort(axis=1)
    unique, inverse = np.unique(edges, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    mid = n + inverse.reshape(3, -1).T  # [M,3] midpoint of edges (01, 12, 20)
    a, b, c = faces.T
    ab, bc, ca = mid.T
    new_faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                                np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)])
    out = [np.concatenate([x, 0.5 * (x[unique[:, 0]] + x[unique[:, 1]])]) for x in arrays]
    return new_faces, out


def _shell(name, material, v, n, faces, weights, vertex_mask, thickness, fold_scale, subdivide=True):
    keep = vertex_mask[faces].all(1)
    f = faces[keep]
    used = np.unique(f)
    remap = -np.ones(len(v), np.int64)
    remap[used] = np.arange(len(used))
    f = remap[f]
    arrays = [v[used], n[used], weights[used], np.broadcast_to(thickness, (len(v),))[used]]
    if subdivide:
        f, arrays = _subdivide(f, arrays)
    rest, normals, w, t = arrays
    normals = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return Part(name, material, rest, normals, f.astype(np.int64), w, t, fold_scale)


def _tube(name, material, rings_y, radius, centre, weights_fn, fold_scale, skirt):
    """A generated tube: rings at heights rings_y [R] with radius [R,A] about centre (x,z)."""
    n_rings, n_ang = radius.shape
    ang = np.arange(n_ang) / n_ang * 2 * math.pi
    x = centre[0] + radius * np.sin(ang)[None]
    z = centre[1] + radius * np.cos(ang)[None]
    y = np.broadcast_to(rings_y[:, None], radius.shape)
    rest = np.stack([x, y, z], -1).reshape(-1, 3)
    normals = np.stack([np.sin(ang)[None].repeat(n_rings, 0), np.zeros_like(radius),
                        np.cos(ang)[None].repeat(n_rings, 0)], -1).reshape(-1, 3)
    faces = []
    for r in range(n_rings - 1):
        for a in range(n_ang):
            i0, i1 = r * n_ang + a, r * n_ang + (a + 1) % n_ang
            j0, j1 = i0 + n_ang, i1 + n_ang
            faces += [[i0, j0, j1], [i0, j1, i1]]
    depth = np.broadcast_to(((rings_y[0] - rings_y) / max(rings_y[0] - rings_y[-1], 1e-6))[:, None], radius.shape)
    skirt = dict(skirt, depth=depth.reshape(-1).copy(), angle=np.broadcast_to(ang[None], radius.shape).reshape(-1).copy())
    return Part(name, material, rest, normals, np.array(faces, np.int64), weights_fn(rest, depth.reshape(-1)),
                np.zeros(len(rest)), fold_scale, skirt)


def _hull_radius(v, mask, centre, y, n_ang, band=0.02):
    """Largest distance from the vertical axis at centre of the masked vertices near height y, per angle."""
    sel = mask & (np.abs(v[:, 1] - y) < band)
    r = np.zeros(n_ang)
    if sel.any():
        dx, dz = v[sel, 0] - centre[0], v[sel, 2] - centre[1]
        a = (np.floor((np.arctan2(dx, dz) % (2 * math.pi)) / (2 * math.pi) * n_ang).astype(int)) % n_ang
        np.maximum.at(r, a, np.hypot(dx, dz))
    # fill empty bins from their neighbours (circularly), then smooth a little
    for _ in range(n_ang):
        empty = r == 0
        if not empty.any() or empty.all():
            break
        r[empty] = np.maximum(np.roll(r, 1), np.roll(r, -1))[empty]
    return (r + np.roll(r, 1) + np.roll(r, -1)) / 3


@dataclass
class _Shape:
    """The shaped body the garments are cut from: rest vertices, faces, skinning weights, joints, normals,
    body-region masks and the limb coordinates the cuts are measured in."""

    v: np.ndarray
    f: np.ndarray
    w: np.ndarray
    jr: np.ndarray
    n: np.ndarray
    arm: np.ndarray
    leg: np.ndarray
    head: np.ndarray
    hands: np.ndarray
    x_abs: np.ndarray
    t_arm: np.ndarray  # 0 at the shoulder to 1 at the wrist
    t_leg: np.ndarray  # 0 at the hip to 1 at the ankle
    y_waist: float


def _shape(body: BodyModel, attrs: dict) -> _Shape:
    betas = torch.tensor(attrs["betas"], dtype=torch.float32)[: body.num_betas]
    v = (body.v_template + body.shapedirs[:, :, : len(betas)] @ betas).double().numpy()
    f = body.faces.numpy()
    w = body.weights.double().numpy()
    jr = body.J_regressor.double().numpy() @ v
    x_abs = np.abs(v[:, 0])
    return _Shape(v, f, w, jr, _vertex_normals(v, f), arm=w[:, ARM_JOINTS].sum(1) > 0.5,
                  leg=w[:, LEG_JOINTS].sum(1) > 0.5, head=w[:, HEAD_JOINTS].sum(1) > 0.5,
                  hands=w[:, 25:55].sum(1) + w[:, 20] + w[:, 21] > 0.5, x_abs=x_abs,
                  t_arm=(x_abs - jr[16, 0]) / (jr[20, 0] - jr[16, 0]),
                  t_leg=(jr[1, 1] - v[:, 1]) / (jr[1, 1] - jr[7, 1]), y_waist=jr[3, 1] - 0.02)


def build_parts(body: BodyModel, attrs: dict) -> tuple[np.ndarray, list[Part]]:
    """The shaped body's rest vertices [V,3] and the person's garment, shoe and hair parts."""
    b = _shape(body, attrs)
    parts = [_top(b, attrs["top"]), _bottom(b, attrs["bottom"], attrs["top"]), _shoes(b, attrs["shoes"])]
    if attrs["hair"]["style"] != "bald":
        parts.append(_hair(b, attrs["hair"]))
    if attrs["hair"]["style"] == "bun":
        parts.append(_bun(b, attrs["hair"]))
    return b.v, parts


def boundary_distance(rest: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per vertex, the straight-line distance [N] to the nearest vertex on the mesh's open border (an edge
    of one face only): hems, cuffs and necklines of a garment, the hairline of hair."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    border = np.unique(unique[counts == 1])
    if len(border) == 0:
        return np.full(len(rest), np.inf)
    points, targets = torch.tensor(rest), torch.tensor(rest[border])
    # direct differences, not the matrix-product form, so the result is exact to rounding on any machine
    return torch.cat([torch.cdist(chunk, targets, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                      for chunk in points.split(8192)]).numpy()


def _seams(part: Part, b: _Shape) -> Part:
    """The garment's seam and hem fields: ``seam`` the distance (m) to the nearest seam line (side seams of
    the torso and legs, the sleeves' shoulder and underarm seams, a skirt's side seams), ``hem`` the
    distance to the garment's border. The shader draws seams and a stitched hem from them."""
    v, jr = part.rest, b.jr
    far = np.full(len(v), 1.0)
    if part.skirt:
        # x = r sin(angle), z = r cos(angle) about the pelvis: the sides are where cos(angle) = 0
        seam = np.hypot(v[:, 0], v[:, 2] - jr[0, 2]) * np.abs(np.cos(part.skirt["angle"]))
    else:
        w = part.weights
        arm = w[:, ARM_JOINTS].sum(1) > 0.5
        leg = w[:, LEG_JOINTS].sum(1) > 0.5
        spine = [J["pelvis"], J["spine1"], J["spine2"], J["spine3"], J["neck"]]
        order = np.argsort(jr[spine, 1])
        zc = np.interp(v[:, 1], jr[spine, 1][order], jr[spine, 2][order])
        side = np.where(~arm & ~leg & (np.abs(v[:, 0]) > 0.05), np.abs(v[:, 2] - zc), far)
        legs = [J["left_hip"], J["left_knee"], J["left_ankle"]]
        zl = np.interp(-v[:, 1], -jr[legs, 1], jr[legs, 2])
        side = np.minimum(side, np.where(leg, np.abs(v[:, 2] - zl), far))
        x_abs = np.abs(v[:, 0])
        shoulder = np.where(arm, np.abs(x_abs - (jr[J["left_shoulder"], 0] + 0.02)), far)
        under = np.where(arm & (v[:, 1] < jr[J["left_shoulder"], 1]), np.abs(v[:, 2] - jr[J["left_shoulder"], 2]), far)
        seam = np.minimum(side, np.minimum(shoulder, under))
    part.attributes = {"seam": seam.astype(np.float32),
                       "hem": boundary_distance(v, part.faces).astype(np.float32)}
    return part


def _top(b: _Shape, top: dict) -> Part:
    """Torso down to the hem, sleeves to the chosen length, a neckline."""
    v, jr, x_abs = b.v, b.jr, b.x_abs
    neck_y = jr[12, 1] - 0.025
    depth = {"crew": 0.0, "scoop": 0.07, "v": 0.11}[top["neckline"]]
    front = v[:, 2] > jr[9, 2] + 0.02
    neck_cut = neck_y - np.where(front, depth * np.clip(1 - x_abs / 0.09, 0, 1) ** (0.5 if top["neckline"] == "v" else 2), 0)
    hem_y = jr[0, 1] - 0.06 if top["kind"] != "dress" else b.y_waist - 0.03
    in_top = (v[:, 1] < neck_cut) & (v[:, 1] > hem_y) & ~b.head & ~b.hands & ~b.leg
    sleeve = top["sleeve"]
    in_top &= ~b.arm | (b.t_arm <= sleeve) if sleeve > 0.02 else ~b.arm
    if sleeve <= 0.02:  # tank tops leave the shoulder cap and the armpit free
        in_top &= ~((x_abs > jr[16, 0] - 0.03) & (v[:, 1] > jr[16, 1] - 0.12))
    loose = top["looseness"]
    thick = 0.008 + 0.006 * loose * np.clip((jr[6, 1] - v[:, 1]) / 0.3, 0, 1)
    return _seams(_shell("top", "top", v, b.n, b.f, b.w, in_top, thick, loose), b)


def _bottom(b: _Shape, bottom: dict, top: dict) -> Part:
    """Trousers and shorts as shells; skirts (and a dress's skirt) as a loose tube."""
    v, jr = b.v, b.jr
    if bottom["kind"] in ("pants", "shorts"):
        in_bottom = (v[:, 1] < b.y_waist) & ~b.arm & ~b.hands & (~b.leg | (b.t_leg <= bottom["length"]) | (v[:, 1] > jr[1, 1] - 0.02))
        return _seams(_shell("bottom", "bottom", v, b.n, b.f, b.w, in_bottom, 0.005, 0.8), b)
    y_hip = jr[1, 1]
    y_hem = y_hip - bottom["length"] * (jr[1, 1] - jr[7, 1])
    rings = np.linspace(b.y_waist + (0.0 if top["kind"] != "dress" else 0.01), y_hem, 28)
    centre = (0.0, float(jr[0, 2]))
    n_ang = 96
    torso_legs = ~b.arm & ~b.hands
    radius = np.zeros((len(rings), n_ang))
    running = np.zeros(n_ang)
    for k, y in enumerate(rings):
        running = np.maximum(running, _hull_radius(v, torso_legs, centre, y, n_ang))
        radius[k] = running + 0.012 + bottom["flare"] * max(0.0, y_hip + 0.05 - y)
    return _seams(_tube("skirt", "bottom", rings, radius, centre, _skirt_weights, 1.0,
                        {"folds": 9 + 4 * bottom["flare"] / 0.35}), b)


def _skirt_weights(rest: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Skinning weights of skirt vertices: the pelvis at the waist, following the hips towards the hem."""
    out = np.zeros((len(rest), 55))
    side = np.clip(0.5 + rest[:, 0] / 0.24, 0, 1)
    follow = 0.55 * np.clip(d * 1.3, 0, 1)
    out[:, J["pelvis"]] = 1 - follow - 0.25 * (1 - d) * (d < 0.15)
    out[:, J["spine1"]] = 0.25 * (1 - d) * (d < 0.15)
    out[:, J["left_hip"]] = follow * side
    out[:, J["right_hip"]] = follow * (1 - side)
    return out


def _shoes(b: _Shape, shoes: dict) -> Part:
    """The feet up to the ankle (boots higher, flats lower with an open instep), on a sole: the shell is
    thicker by the sole's height under the foot, where its normals point down."""
    v, jr = b.v, b.jr
    top_y = jr[7, 1] + (0.16 if shoes["kind"] == "boots" else (0.01 if shoes["kind"] == "flats" else 0.05))
    in_shoes = b.leg & (v[:, 1] < top_y)
    if shoes["kind"] == "flats":
        in_shoes &= ~((v[:, 1] > jr[10, 1] - 0.005) & (v[:, 2] > jr[7, 2] + 0.02))  # open instep
    floor = v[:, 1].min()
    thick = 0.009 + shoes["sole_height"] * np.clip((floor + 0.02 - v[:, 1]) / 0.02, 0, 1) * np.clip(-b.n[:, 1], 0, 1)
    return _shell("shoes", "shoes", v, b.n, b.f, b.w, in_shoes, thick, 0.3, subdivide=False)


HAIR_THICKNESS = {"buzz": 0.003, "short": 0.012, "bob": 0.02, "long": 0.018, "curly": 0.032, "bun": 0.006}


def _hair(b: _Shape, hair: dict) -> Part:
    """A shell over the scalp, down the back of the neck for longer styles, with volume: thicker at the
    crown, thinning towards the hairline, and lumpy (clumps and curls from a few random waves)."""
    v, jr, w = b.v, b.jr, b.w
    style = hair["style"]
    rel_z = v[:, 2] - jr[15, 2]
    line = jr[15, 1] + 0.06 + 0.45 * np.clip(rel_z, -0.15, 0.15)
    if style in ("bob", "long", "curly"):
        line = np.where(rel_z < 0.02, jr[15, 1] - (0.02 if style != "curly" else 0.0), line)
    scalp = (v[:, 1] > line) & (b.head | (w[:, 12] > 0.3))
    if style == "long":
        drop = hair["length"]
        back = (v[:, 2] < jr[9, 2] - 0.02) & (b.x_abs < 0.11) & (v[:, 1] > jr[12, 1] - drop) & ~b.arm
        scalp |= back & (v[:, 1] > jr[9, 1] - 0.05)
    volume = 1.0 if style in ("buzz", "bun") else hair["volume"]
    hair_t = HAIR_THICKNESS[style] * volume * np.clip(0.6 + 3 * (v[:, 1] - jr[15, 1]), 0.4, 1.2)
    part = _shell("hair", "hair", v, b.n, b.f, w, scalp, hair_t, 0.0, subdivide=style != "buzz")
    _smooth_border(part)
    if style != "buzz":
        rng = np.random.default_rng(hair["clump_seed"])
        wavelength = 0.035 if style == "curly" else 0.07
        k = rng.normal(size=(6, 3))
        k *= 2 * math.pi / wavelength / np.linalg.norm(k, axis=1, keepdims=True)
        lumps = np.sin(part.rest @ k.T + rng.uniform(0, 2 * math.pi, 6)).mean(1)  # [N], about +-0.4
        edge = np.clip(boundary_distance(part.rest, part.faces) / 0.04, 0.25, 1.0)  # thin at the hairline
        part.thickness = part.thickness * edge * (1.0 + (0.9 if style == "curly" else 0.5) * lumps)
    return part


def _smooth_border(part: Part, iterations: int = 8) -> None:
    """Round off the staircase a shell's border takes from whole body faces (the hairline): each border
    vertex with two border neighbours moves halfway to their midpoint, ``iterations`` times."""
    f = part.faces
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    border = unique[counts == 1]
    if len(border) == 0:
        return
    neighbours = {}
    for a, c in border:
        neighbours.setdefault(int(a), []).append(int(c))
        neighbours.setdefault(int(c), []).append(int(a))
    chain = np.array([k for k, n in neighbours.items() if len(n) == 2])
    if len(chain) == 0:
        return
    pairs = np.array([neighbours[int(k)] for k in chain])
    for _ in range(iterations):
        part.rest[chain] = 0.5 * part.rest[chain] + 0.25 * (part.rest[pairs[:, 0]] + part.rest[pairs[:, 1]])


def _bun(b: _Shape, hair: dict) -> Part:
    """A bun: an ellipsoid at the back of the crown, carried by the head joint."""
    jr = b.jr
    radius = 0.03 + 0.012 * hair["volume"]
    centre = jr[15] + np.array([0.0, 0.085, -0.105])
    lat, lon = np.meshgrid(np.linspace(0.1, math.pi - 0.1, 10), np.arange(16) / 16 * 2 * math.pi, indexing="ij")
    normals = np.stack([np.sin(lat) * np.sin(lon), np.cos(lat), np.sin(lat) * np.cos(lon)], -1).reshape(-1, 3)
    rest = centre + radius * normals * np.array([1.0, 0.8, 0.9])
    faces = []
    for r in range(9):
        for a in range(16):
            i0, i1 = r * 16 + a, r * 16 + (a + 1) % 16
            faces += [[i0, i1 + 16, i0 + 16], [i0, i1, i1 + 16]]
    weights = np.zeros((len(rest), 55))
    weights[:, J["head"]] = 1.0
    return Part("bun", "hair", rest, normals, np.array(faces, np.int64), weights, np.zeros(len(rest)))


# --- pose-dependent folds ------------------------------------------------------------------------------

# joint, frame joint (whose rotation is the parent segment's), child joint, region joints, sigma, gain
DRIVERS = [
    ("left_elbow", "left_shoulder", "left_wrist", ["left_shoulder", "left_elbow"], 0.08, 1.0),
    ("right_elbow", "right_shoulder", "right_wrist", ["right_shoulder", "right_elbow"], 0.08, 1.0),
    ("left_knee", "left_hip", "left_ankle", ["left_hip", "left_knee"], 0.09, 1.0),
    ("right_knee", "right_hip", "right_ankle", ["right_hip", "right_knee"], 0.09, 1.0),
    ("left_hip", "pelvis", "left_knee", ["pelvis", "left_hip", "spine1"], 0.10, 0.8),
    ("right_hip", "pelvis", "right_knee", ["pelvis", "right_hip", "spine1"], 0.10, 0.8),
    ("left_shoulder", "left_collar", "left_elbow", ["left_collar", "left_shoulder", "spine3"], 0.09, 0.6),
    ("right_shoulder", "right_collar", "right_elbow", ["right_collar", "right_shoulder", "spine3"], 0.09, 0.6),
    ("spine2", "pelvis", "neck", ["pelvis", "spine1", "spine2", "spine3"], 0.14, 1.0),
]
FOLD_AMPLITUDE = 0.011   # metres per radian of bend
FOLD_WAVELENGTH = 0.045


class Deformer:
    """Poses a person: body vertices by LBS, parts by LBS of their rest shape plus joint-driven folds."""

    def __init__(self, body: BodyModel, attrs: dict, parts: list[Part]):
        self.body, self.parts = body, parts
        self.betas = torch.tensor(attrs["betas"], dtype=torch.float32)[None, : body.num_betas]
        v = (body.v_template + body.shapedirs[:, :, : self.betas.shape[1]] @ self.betas[0]).double().numpy()
        self.rest_joints = body.J_regressor.double().numpy() @ v
        w = body.weights.numpy()
        below = v[:, 1] < self.rest_joints[J["spine1"], 1]
        limbs = w[:, LEG_JOINTS + ARM_JOINTS].sum(1) > 0.5
        self.collider = torch.tensor(np.nonzero(below | limbs)[0])
        rng = np.random.default_rng(int(attrs.get("fold_phase", 0) * 1e6))
        self.fold_fields = []
        for part in parts:
            fields = []
            if part.fold_scale > 0 and not part.skirt:
                for joint, frame, child, region, sigma, gain in DRIVERS:
                    jp = self.rest_joints[J[joint]]
                    bone = self.rest_joints[J[child]] - jp
                    bone /= np.linalg.norm(bone)
                    rel = part.rest - jp
                    s = rel @ bone
                    radial = rel - s[:, None] * bone
                    radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-9)
                    mask = np.clip(part.weights[:, [J[r] for r in region]].sum(1), 0, 1)
                    fall = mask * np.exp(-(np.linalg.norm(rel, axis=1) / (1.6 * sigma)) ** 2)
                    keep = fall > 1e-3
                    if not keep.any():
                        continue
                    # a random slant and irregularity per subject and joint
                    e1 = np.cross(bone, [0.3, 0.5, 0.8])
                    e1 /= np.linalg.norm(e1)
                    e2 = np.cross(bone, e1)
                    phi = np.arctan2(radial @ e2, radial @ e1)
                    psi = rng.uniform(0.6, 1.6) * np.sin(2 * phi + rng.uniform(0, 6.3)) + rng.uniform(0, 6.3)
                    wave = 0.5 + 0.5 * np.sin(2 * math.pi * s / (FOLD_WAVELENGTH * rng.uniform(0.8, 1.25)) + psi)
                    fields.append(dict(joint=J[joint], frame=J[frame], child=J[child], bone=bone,
                                       idx=np.nonzero(keep)[0], amp=(gain * fall * wave)[keep], radial=radial[keep]))
            self.fold_fields.append(fields)

    def _push_out(self, verts: torch.Tensor, body_verts: torch.Tensor, margin: float = 0.012) -> torch.Tensor:
        """Collision of a loose garment with the legs and arms: each vertex closer than ``margin`` in
        front of (or behind) its nearest body vertex's tangent plane is moved out along that normal."""
        normals = vertex_normals(body_verts, self.body.faces)
        out = verts.clone()
        idx = self.collider
        for f in range(verts.shape[0]):
            pts, nrm = body_verts[f, idx], normals[f, idx]
            nearest = torch.cdist(verts[f], pts).argmin(1)
            depth = ((verts[f] - pts[nearest]) * nrm[nearest]).sum(1)
            push = (margin - depth).clamp_min(0)[:, None]
            out[f] = verts[f] + push * nrm[nearest]
        return out

    def bends(self, posed_joints: torch.Tensor, transforms: torch.Tensor):
        """Per driver: bend angle [F] and the inner side of the bend in rest space [F,3]."""
        out = {}
        for joint, frame, child, *_ in DRIVERS:
            j, fr, c = J[joint], J[frame], J[child]
            rest = self.rest_joints[c] - self.rest_joints[j]
            rest = torch.tensor(rest / np.linalg.norm(rest), dtype=torch.float64)
            posed = (posed_joints[:, c] - posed_joints[:, j]).double()
            local = torch.einsum("fji,fj->fi", transforms[:, fr, :3, :3].double(), posed)  # R^T posed
            local = local / local.norm(dim=1, keepdim=True).clamp_min(1e-9)
            angle = torch.acos((local @ rest).clamp(-1, 1))
            inner = local - (local @ rest)[:, None] * rest
            inner = inner / inner.norm(dim=1, keepdim=True).clamp_min(1e-9)
            out[j] = (angle, inner)
        return out

    def pose(self, poses: torch.Tensor, transl: torch.Tensor):
        """Body vertices [F,V,3], joints [F,55,3] and each part's vertices [F,N,3] (float32 numpy)."""
        frames = poses.shape[0]
        posed = pose_body(self.body, poses, self.betas.expand(frames, -1), transl)
        bends = self.bends(posed.joints, posed.transforms)
        hip_bend = torch.maximum(bends[J["left_hip"]][0], bends[J["right_hip"]][0])
        outputs = []
        for part, fields in zip(self.parts, self.fold_fields):
            offset = np.broadcast_to(part.thickness, (frames, len(part.rest))).astype(np.float64).copy()
            for fld in fields:
                angle, inner = bends[fld["joint"]]
                side = np.clip(0.2 + 0.8 * (fld["radial"] @ inner.numpy().T), 0, 1).T  # [F,n]
                offset[:, fld["idx"]] += (FOLD_AMPLITUDE * part.fold_scale * np.clip(angle.numpy(), 0, 2.2)[:, None]
                                          * side * fld["amp"][None])
            if part.skirt:
                d, ang = part.skirt["depth"], part.skirt["angle"]
                drape = 0.5 + 0.5 * np.sin(part.skirt["folds"] * ang + 3.0 * d + 2.0 * np.sin(3 * ang))
                amp = 0.012 * d * (0.35 + 1.2 * np.clip(hip_bend.numpy(), 0, 1.5))[:, None]
                offset += amp * drape[None]
            rest = torch.tensor(part.rest[None] + offset[..., None] * part.normals[None], dtype=torch.float32)
            verts = skin_points(rest, torch.tensor(part.weights, dtype=torch.float32), posed.transforms)
            if part.skirt:
                verts = self._push_out(verts, posed.vertices)
            outputs.append(verts.numpy())
        return posed.vertices.numpy(), posed.joints.numpy(), outputs
