"""The capture studio: a tiny dataset rendered through real Blender (Cycles) inside the test, read back
by the loader; camera convention, determinism, resume, the new motion clips and the fold field."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hda_backend.body import JOINT_INDEX as J
from hda_backend.body import load_body, pose_body, skin_points
from hda_backend.dataset import list_subjects, load_subject, project
from hda_backend.errors import HDAError
from hda_backend.motion import procedural
from hda_backend.studio.cli import main as studio_main
from hda_backend.studio.person import LIBRARY, Deformer, build_parts, sample_attributes, training_motion
from hda_backend.studio.synth import SynthOptions, camera_rig, synth

pytest.importorskip("bpy")  # the renderer runs in a subprocess, but needs the module installed

OPTS = dict(subjects=2, cameras=3, frames=3, size=64, seed=0, samples=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth(SynthOptions(out=out, **OPTS), quiet=True)
    return out


@pytest.fixture(scope="module")
def body():
    return load_body(None, 16)


def test_loader_round_trips_the_rendered_dataset(dataset):
    paths = list_subjects(dataset)
    assert [p.name for p in paths] == ["subject_000", "subject_001"]
    for path in paths:
        s = load_subject(path)
        assert (s.width, s.height) == (64, 64) and s.camera_names == ["cam00", "cam01", "cam02"]
        assert s.frame_names == ["0000", "0001", "0002"]
        assert s.train_frames == [0, 1] and s.test_frames == [2] and s.test_cameras == [2]
        assert s.poses.shape == (3, 55, 3) and s.betas.shape == (16,) and s.transl.shape == (3, 3)
        with np.load(path / "smplx" / "0001.npz") as z:
            assert z["body_pose"].shape == (63,) and z["left_hand_pose"].shape == (45,)
            assert np.array_equal(s.poses[1, 25:40].numpy().reshape(-1), z["left_hand_pose"])
            assert np.array_equal(s.betas.numpy(), z["betas"])
        cams = json.loads((path / "cameras.json").read_text())
        assert np.allclose(s.Ks[1].numpy(), cams["cam01"]["K"]) and np.allclose(s.viewmats[2, :3, 3].numpy(), cams["cam02"]["t"])
        image = np.asarray(Image.open(path / "images/cam01/0002.png"), np.float32) / 255
        assert torch.equal(s.image(1, 2), torch.from_numpy(image))
        mask = s.mask(1, 2)
        assert 0.02 < mask.mean() < 0.5  # a person, not an empty or full frame
        # outside the mask the image is exactly the background colour
        outside = s.image(1, 2)[mask == 0]
        assert torch.allclose(outside, torch.tensor(s.background).expand_as(outside))
        # two camera heights (a ring at two elevations)
        centres = -torch.einsum("cji,cj->ci", s.viewmats[:, :3, :3], s.viewmats[:, :3, 3])
        assert centres[:, 1].max() - centres[:, 1].min() > 1.0
        assert (path / "subject.png").is_file() and not (path / "_work").exists()


def test_smplx_joints_project_inside_the_masks(dataset, body):
    for path in list_subjects(dataset):
        s = load_subject(path)
        posed = pose_body(body, s.poses, s.betas.expand(3, -1), s.transl)
        torso = [J[n] for n in ("pelvis", "spine1", "spine2", "spine3", "neck", "left_hip", "right_hip",
                                "left_knee", "right_knee", "head")]
        for f in range(3):
            uv = project(posed.joints[f], s.viewmats, s.Ks)  # [C,55,2]
            for c in range(3):
                mask = s.mask(c, f)
                px = uv[c].floor().long()
                assert ((px >= 0) & (px < 64)).all()
                values = mask[px[:, 1], px[:, 0]]
                assert (values[torso] > 0.5).all(), (path.name, c, f, values[torso])
                assert (values[:22] > 0).float().mean() > 0.85
                # a point 60 cm to the side of the pelvis, as this camera sees it, is background
                right = s.viewmats[c, 0, :3]  # the camera's x axis in world coordinates
                for sign in (1.0, -1.0):
                    side = project((posed.joints[f, 0] + sign * 0.6 * right)[None], s.viewmats[c:c + 1], s.Ks[c:c + 1])[0, 0]
                    assert 0 <= side[0] < 64 and mask[int(side[1]), int(side[0])] == 0
                # the mask's bounding box is centred near the projected body's (a box, not a mean over
                # vertices, which the dense hands and face pull towards raised arms)
                ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
                centre = torch.stack([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]).float() / 2
                verts = project(posed.vertices[f], s.viewmats[c:c + 1], s.Ks[c:c + 1])[0]
                assert (centre - (verts.amin(0) + verts.amax(0)) / 2).norm() < 6


def test_two_seeds_give_different_subjects(dataset):
    a, b = (load_subject(p) for p in list_subjects(dataset))
    assert a.seed != b.seed and not torch.allclose(a.betas, b.betas)
    assert a.attributes != b.attributes
    assert (a.image(0, 0) - b.image(0, 0)).abs().mean() > 0.01
    attrs = [sample_attributes(s) for s in range(12)]
    assert len({a["top"]["kind"] for a in attrs}) >= 3 and len({a["skin"]["tone_index"] for a in attrs}) >= 5
    assert len({a["top"]["pattern"]["kind"] for a in attrs}) >= 3 and len({a["hair"]["style"] for a in attrs}) >= 3
    for a in attrs:  # every clip but the held-out one trains
        train = [m["clip"] for m in a["motions"]["train"]]
        assert a["motions"]["test"]["clip"] not in train and len(set(train)) == len(train) == len(LIBRARY) - 1


def test_same_seed_identical_images_and_resume(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset / "subject_000", copy / "subject_000")
    sub = copy / "subject_000"
    (sub / "images/cam01/0002.png").unlink()
    data = (sub / "masks/cam00/0001.png").read_bytes()
    (sub / "masks/cam00/0001.png").write_bytes(data[: len(data) // 3])  # half-written
    (sub / "images/cam02/0000.png.tmp").write_bytes(b"partial")
    untouched = sub / "images/cam02/0002.png"
    stamp = untouched.stat().st_mtime_ns
    synth(SynthOptions(out=copy, **{**OPTS, "subjects": 1}), quiet=True)
    for kind in ("images", "masks"):
        for cam in ("cam00", "cam01", "cam02"):
            for frame in ("0000", "0001", "0002"):
                new = np.asarray(Image.open(sub / kind / cam / f"{frame}.png"))
                old = np.asarray(Image.open(dataset / "subject_000" / kind / cam / f"{frame}.png"))
                assert np.array_equal(new, old), (kind, cam, frame)
    assert untouched.stat().st_mtime_ns == stamp  # finished frames were skipped
    assert not list(sub.glob("*/*/*.tmp"))
    assert (sub / "subject.json").read_text() == (dataset / "subject_000/subject.json").read_text()


def test_folds_follow_the_joint_angles(body):
    attrs = sample_attributes(4)
    attrs["top"].update(kind="longsleeve", sleeve=0.93, looseness=1.0)
    _, parts = build_parts(body, attrs)
    deformer = Deformer(body, attrs, parts)
    top = [i for i, p in enumerate(parts) if p.name == "top"][0]
    poses = torch.zeros(2, 55, 3)
    poses[1, J["left_elbow"], 1] = -1.5  # bend the left elbow
    _, _, outs = deformer.pose(poses, torch.zeros(2, 3))
    betas = torch.tensor(attrs["betas"])[None]
    transforms = pose_body(body, poses, betas.expand(2, -1)).transforms
    part = parts[top]
    rest = torch.tensor(part.rest + part.thickness[:, None] * part.normals, dtype=torch.float32)
    lbs = skin_points(rest[None].expand(2, -1, -1), torch.tensor(part.weights, dtype=torch.float32), transforms)
    residual = (torch.tensor(outs[top]) - lbs).norm(dim=-1)  # what plain LBS of the garment cannot explain
    jr = deformer.rest_joints
    near = torch.tensor(np.linalg.norm(part.rest - jr[J["left_elbow"]], axis=1) < 0.08)
    far = torch.tensor(np.linalg.norm(part.rest - jr[J["right_elbow"]], axis=1) < 0.08)
    assert residual[0].max() < 1e-4  # straight arms: pure LBS
    assert residual[1][near].max() > 0.006  # bent elbow: folds of several millimetres
    assert residual[1][far].max() < 1e-4  # the other, straight elbow stays smooth


def test_camera_rig_frames_the_points():
    rng = np.random.default_rng(0)
    points = rng.normal(0, 0.3, (500, 3)) + [0, -0.3, 0]
    views, Ks = camera_rig(8, 100, points, -1.2, 0.3)
    assert np.allclose(views[:, :3, :3] @ views[:, :3, :3].transpose(0, 2, 1), np.eye(3), atol=1e-6)
    uv = project(torch.tensor(points, dtype=torch.float32), torch.tensor(views, dtype=torch.float32),
                 torch.tensor(Ks, dtype=torch.float32))
    assert uv.min() >= 0 and uv.max() <= 100 and (uv.amax((1, 2)) > 90).any()
    heights = -np.einsum("cji,cj->ci", views[:, :3, :3], views[:, :3, 3])[:, 1]
    assert len(np.unique(heights.round(3))) == 2


def test_new_clips_move_as_named(body):
    def joints(name, n=8):
        m = procedural(name, n)
        return pose_body(body, m.poses, transl=m.transl).joints

    up = joints("arm_raise")
    assert up[:, J["left_wrist"], 1].max() > up[0, J["head"], 1] + 0.1  # an arm goes overhead
    assert up[0, J["left_wrist"], 1] < up[0, J["left_shoulder"], 1] - 0.3  # and starts down
    kick = joints("kick")
    assert kick[4, J["right_ankle"], 2] > 0.5 and kick[4, J["left_ankle"], 2].abs() < 0.1
    jack = joints("jumping_jack")
    assert (jack[4, J["left_ankle"], 0] - jack[4, J["right_ankle"], 0]) > (jack[0, J["left_ankle"], 0] - jack[0, J["right_ankle"], 0]) + 0.3
    bow = joints("bow")
    assert bow[4, J["head"], 2] > 0.3 and bow[4, J["right_ankle"], 2].abs() < 0.05
    lunge = joints("lunge")
    assert lunge[2, 0, 1] < lunge[0, 0, 1] - 0.15


@pytest.mark.parametrize("argv, message", [
    (["synth", "--size", "0", "--out", "x"], "--size 0: expected 16..8192"),
    (["synth", "--cameras", "many", "--out", "x"], "--cameras 'many': expected a whole number"),
    (["synth", "--frames", "-3", "--out", "x"], "--frames -3: expected 1..100000"),
    (["synth", "--background", "1,1", "--out", "x"], "--background '1,1': expected three numbers"),
    (["convert", "/nonexistent/capture", "--out", "x"], "/nonexistent/capture: capture folder not found"),
])
def test_cli_bad_arguments(argv, message, capsys):
    assert studio_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hda: error:") and message in err and "\n" not in err


def test_training_motion_covers_every_clip_evenly():
    clips = [{"clip": "walk", "phase": 0.0}, {"clip": "squat", "phase": 0.5}, {"clip": "wave", "phase": 0.25}]
    poses, transl = training_motion(clips, 8)
    assert poses.shape == (8, 55, 3) and transl.shape == (8, 3)
    # 3 + 3 + 2 frames, each share equal to the clip sampled alone (translation re-started in x, z)
    start = 0
    for clip, n in zip(clips, (3, 3, 2)):
        p = procedural(clip["clip"], max(4 * n, 60))
        expected_first = p.poses[int(round(clip["phase"] * max(4 * n, 60))) % max(4 * n, 60)]
        assert torch.equal(poses[start], expected_first)
        assert transl[start, 0] == 0 and transl[start, 2] == 0
        start += n


def test_blender_camera_maths_by_hand():
    from hda_backend.studio.blender_render import blender_camera_matrix, blender_lens, over_background

    # fx 500 px over 512 px on a 36 mm sensor: 35.15625 mm; the principal point 56 px left of centre moves
    # the frame right by 56/512 of the larger side, 10 px below centre moves it down (Blender's +y is up).
    lens, sx, sy = blender_lens([[500.0, 0, 200.0], [0, 500.0, 202.0], [0, 0, 1]], 512, 384)
    assert (lens, sx, sy) == pytest.approx((35.15625, 56 / 512, 10 / 512))
    with pytest.raises(ValueError, match="fx != fy"):
        blender_lens([[500.0, 0, 256], [0, 400.0, 192], [0, 0, 1]], 512, 384)
    # A camera at (0, 1, 5) looking at -Z (world), OpenCV up = world -Y: Blender's camera sits at the same
    # place, looks down its own -Z = world -Z, its +Y is world +Y.
    R = np.diag([1.0, -1.0, -1.0])
    t = -R @ np.array([0.0, 1.0, 5.0])
    m = blender_camera_matrix(R, t)
    np.testing.assert_allclose(m[:3, 3], [0, 1, 5], atol=1e-12)
    np.testing.assert_allclose(-m[:3, 2], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(m[:3, 1], [0, 1, 0], atol=1e-12)
    # Straight alpha over a grey background, rounded to 8 bits; the mask is the alpha.
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [200, 100, 0, 128]]], np.uint8)
    rgb, mask = over_background(rgba, (0.5, 0.5, 0.5))
    a = 128 / 255
    expected = [[255, 0, 0], [128, 128, 128], [round(200 * a + 127.5 * (1 - a)), round(100 * a + 127.5 * (1 - a)),
                                               round(127.5 * (1 - a))]]
    assert rgb.tolist() == [expected] and mask.tolist() == [[255, 0, 128]]


def test_mvhumannet_composite_view_by_hand():
    from hda_backend.studio.convert_mvhumannet import composite_view

    rgb = np.full((1, 3, 3), 0.8)
    soft = np.array([[0.0, 0.5, 1.0]])
    out, m = composite_view(rgb, soft, (0.0, 0.2, 1.0))
    np.testing.assert_allclose(out[0, 1], [0.4, 0.5, 0.9])
    np.testing.assert_allclose(m, soft)
    binary = np.array([[0.0, 0.2, 0.2]])  # two levels: any non-zero value is the person
    out, m = composite_view(rgb, binary, (0.0, 0.0, 0.0))
    np.testing.assert_allclose(m, [[0.0, 1.0, 1.0]])
    np.testing.assert_allclose(out[0, 2], [0.8, 0.8, 0.8])


STUDIO_FINGERPRINT = Path(__file__).resolve().parent / "studio_people.json"


def _fingerprint(name: str, array: np.ndarray, seed: int) -> dict:
    """An array's fingerprint: dtype, shape and, for integers, the sha256 of its bytes; for floats, 4
    random ±1 projections and the L2 norm in float64. The same code and packages gave a different
    sha256 of these arrays on two machines of this project, so floats are compared to 1e-5 of their
    norm: float32 rounding moves a projection by about 1e-7 of it, while one coordinate moved by a
    millimetre moves it by 1e-3 (the body's vertices of one person: norm 80, tolerance 8e-4:
    test_the_fingerprint_sees_a_millimetre)."""
    a = np.ascontiguousarray(array)
    entry = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
    if np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float64).ravel()
        signs = np.random.default_rng(seed).integers(0, 2, (4, x.size)) * 2.0 - 1.0
        entry.update(norm=float(np.linalg.norm(x)), projections=(signs @ x).tolist())
    else:
        import hashlib

        entry["sha256"] = hashlib.sha256(a.tobytes()).hexdigest()
    return entry


def test_people_are_built_as_recorded(body):
    """A regression guard on the studio's geometry: every array of 4 people (parts, their seam/hem
    fields and the face fields) against the fingerprints in tests/studio_people.json. Recorded when faces,
    seams, hair volume, buns and soles were added (issue 15), again when the hairline was smoothed, and
    as fingerprints when a bit-exact hash proved to differ between machines; it changes only when the
    studio's people are meant to change (then HDA_RECORD_STUDIO=1 writes the file again)."""
    from hda_backend.studio.face import face_fields

    got = []
    for seed in range(4):
        attrs = sample_attributes(seed)
        v, parts = build_parts(body, attrs)
        arrays = [("vertices", v)]
        arrays += [(f"face {key}", value) for key, value in sorted(face_fields(v, body.faces.numpy(), attrs["face"]).items())]
        for p in parts:
            arrays += [(f"{p.name} {field}", getattr(p, field)) for field in ("rest", "normals", "faces", "weights", "thickness")]
            arrays += [(f"{p.name} attribute {key}", p.attributes[key]) for key in sorted(p.attributes)]
            got.append({"name": f"{p.name} description",
                        "repr": repr((p.name, p.material, p.fold_scale, sorted(p.skirt.items()) if p.skirt else None))})
        got += [_fingerprint(f"person {seed} {name}", array, len(got) + i) for i, (name, array) in enumerate(arrays)]
    if os.environ.get("HDA_RECORD_STUDIO") == "1":
        STUDIO_FINGERPRINT.write_text(json.dumps(got, indent=0) + "\n")
    want = json.loads(STUDIO_FINGERPRINT.read_text())
    assert [g["name"] for g in got] == [w["name"] for w in want]
    for g, w in zip(got, want):
        assert _same(g, w), g["name"]


