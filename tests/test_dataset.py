"""The capture dataset format: loader validation (one-line errors naming the file) and the
MVHumanNet-style converter, on fixtures written here (no Blender needed)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hda_backend.dataset import list_subjects, load_subject
from hda_backend.errors import HDAError
from hda_backend.studio.convert_mvhumannet import convert_mvhumannet

W, H = 8, 6


def _rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def write_subject(root, cams=("a", "b"), frames=("0000", "0001", "0002"), seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    cameras = {}
    for c in cams:
        cameras[c] = {"K": [[10.0, 0, 4], [0, 11.0, 3], [0, 0, 1]], "R": _rotation(rng).tolist(),
                      "t": rng.normal(size=3).tolist(), "width": W, "height": H}
    (root / "cameras.json").write_text(json.dumps(cameras))
    poses = rng.normal(0, 0.2, (len(frames), 55, 3)).astype(np.float32)
    (root / "smplx").mkdir()
    for i, f in enumerate(frames):
        np.savez(root / "smplx" / f"{f}.npz", betas=np.arange(16, dtype=np.float32) / 10,
                 global_orient=poses[i, 0], body_pose=poses[i, 1:22].reshape(-1), jaw_pose=poses[i, 22],
                 leye_pose=poses[i, 23], reye_pose=poses[i, 24], left_hand_pose=poses[i, 25:40].reshape(-1),
                 right_hand_pose=poses[i, 40:].reshape(-1), transl=np.array([0.1 * i, 0, 0], np.float32))
        for c in cams:
            for folder, shape in (("images", (H, W, 3)), ("masks", (H, W))):
                (root / folder / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / folder / c / f"{f}.png")
    meta = {"format": "hda-capture", "format_version": 1, "name": root.name, "seed": seed, "width": W, "height": H,
            "background": [1, 1, 1], "cameras": list(cams), "frames": list(frames), "train_frames": [0, 1],
            "test_frames": [2], "test_cameras": [1], "attributes": {"note": "fixture"}}
    (root / "subject.json").write_text(json.dumps(meta))
    return cameras, poses


def test_round_trip(tmp_path):
    cameras, poses = write_subject(tmp_path / "s1")
    s = load_subject(tmp_path / "s1")
    assert s.camera_names == ["a", "b"] and s.frame_names == ["0000", "0001", "0002"]
    assert (s.width, s.height) == (W, H) and s.train_frames == [0, 1] and s.test_frames == [2]
    assert s.test_cameras == [1] and s.train_cameras == [0] and s.background == (1.0, 1.0, 1.0)
    assert torch.allclose(s.viewmats[1, :3, :3], torch.tensor(cameras["b"]["R"], dtype=torch.float32))
    assert torch.allclose(s.viewmats[1, :3, 3], torch.tensor(cameras["b"]["t"], dtype=torch.float32))
    assert torch.equal(s.viewmats[:, 3], torch.tensor([[0.0, 0, 0, 1]] * 2))
    assert torch.equal(s.poses, torch.from_numpy(poses)) and s.transl[2, 0].item() == pytest.approx(0.2)
    assert s.betas.shape == (16,)
    expected = np.asarray(Image.open(tmp_path / "s1/images/b/0001.png"), np.float32) / 255
    assert torch.allclose(s.image(1, 1), torch.from_numpy(expected))
    assert s.image(0, 0).dtype == torch.float32 and s.mask(0, 0).shape == (H, W)
    expected = np.asarray(Image.open(tmp_path / "s1/masks/a/0002.png"), np.float32) / 255
    assert torch.equal(s.mask(0, 2), torch.from_numpy(expected))


def test_rgba_images_are_composited_over_the_background(tmp_path):
    write_subject(tmp_path / "s")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 51  # red at 20 % over white
    Image.fromarray(rgba).save(tmp_path / "s/images/a/0000.png")
    pixel = load_subject(tmp_path / "s").image(0, 0)[0, 0]
    assert torch.allclose(pixel, torch.tensor([1.0, 0.8, 0.8]), atol=1e-6)


def test_list_subjects(tmp_path):
    write_subject(tmp_path / "d" / "s2")
    write_subject(tmp_path / "d" / "s1")
    (tmp_path / "d" / "notes").mkdir()
    assert [p.name for p in list_subjects(tmp_path / "d")] == ["s1", "s2"]
    with pytest.raises(HDAError, match="no subject folders"):
        list_subjects(tmp_path / "d" / "notes")


def _nan_frame(root):
    path = root / "smplx/0001.npz"
    data = dict(np.load(path))
    data["body_pose"][5] = np.nan
    np.savez(path, **data)


def _wrong_count(root):
    cams = json.loads((root / "cameras.json").read_text())
    del cams["b"]
    (root / "cameras.json").write_text(json.dumps(cams))


def _set_json(root, **changes):
    meta = json.loads((root / "subject.json").read_text())
    meta.update(changes)
    (root / "subject.json").write_text(json.dumps(meta))


BAD = {
    "missing mask": (lambda r: (r / "masks/b/0001.png").unlink(), "masks/b/0001.png: file is missing"),
    "missing cameras.json": (lambda r: (r / "cameras.json").unlink(), "cameras.json: file is missing"),
    "missing smplx frame": (lambda r: (r / "smplx/0002.npz").unlink(), "smplx/0002.npz: file is missing"),
    "missing image frame": (lambda r: shutil.rmtree(r / "images/a"), "images/a/0000.png: file is missing"),
    "camera count": (_wrong_count, "cameras.json: camera 'b' is missing"),
    "image size": (lambda r: Image.new("RGB", (W + 1, H)).save(r / "images/a/0001.png"),
                   "images/a/0001.png: image is 9x6, expected 8x6"),
    "nan smplx": (_nan_frame, "smplx/0001.npz: field 'body_pose' contains NaN"),
    "hand pose size": (lambda r: np.savez(r / "smplx/0000.npz", **{**dict(np.load(r / "smplx/0000.npz")),
                                                                   "left_hand_pose": np.zeros(12)}),
                       "smplx/0000.npz: field 'left_hand_pose' has 12 values, expected 45"),
    "corrupt png": (lambda r: (r / "masks/a/0000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"),
                    "masks/a/0000.png: not a readable image"),
    "corrupt json": (lambda r: (r / "subject.json").write_text('{"format": "hda-capture", '),
                     "subject.json: not valid JSON"),
    "corrupt npz": (lambda r: (r / "smplx/0000.npz").write_bytes(b"PK\x03\x04junk"),
                    "smplx/0000.npz: not a readable .npz"),
    "frames overlap": (lambda r: _set_json(r, test_frames=[1]), "subject.json: fields 'train_frames' and 'test_frames' share"),
    "frame index": (lambda r: _set_json(r, train_frames=[0, 5]), "subject.json: field 'train_frames' is \\[0, 5\\], expected frame indices in 0..2"),
    "background": (lambda r: _set_json(r, background=[1, 2, 0]), "subject.json: field 'background' is \\[1, 2, 0\\]"),
    "wrong format": (lambda r: _set_json(r, format="nerf"), "subject.json: field 'format' is 'nerf', expected 'hda-capture'"),
    "not a rotation": (lambda r: (r / "cameras.json").write_text(json.dumps(
        {**json.loads((r / "cameras.json").read_text()),
         "a": {"K": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "R": [[2, 0, 0], [0, 1, 0], [0, 0, 1]], "t": [0, 0, 0],
               "width": W, "height": H}})), "camera 'a': field 'R' is not a rotation"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_subjects_name_the_file(tmp_path, case):
    root = tmp_path / "s"
    write_subject(root)
    damage, message = BAD[case]
    damage(root)
    with pytest.raises(HDAError, match=message) as err:
        load_subject(root)
    text = str(err.value)
    assert "\n" not in text and str(root) in text


def test_corrupt_pixels_found_on_read(tmp_path):
    write_subject(tmp_path / "s")
    s = load_subject(tmp_path / "s")
    data = (tmp_path / "s/images/a/0001.png").read_bytes()
    (tmp_path / "s/images/a/0001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(HDAError, match="images/a/0001.png: not a readable image"):
        s.image(0, 1)
    with pytest.raises(HDAError, match="camera index 5"):
        s.mask(5, 0)


# --- MVHumanNet-style converter ----------------------------------------------------------------------

def write_mvhumannet(root, cams=("CC32871A005", "CC32871A016"), frames=(25, 30, 35), size=(10, 8)):
    rng = np.random.default_rng(3)
    intr, extr, truth = {}, {}, {}
    for i, cam in enumerate(cams):
        K = [[20.0 + i, 0, 5.0], [0, 20.0 + i, 4.0], [0, 0, 1]]
        R, C = _rotation(rng), rng.normal(size=3) * 2
        intr[cam] = K
        extr[f"1_{cam}.png"] = {"rotation": R.tolist(), "camera_pos": C.tolist()}
        truth[cam] = (np.array(K), R, -R @ C)
        for f in frames:
            (root / "images" / cam).mkdir(parents=True, exist_ok=True)
            (root / "fmask" / cam).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / cam / f"{f:04d}_img.png")
            mask = np.zeros((size[1], size[0]), np.uint8)
            mask[2:6, 3:7] = 255
            Image.fromarray(mask).save(root / "fmask" / cam / f"{f:04d}_img_fmask.png")
    (root / "camera_intrinsics.json").write_text(json.dumps({"intrinsics": intr}))
    (root / "camera_extrinsics.json").write_text(json.dumps(extr))
    (root / "smplx" / "smpl").mkdir(parents=True)
    fits = {}
    for f in frames:
        fit = {"global_orient": rng.normal(size=(1, 3)).tolist(), "body_pose": rng.normal(size=(1, 63)).tolist(),
               "betas": rng.normal(size=(1, 10)).tolist(), "transl": rng.normal(size=(1, 3)).tolist(),
               "left_hand_pose": rng.normal(size=45).tolist(), "right_hand_pose": rng.normal(size=45).tolist(),
               "jaw_pose": [0.1, 0, 0]}
        fits[f] = fit
        (root / "smplx" / "smpl" / f"{f:06d}.json").write_text(json.dumps(fit))
    return truth, fits


def test_mvhumannet_conversion_round_trips(tmp_path):
    truth, fits = write_mvhumannet(tmp_path / "src")
    out = convert_mvhumannet(tmp_path / "src", tmp_path / "subj", test_every=2, test_frames=1)
    s = load_subject(out)
    assert s.camera_names == ["CC32871A005", "CC32871A016"] and s.frame_names == ["000025", "000030", "000035"]
    assert s.train_frames == [0, 1] and s.test_frames == [2] and s.test_cameras == [1] and (s.width, s.height) == (10, 8)
    for c, cam in enumerate(s.camera_names):
        K, R, t = truth[cam]
        assert np.allclose(s.Ks[c].numpy(), K) and np.allclose(s.viewmats[c, :3, :3].numpy(), R, atol=1e-6)
        assert np.allclose(s.viewmats[c, :3, 3].numpy(), t, atol=1e-5)
    fit = fits[30]
    assert np.allclose(s.poses[1, 1:22].numpy().reshape(-1), np.array(fit["body_pose"]).reshape(-1), atol=1e-6)
    assert np.allclose(s.poses[1, 25:40].numpy().reshape(-1), fit["left_hand_pose"], atol=1e-6)
    assert np.allclose(s.poses[1, 22].numpy(), [0.1, 0, 0]) and np.allclose(s.poses[1, 23:25].numpy(), 0)
    assert np.allclose(s.transl[1].numpy(), np.array(fit["transl"]).reshape(-1), atol=1e-6)
    src = np.asarray(Image.open(tmp_path / "src/images/CC32871A016/0030_img.png"), np.float32) / 255
    mask = s.mask(1, 1).numpy()
    assert mask[3, 4] == 1 and mask[0, 0] == 0
    expected = src * mask[..., None]  # black background
    assert np.allclose(s.image(1, 1).numpy(), expected, atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "fmask/CC32871A016/0030_img_fmask.png").unlink(), "fmask/CC32871A016: frame 30 is missing"),
    (lambda r: (r / "camera_extrinsics.json").write_text("{"), "camera_extrinsics.json: not valid JSON"),
    (lambda r: (r / "smplx/smpl/000035.json").write_text(json.dumps({"global_orient": [0, 0, 0], "body_pose": [0] * 63,
                                                                     "betas": [0], "transl": [0, 0, 0],
                                                                     "left_hand_pose": [0] * 12})),
     "000035.json: field 'left_hand_pose' has 12 values, expected 45"),
    (lambda r: (r / "smplx/smpl/000025.json").write_text(json.dumps({"global_orient": [0, 0, "x"], "body_pose": [0] * 63,
                                                                     "betas": [0], "transl": [0, 0, 0]})),
     "000025.json: field 'global_orient'"),
    (lambda r: (r / "camera_intrinsics.json").write_text(json.dumps({"intrinsics": {"CC32871A005": [[1, 0, 0]]}})),
     "camera_intrinsics.json: camera 'CC32871A016' is missing"),
])
def test_mvhumannet_bad_sources(tmp_path, damage, message):
    write_mvhumannet(tmp_path / "src")
    damage(tmp_path / "src")
    with pytest.raises(HDAError, match=message) as err:
        convert_mvhumannet(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(err.value)
