"""HDA Avatars Blender add-on: preferences, backend check, dependency installer, sidebar panel.

Inside Blender this package is ``bl_ext.<repo>.hda_avatars.blender_addon``; the extension's root
``__init__.py`` (written by scripts/build_extension.py) re-exports :func:`register` and
:func:`unregister`. Its siblings ``operators`` and ``hda_backend`` are imported relatively.

Importing this package does not import bpy (the pure modules ``deps``, ``probe`` and ``state`` are
tested without Blender); the bpy modules are imported by :func:`register`. ``register()`` is cheap:
no torch, no network, no subprocess, no scene access.
"""

_registered: list = []


def addon_id() -> str:
    """The add-on's module name (``bl_ext.<repo>.hda_avatars``): the AddonPreferences bl_idname."""
    return __package__.rpartition(".")[0] or __package__


def _classes():
    from .. import operators
    from . import preferences, props, ui

    return (*preferences.CLASSES, *props.CLASSES, *operators.CLASSES, *ui.CLASSES)


def register():
    import bpy

    from ..operators import fit
    from . import handlers, preferences, props, viewport

    if _registered:  # enabled twice without a disable in between: start from a clean slate
        unregister()
    try:
        for cls in _classes():
            bpy.utils.register_class(cls)
            _registered.append(cls)
        props.register_properties()
        fit.register_properties()
        handlers.register()
        viewport.register()
        preferences.sync_sys_path()
    except Exception:
        unregister()
        raise


def unregister():
    import bpy

    from .. import operators
    from ..operators import fit, identity
    from . import handlers, preferences, props, runtime, viewport

    operators.stop_jobs()        # cancels running checks/installs, removes their timers
    fit.unregister_properties()  # cancels a running fit
    identity.clear()             # loaded diffusion models
    viewport.unregister()        # removes the draw handler and its GPU resources
    handlers.unregister()
    runtime.clear()
    props.unregister_properties()
    preferences.forget_sys_path()
    while _registered:
        bpy.utils.unregister_class(_registered.pop())
