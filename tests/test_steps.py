"""The shared step / log / checkpoint skeleton (hda_backend/steps.py), against a hand-written loop."""

from hda_backend.steps import run_steps


def _run(start, total, log_every, checkpoint_every, stop_after=None):
    events = []
    done = run_steps(start, total, lambda i: {"loss": float(i), "twice": 2.0 * i}, log_every, checkpoint_every,
                     lambda d, row: events.append(("log", d, row)), lambda d: events.append(("ckpt", d)),
                     stop_after)
    return done, events


def test_rows_average_the_steps_since_the_last_row_and_checkpoints_follow_the_log():
    done, events = _run(0, 7, log_every=3, checkpoint_every=5)
    assert done == 7
    assert events == [("log", 3, {"loss": 1.0, "twice": 2.0}), ("ckpt", 5),
                      ("log", 6, {"loss": 4.0, "twice": 8.0}), ("log", 7, {"loss": 6.0, "twice": 12.0}), ("ckpt", 7)]


def test_a_resumed_run_continues_the_schedule_and_stop_after_returns_at_a_checkpoint():
    done, events = _run(4, 10, log_every=2, checkpoint_every=4, stop_after=7)
    assert done == 8 and events[-1] == ("ckpt", 8)
    assert [e[1] for e in events if e[0] == "log"] == [6, 8]
    assert events[0] == ("log", 6, {"loss": 4.5, "twice": 9.0})  # steps 4 and 5
    done, _ = _run(8, 10, log_every=2, checkpoint_every=4, stop_after=7)  # already past stop_after: to the end
    assert done == 10
