"""Work off the caller's thread where only the newest request matters: a pipeline of stages, each on
its own thread, with a one-request mailbox in front of each.

The viewport hands it a pose (read on Blender's main thread) and later draws whatever image finished
last: while a frame is being evaluated, newer poses replace each other in the mailbox, so a slow
frame makes playback skip frames instead of falling behind (the *latest pose wins*). With two stages
(pose -> Gaussians, then rasterize) the second rasterizes frame N while the first evaluates frame N+1,
so two cores overlap the UNet and the rasterizer.

Stages run plain Python callables: no Blender data may reach them (bpy is main-thread only), only
numpy arrays, tensors and numbers. A stage that raises ends that request with its exception, which
:meth:`LatestWins.latest` hands back like a result; the threads keep running.

Requests are numbered in the order submitted; a finished result is only ever replaced by a newer one,
so the image shown never goes back in time.

A stage may have a ``follow_up(wait)`` method: its thread calls it after handing each result on, for
work that prepares the *next* request (the viewport's UNet on the pose playback shows next) off this
request's critical path. ``wait()`` blocks until this request has left the last stage: a follow-up
with work to do calls it first, so it does not take the cores from the later stages, and one with
nothing to do returns at once, leaving the stage free to overlap the next request with them. The stage
counts as busy until it returns. Follow-up work only prepares: an
exception it raises is dropped, and the next request, finding nothing prepared, does the work on its
own path, where an error reaches the caller with that request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Finished:
    """A request that went through every stage: ``value`` is the last stage's result, or ``error`` the
    exception a stage raised (then ``value`` is None)."""

    seq: int            # 1 for the first request submitted, then increasing
    key: object         # what the caller submitted it with (e.g. what the image shows)
    value: object = None
    error: BaseException | None = None


class LatestWins:
    """stages: callables, each taking the previous one's result (the first one the submitted value).
    The caller polls (:meth:`latest`) or blocks (:meth:`wait`): nothing calls back into its thread."""

    def __init__(self, stages: Sequence[Callable], name: str = "hda-latest"):
        if not stages:
            raise ValueError("LatestWins needs at least one stage")
        self._stages = list(stages)
        self._cond = threading.Condition()
        self._slots: list[tuple | None] = [None] * len(self._stages)   # (seq, key, value) waiting per stage
        self._busy = [False] * len(self._stages)
        self._submitted = 0
        self._finished: Finished | None = None
        self.dropped = 0    # requests replaced in a mailbox before their stage took them
        self._closed = False
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"{name}-{i}", daemon=True)
                         for i in range(len(self._stages))]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------------------- the caller's side
    def submit(self, key, value) -> int:
        """Queue ``value`` for the first stage, replacing a request still waiting there; returns its seq."""
        with self._cond:
            if self._closed:
                raise RuntimeError("LatestWins is closed")
            self._submitted += 1
            self._put(0, (self._submitted, key, value))
            return self._submitted

    def latest(self) -> Finished | None:
        """The newest finished request, or None before the first finishes."""
        with self._cond:
            return self._finished

    @property
    def submitted(self) -> int:
        return self._submitted

    def idle(self) -> bool:
        """True when no request is waiting or being worked on."""
        with self._cond:
            return not any(self._busy) and all(s is None for s in self._slots)

    def wait(self, predicate: Callable[["LatestWins"], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(self)`` holds (checked whenever a stage takes or finishes a request);
        returns whether it held before ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def taken(self, seq: int) -> bool:
        """Whether request ``seq`` has left the first mailbox (taken by the first stage, or dropped)."""
        first = self._slots[0]
        return first is None or first[0] > seq

    def finished_seq(self) -> int:
        return self._finished.seq if self._finished is not None else 0

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads after the stages' current calls return; waiting requests are dropped."""
        with self._cond:
            self._closed = True
            self._slots = [None] * len(self._stages)
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # ------------------------------------------------------------------------------------ workers
    def _wait_finished(self, seq: int) -> None:
        """Block until request ``seq`` has left the last stage (or the worker closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._finished is not None and self._finished.seq >= seq))

    def _put(self, stage: int, item: tuple) -> None:
        """(Under the lock.) Put an item in a stage's mailbox, dropping an older one still waiting there
        (items reach a mailbox in submission order, so the one waiting is always the older)."""
        if self._slots[stage] is not None:
            self.dropped += 1
        self._slots[stage] = item
        self._cond.notify_all()

    def _run(self, stage: int) -> None:
        func, last = self._stages[stage], stage == len(self._stages) - 1
        follow_up = getattr(func, "follow_up", None)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._slots[stage] is not None)
                if self._closed:
                    return
                seq, key, value = self._slots[stage]
                self._slots[stage] = None
                self._busy[stage] = True
                self._cond.notify_all()
            error = None
            try:
                value = func(value)
            except Exception as exc:  # noqa: BLE001 - handed to the caller with its request
                value, error = None, exc
            with self._cond:
                if error is None and not last:
                    self._put(stage + 1, (seq, key, value))
                elif self._finished is None or seq > self._finished.seq:
                    self._finished = Finished(seq, key, value, error)
                self._busy[stage] = follow_up is not None
                self._cond.notify_all()
            if follow_up is not None:
                try:
                    follow_up(lambda seq=seq: self._wait_finished(seq))
                except Exception:  # noqa: BLE001 - an optimisation: the next request does the work itself
                    pass
                with self._cond:
                    self._busy[stage] = False
                    self._cond.notify_all()