def _same(got: dict, want: dict) -> bool:
    """Two fingerprints of :func:`_fingerprint` agree: floats to 1e-5 of the recorded norm, the rest exactly."""
    if "projections" not in want:
        return got == want
    tolerance = 1e-5 * want["norm"] + 1e-9
    return (got["dtype"] == want["dtype"] and got["shape"] == want["shape"]
            and abs(got["norm"] - want["norm"]) <= tolerance
            and bool(np.abs(np.subtract(got["projections"], want["projections"])).max() <= tolerance))


def test_the_fingerprint_sees_a_millimetre(body):
    """The guard above tells float32 rounding from a real change: a person's vertices agree with
    themselves rounded differently (each coordinate moved by one float32 ulp, as another CPU's
    arithmetic might), and not with one vertex moved by 1 mm; integer arrays must be equal."""
    v, _ = build_parts(body, sample_attributes(0))
    want = _fingerprint("v", v, 7)
    ulp = np.nextafter(v, np.where(np.random.default_rng(1).random(v.shape) < 0.5, -np.inf, np.inf)).astype(v.dtype)
    assert _same(_fingerprint("v", ulp, 7), want)
    moved = v.copy()
    moved[1234, 1] += 1e-3
    assert not _same(_fingerprint("v", moved, 7), want)
    faces = body.faces.numpy()
    changed = faces.copy()
    changed[0, :2] = changed[0, 1::-1]
    assert _same(_fingerprint("f", faces, 0), _fingerprint("f", faces, 0))
    assert not _same(_fingerprint("f", changed, 0), _fingerprint("f", faces, 0))


