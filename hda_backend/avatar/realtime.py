"""The per-frame fast path of an avatar: one pose -> posed Gaussians, for the viewport and final renders.

The slow, obviously correct twin is :class:`~hda_backend.avatar.model.Avatar` itself in float32
(``avatar(pose, transl).index(0)``); ``tests/test_realtime.py`` checks that both render the bundled
reference avatars and sampled identities within :data:`PSNR_FLOOR_DB` of each other. What differs,
measured by ``scripts/bench_frame.py`` (README, Speed):

- what depends only on the body and the UV layout is computed once here: the texels' corner vertices
  and barycentric weights, and the vertex-face incidence as a sparse matrix, so vertex normals are
  one sparse product instead of three scatter-adds (``body.vertex_normals``, its twin);
- the UV maps are written straight into a channels-last buffer, the layout oneDNN's convolutions
  prefer, and the UNet's output is read back channels-last, where a texel's 59 values are contiguous;
- the UNet runs in bfloat16 where the CPU has bf16 instructions (``precision.resolve``), float32
  elsewhere. On the CPU each conv and its SiLU are one oneDNN call (:class:`FusedBf16Convs`, oneDNN's
  convolution with a SiLU post-op, the kernel ``torch.compile`` itself fuses to), 12 % faster in one measured run than
  autocast, which runs SiLU as a pass of its own; where that operator is missing, and on CUDA, bf16
  autocast. Its weights are read from ``avatar.unet`` at every call, never frozen or traced: the fused
  convs keep a bf16 copy in oneDNN's layout only while the conv's weights are still its source, so a
  weight edit (identity mix, a loaded file) is seen at once.

On the CPU, where numba is installed, the UV maps (skinning the template's vertices, their normals,
the texels) and the decoding run as numba kernels (``_realtime_numba``: a few passes over vertices,
faces and texels instead of dozens of small PyTorch operations; sparse skinning weights), in float32
and tested against their twins (``uvmap.pose_maps`` and ``gaussians.decode``). Elsewhere (CUDA) the
PyTorch code below does it. The joint transforms are the reference's own (``pose_transforms``,
``global_transform``).
"""

from __future__ import annotations

import warnings

import torch

from ..body import PosedBody, pose_body, pose_transforms
from ..precision import autocast, resolve
from ..uvmap import global_transform, local_pose
from .gaussians import Gaussians, decode
from .model import Avatar
from .unet import run_unet

# The fast path must render within this of the float32 reference (a trained avatar's renders from
# two different people are 20-27 dB apart; README, Default model).
PSNR_FLOOR_DB = 40.0


def fused_conv_available(device: torch.device | str = "cpu") -> bool:
    """Whether :class:`FusedBf16Convs` can run on ``device``: oneDNN's pointwise-fused convolution
    (an operator torch registers for its own compiler) exists in this torch, on the CPU."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedBf16Convs:
    """``unet.conv_layer`` in bfloat16 as one oneDNN call per conv: ``self(conv, h, silu)`` with h
    [B,C,H,W] bf16 (channels-last) -> the conv with ``conv``'s weights cast to bf16 (as autocast casts
    them), SiLU fused where ``silu``.

    Each conv's weights are cast and reordered into oneDNN's blocked layout once, not at every call
    (given plain weights, oneDNN reorders them on every call: 3.4 ms of a 26 ms UNet in one measured run).
    A packed weight is reused only while the conv's weights are, byte for byte, those it was packed
    from (a copy kept here; comparing them costs one read of the weights) and the input has the same
    size. Version counters would be cheaper but miss edits made through ``.data`` and do not exist
    under ``torch.inference_mode``; with the comparison, any weight edit (an identity mix, a loaded
    file) is packed again at the next call, never rendered stale.
    """

    def __init__(self):
        self._packed = {}  # conv -> (weight and bias bytes, input [C,H,W], (packed weight, bf16 bias))

    def __call__(self, conv: torch.nn.Conv2d, h: torch.Tensor, silu: bool) -> torch.Tensor:
        weight, bias = conv.weight.detach(), conv.bias.detach()
        # As bytes (any dtype): a copy and a memcmp, several times faster than torch.equal here.
        source = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in (weight, bias))
        entry = self._packed.get(conv)
        if entry is None or entry[1] != h.shape[1:] or entry[0] != source:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to(torch.bfloat16).to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups,
                list(h.shape))
            entry = (source, h.shape[1:], (packed, bias.to(torch.bfloat16)))
            self._packed[conv] = entry
        packed_weight, packed_bias = entry[2]
        return torch.ops.mkldnn._convolution_pointwise(
            h, packed_weight, packed_bias, conv.padding, conv.stride, conv.dilation, conv.groups,
            "swish" if silu else "none", [], "")


def vertex_face_matrix(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """[V,F] sparse CSR matrix with a 1 where a vertex is a corner of a face: its product with the face
    normals sums each vertex's adjacent faces. faces: [F,3]."""
    corner_vertex = faces.reshape(-1)
    order = torch.argsort(corner_vertex, stable=True)
    degree = torch.bincount(corner_vertex, minlength=num_vertices)
    crow = torch.cat([degree.new_zeros(1), torch.cumsum(degree, 0)])
    col = torch.arange(faces.shape[0]).repeat_interleave(3)[order]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all that is used
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, torch.ones(col.shape[0]), (num_vertices, faces.shape[0]))


