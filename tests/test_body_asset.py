"""The bundled open body (hda_backend/body/assets/hda_body.npz): format, anatomy, UV atlas, skinning, shape.

Built by scripts/build_body.py from the CC0 MakeHuman base mesh. Frame: +Y up, facing +Z, left at +X,
metres, SMPL-X T-pose, pelvis joint of the mean shape at (0, -0.35, 0).
"""

import math

import numpy as np
import pytest
import torch

from hda_backend.body import BUNDLED_BODY, JOINT_INDEX, JOINT_NAMES, PARENTS, load_body, pose_body

J = JOINT_INDEX
SIDES = (("left", 1.0), ("right", -1.0))


@pytest.fixture(scope="module")
def raw():
    with np.load(BUNDLED_BODY, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def rest(body):
    return pose_body(body, torch.zeros(1, 55, 3))


def pose(**joints):
    """[1,55,3] pose from joint name -> axis-angle."""
    p = torch.zeros(1, 55, 3)
    for name, aa in joints.items():
        p[0, J[name]] = torch.tensor(aa, dtype=torch.float32)
    return p


def height(vertices):
    return float(vertices[..., 1].max() - vertices[..., 1].min())


def mirror_map(v):
    """Index of each vertex's mirror image (x -> -x) and the distance to it."""
    v = torch.as_tensor(v, dtype=torch.float64)
    refl = v * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    idx, dist = [], []
    for chunk in refl.split(2048):
        d = torch.cdist(chunk, v)
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values)
    return torch.cat(idx).numpy(), torch.cat(dist).numpy()


# --- file format ------------------------------------------------------------------------------------


def test_file_format(raw):
    assert BUNDLED_BODY.stat().st_size <= 5e6
    expected = {"v_template", "f", "vt", "ft", "J_regressor", "weights", "kintree_table", "shapedirs",
                "joint_names", "body_id"}
    assert expected <= set(raw) and "posedirs" not in raw
    V, F = raw["v_template"].shape[0], raw["f"].shape[0]
    assert 8000 <= V <= 14000 and 2 * V - 100 <= F <= 2 * V + 100  # closed genus-0 surface: F ~ 2V
    assert raw["f"].dtype == np.int32 and raw["ft"].dtype == np.int32 and raw["kintree_table"].dtype == np.int64
    for key in ("v_template", "vt", "J_regressor", "weights", "shapedirs"):
        assert raw[key].dtype == np.float32 and np.isfinite(raw[key]).all(), key
    assert raw["J_regressor"].shape == (55, V) and raw["weights"].shape == (V, 55)
    assert raw["shapedirs"].shape[:2] == (V, 3) and raw["shapedirs"].shape[2] >= 10
    assert raw["ft"].shape == raw["f"].shape and raw["ft"].max() < len(raw["vt"])
    assert raw["f"].min() == 0 and raw["f"].max() == V - 1  # every vertex is used
    assert raw["kintree_table"][0].tolist() == list(PARENTS) and raw["kintree_table"][1].tolist() == list(range(55))
    assert raw["joint_names"].dtype.kind == "U" and tuple(raw["joint_names"]) == JOINT_NAMES
    assert raw["body_id"].dtype.kind == "U" and raw["body_id"].shape == () and str(raw["body_id"]) == "hda-open-body-v1"


def test_rows_are_convex_combinations(raw):
    for key in ("weights", "J_regressor"):
        a = raw[key]
        assert (a >= 0).all(), key
        assert np.allclose(a.sum(1), 1.0, atol=1e-5), key


def test_surface_is_closed_and_consistently_oriented(raw):
    f = raw["f"].astype(np.int64)
    half = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # each directed edge once, and its reverse present: closed, manifold, consistently oriented
    keys = half[:, 0] * len(raw["v_template"]) + half[:, 1]
    rev = half[:, 1] * len(raw["v_template"]) + half[:, 0]
    assert len(np.unique(keys)) == len(keys)
    assert np.isin(rev, keys).all()
    # outward normals: positive enclosed volume of about a human's (~0.06 m^3)
    v = raw["v_template"].astype(np.float64)
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert 0.04 < vol < 0.10


# --- UV atlas ---------------------------------------------------------------------------------------


