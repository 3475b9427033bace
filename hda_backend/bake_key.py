"""The bake key of an avatar's compositing layer: everything that changes its pixels, so that a layer
file can say whether it still shows the scene as it is (pure functions, numpy only, no bpy, no torch).

A layer frame depends on
- the *identity*: the avatar file's content (SHA-256) or, without a file, the seed, second seed, mix
  and preset it is initialised from; the body file as the avatar names it; the shading mode; the
  render's pixel size; how colour is encoded (:data:`COLOUR`) and this key's version;
- per frame, the *inputs* Blender evaluates: every bone's pose matrix (armature space), the
  armature's world matrix, the camera's world matrix and its projection at the render's size and
  pixel aspect (lens, sensor, shift, clipping).

The identity is hashed; the per-frame inputs are kept as numbers (float32) and compared within
:data:`TOLERANCE`, because the same keyframes evaluated in another process or depsgraph may differ
in the last float bits and a hash would call that stale. The key text is stored in the layer EXR's
header (attribute :data:`ATTRIBUTE`), so a layer file and its key are written, moved and deleted
together.
"""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np

KEY_VERSION = 1
ATTRIBUTE = "hdaBakeKey"            # EXR header attribute (type string) holding the key text
COLOUR = "scene-linear"             # layers hold scene-linear radiance (see blender_addon/runtime.py)
TOLERANCE = 1e-5                    # metres / matrix entries: far below a pixel at any sane distance
GROUPS = ("pose", "placement", "camera")
REASONS = {                          # why a frame's layer is stale, by what changed (first match wins)
    "identity": "the identity or render settings changed since the bake",
    "pose": "the pose changed since the bake",
    "placement": "the avatar moved since the bake",
    "camera": "the camera changed since the bake",
}
NOT_BAKED = "a placeholder, not baked: bake it"
MISSING = "no layer file: bake it"


def identity_digest(fields: dict) -> str:
    """Hex SHA-256 of the identity fields (JSON with sorted keys; values must be JSON types), with
    the key version and colour encoding added."""
    canonical = json.dumps({**fields, "key_version": KEY_VERSION, "colour": COLOUR}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def frame_inputs(bone_matrices, armature_world, camera_world, projection) -> dict[str, np.ndarray]:
    """One frame's inputs: bone_matrices [B,4,4] (pose, armature space), armature_world [4,4],
    camera_world [4,4], projection [4,4] -> {group: flat float32 array}."""
    return {
        "pose": np.asarray(bone_matrices, np.float32).reshape(-1),
        "placement": np.asarray(armature_world, np.float32).reshape(-1),
        "camera": np.concatenate([np.asarray(camera_world, np.float32).reshape(-1),
                                  np.asarray(projection, np.float32).reshape(-1)]),
    }


def encode(identity: str, inputs: dict[str, np.ndarray]) -> str:
    """The key text stored with a layer frame (ASCII JSON)."""
    return json.dumps({"version": KEY_VERSION, "identity": identity,
                       **{g: base64.b64encode(np.ascontiguousarray(inputs[g], np.float32).tobytes()).decode()
                          for g in GROUPS}}, sort_keys=True)


def decode(text: str) -> tuple[str, dict[str, np.ndarray]] | None:
    """(identity, inputs) of a key text, or None when it is not a key of this version."""
    try:
        data = json.loads(text)
        if data.get("version") != KEY_VERSION:
            return None
        return data["identity"], {g: np.frombuffer(base64.b64decode(data[g]), np.float32) for g in GROUPS}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def stale_reason(stored: str | None, identity: str, inputs: dict[str, np.ndarray]) -> str | None:
    """None when the layer keyed ``stored`` shows ``identity`` at ``inputs``; else why not, one of
    :data:`NOT_BAKED` (no key: a placeholder, or a file from before keys) or :data:`REASONS`' texts."""
    decoded = decode(stored) if stored else None
    if decoded is None:
        return NOT_BAKED
    was_identity, was = decoded
    if was_identity != identity:
        return REASONS["identity"]
    for group in GROUPS:
        now = np.asarray(inputs[group], np.float32).reshape(-1)
        if was[group].shape != now.shape or not np.all(np.abs(was[group] - now) <= TOLERANCE):
            return REASONS[group]
    return None


def frame_ranges(frames) -> str:
    """'1-4, 7, 9-10' for the frame numbers ``frames``."""
    frames = sorted(set(int(f) for f in frames))
    parts, start = [], None
    for i, f in enumerate(frames):
        if start is None:
            start = f
        if i + 1 == len(frames) or frames[i + 1] != f + 1:
            parts.append(str(start) if start == f else f"{start}-{f}")
            start = None
    return ", ".join(parts)


def summarize(avatar: str, reasons: dict[int, str | None]) -> list[str]:
    """One line per reason for an avatar's frames {frame: reason or None}: '<avatar>: frames 1-4:
    the camera changed since the bake'. Empty when every frame is fresh."""
    by_reason: dict[str, list[int]] = {}
    for frame, reason in reasons.items():
        if reason is not None:
            by_reason.setdefault(reason, []).append(frame)
    lines = []
    for reason, frames in sorted(by_reason.items(), key=lambda item: min(item[1])):
        word = "frame" if len(frames) == 1 else "frames"
        lines.append(f"{avatar}: {word} {frame_ranges(frames)}: {reason}")
    return lines