# --- appearance: faces, seams, hair volume, variety --------------------------------------------------

def _parts_digest(parts) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in parts:
        for a in (p.rest, p.normals, p.faces, p.weights, p.thickness, *[p.attributes[k] for k in sorted(p.attributes)]):
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def test_face_regions_sit_where_the_skeleton_puts_the_face(body):
    """The eye, brow and lip fields (from the mesh's opening fans) against an independent definition: the
    eye joints of the body's J_regressor (fitted to the rig's bones, not to the mesh topology) and the
    head part of its skinning weights, on the mean body and on a strongly shaped one."""
    from hda_backend.studio.face import face_fields, openings
    from hda_backend.studio.person import HEAD_JOINTS

    faces = body.faces.numpy()
    w = body.weights.numpy()
    for seed in (0, 5):
        attrs = sample_attributes(seed)
        v, _ = build_parts(body, attrs)
        joints = body.J_regressor.double().numpy() @ v
        fields = face_fields(v, faces, attrs["face"])
        anchors = openings(faces, v)
        head = w[:, HEAD_JOINTS].sum(1) > 0.5
        for side in ("left_eye", "right_eye"):
            centre = v[anchors[side]]
            assert np.linalg.norm(centre - joints[J[f"{side}_smplhf"]]) < 0.01  # the opening is at the eye joint
        assert v[anchors["left_eye"], 0] > 0.02 > -0.02 > v[anchors["right_eye"], 0]  # left at +X
        mouth, eye_y = v[anchors["mouth"]], v[anchors["left_eye"], 1]
        assert abs(mouth[0]) < 1e-6 and 0.05 < eye_y - mouth[1] < 0.09 and mouth[1] > joints[J["jaw"], 1] - 0.06
        # Faces where a region shows (the shader's contour: the field interpolated over a face is > 0
        # somewhere, i.e. at a vertex): every vertex is in the head part and near its anchor.
        for name, radius in (("eye", 0.02), ("lips", 0.035), ("brow", 0.06)):
            shown = (fields[name][faces] > 0).any(1)
            assert shown.sum() >= 4, name
            verts = np.unique(faces[shown])
            assert head[verts].all(), name
            anchor = [anchors["mouth"]] if name == "lips" else [anchors["left_eye"], anchors["right_eye"]]
            dist = np.linalg.norm(v[verts][:, None] - v[anchor][None], axis=-1).min(1)
            assert dist.max() < radius, (name, dist.max())
        # each eye is exactly its opening: the fan faces around the centre, nothing else
        eye_faces = (fields["eye"][faces] > 0).any(1)
        fans = np.isin(faces, [anchors["left_eye"], anchors["right_eye"]]).any(1)
        assert np.array_equal(eye_faces, fans)
        # brows are above the eyes, lips around the mouth
        brow = fields["brow"] > 0
        assert (v[brow, 1] > eye_y + 0.008).all() and (v[brow, 1] < eye_y + 0.04).all()
        lips = fields["lips"] > 0
        assert (np.abs(v[lips, 1] - mouth[1]) < 0.02).all() and (np.abs(v[lips, 0]) < 0.03).all()


