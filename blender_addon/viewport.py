"""Avatars in the 3D viewport: a ``SpaceView3D`` POST_VIEW draw handler.

Each visible avatar is rendered by the backend for the viewport's own camera (the region's view and
projection matrices, :func:`viewport_camera`) and drawn as one quad over the box of the region it
covers: an RGBA texture of that box (linear, premultiplied, as runtime.to_layer makes it) blended over
the scene, and a depth texture from which the fragment shader writes ``gl_FragDepth``, so scene
geometry in front hides the avatar and the avatar hides what is behind it. Only the box is uploaded
and shaded: on a software GL (llvmpipe) a full-region quad cost 7.4-8.1 ms a draw at 1280x720 against
1.0 ms for a standing person's box, with the same pixels. The camera maths (the region as a backend
camera, window depth) is hda_backend.rig's: ``viewport_camera``, ``depth_terms``, ``ndc_depth``.

Interactive rates on a CPU: the draw callback never waits for the backend. On the main thread it
reads the pose and the view (all bpy access stays there) and hands them, as arrays, to a worker of
that region and avatar (hda_backend.latest.LatestWins running hda_backend.preview's two stages, pose
-> Gaussians then rasterize, each on its own thread, so the UNet of one frame overlaps the raster of
the one before). A newer request replaces one still waiting (the latest pose wins: playback skips
frames rather than falling behind). Until its image is ready the callback draws the newest finished
one; a main-thread timer (:func:`_poll`) redraws the views when one lands. While the view or the pose
is changing (navigation, playback) the avatar renders at :data:`NAV_SCALE` of the region's size; once
both have been still for :data:`SETTLE_S` a timer asks for one full-resolution redraw. The worker
keeps the Gaussians of the last pose, so orbiting around a still avatar only re-rasterizes (the UNet
does not run again), and the last image and its GPU textures are kept per region, so a redraw with
nothing changed (a hover, a click elsewhere) draws the cached textures. While moving, requests also
allow the level of detail of hda_backend.preview.PoseStage (the last UNet output re-skinned to the new
pose, the UNet on every REFRESH_FRAMES-th frame), unless the preference *Fast Playback Preview* is off;
the settled redraw asks for full quality, so the image left on screen once the playhead stops is the
full path's. While the animation plays, each request also names the pose the playhead shows
REFRESH_FRAMES frames on (:func:`look_ahead`, predicted from the action by blender_addon.playback), on
which the worker runs the UNet after handing on the frame, so the frames between interpolate.

Orthographic views are drawn through a pinhole camera pulled far back along the view axis (the
rasterizer is perspective only); its depth is shifted back into the orthographic view's.

What it keeps between draws (the handler, the shader, the workers, per-region images) is
session.viewport.

Never in background mode: ``register()`` adds nothing when ``bpy.app.background`` (no window will
ever draw, and the ``gpu`` module refuses to draw there); shaders are built lazily in the first
draw. ``unregister()`` removes the handler and the timers, stops the workers and frees every GPU resource.
"""

from __future__ import annotations

import time

import bpy
import numpy as np

from ..hda_backend.errors import HDAError
from . import playback, preferences, runtime, session
from .objects import object_key, scene_avatars