def rasterize_uv(vt, ft, res):
    """Per-texel count of UV triangles covering the texel centre."""
    count = np.zeros((res, res), np.int32)
    tri = vt[ft].astype(np.float64) * res
    lo = np.clip(np.floor(tri.min(1) - 0.5).astype(int), 0, res - 1)
    hi = np.clip(np.ceil(tri.max(1) - 0.5).astype(int), 0, res - 1)
    for t, (a, b, c) in enumerate(tri):
        xs = np.arange(lo[t, 0], hi[t, 0] + 1) + 0.5
        ys = np.arange(lo[t, 1], hi[t, 1] + 1) + 0.5
        x, y = np.meshgrid(xs, ys)
        den = (b[1] - c[1]) * (a[0] - c[0]) + (c[0] - b[0]) * (a[1] - c[1])
        if abs(den) < 1e-14:
            continue
        l1 = ((b[1] - c[1]) * (x - c[0]) + (c[0] - b[0]) * (y - c[1])) / den
        l2 = ((c[1] - a[1]) * (x - c[0]) + (a[0] - c[0]) * (y - c[1])) / den
        inside = (l1 >= 0) & (l2 >= 0) & (1 - l1 - l2 >= 0)
        count[y[inside].astype(int), x[inside].astype(int)] += 1
    return count


def test_uv_atlas_in_unit_square_without_overlaps(raw):
    vt, ft = raw["vt"], raw["ft"]
    assert vt.min() >= 0.0 and vt.max() <= 1.0
    count = rasterize_uv(vt, ft, 256)
    covered = (count > 0).sum()
    shared = (count > 1).sum()
    coverage = covered / count.size
    assert shared <= 0.005 * covered, f"{shared} of {covered} texels claimed by more than one face"
    assert coverage >= 0.45, f"UV coverage of the unit square {coverage:.3f}"
    # every face of the body is reachable in UV space (no zero-area UV triangles)
    e1, e2 = vt[ft[:, 1]] - vt[ft[:, 0]], vt[ft[:, 2]] - vt[ft[:, 0]]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert (area > 0).all()


# --- anatomy in the rest pose -----------------------------------------------------------------------


def test_standing_height_and_placement(rest):
    v, j = rest.vertices[0], rest.joints[0]
    assert 1.6 <= height(v) <= 1.8
    assert torch.allclose(j[J["pelvis"]], torch.tensor([0.0, -0.35, 0.0]), atol=0.02)
    # head above pelvis, feet at the bottom, vertical order along the body
    chain = ["left_ankle", "left_knee", "left_hip", "pelvis", "spine1", "spine2", "spine3", "neck", "head"]
    ys = [float(j[J[n], 1]) for n in chain]
    assert ys == sorted(ys), dict(zip(chain, ys))
    low = v[v[:, 1] < v[:, 1].min() + 0.03]  # lowest 3 cm: the feet
    assert (low[:, 1] < j[J["left_ankle"], 1]).all()
    for side, sx in SIDES:
        near = low[(low[:, 0] * sx) > 0]
        assert len(near) > 0 and torch.allclose(near[:, 0].mean(), j[J[f"{side}_ankle"], 0], atol=0.05)
        # feet flat: the sole touches the ground at the heel and under the toes
        sole = near[near[:, 1] < v[:, 1].min() + 0.015]
        assert float(sole[:, 2].max() - sole[:, 2].min()) > 0.12


def test_left_side_at_plus_x(rest):
    j = rest.joints[0]
    for name in JOINT_NAMES:
        if name.startswith("left_"):
            other = "right_" + name[5:]
            assert j[J[name], 0] > 0.01 and j[J[other], 0] < -0.01, name
            assert torch.allclose(j[J[name]] * torch.tensor([-1.0, 1, 1]), j[J[other]], atol=1e-3), name
    # the body faces +Z: the nose is the frontmost point of the head
    v = rest.vertices[0]
    head = v[v[:, 1] > rest.joints[0, J["head"], 1]]
    nose = head[head[:, 2].argmax()]
    assert abs(float(nose[0])) < 0.01 and nose[2] > rest.joints[0, J["head"], 2] + 0.05


def test_t_pose_arms(rest):
    j = rest.joints[0]
    for side, sx in SIDES:
        sh, el, wr = (j[J[f"{side}_{n}"]] for n in ("shoulder", "elbow", "wrist"))
        assert abs(float(wr[1] - sh[1])) < 0.03 and abs(float(el[1] - sh[1])) < 0.03
        assert abs(float(wr[2] - sh[2])) < 0.03
        assert sx * (wr[0] - el[0]) > 0.2 and sx * (el[0] - sh[0]) > 0.2
        # fingers straight along the arm, in the plane of the palm
        for finger in ("index", "middle", "ring", "pinky"):
            k1, k3 = j[J[f"{side}_{finger}1"]], j[J[f"{side}_{finger}3"]]
            assert sx * (k3[0] - k1[0]) > 0.03 and abs(float(k3[1] - k1[1])) < 0.01, finger
        # the thumb is in front (+Z) of the index finger: palms face down
        assert j[J[f"{side}_thumb3"], 2] > j[J[f"{side}_index1"], 2]