def test_boundary_distance_by_hand():
    from hda_backend.studio.person import boundary_distance

    # a flat 11 x 11 grid on [0,1]^2: the distance to the border vertices is the distance to the square's edge
    g = np.stack(np.meshgrid(np.linspace(0, 1, 11), np.linspace(0, 1, 11), indexing="ij"), -1).reshape(-1, 2)
    rest = np.concatenate([g, np.zeros((len(g), 1))], 1)
    idx = np.arange(121).reshape(11, 11)
    faces = np.concatenate([np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:]], -1).reshape(-1, 3),
                            np.stack([idx[:-1, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 3)])
    expected = np.minimum(np.minimum(g[:, 0], 1 - g[:, 0]), np.minimum(g[:, 1], 1 - g[:, 1]))
    np.testing.assert_allclose(boundary_distance(rest, faces), expected, atol=1e-12)


def test_a_body_without_eye_and_mouth_openings_is_refused_in_one_line():
    from hda_backend.studio.face import openings

    g = np.stack(np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4), indexing="ij"), -1).reshape(-1, 2)
    idx = np.arange(16).reshape(4, 4)
    faces = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:]], -1).reshape(-1, 3)
    with pytest.raises(HDAError, match=r"body model /x/SMPLX_NEUTRAL.npz: found 0 eye/mouth opening centres .* expected 3"):
        openings(faces, np.concatenate([g, np.zeros((16, 1))], 1), "/x/SMPLX_NEUTRAL.npz")