def vertex_normals_sparse(vertices: torch.Tensor, faces: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals, as ``body.vertex_normals`` (its twin, three scatter-adds):
    vertices [V,3], faces [F,3], incidence [V,F] from :func:`vertex_face_matrix` -> [V,3]."""
    tri = vertices[faces]  # [F,3,3]
    face_n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    return torch.nn.functional.normalize(incidence @ face_n, dim=-1, eps=1e-12)


def frame_kernels(avatar: Avatar):
    """The numba kernels of the fast path prepared for ``avatar`` (``_realtime_numba.FrameKernels``), or
    None where numba is missing."""
    try:
        from ._realtime_numba import FrameKernels
    except ImportError:
        return None
    return FrameKernels(avatar.body, avatar.layout, avatar.binding)


class RealtimeAvatar:
    """One frame at a time through ``avatar``, precomputed for its body and UV layout.

    precision: "auto" (bfloat16 where the CPU or GPU runs it natively, else float32), "float32" or
    "bfloat16" for the UNet; see :mod:`hda_backend.precision`.
    """

    def __init__(self, avatar: Avatar, precision: str = "auto"):
        self.avatar = avatar
        device = next(avatar.unet.parameters()).device
        self.precision = resolve(precision, device)
        body, layout = avatar.body, avatar.layout
        self.texels = layout.texels.to(device)  # [M] flat texel ids
        self.device = device
        self.fused = self.precision == "bfloat16" and fused_conv_available(device)
        self.convs = FusedBf16Convs() if self.fused else None
        # On the CPU, UV maps and decoding run as numba kernels; elsewhere (CUDA) as the PyTorch below,
        # whose per-body arrays are made only then.
        self.kernels = frame_kernels(avatar) if device.type == "cpu" else None
        if self.kernels is None:
            self.faces = body.faces.to(device)
            self.incidence = vertex_face_matrix(body.faces, body.v_template.shape[0]).to(device)
            self.corners = body.faces[layout.texel_faces()].to(device)  # [M,3] vertex ids
            self.bary = layout.texel_bary().to(device)  # [M,3]

    def pose_inputs(self, pose: torch.Tensor):
        """pose [1,55,3] -> (maps [1,6,R,R] in channels-last memory, the posed template), the values of
        ``Avatar.pose_inputs`` (global orientation ignored)."""
        avatar = self.avatar
        if self.kernels is not None:
            joints, transforms, v_rest = pose_transforms(avatar.body, local_pose(pose))
            vertices, maps = self.kernels.pose_maps(v_rest[0], transforms[0], joints[0, 0])
            return maps, PosedBody(vertices[None], joints, transforms, v_rest)
        posed = pose_body(avatar.body, local_pose(pose))
        positions = posed.vertices - posed.joints[:, :1]
        normals = vertex_normals_sparse(posed.vertices[0], self.faces, self.incidence)
        both = torch.cat([normals, positions[0]], -1)  # [V,6]
        texel = torch.einsum("mkc,mk->mc", both[self.corners], self.bary)  # [M,6]
        texel = torch.cat([torch.nn.functional.normalize(texel[:, :3], dim=-1, eps=1e-12), texel[:, 3:]], -1)
        res = avatar.uv_res
        flat = texel.new_zeros(res * res, 6)
        flat[self.texels] = texel
        return flat.reshape(1, res, res, 6).permute(0, 3, 1, 2), posed

    def run_unet(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [1,6,R,R] channels-last -> the UNet's output [1,59,R,R] (channels-last) in this path's
        precision: bf16 through :class:`FusedBf16Convs` where available, else under autocast."""
        if self.fused:
            return run_unet(self.avatar.unet, maps.to(torch.bfloat16), self.convs)
        with autocast(self.precision, self.device)():
            return self.avatar.unet(maps)

    def _pose(self, pose) -> torch.Tensor:
        return torch.as_tensor(pose, dtype=torch.float32, device=self.device).reshape(1, 55, 3)

    def raw_output(self, pose):
        """pose [165] or [1,55,3] -> (raw [1,M,59], the posed template): the UNet's per-texel output for
        this pose (its pose-dependent part; global orientation and translation do not enter it), in
        float32, with the posed template :meth:`skin` reuses. Run under ``torch.inference_mode``."""
        avatar = self.avatar
        maps, posed = self.pose_inputs(self._pose(pose))
        if avatar.static:
            maps = avatar._rest_maps(maps).contiguous(memory_format=torch.channels_last)
        out = self.run_unet(maps)
        # [1,59,R,R] -> [1,M,59]: a texel's channels are contiguous in channels-last memory.
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])[self.texels].float()[None], posed

    def skin(self, raw: torch.Tensor, pose, transl=None, posed=None) -> Gaussians:
        """raw [1,M,59] from :meth:`raw_output` of this pose or another one; pose, transl as
        :meth:`__call__`; posed: the posed template of this pose when already at hand -> Gaussians of
        one frame: ``gaussians.decode`` with this pose's skinning (pose correctives and transforms).
        With the raw output of the same pose this is :meth:`__call__` exactly; with an earlier pose's it
        is the viewport's level of detail during playback (hda_backend.preview), which costs no UNet."""
        avatar = self.avatar
        pose = self._pose(pose)
        if transl is not None:
            transl = torch.as_tensor(transl, dtype=torch.float32, device=self.device).reshape(1, 3)
        if posed is None:
            posed = pose_body(avatar.body, local_pose(pose))
        transforms = global_transform(avatar.body, pose, transl)[:, None] @ posed.transforms
        if self.kernels is not None and not raw.requires_grad:
            return self.kernels.decode(raw, posed.rest_vertices, transforms, avatar.gaussian_config)
        return decode(raw, avatar.binding, posed.rest_vertices, transforms, avatar.gaussian_config).index(0)

    def __call__(self, pose, transl=None) -> Gaussians:
        """pose [165] or [1,55,3] axis-angle; transl [3] or None -> Gaussians of one frame (no batch
        dimension), like ``avatar(pose, transl).index(0)``. Run under ``torch.inference_mode``."""
        raw, posed = self.raw_output(pose)
        return self.skin(raw, pose, transl, posed)
