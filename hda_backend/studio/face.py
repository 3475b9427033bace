"""Faces for the studio's people: eyes, brows and lips as per-vertex region fields on the bundled body.

The bundled body (scripts/build_body.py) closes MakeHuman's eye and mouth openings with a fan around one
new vertex each, so the three vertices of valence >= OPENING_VALENCE are the centres of the openings:
the eyes' and the mouth's positions come from the mesh itself, no mask needs downloading or baking.
Each region is a field over the body's vertices, positive inside and negative outside; Blender
interpolates it over the triangles and the skin shader thresholds it at 0, so a region's border is
one contour, defined once here, whether it is drawn, tested or counted.

- ``eye``: 1 at an opening's centre, 0 on its rim, negative outside (minus the distance to the nearest
  rim vertex over EYE_FALLOFF): the fan is the visible eyeball, a thin band outside it the lash line.
- ``iris``: 1 - distance to the opening's centre / the subject's iris radius (positive only inside
  the fan, where the sclera is).
- ``brow``: an arched band above each eye, ``1 - ((dx - c) / a)^2 - ((dy - arch(dx)) / b)^2`` in the
  eye's frame, dx measured outwards from the nose.
- ``lips``: an ellipse about the mouth, taller below (the lower lip is fuller), with a cupid's bow.
"""

from __future__ import annotations

import numpy as np

from ..errors import HDAError

OPENING_VALENCE = 16  # body vertices are of valence <= 9; the openings' fan centres 28 and 38
EYE_FALLOFF = 0.01  # metres: the eye field reaches -1 this far outside the rim (the lash line is a band of it)
FIELDS = ("eye", "iris", "brow", "lips")


def openings(faces: np.ndarray, rest: np.ndarray, source: str = "body") -> dict[str, int]:
    """The fan-centre vertices of the body's openings: {"left_eye", "right_eye", "mouth"} (left at +X)."""
    valence = np.bincount(np.asarray(faces).reshape(-1), minlength=len(rest))
    centres = np.nonzero(valence >= OPENING_VALENCE)[0]
    if len(centres) != 3:
        raise HDAError(f"body model {source}: found {len(centres)} eye/mouth opening centres (vertices of valence "
                       f">= {OPENING_VALENCE}), expected 3; the studio's faces need the bundled body's topology")
    by_x = centres[np.argsort(rest[centres, 0])]
    return {"right_eye": int(by_x[0]), "mouth": int(by_x[1]), "left_eye": int(by_x[2])}


def _ring(faces: np.ndarray, centre: int) -> np.ndarray:
    ring = np.unique(faces[(faces == centre).any(1)])
    return ring[ring != centre]


def face_fields(rest: np.ndarray, faces: np.ndarray, face: dict, source: str = "body") -> dict[str, np.ndarray]:
    """Region fields [V] (float32, > 0 inside) of the body's rest vertices [V,3] for a subject's ``face``
    attributes (``iris_radius``, ``brow`` {thickness, arch, length}, ``lips`` {width, fullness})."""
    rest = np.asarray(rest, np.float64)
    anchors = openings(faces, rest, source)
    out = {}
    eye = np.full(len(rest), -1.0)
    iris = np.full(len(rest), -1.0)
    brow = np.full(len(rest), -1.0)
    front = rest[:, 2]
    for side, sign in (("left_eye", 1.0), ("right_eye", -1.0)):
        c = anchors[side]
        ring = _ring(faces, c)
        centre = rest[c]
        # outside: minus the distance to the rim over the fall-off; the rim 0; the centre 1
        dist_rim = np.min(np.linalg.norm(rest[:, None] - rest[ring][None], axis=-1), axis=1)
        field = np.maximum(-dist_rim / EYE_FALLOFF, -1.0)
        field[ring], field[c] = 0.0, 1.0
        near = np.linalg.norm(rest - centre, axis=1) < 0.05
        eye = np.where(near, np.maximum(eye, field), eye)
        disc = 1.0 - np.linalg.norm(rest - centre, axis=1) / face["iris_radius"]
        iris = np.where(near, np.maximum(iris, disc), iris)
        # brow: dx outwards from the nose, dy up from the eye's centre
        b = face["brow"]
        dx = sign * (rest[:, 0] - centre[0])
        dy = rest[:, 1] - centre[1]
        half = 0.5 * b["length"]
        mid = half - 0.012  # the brow starts ~1.2 cm inside the eye's inner corner
        arch = 0.014 + b["arch"] * (1.0 - ((dx - mid) / half) ** 2)
        thick = b["thickness"] * (1.0 - 0.45 * np.clip((dx - mid) / half, 0, 1))  # thinner towards the tail
        band = 1.0 - ((dx - mid) / half) ** 2 - ((dy - arch) / (0.5 * thick)) ** 2
        band = np.where(front > centre[2] - 0.03, band, -1.0)  # the brow, not the back of the head
        brow = np.maximum(brow, np.clip(band, -1.0, 1.0))
    m = rest[anchors["mouth"]]
    lips = face["lips"]
    dx = (rest[:, 0] - m[0]) / (0.5 * lips["width"])
    dy = rest[:, 1] - m[1]
    bow = 1.0 - 0.35 * np.exp(-(dx / 0.12) ** 2)  # the dip of the upper lip in the middle
    height = np.where(dy > 0, 0.0075 * lips["fullness"] * bow, 0.0105 * lips["fullness"])
    taper = np.sqrt(np.clip(1.0 - dx ** 2, 0.0, 1.0))
    field = 1.0 - dx ** 2 - (dy / (height * np.maximum(taper, 0.35))) ** 2
    field = np.where(front > m[2] - 0.025, field, -1.0)
    out["eye"], out["iris"], out["brow"] = eye, iris, brow
    out["lips"] = np.clip(field, -1.0, 1.0)
    return {k: out[k].astype(np.float32) for k in FIELDS}