def test_smooth_border_rounds_a_staircase_and_keeps_the_inside():
    """A band around a cylinder whose top border is a staircase (teeth 1 cm high), as a hairline is a
    closed loop: smoothing brings the top border's heights towards their mean and leaves the interior
    ring where it was."""
    from hda_backend.studio.person import Part, _smooth_border

    n = 24
    ang = np.arange(n) / n * 2 * np.pi
    ring = lambda y: np.stack([0.1 * np.sin(ang), y, 0.1 * np.cos(ang)], 1)  # noqa: E731
    top = 0.05 + 0.01 * (np.arange(n) % 2)
    rest = np.concatenate([ring(np.zeros(n)), ring(np.full(n, 0.03)), ring(top)])
    faces = []
    for row in range(2):
        for i in range(n):
            a, b = row * n + i, row * n + (i + 1) % n
            faces += [[a, b, b + n], [a, b + n, a + n]]
    part = Part("band", "hair", rest.copy(), rest * [1.0, 0.0, 1.0] / 0.1, np.array(faces), np.zeros((3 * n, 55)),
                np.zeros(3 * n))
    _smooth_border(part)
    np.testing.assert_array_equal(part.rest[n:2 * n], rest[n:2 * n])  # the interior ring
    before = np.abs(rest[2 * n:, 1] - 0.055).max()
    after = np.abs(part.rest[2 * n:, 1] - 0.055).max()
    assert before == pytest.approx(0.005) and after < 0.01 * before


