"""Avatars in the 3D viewport: a ``SpaceView3D`` POST_VIEW draw handler.

Each visible avatar is rendered by the backend for the viewport's own camera (the region's view and
projection matrices, :func:`viewport_camera`) and drawn as one full-region quad: an RGBA texture
(linear, premultiplied, as runtime.to_layer makes it) blended over the scene, and a depth texture
from which the fragment shader writes ``gl_FragDepth``, so scene geometry in front hides the avatar
and the avatar hides what is behind it. The camera maths (the region as a backend camera, window
depth) is hda_backend.rig's: ``viewport_camera``, ``depth_terms``, ``ndc_depth``.

Interactive rates on a CPU: while the view or the pose is changing (navigation, playback) the
avatar renders at :data:`NAV_SCALE` of the region's size; once both have been still for
:data:`SETTLE_S` a timer asks for one full-resolution redraw. Posed Gaussians are kept per avatar
and pose, so orbiting around a still avatar only re-rasterizes (the UNet does not run again), and
the last image and its GPU textures are kept per region, so a redraw with nothing changed (a hover,
a click elsewhere) draws the cached textures.

Orthographic views are drawn through a pinhole camera pulled far back along the view axis (the
rasterizer is perspective only); its depth is shifted back into the orthographic view's.

What it keeps between draws (the handler, the shader, per-region images) is session.viewport.

Never in background mode: ``register()`` adds nothing when ``bpy.app.background`` (no window will
ever draw, and the ``gpu`` module refuses to draw there); shaders are built lazily in the first
draw. ``unregister()`` removes the handler, the settle timer and every GPU resource.
"""

from __future__ import annotations

import time

import bpy
import numpy as np

from ..hda_backend.errors import HDAError
from . import runtime, session
from .objects import object_key, scene_avatars

NAV_SCALE = 0.35         # resolution factor while the view or pose is changing
MIN_NAV_PIXELS = 96      # ... but never below this many pixels on the short side
SETTLE_S = 0.3           # still for this long: render at full resolution

# ------------------------------------------------------------------------------------ image size
def render_size(width: int, height: int, moving: bool) -> tuple[int, int]:
    """Image size for a region: the region's, or the navigation size while the view moves."""
    from ..hda_backend import rig

    return rig.navigation_size(width, height, moving, NAV_SCALE, MIN_NAV_PIXELS)


# ------------------------------------------------------------------------------------------ drawing
_VERTEX = """
void main()
{
  uv = pos * 0.5 + 0.5;
  gl_Position = vec4(pos, 0.0, 1.0);
}
"""

_FRAGMENT = """
void main()
{
  ivec2 size = textureSize(color_tex, 0);
  ivec2 texel = clamp(ivec2(uv * vec2(size)), ivec2(0), size - 1);
  texel.y = size.y - 1 - texel.y;  /* the images' rows run top to bottom */
  vec4 color = texelFetch(color_tex, texel, 0);
  if (color.a < alpha_min) {
    discard;
  }
  float view_z = depth_shift - texelFetch(depth_tex, texel, 0).r;
  float ndc = (proj_z.x * view_z + proj_z.y) / (proj_z.z * view_z + proj_z.w);
  gl_FragDepth = clamp(0.5 * ndc + 0.5, 0.0, 1.0);
  frag_color = color;
}
"""


