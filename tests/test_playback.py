"""blender_addon.playback's frame arithmetic against hand-worked cases: the frame playback reaches a few
frames on (looping in the playback range) and the direction it moved. (The prediction from an action
against Blender's own evaluation, and the poses kept from a loop played before, are checked in real
Blender: test_blender_periphery.py.)"""

from __future__ import annotations

from types import SimpleNamespace

from blender_addon import playback


def _scene(frame, start=1, end=10, preview=None):
    return SimpleNamespace(frame_current=frame, frame_start=start, frame_end=end,
                           use_preview_range=preview is not None,
                           frame_preview_start=preview[0] if preview else 0,
                           frame_preview_end=preview[1] if preview else 0)


def test_frame_ahead_loops_in_the_playback_range_and_direction_takes_the_shorter_way():
    scene = _scene(9)
    assert [playback.frame_ahead(scene, f, s) for f, s in ((3, 2), (9, 2), (10, 1), (1, -2), (12, 2))] == \
        [5, 1, 1, 9, 14]                                      # outside the range: no looping
    preview = _scene(5, preview=(4, 6))
    assert [playback.frame_ahead(preview, f, 2) for f in (4, 5, 6)] == [6, 4, 5]
    assert [playback.direction(scene, a, b) for a, b in ((3, 4), (4, 3), (10, 1), (1, 10), (5, 5), (3, 7))] == \
        [1, -1, 1, -1, 1, 1]
    assert playback.direction(scene, 3, 9) == -1             # 6 on or 4 back: back is shorter
