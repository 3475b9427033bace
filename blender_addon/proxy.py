"""The proxy mesh in the render: a shadow-only caster (no bpy import: these only set attributes).

By default the proxy, posed by the armature like the person, is visible to shadow rays only: in Cycles
and EEVEE it casts the person's shadow on the scene (contact shadows at the feet included) while
camera, diffuse, glossy, transmission and volume rays pass through it, so it never appears in the
image nor in its Depth pass and the composited person stays the only thing seen. Workbench ignores
ray visibility and would draw it as a grey body over the person, so renders with Workbench hide the
shadow-only proxies from render_init until the render completes or is cancelled (handlers.py), and
show them again afterwards.
"""

# (Object attribute, value) of a shadow-only caster; a tuple, since module state lives in session.py only.
SHADOW_ONLY = (("hide_render", False), ("visible_camera", False), ("visible_diffuse", False),
               ("visible_glossy", False), ("visible_transmission", False), ("visible_volume_scatter", False),
               ("visible_shadow", True))
RAY_VISIBILITY_ENGINES = ("CYCLES", "BLENDER_EEVEE", "BLENDER_EEVEE_NEXT")  # EEVEE is _NEXT in 4.2-4.5


def make_shadow_only(proxy) -> None:
    """Make ``proxy`` render as a shadow caster only."""
    for name, value in SHADOW_ONLY:
        setattr(proxy, name, value)


def is_shadow_only(proxy) -> bool:
    return all(getattr(proxy, name) == value for name, value in SHADOW_ONLY)


def hide_for_engine(scene, avatars) -> list[str]:
    """Hide the shadow-only proxies of ``avatars`` from a render by any engine but Cycles and EEVEE
    (Workbench ignores ray visibility; another engine's handling of it is unknown, and no shadow is
    better than a grey body over the person); returns the names of the proxies hidden, for :func:`show`."""
    if scene.render.engine in RAY_VISIBILITY_ENGINES:
        return []
    hidden = []
    for obj in avatars:
        proxy = obj.hda.proxy
        if proxy is not None and is_shadow_only(proxy):
            proxy.hide_render = True
            hidden.append(proxy.name)
    return hidden


def show(objects, names) -> None:
    """Undo :func:`hide_for_engine` for the proxies named ``names`` (``objects``: bpy.data.objects)."""
    for name in names:
        proxy = objects.get(name)
        if proxy is not None:
            proxy.hide_render = False
