"""Decoding image files so that a damaged one is refused, never half-used.

OpenCV returns pixels for a JPEG that libjpeg could only partly read
("Corrupt JPEG data: premature end of data segment", "N extraneous bytes
before marker"): libjpeg reports those only as a warning on the C stderr,
and the missing part comes out grey. ``decode_image`` treats such a warning
as a corrupt image. How it sees the warning: around ``cv2.imdecode`` of a
JPEG, file descriptor 2 is pointed at a scratch file (libjpeg writes there),
then restored; anything else written to stderr meanwhile (other threads) is
passed on unchanged. The redirect is process-wide, so JPEG decodes that
check warnings take turns within one process (a lock); the extra cost is a
few system calls, at most tens of microseconds next to a millisecond or more
of decoding (scripts/bench_image_check.py; docs/reliability.md).

Cheap structural checks come first: an empty file, a JPEG without its
end-of-image marker, a PNG without its IEND chunk.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading

import numpy as np

_LOCK = threading.Lock()
_SCRATCH: dict = {}  # pid -> fd of this process's scratch file
# What libjpeg(-turbo) writes for a warning it recovers from (jerror.h texts).
# Warnings about the file's data; others (e.g. an unknown JFIF revision) pass through.
_LIBJPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
                     "Inconsistent progression sequence")
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def structural_problem(data) -> str | None:
    """What is visibly wrong with an encoded image's bytes (no decoding), or None."""
    n = len(data)
    if n == 0:
        return "empty file (0 bytes)"
    head = bytes(data[:8])
    if head[:2] == JPEG_SOI:
        # Some writers append bytes after the marker: look at the last 4 KiB.
        if JPEG_EOI not in bytes(data[-4096:]):
            return "truncated JPEG (no end-of-image marker)"
    elif head == PNG_SIGNATURE:
        if b"IEND" not in bytes(data[-64:]):
            return "truncated PNG (no IEND chunk)"
    return None


def file_problem(path) -> str | None:
    """``structural_problem`` of a file from its first and last bytes only (cheap enough
    for every training sample); also a missing or unreadable file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if size > 4096 + 8:
                f.seek(size - 4096)
            tail = f.read()
    except OSError as e:
        return open_problem(e)
    if size == 0:
        return "empty file (0 bytes)"
    if head[:2] == JPEG_SOI and JPEG_EOI not in (head + tail)[-4096:]:
        return "truncated JPEG (no end-of-image marker)"
    if head == PNG_SIGNATURE and b"IEND" not in tail[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def _scratch_fd() -> int:
    fd = _SCRATCH.get(os.getpid())
    if fd is None:
        f = tempfile.TemporaryFile(prefix="bpnet-stderr-")
        fd = os.dup(f.fileno())
        f.close()
        _SCRATCH.clear()  # a forked child must not share its parent's file
        _SCRATCH[os.getpid()] = fd
    return fd


def _decode_watching_stderr(buf: np.ndarray, flags: int):
    """cv2.imdecode with fd 2 pointed at a scratch file; (image, libjpeg warning or None)."""
    import cv2
    with _LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            scratch = _scratch_fd()
            saved = os.dup(2)
        except OSError:  # no stderr to redirect (closed): decode without the check
            return cv2.imdecode(buf, flags), None
        os.lseek(scratch, 0, os.SEEK_SET)
        os.ftruncate(scratch, 0)
        os.dup2(scratch, 2)
        try:
            img = cv2.imdecode(buf, flags)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(scratch, 0, os.SEEK_END)
        text = os.pread(scratch, size, 0).decode("utf-8", "replace") if size else ""
    warning, others = None, []
    for line in text.splitlines(keepends=True):
        if warning is None and any(w in line for w in _LIBJPEG_WARNINGS):
            warning = line.strip()
        else:
            others.append(line)
    if others:  # not ours: pass it on
        with contextlib.suppress(OSError):
            os.write(2, "".join(others).encode())
    return img, warning


def decode_image(data, flags: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """Decode an encoded image (bytes or a uint8 array) with OpenCV.

    Returns (image, None) or (None, problem): empty, truncated, not decodable,
    too large for OpenCV, or a JPEG that libjpeg warned about (corrupt).
    ``flags``: cv2.imread flags (default IMREAD_UNCHANGED).
    """
    import cv2
    if flags is None:
        flags = cv2.IMREAD_UNCHANGED
    problem = structural_problem(data)
    if problem:
        return None, problem
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    try:
        if bytes(buf[:2]) == JPEG_SOI:
            img, warning = _decode_watching_stderr(buf, flags)
        else:
            img, warning = cv2.imdecode(buf, flags), None
    except cv2.error as e:  # e.g. over OpenCV's pixel limit
        return None, f"cannot decode ({str(e).strip().splitlines()[-1]})"
    if warning is not None:
        return None, f"corrupt JPEG (the decoder warned: {warning})"
    if img is None or img.size == 0:
        return None, "not a decodable image (corrupt or unsupported format)"
    return img, None


#: What a folder given as an image file is told.
FOLDER_PROBLEM = "is a folder, not an image file"


def open_problem(e: OSError) -> str:
    """What an OSError from opening an image file means, in a user's words."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return FOLDER_PROBLEM
    return f"cannot read ({e.strerror or e})"


def read_image_file(path, flags: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """``decode_image`` of a file: (image, None) or (None, problem); the problem
    includes a missing, unreadable or folder path (``open_problem``)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # any file name, also non-ASCII
    except OSError as e:
        return None, open_problem(e)
    return decode_image(data, flags)


@functools.lru_cache(maxsize=16)
def normalization_lut(scale: tuple, offset: tuple) -> np.ndarray:
    """cv2.LUT's table for x / scale - offset: [1, 256, C] float32, value v of channel c.

    The same float32 numbers as the formula on each pixel, several times faster as one
    lookup (training samples, inference pictures). Read-only: it is shared.
    """
    v = np.arange(256, dtype=np.float32)[:, None]
    table = (v / np.asarray(scale, np.float32) - np.asarray(offset, np.float32)).reshape(1, 256, -1)
    table.setflags(write=False)
    return table