def test_a_pose_lowers_wrists(body, rest):
    j0 = rest.joints[0]
    a = math.pi / 4
    out = pose_body(body, pose(left_shoulder=[0, 0, -a], right_shoulder=[0, 0, a]))
    for side, _ in SIDES:
        sh, wr = J[f"{side}_shoulder"], J[f"{side}_wrist"]
        arm = float(torch.linalg.norm(j0[wr] - j0[sh]))
        drop = float(j0[wr, 1] - out.joints[0, wr, 1])
        assert drop == pytest.approx(arm * math.sin(a), rel=0.05)
        # the hand stays attached to the wrist: hand vertices move rigidly with it
        assert torch.linalg.norm(out.joints[0, wr] - out.joints[0, sh]) == pytest.approx(arm, rel=1e-4)


def test_knee_bends_backward(body, rest):
    j0 = rest.joints[0]
    out = pose_body(body, pose(left_knee=[1.0, 0, 0], right_knee=[1.0, 0, 0]))
    for side, _ in SIDES:
        ank = J[f"{side}_ankle"]
        assert out.joints[0, ank, 2] < j0[ank, 2] - 0.2  # backward
        assert out.joints[0, ank, 1] > j0[ank, 1] + 0.1  # and up
    hip = pose_body(body, pose(left_hip=[-0.8, 0, 0]))  # hip flexion: thigh forward
    assert hip.joints[0, J["left_knee"], 2] > j0[J["left_knee"], 2] + 0.2


# --- skinning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side,sign", [("left", -1.0), ("right", 1.0)])
def test_elbow_bend_keeps_forearm_rigid(body, rest, side, sign):
    j0, v0 = rest.joints[0], rest.vertices[0]
    el, wr = J[f"{side}_elbow"], J[f"{side}_wrist"]
    out = pose_body(body, pose(**{f"{side}_elbow": [0, sign * math.pi / 2, 0]}))
    v1, j1 = out.vertices[0], out.joints[0]
    # the forearm swings forward (+Z) by its length
    assert j1[wr, 2] - j0[wr, 2] > 0.2
    sx = 1.0 if side == "left" else -1.0
    x = sx * v0[:, 0]
    forearm = (x > sx * j0[el, 0] + 0.06) & (x < sx * j0[wr, 0] - 0.03)
    assert forearm.sum() > 100
    d0 = torch.linalg.norm(v0[forearm] - j0[wr], dim=1)
    d1 = torch.linalg.norm(v1[forearm] - j1[wr], dim=1)
    assert float((d1 - d0).abs().max()) < 0.004
    # the rest of the body does not move
    far = (x < sx * j0[el, 0] - 0.15)
    assert float((v1[far] - v0[far]).norm(dim=1).max()) < 1e-5


def test_finger_curl_and_head_turn(body, rest):
    v0, j0 = rest.vertices[0], rest.joints[0]
    curl = {f"left_index{k}": [0, 0, -0.7] for k in (1, 2, 3)}
    out = pose_body(body, pose(**curl))
    tip = J["left_index3"]
    w = body.weights[:, tip]
    tip_vertices = w > 0.9
    # flexion moves the fingertip down towards the palm side (-Y), not up
    assert (out.vertices[0, tip_vertices, 1] - v0[tip_vertices, 1]).mean() < -0.02
    turn = pose_body(body, pose(neck=[0, 0.3, 0], head=[0, 0.3, 0]))
    head = v0[:, 1] > j0[J["head"], 1] + 0.05
    nose = int(torch.nonzero(head)[v0[head, 2].argmax()])
    assert turn.vertices[0, nose, 0] > v0[nose, 0] + 0.05  # rotation about +Y turns the face to +X
    feet = v0[:, 1] < j0[J["left_knee"], 1]
    assert float((turn.vertices[0, feet] - v0[feet]).norm(dim=1).max()) < 1e-5


def test_no_exploded_vertices(body, rest):
    g = torch.Generator().manual_seed(0)
    poses = [
        pose(left_shoulder=[0, 0, -1.3], right_shoulder=[0, 0, 1.3], left_elbow=[0, -1.5, 0],
             right_elbow=[0, 1.5, 0], left_hip=[-1.2, 0, 0], left_knee=[1.8, 0, 0], spine2=[0.3, 0.2, 0],
             neck=[0.3, 0.4, 0], jaw=[0.3, 0, 0]),
        pose(left_shoulder=[0, 0, 1.2], right_shoulder=[0, 0, -1.2], left_wrist=[0, 0, 0.8], pelvis=[0, 1.0, 0]),
        0.4 * torch.randn(4, 55, 3, generator=g),
    ]
    h = height(rest.vertices[0])
    for p in poses:
        out = pose_body(body, p)
        root = out.joints[:, :1]
        assert float((out.vertices - root).norm(dim=-1).max()) < 0.75 * h