def test_seams_hair_volume_and_shoes(body):
    attrs = sample_attributes(1)
    attrs["top"].update(kind="longsleeve", sleeve=0.93)
    attrs["hair"].update(style="curly", volume=1.5)
    _, parts = build_parts(body, attrs)
    top = next(p for p in parts if p.name == "top")
    seam, hem = top.attributes["seam"], top.attributes["hem"]
    torso = np.abs(top.rest[:, 0]) < 0.15
    for sign in (1, -1):  # a side seam on each side of the torso, none down the front
        side = torso & (np.sign(top.rest[:, 0]) == sign) & (np.abs(top.rest[:, 0]) > 0.08)
        assert (seam[side] < 0.003).sum() > 10
    front = torso & (np.abs(top.rest[:, 0]) < 0.03) & (top.rest[:, 2] > 0.05)
    assert front.any() and seam[front].min() > 0.04
    assert hem.min() == 0 and (hem > 0.05).any()  # 0 on the hems and cuffs, growing inside
    hair = next(p for p in parts if p.name == "hair")
    attrs["hair"].update(style="short", volume=1.0)
    short = next(p for p in build_parts(body, attrs)[1] if p.name == "hair")
    assert hair.thickness.max() > 2 * short.thickness.max() and hair.thickness.std() > short.thickness.std()
    attrs["hair"]["style"] = "bun"
    names = [p.name for p in build_parts(body, attrs)[1]]
    assert "bun" in names and "hair" in names
    shoes = next(p for p in parts if p.name == "shoes")
    sole = shoes.rest[:, 1] < shoes.rest[:, 1].min() + 0.005
    assert shoes.thickness[sole].mean() > 0.009 + 0.5 * attrs["shoes"]["sole_height"]  # a sole under the foot


