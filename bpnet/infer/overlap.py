"""An ordered pipeline of stages that run at the same time, one thread per stage.

``pipeline(source, stages)`` pulls items from the iterator ``source`` in one
thread, passes each through ``stages[0]``, ``stages[1]``, ... each in a
thread of its own, and yields the last stage's results in the order the
source gave them (every stage is one thread working first-in first-out, so
order needs no bookkeeping). Small bounded queues between the threads keep
memory flat: a slow stage holds up the ones before it instead of letting
them run ahead. While the network stage computes one batch, the reader
decodes the next frames and the decoder turns the previous maps into
people; the slowest stage (the network) then runs back to back.

An exception in any stage (or in the source) is re-raised in the consumer
after the items before it, with its original type. Closing the generator
(the consumer stops early, or Ctrl-C reaches the consumer) stops every
thread within about a tenth of a second after the call it is in returns.
``threaded=False`` runs the same stages one after the other in the caller's
thread: the same results, for comparison and debugging.

``workers`` gives a stage several threads (e.g. the network stage with two
OpenVINO streams, two frames in flight): they take items in order, compute
at the same time, and hand results on in the order they took them, so the
output order is still the source's.

Pure Python (threading, queue); nothing of bpnet's.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence

_END = object()
_POLL_S = 0.1


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return _END


def _reader(source: Iterator, out: queue.Queue, stop: threading.Event):
    try:
        for item in source:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, re-raised there
        _put(out, _Failure(e), stop)
        return
    _put(out, _END, stop)


class _Turnstile:
    """The workers of one stage: items are taken one at a time with a ticket, and results
    leave in ticket order (with one worker, simply first in, first out)."""

    def __init__(self):
        self.take = threading.Lock()
        self.turn = threading.Condition()
        self.next_ticket = 0
        self.next_out = 0
        self.done = False

    def get(self, inp: queue.Queue, stop: threading.Event):
        with self.take:
            if self.done:
                return None, _END
            item = _get(inp, stop)
            if item is _END or isinstance(item, _Failure):
                self.done = True
            ticket = self.next_ticket
            self.next_ticket += 1
            return ticket, item

    def put(self, ticket: int, out: queue.Queue, item, stop: threading.Event) -> bool:
        with self.turn:
            while self.next_out != ticket:
                if stop.is_set():
                    return False
                self.turn.wait(timeout=_POLL_S)
            ok = _put(out, item, stop)
            self.next_out += 1
            self.turn.notify_all()
            return ok


def _worker(fn: Callable, inp: queue.Queue, out: queue.Queue, stop: threading.Event,
            gate: _Turnstile):
    while True:
        ticket, item = gate.get(inp, stop)
        if ticket is None:  # another worker took the end
            return
        if item is _END or isinstance(item, _Failure):
            gate.put(ticket, out, item, stop)
            return
        try:
            result = fn(item)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, re-raised there
            gate.done = True  # no more items taken (a plain flag: the lock may be busy)
            gate.put(ticket, out, _Failure(e), stop)
            return
        if not gate.put(ticket, out, result, stop):
            return


def pipeline(source: Iterable, stages: Sequence[Callable], *, threaded: bool = True,
             queue_size: int = 2, name: str = "bpnet",
             workers: Optional[Sequence[int]] = None) -> Iterator:
    """Each source item through every stage, results in source order (see the module doc).

    ``workers``: threads per stage (default one each).
    """
    if not threaded:
        for item in source:
            for fn in stages:
                item = fn(item)
            yield item
        return
    stop = threading.Event()
    queues = [queue.Queue(maxsize=max(1, queue_size)) for _ in range(len(stages) + 1)]
    threads = [threading.Thread(target=_reader, args=(iter(source), queues[0], stop),
                                name=f"{name}-read", daemon=True)]
    counts = list(workers) if workers is not None else [1] * len(stages)
    if len(counts) != len(stages) or min(counts, default=1) < 1:
        raise ValueError(f"workers {counts}: one count >= 1 per stage")
    for k, fn in enumerate(stages):
        gate = _Turnstile()  # one per stage, shared by its workers
        for j in range(counts[k]):
            tag = f"{k + 1}.{j + 1}" if counts[k] > 1 else f"{k + 1}"
            threads.append(threading.Thread(target=_worker,
                                            args=(fn, queues[k], queues[k + 1], stop, gate),
                                            name=f"{name}-stage{tag}", daemon=True))
    for t in threads:
        t.start()
    try:
        while True:
            item = _get(queues[-1], stop)
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        for t in threads:
            # A stage in the middle of a network call finishes that call first.
            t.join(timeout=30)
