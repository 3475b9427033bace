"""HDA Avatars Blender add-on: preferences, backend check, dependency installer, sidebar panel.

Inside Blender this package is ``bl_ext.<repo>.hda_avatars.blender_addon``; the extension's root
``__init__.py`` (written by scripts/build_extension.py) re-exports :func:`register` and
:func:`unregister`. Its siblings ``operators`` and ``hda_backend`` are imported relatively.

Importing this package does not import bpy (``deps``, ``probe``, ``fitjob``, ``session``, ``objects``,
``paths`` and ``messages`` never do, and are tested without Blender); the bpy modules are imported by
:func:`register`. ``register()`` is cheap: no torch, no network, no subprocess, no scene
access. The session's state is in ``session`` and :func:`unregister` forgets it with one call; the
operators use the add-on through ``api`` only.
"""


def _classes():
    from .. import operators
    from . import preferences, props, ui

    return (*preferences.CLASSES, *props.CLASSES, *operators.CLASSES, *ui.CLASSES)


def register():
    import bpy

    from ..hda_backend.constants import NATIVE_BLENDER_MIN
    from ..operators import fit
    from . import handlers, kernels, menus, preferences, props, session, viewport

    if session.registration.classes:  # enabled twice without a disable in between: start from a clean slate
        unregister()
    try:
        for cls in _classes():
            bpy.utils.register_class(cls)
            session.registration.classes.append(cls)
        props.register_properties()
        fit.register_properties()
        handlers.register()
        menus.register()
        if bpy.app.version >= NATIVE_BLENDER_MIN:
            from . import native

            native.register()
        viewport.register()
        preferences.sync_sys_path()
        kernels.register()       # a one-shot timer: the compile starts after register() returns
    except Exception:
        unregister()
        raise


def unregister():
    import bpy

    from .. import operators
    from ..hda_backend.constants import NATIVE_BLENDER_MIN
    from ..operators import fit
    from . import handlers, identity, kernels, layers, menus, preferences, props, session, viewport

    operators.stop_jobs()        # cancels running checks/installs, removes their timers
    kernels.unregister()         # stops the kernel compile and its timers
    fit.unregister_properties()  # cancels a running fit
    viewport.unregister()        # removes the draw handler and its GPU resources
    identity.unregister()        # removes the live-identity timer, waits for a running sample
    menus.unregister()           # Shift+A, File > Import / Export entries
    handlers.unregister()
    layers.close_writer()        # finishes the layer files' compressed rewrites
    if bpy.app.version >= NATIVE_BLENDER_MIN:
        from . import native

        native.unregister()
    props.unregister_properties()
    preferences.forget_sys_path()
    classes = session.registration.classes
    while classes:
        bpy.utils.unregister_class(classes.pop())
    session.reset()              # everything the session remembered: caches, jobs, models, viewport
