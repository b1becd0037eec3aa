"""The detection loop of ``bpnet inference`` and ``bpnet evaluate``: pictures in, people out.

``detect(predictor, pictures)`` yields one Detection per picture, in input
order: the item, the decoded picture, its People (original-image pixels) and
the step timings. Pictures are read ``window`` batches at a time (stopping
early at ``WINDOW_PIXELS``) and sent through the Predictor's three steps
(prepare, infer, finish) together; the network inputs of one window are
grouped by their planned shape and run ``batch_size`` at a time, so a folder
of mixed sizes still fills its batches. ``window=1`` takes one batch at a
time: a webcam read with batch size 1 gets each frame's people as soon as it
arrives.

``threaded=True`` overlaps the steps (bpnet.infer.overlap): reading and
decoding the next pictures, preprocessing, the network and decoding the maps
run in four threads, and the results come out in order, equal to a
sequential run's (each batch is made of the same pictures either way).

A picture file that cannot be read (missing, corrupt, not an image) becomes
a Detection with ``error`` set and no image or people; the run goes on.
``strict=True`` raises its ImageReadError instead.

``RunTimer`` summarises a run's timings the one way both commands report
them: wall milliseconds per picture, pictures per second and the median of
each step.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .sources import Item

#: The per-picture timings the Predictor reports, in seconds.
STEPS = ("preprocess_s", "network_s", "decode_s")


@dataclasses.dataclass
class Detection:
    """What one picture gave."""

    item: Item
    image: Optional[np.ndarray] = None  # the picture as read (BGR); None if unreadable
    people: object = None  # People; None if unreadable
    timings: dict = dataclasses.field(default_factory=dict)  # seconds per step (STEPS)
    error: Optional[str] = None  # why the picture could not be read

    @property
    def ok(self) -> bool:
        return self.error is None


#: Pictures read ahead per network batch, for grouping by size (``detect``'s ``window``).
GROUP_WINDOW = 8
#: A window also ends at this many decoded pixels (bounds memory on huge pictures).
WINDOW_PIXELS = 64_000_000


def detect(predictor, pictures: Iterable, batch_size: Optional[int] = None, *,
           strict: bool = False, window: int = GROUP_WINDOW, threaded: bool = False,
           ) -> Iterator[Detection]:
    """People on each picture, one Detection per picture, in order.

    ``pictures``: Items (read from ``item.file``), ``(Item, image)`` pairs
    (pictures already decoded, such as video frames), image paths, or BGR
    arrays. ``batch_size``: network inputs per network call (default: the
    predictor's batch size). ``window``: batches read ahead and grouped by
    input shape. ``threaded``: overlap reading, preprocessing, network and
    decoding (same results).
    """
    from .overlap import pipeline
    size = max(1, int(batch_size or predictor.batch_size))
    chunks = _chunks(pictures, size * max(1, int(window)), strict)

    def prepare(chunk):
        good = [d for d in chunk if d.ok]
        return chunk, good, predictor.prepare([d.image for d in good]) if good else None

    def infer(work):
        chunk, good, prep = work
        if prep is not None:
            predictor.infer(prep, size)
        return work

    def finish(work):
        chunk, good, prep = work
        if prep is not None:
            for d, (people, timings) in zip(good, predictor.finish(prep)):
                d.people, d.timings = people, timings
        return chunk

    # The network stage gets as many threads as the runner takes calls at once.
    for chunk in pipeline(chunks, [prepare, infer, finish], threaded=threaded,
                          name="bpnet-detect", workers=[1, predictor.runner.parallel_calls, 1]):
        yield from chunk


def _chunks(pictures: Iterable, limit: int, strict: bool) -> Iterator[list]:
    """Detections (pictures read) in chunks of ``limit`` or ``WINDOW_PIXELS``."""
    counter = itertools.count()
    chunk, pixels = [], 0
    for p in pictures:
        d = _load(p, next(counter), strict)
        chunk.append(d)
        if d.image is not None:
            pixels += d.image.shape[0] * d.image.shape[1]
        if len(chunk) >= limit or pixels >= WINDOW_PIXELS:
            yield chunk
            chunk, pixels = [], 0
    if chunk:
        yield chunk


def _load(picture, k: int, strict: bool) -> Detection:
    from .preprocess import ImageReadError, read_image
    if isinstance(picture, tuple):
        item, image = picture
        return Detection(item, image)
    if isinstance(picture, np.ndarray):
        return Detection(Item(f"<image {k}>", None, k), picture)
    item = picture if isinstance(picture, Item) else Item(str(picture), Path(picture), k)
    try:
        return Detection(item, read_image(item.file))
    except ImageReadError as e:
        if strict:
            raise
        return Detection(item, error=str(e))


class RunTimer:
    """A run's timing summary: wall time per picture and each step's median.

    Medians, because the first pictures also pay one-off costs (graph tracing,
    the decoder's JIT cache) that a mean would spread over a short run. The
    wall clock starts when the timer is made.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = {k: [] for k in STEPS}
        self.count = 0

    def fps(self) -> float:
        """Pictures per wall second so far."""
        wall = time.perf_counter() - self.start
        return round(self.count / wall, 2) if wall > 0 else 0.0

    def add(self, timings: dict):
        """Count one picture with its Predictor timings."""
        self.count += 1
        for k in STEPS:
            self.steps[k].append(float(timings.get(k, 0.0)))

    def summary(self) -> dict:
        """{ms_per_image, fps, preprocess_ms_median, network_ms_median, decode_ms_median}."""
        wall = time.perf_counter() - self.start

        def ms(v):
            return round(1000 * float(np.median(v)), 2) if v else 0.0
        return {"ms_per_image": round(1000 * wall / max(self.count, 1), 2),
                "fps": round(self.count / wall, 2) if wall > 0 else 0.0,
                "preprocess_ms_median": ms(self.steps["preprocess_s"]),
                "network_ms_median": ms(self.steps["network_s"]),
                "decode_ms_median": ms(self.steps["decode_s"])}