NAV_SCALE = 0.35         # resolution factor while the view or pose is changing
MIN_NAV_PIXELS = 96      # ... but never below this many pixels on the short side
SETTLE_S = 0.3           # still for this long: render at full resolution
POLL_S = 0.01            # how often the main thread looks for a finished image while a worker is busy

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
  gl_Position = vec4(mix(rect.xy, rect.zw, uv) * 2.0 - 1.0, 0.0, 1.0);
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
    """The layer shader and its unit quad (placed by the ``rect`` constant), built on first use (never in
    background mode)."""
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
        info.push_constant('VEC4', "rect")
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
    """GPU textures of the box a layer covers: rgba [H,W,4] float32, depth [H,W] float32 (rows top to
    bottom) -> (colour texture, depth texture, rect), rect = (left, bottom, right, top) of the box as
    fractions of the layer (bottom up), or None where the layer covers no pixel (nothing to draw)."""
    import gpu

    from ..hda_backend.layer import covered_box

    box = covered_box(rgba[..., 3])
    if box is None:
        return None
    rows, cols = box
    h, w = depth.shape
    rect = (cols.start / w, 1.0 - rows.stop / h, cols.stop / w, 1.0 - rows.start / h)
    rgba, depth = rgba[box], depth[box]
    bh, bw = depth.shape
    color = gpu.types.Buffer('FLOAT', rgba.size, np.ascontiguousarray(rgba, dtype=np.float32).reshape(-1))
    z = gpu.types.Buffer('FLOAT', depth.size, np.ascontiguousarray(depth, dtype=np.float32).reshape(-1))
    return (gpu.types.GPUTexture((bw, bh), format='RGBA32F', data=color),
            gpu.types.GPUTexture((bw, bh), format='R32F', data=z), rect)


def draw_layer(uploaded, terms, depth_shift: float = 0.0, alpha_min: float = runtime.ALPHA_EMPTY) -> None:
    """Draw a layer (:func:`upload`'s textures and rect; None draws nothing) over the bound framebuffer:
    premultiplied blending, depth-tested against and written into its depth buffer. terms:
    rig.depth_terms of the projection the layer was rendered for."""
    if uploaded is None:
        return
    import gpu

    color_tex, depth_tex, rect = uploaded
    shader, batch = _shader()
    gpu.state.blend_set('ALPHA_PREMULT')
    gpu.state.depth_test_set('LESS_EQUAL')
    gpu.state.depth_mask_set(True)
    try:
        shader.bind()
        shader.uniform_sampler("color_tex", color_tex)
        shader.uniform_sampler("depth_tex", depth_tex)
        shader.uniform_float("rect", rect)
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


def read_pose(obj, depsgraph):
    """(pose [165], transl [3], pose key) of the avatar ``obj`` as evaluated in ``depsgraph``."""
    pose, transl = runtime.read_pose(obj, depsgraph, runtime.get_layout(runtime.get_avatar(obj).body))
    return pose, transl, _digest(pose, transl)


def request_for(obj, depsgraph, posed, view, proj, width: int, height: int, lod: bool = False, ahead=None):
    """(preview.PreviewRequest, depth shift) of the avatar ``obj`` at ``posed`` (from :func:`read_pose`),
    seen by a view (view [4,4], projection [4,4] matrices) at width x height; lod: the worker may
    re-skin its last UNet output (while moving); ahead: the pose [165] playback shows REFRESH_FRAMES
    frames on (playback.ahead_pose), or None. Everything is read from Blender here, on the main
    thread, so the worker gets arrays only."""
    from ..hda_backend import rig
    from ..hda_backend.preview import PreviewRequest

    avatar = runtime.get_avatar(obj)
    fast = session.caches.avatars[object_key(obj)][2]
    pose, transl, pose_key = posed
    matrix = np.array(obj.evaluated_get(depsgraph).matrix_world)
    viewmat, K, shift = rig.viewport_camera(view, proj, width, height, matrix)
    request = PreviewRequest(fast, pose, transl, pose_key, viewmat, K, int(width), int(height),
                             runtime.shading(obj), avatar.gaussian_config.sh_degree, lod, ahead)
    return request, shift


def look_ahead(context, obj, pose, key):
    """While the animation plays: the pose the playhead shows REFRESH_FRAMES frames on, in the
    direction it last moved, from the action (playback.ahead_pose) or else from a loop played before
    (playback.played_ahead); None otherwise."""
    from ..hda_backend.preview import REFRESH_FRAMES

    state, scene = session.viewport, context.scene
    frame, last = scene.frame_current, state.frames.get(key)
    state.frames[key] = frame
    if context.screen is None or not context.screen.is_animation_playing:
        state.ahead.pop(key, None)
        state.unpredicted.pop(key, None)  # the rig may have changed by the next play: ask again
        return None
    step = REFRESH_FRAMES * (playback.direction(scene, last, frame) if last is not None else 1)
    from_loop = playback.played_ahead(state.played.setdefault(key, {}), scene, pose, step)
    ahead, action = None, playback.action_id(obj)
    if action is not None and state.unpredicted.get(key) != action:  # its keys evaluated only while they may predict
        layout = runtime.get_layout(runtime.get_avatar(obj).body)
        ahead, predicts = playback.ahead_pose(obj, scene, pose, layout, step)
        if not predicts:
            state.unpredicted[key] = action
    ahead = ahead if ahead is not None else from_loop
    state.ahead[key] = ahead is not None  # the sidebar says whether playback looks ahead
    return ahead