def test_appearance_is_deterministic_per_seed_and_varies_across_seeds(body):
    from hda_backend.studio.face import face_fields

    first = [sample_attributes(s) for s in range(16)]
    assert first == [sample_attributes(s) for s in range(16)]
    assert json.loads(json.dumps(first))[3]["face"]["brow"]["length"] == first[3]["face"]["brow"]["length"]  # JSON-ready
    faces = body.faces.numpy()
    v1, p1 = build_parts(body, first[3])
    v2, p2 = build_parts(body, first[3])
    assert _parts_digest(p1) == _parts_digest(p2) and np.array_equal(v1, v2)
    f1, f2 = face_fields(v1, faces, first[3]["face"]), face_fields(v2, faces, first[3]["face"])
    assert all(np.array_equal(f1[k], f2[k]) for k in f1)
    f3 = face_fields(build_parts(body, first[4])[0], faces, first[4]["face"])
    assert not np.array_equal(f1["brow"], f3["brow"]) and not np.array_equal(f1["lips"], f3["lips"])
    assert _parts_digest(p1) != _parts_digest(build_parts(body, first[4])[1])
    assert len({a["hair"]["style"] for a in first}) >= 5 and len({a["top"]["fabric"] for a in first}) >= 3
    assert len({a["top"]["pattern"]["kind"] for a in first}) >= 4 and len({a["skin"]["colour"] for a in first}) == 16
    ages = [a["age"] for a in first]
    assert max(ages) - min(ages) >= 30 and len({a["face"]["iris_colour"] for a in first}) >= 3
    old = [a for a in first if a["age"] >= 70]
    young = [a for a in first if a["age"] <= 30]
    assert all(a["hair"]["grey"] == 0 for a in young) or not young
    assert all(a["hair"]["grey"] > 0.3 for a in old) or not old