def _segment_distance(p, a, b):
    ab = b - a
    t = ((p - a) @ ab / (ab @ ab).clamp_min(1e-12)).clamp(0, 1)
    return (p - a - t[:, None] * ab).norm(dim=1)


def test_weights_are_local(body, rest):
    """Each joint only drives skin near its own bones, and never skin on the other side of the body."""
    j, v, w = rest.joints[0], rest.vertices[0], body.weights
    for k, name in enumerate(JOINT_NAMES):
        sel = w[:, k] > 0.01
        if not sel.any():
            continue
        segs = ([(j[PARENTS[k]], j[k])] if PARENTS[k] >= 0 else []) + [
            (j[k], j[c]) for c in range(55) if PARENTS[c] == k] + [(j[k], j[k])]
        d = torch.stack([_segment_distance(v[sel], a, b) for a, b in segs]).min(0).values
        assert float(d.max()) < 0.3, name
        if name.startswith("left_"):
            assert float(v[sel, 0].min()) > -0.02, name
        if name.startswith("right_"):
            assert float(v[sel, 0].max()) < 0.02, name


# --- shape space ------------------------------------------------------------------------------------


def test_beta1_changes_height_or_mass(body):
    up = pose_body(body, torch.zeros(1, 55, 3), betas=torch.tensor([[2.0]]))
    down = pose_body(body, torch.zeros(1, 55, 3), betas=torch.tensor([[-2.0]]))
    dh = height(up.vertices[0]) - height(down.vertices[0])
    f = body.faces

    def volume(v):
        return float(torch.einsum("ij,ij->i", v[f[:, 0]], torch.cross(v[f[:, 1]], v[f[:, 2]], dim=1)).sum() / 6)

    dv = volume(up.vertices[0]) / volume(down.vertices[0]) - 1
    assert dh > 0.08 or abs(dv) > 0.15, (dh, dv)
    # joints follow the shape: the taller body has longer legs
    leg = lambda o: float(o.joints[0, J["left_hip"], 1] - o.joints[0, J["left_ankle"], 1])  # noqa: E731
    assert leg(up) > leg(down) + 0.03


def test_random_shapes_are_plausible_adults(body):
    g = torch.Generator().manual_seed(1)
    betas = torch.randn(64, body.num_betas, generator=g)
    out = pose_body(body, torch.zeros(64, 55, 3), betas=betas)
    h = out.vertices[..., 1].amax(1) - out.vertices[..., 1].amin(1)
    assert float(h.min()) > 1.4 and float(h.max()) < 2.05
    assert 0.03 < float(h.std()) < 0.15
    j = out.joints
    assert (j[:, J["head"], 1] > j[:, J["neck"], 1]).all() and (j[:, J["neck"], 1] > j[:, J["pelvis"], 1]).all()
    assert (j[:, J["left_knee"], 1] > j[:, J["left_ankle"], 1]).all()
    assert (j[:, J["left_wrist"], 0] > j[:, J["left_elbow"], 0]).all()


def test_shape_space_is_pca_and_left_right_symmetric(raw):
    v, sd = raw["v_template"].astype(np.float64), raw["shapedirs"].astype(np.float64)
    flat = sd.reshape(-1, sd.shape[2])
    gram = flat.T @ flat
    std = np.sqrt(np.diag(gram))
    assert (np.diff(std) <= 1e-6).all()  # components ordered by standard deviation
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-3 * gram.max()  # orthogonal
    idx, dist = mirror_map(v)
    assert dist.max() < 1e-4  # the template is mirror-symmetric
    refl = np.array([-1.0, 1.0, 1.0])[None, :, None]
    assert np.abs(sd[idx] * refl - sd).max() < 1e-4
    # so are the skinning weights and the joint regressor, with left and right joints swapped
    jm = [JOINT_NAMES.index(n.replace("left_", "@").replace("right_", "left_").replace("@", "right_"))
          for n in JOINT_NAMES]
    assert np.abs(raw["weights"][idx][:, jm] - raw["weights"]).max() < 1e-5
    assert np.abs(raw["J_regressor"][jm][:, idx] - raw["J_regressor"]).max() < 1e-5