def _worker(slot):
    """The worker of one (region, avatar): pose -> Gaussians, then rasterize, each on its own thread."""
    from ..hda_backend import preview
    from ..hda_backend.latest import LatestWins

    workers = session.viewport.workers
    if slot not in workers:
        workers[slot] = LatestWins([preview.PoseStage(), preview.raster_stage], name="hda-viewport")
    return workers[slot]


def _tag_views() -> None:
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()


def _settled():
    _tag_views()
    return None


def _poll():
    """Main-thread timer while workers are busy: redraw the views when a newer image has finished."""
    state = session.viewport
    busy = any(not w.idle() for w in state.workers.values())  # first: what lands after this is still seen
    if any(w.finished_seq() > state.shown.get(slot, 0) for slot, w in state.workers.items()):
        _tag_views()
    return POLL_S if busy else None


def _pick_up(slot) -> None:
    """Upload the worker's newest finished image of ``slot`` if it has not been shown yet. A request that
    failed raises its error and leaves nothing to draw (never a stale image passing for the new pose);
    the error stays in the sidebar until an image lands."""
    state = session.viewport
    worker = state.workers.get(slot)
    finished = worker.latest() if worker is not None else None
    if finished is None or finished.seq <= state.shown.get(slot, 0):
        return
    state.shown[slot] = finished.seq
    if finished.error is not None:
        state.drawn.pop(slot, None)
        raise finished.error
    layer_key, terms, shift, submitted, scale = finished.key
    rgba, depth = finished.value
    state.drawn[slot] = (layer_key, upload(rgba, depth), terms, shift)
    state.stats[slot[1]] = {"ms": 1e3 * (time.monotonic() - submitted), "scale": scale}
    session.caches.errors.pop(slot[1], None)


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
        slot = (rkey, key)
        try:
            _pick_up(slot)
            posed = read_pose(obj, depsgraph)
            pose_key = posed[2]
            last = state.last_pose.get(key)
            if last is None or last[0] != pose_key:
                state.last_pose[key] = last = (pose_key, now)
            moving = now - max(seen["changed"], last[1]) < SETTLE_S
            width, height = render_size(region.width, region.height, moving)
            # moving is in the key: the settled redraw asks for full quality even at the same size
            layer_key = (view_key, pose_key, runtime.signature(obj), width, height, runtime.shading(obj), moving)
            drawn = state.drawn.get(slot)
            asked = state.requested.get(slot)
            if (drawn is None or drawn[0] != layer_key) and (asked is None or asked != layer_key):
                lod = moving and preferences.playback_lod()
                ahead = look_ahead(context, obj, posed[0], key) if lod else None
                request, shift = request_for(obj, depsgraph, posed, view[0], view[1], width, height, lod, ahead)
                meta = (layer_key, rig.depth_terms(view[1]), shift, now, width / max(1, region.width))
                _worker(slot).submit(meta, request)  # a request still waiting there is dropped
                state.requested[slot] = layer_key
                if not bpy.app.timers.is_registered(_poll):
                    bpy.app.timers.register(_poll, first_interval=POLL_S)
                if moving and not bpy.app.timers.is_registered(_settled):
                    bpy.app.timers.register(_settled, first_interval=SETTLE_S)
            if drawn is not None:  # the newest finished image, until the one asked for is ready
                draw_layer(drawn[1], drawn[2], drawn[3])
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
    for timer in (_settled, _poll):
        while bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    state.close_workers()
    state.reset()  # the handle, the shader and every cached image and texture