def test_rendered_face_shows_pupils_and_lips(body, tmp_path):
    """The skin shader reads the face fields: in a Blender close-up of the head, the pixel at each eye's
    centre (the pupil) is much darker than the skin 2 cm below it, and the mouth is redder than the skin
    (without the face fields, measured: pupil/skin 0.8 and no redder mouth; with them 0.2 and +20)."""
    from hda_backend.studio.cards import CARD_POSE, CARD_RIG, _add_head_camera
    from hda_backend.studio.face import openings
    from hda_backend.studio.person import sample_clip
    from hda_backend.studio.synth import _scene_spec, _write_npz, plan_subject, run_blender

    motion = sample_clip(CARD_POSE[0], 1, CARD_POSE[1])
    seed = next(s for s in range(50) if sample_attributes(s)["skin"]["tone_index"] <= 4)  # a light skin
    plan = plan_subject(body, seed, 2, 1, 96, 8, (1.0, 1.0, 1.0), motion=motion, rig=CARD_RIG)
    _add_head_camera(plan, 96)
    work = tmp_path / "s" / "_work"
    work.mkdir(parents=True)
    spec, arrays = _scene_spec(plan, tmp_path / "s", [(2, 0)])
    _write_npz(work / "scene.npz", **arrays)
    (work / "scene.json").write_text(json.dumps(spec))
    run_blender(work, 1, lambda n: None)
    image = np.asarray(Image.open(tmp_path / "s/images/cam02/0000.png"), np.float64)
    anchors = openings(plan["faces"], plan["rest_body"])
    verts = torch.tensor(plan["body_verts"][0], dtype=torch.float64)
    view, K = torch.tensor(plan["viewmats"][2:]), torch.tensor(plan["Ks"][2:])

    def pixel(point):
        x, y = project(point[None], view, K)[0, 0].floor().long().tolist()
        return image[y, x]

    below = torch.tensor([0.0, 0.02, 0.0], dtype=torch.float64)
    for side in ("left_eye", "right_eye"):
        centre = verts[anchors[side]]
        assert pixel(centre).mean() < 0.4 * pixel(centre - below).mean(), side
    mouth = verts[anchors["mouth"]]
    redness = lambda rgb: rgb[0] - rgb[1]  # noqa: E731
    assert redness(pixel(mouth)) > redness(pixel(mouth - below)) + 10