def _shader():
    """The layer shader and its full-region quad, built on first use (never in background mode)."""
    gpu_cache = session.viewport.gpu
    if "shader" not in gpu_cache:
        import gpu
        from gpu_extras.batch import batch_for_shader

        iface = gpu.types.GPUStageInterfaceInfo("hda_layer_iface")
        iface.smooth('VEC2', "uv")
        info = gpu.types.GPUShaderCreateInfo()
        info.vertex_in(0, 'VEC2', "pos")
        info.vertex_out(iface)
        info.sampler(0, 'FLOAT_2D', "color_tex")
        info.sampler(1, 'FLOAT_2D', "depth_tex")
        info.push_constant('VEC4', "proj_z")
        info.push_constant('FLOAT', "depth_shift")
        info.push_constant('FLOAT', "alpha_min")
        info.fragment_out(0, 'VEC4', "frag_color")
        if hasattr(info, "depth_write"):  # 4.3+: declares the gl_FragDepth write
            info.depth_write('ANY')
        info.vertex_source(_VERTEX)
        info.fragment_source(_FRAGMENT)
        shader = gpu.shader.create_from_info(info)
        gpu_cache["shader"] = shader
        gpu_cache["batch"] = batch_for_shader(shader, 'TRI_FAN', {"pos": ((-1, -1), (1, -1), (1, 1), (-1, 1))})
    return gpu_cache["shader"], gpu_cache["batch"]


def upload(rgba: np.ndarray, depth: np.ndarray):
    """GPU textures of a layer: rgba [H,W,4] float32, depth [H,W] float32 (rows top to bottom)."""
    import gpu

    h, w = depth.shape
    color = gpu.types.Buffer('FLOAT', rgba.size, np.ascontiguousarray(rgba, dtype=np.float32).reshape(-1))
    z = gpu.types.Buffer('FLOAT', depth.size, np.ascontiguousarray(depth, dtype=np.float32).reshape(-1))
    return (gpu.types.GPUTexture((w, h), format='RGBA32F', data=color),
            gpu.types.GPUTexture((w, h), format='R32F', data=z))


def draw_layer(color_tex, depth_tex, terms, depth_shift: float = 0.0, alpha_min: float = runtime.ALPHA_EMPTY) -> None:
    """Draw a layer over the bound framebuffer: premultiplied blending, depth-tested against and written
    into its depth buffer. terms: rig.depth_terms of the projection the layer was rendered for."""
    import gpu

    shader, batch = _shader()
    gpu.state.blend_set('ALPHA_PREMULT')
    gpu.state.depth_test_set('LESS_EQUAL')
    gpu.state.depth_mask_set(True)
    try:
        shader.bind()
        shader.uniform_sampler("color_tex", color_tex)
        shader.uniform_sampler("depth_tex", depth_tex)
        shader.uniform_float("proj_z", terms)
        shader.uniform_float("depth_shift", float(depth_shift))
        shader.uniform_float("alpha_min", float(alpha_min))
        batch.draw(shader)
    finally:
        gpu.state.depth_mask_set(False)
        gpu.state.depth_test_set('NONE')
        gpu.state.blend_set('NONE')


# ------------------------------------------------------------------------------------ the draw handler
def _digest(*arrays) -> bytes:
    return b"".join(runtime.quantize(a).tobytes() for a in arrays)


def _posed_gaussians(obj, depsgraph):
    """(Gaussians, pose key) of the avatar as posed now; the UNet runs only when the pose changes."""
    import torch

    posed = session.viewport.posed
    key = object_key(obj)
    avatar = runtime.get_avatar(obj)
    pose, transl = runtime.read_pose(obj, depsgraph, runtime.get_layout(avatar.body))
    sig, digest = runtime.signature(obj), _digest(pose, transl)
    cached = posed.get(key)
    if cached is not None and cached[0] == sig and cached[1] == digest:
        return cached[2], digest
    with torch.inference_mode():
        g = runtime.fast_gaussians(obj, pose, transl)
    posed[key] = (sig, digest, g)
    return g, digest


def render_layer(obj, g, viewmat, K, width: int, height: int):
    """Rasterize posed Gaussians for the viewport: (rgba [H,W,4], depth [H,W]) as runtime.to_layer gives."""
    import torch

    from ..hda_backend.render.frames import render_gaussians

    device = g.means.device
    with torch.inference_mode():
        out, alpha = render_gaussians(g, torch.as_tensor(viewmat, dtype=torch.float32, device=device),
                                      torch.as_tensor(K, dtype=torch.float32, device=device), int(width), int(height),
                                      shading=runtime.shading(obj), render_mode="RGB+ED",
                                      sh_degree=runtime.get_avatar(obj).gaussian_config.sh_degree)
        out, alpha = out.cpu().numpy(), alpha[..., 0].cpu().numpy()
    return runtime.to_layer(out[..., :3], alpha, out[..., 3])


def _settled():
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()
    return None


def _draw():
    from ..hda_backend import rig

    state = session.viewport
    context = bpy.context
    region, rv3d = context.region, context.region_data
    if region is None or rv3d is None or context.scene is None:
        return
    avatars = [o for o in scene_avatars(context.scene) if o.visible_get()]
    if not avatars:
        return
    depsgraph = context.evaluated_depsgraph_get()
    now = time.monotonic()
    view = np.array(rv3d.view_matrix), np.array(rv3d.window_matrix)
    view_key = _digest(*view) + bytes(f"{region.width}x{region.height}", "ascii")
    rkey = region.as_pointer()
    seen = state.views.setdefault(rkey, {"key": None, "changed": 0.0})
    if seen["key"] != view_key:
        seen.update(key=view_key, changed=now)
    for obj in avatars:
        key = object_key(obj)
        try:
            g, pose_key = _posed_gaussians(obj, depsgraph)
            last = state.last_pose.get(key)
            if last is None or last[0] != pose_key:
                state.last_pose[key] = last = (pose_key, now)
            moving = now - max(seen["changed"], last[1]) < SETTLE_S
            width, height = render_size(region.width, region.height, moving)
            layer_key = (view_key, pose_key, runtime.signature(obj), width, height, runtime.shading(obj))
            drawn = state.drawn.get((rkey, key))
            if drawn is None or drawn[0] != layer_key:
                t0 = time.perf_counter()
                matrix = np.array(obj.evaluated_get(depsgraph).matrix_world)
                viewmat, K, shift = rig.viewport_camera(view[0], view[1], width, height, matrix)
                rgba, depth = render_layer(obj, g, viewmat, K, width, height)
                color_tex, depth_tex = upload(rgba, depth)
                drawn = (layer_key, color_tex, depth_tex, rig.depth_terms(view[1]), shift)
                state.drawn[(rkey, key)] = drawn
                state.stats[key] = {"ms": 1e3 * (time.perf_counter() - t0), "scale": width / max(1, region.width)}
                if moving and not bpy.app.timers.is_registered(_settled):
                    bpy.app.timers.register(_settled, first_interval=SETTLE_S)
            draw_layer(drawn[1], drawn[2], drawn[3], drawn[4])
            session.caches.errors.pop(key, None)
        except Exception as exc:  # noqa: BLE001 - a draw callback must never raise (it would on every redraw)
            session.caches.errors[key] = str(exc) if isinstance(exc, HDAError) else f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ lifecycle
@bpy.app.handlers.persistent
def _on_load_post(*_):
    session.viewport.forget_images()


def _background() -> bool:
    """True where nothing may touch ``gpu`` (``blender -b``, bpy as a module). Tests replace it to check
    that the handler is added and removed."""
    return bpy.app.background


def register() -> None:
    state = session.viewport
    if _background() or state.handle is not None:
        return
    state.handle = bpy.types.SpaceView3D.draw_handler_add(_draw, (), 'WINDOW', 'POST_VIEW')
    bpy.app.handlers.load_post.append(_on_load_post)


def unregister() -> None:
    state = session.viewport
    if state.handle is not None:
        bpy.types.SpaceView3D.draw_handler_remove(state.handle, 'WINDOW')
    while _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    while bpy.app.timers.is_registered(_settled):
        bpy.app.timers.unregister(_settled)
    state.reset()  # the handle, the shader and every cached image and texture
