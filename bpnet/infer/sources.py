"""Where pictures come from: image files, folders, JSON lists, videos and webcams.

- ``collect_inputs``: the pictures of an image, a folder (sorted by name, not
  recursive; other files skipped with a warning) or a JSON file (a list of
  paths, or a COCO-style object with ``images[].file_name`` whose ``id``
  becomes the image id), as Items; inputs that cannot be pictures are
  reported as skipped, before any pixel is read.
- ``open_video`` / ``frames``: a video file (anything OpenCV's FFmpeg backend
  reads), a webcam index or a stream address (rtsp://, http://, ...), frame by frame.
- ``Mp4Writer``: an annotated video that appears only when complete.

Everything that cannot be used at all is one BpnetError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..errors import BpnetError

# Its warnings are about the inference command's --input, and read as such.
log = logging.getLogger("bpnet.inference")

INPUT_TYPES = ("image", "dir", "json", "video")


@dataclasses.dataclass
class Item:
    """One picture to process."""

    path: str  # as shown in detections.json
    file: Optional[Path]  # where to read it; None when the picture comes decoded (a frame)
    image_id: object
    frame: Optional[int] = None  # the frame number of a video picture


# ----------------------------------------------------------------- pictures

def collect_inputs(input_type: str, input_path: str, image_root_path=None
                   ) -> Tuple[List[Item], list]:
    """Pictures to process, and the inputs skipped before reading any pixel."""
    from .preprocess import is_image_file
    skipped = []
    if input_type == "image":
        p = Path(input_path)
        if not p.exists():
            raise BpnetError(f"--input {p}: file not found")
        if p.is_dir():
            raise BpnetError(f"--input {p}: is a folder; use --input_type dir")
        return [Item(str(p), p, 0)], skipped
    if input_type == "dir":
        d = Path(input_path)
        if not d.is_dir():
            raise BpnetError(f"--input {d}: not a folder (--input_type dir)")
        items = []
        for f in sorted(d.iterdir()):
            if f.is_dir():
                continue
            if not is_image_file(f):
                log.warning("skipping %s: not an image file (by its extension)", f)
                skipped.append({"path": str(f), "reason": "not an image file"})
                continue
            items.append(Item(str(f), f, len(items)))
        if not items:
            raise BpnetError(f"--input {d}: no image files in this folder")
        return items, skipped
    if input_type == "json":
        return _json_inputs(Path(input_path), image_root_path)
    raise BpnetError(f"--input_type {input_type!r}: choose one of {', '.join(INPUT_TYPES)}")


def _json_inputs(path: Path, root) -> Tuple[List[Item], list]:
    if not path.is_file():
        raise BpnetError(f"--input {path}: file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BpnetError(f"--input {path}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        entries = []
        for k, im in enumerate(doc["images"]):
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
                raise BpnetError(f"--input {path}: images[{k}] has no file_name")
            entries.append((im["file_name"], im.get("id", k)))
    elif isinstance(doc, list):
        entries = []
        for k, name in enumerate(doc):
            if not isinstance(name, str):
                raise BpnetError(f"--input {path}: entry {k} is {name!r}, expected a path string")
            entries.append((name, k))
    else:
        raise BpnetError(f"--input {path}: expected a list of image paths or a COCO-style "
                         "object with an 'images' list")
    if not entries:
        raise BpnetError(f"--input {path}: lists no images")
    items, skipped = [], []
    for name, image_id in entries:
        if root is not None:
            f = Path(root) / name
        else:
            # As given first; a relative path that is not there may be
            # relative to the list itself.
            f = Path(name)
            if not f.is_absolute() and not f.exists() and (path.parent / name).exists():
                f = path.parent / name
        if not f.is_file():
            log.warning("skipping %s: file not found (%s)", name, f)
            skipped.append({"path": str(f), "reason": "file not found"})
            continue
        items.append(Item(str(f), f, image_id))
    if not items:
        raise BpnetError(f"--input {path}: none of the {len(entries)} listed images exist "
                         f"(first: {skipped[0]['path']}); check --image_root_path")
    return items, skipped


# ----------------------------------------------------------------- video

def is_webcam(source) -> bool:
    """A bare number names a webcam, unless a file of that name exists."""
    return str(source).strip().isdigit() and not Path(str(source)).exists()


_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]*@)?(.*)$", re.S)
STREAM_TIMEOUT_S = 15  # to open a stream, and for each frame read from it


def is_stream(source) -> bool:
    """An address (rtsp://, rtmp://, http(s)://, udp://, ...) names a network stream, read
    live as a webcam is."""
    return bool(_URL.match(str(source).strip()))


def public_address(source) -> str:
    """A stream address without the password in it (``user:secret@`` -> ``user:***@``): what
    logs, messages and output files show."""
    m = _URL.match(str(source).strip())
    if not m or not m.group(2) or ":" not in m.group(2):
        return str(source).strip()  # no password in it
    user = m.group(2)[:-1].split(":", 1)[0]
    return f"{m.group(1)}{user}:***@{m.group(3)}"


def stream_stem(source) -> str:
    """A file-name stem for a stream's outputs: the last part of the address's path without
    its extension and query (``rtsp://cam/live/ch1`` -> ``ch1``), or ``stream``."""
    path = _URL.match(str(source).strip()).group(3).split("?", 1)[0].split("#", 1)[0]
    parts = path.rstrip("/").split("/")
    last = os.path.splitext(parts[-1])[0] if len(parts) > 1 else ""
    last = re.sub(r"[^A-Za-z0-9_-]+", "_", last).strip("_")
    return last or "stream"


def video_names(source) -> Tuple[str, str]:
    """(stem of a video run's output files, label of its frames in detections.json) for a
    video file, a webcam index or a stream address (without its password)."""
    if is_webcam(source):
        return f"webcam{int(source)}", f"webcam:{int(source)}"
    if is_stream(source):
        return stream_stem(source), public_address(source)
    return Path(source).stem, str(source)


def open_video(source: str):
    """(cv2.VideoCapture, live) for a file, a webcam index or a stream address; ``live``: a
    webcam or a stream (frames as they come, no frame count). BpnetError if unreadable."""
    import cv2
    if is_webcam(source):
        cap = cv2.VideoCapture(int(source))
        if not cap.isOpened():
            raise BpnetError(f"--input {source}: cannot open webcam {int(source)}")
        return cap, True
    if is_stream(source):
        # Bounded waits: an address that does not answer is an error, not a hang.
        ms = STREAM_TIMEOUT_S * 1000
        cap = cv2.VideoCapture(str(source).strip(), cv2.CAP_FFMPEG,
                               [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        if not cap.isOpened():
            raise BpnetError(f"--input {public_address(source)}: cannot open the stream (no "
                             f"answer within {STREAM_TIMEOUT_S} s, or a protocol or format "
                             "OpenCV's FFmpeg cannot read)")
        return cap, True
    p = Path(source)
    if not p.is_file():
        raise BpnetError(f"--input {p}: video file not found")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise BpnetError(f"--input {p}: cannot open as a video (corrupt or unsupported format)")
    return cap, False


def frames(cap, label: str, max_frames: int = 0) -> Iterator[Tuple[Item, np.ndarray]]:
    """(Item, BGR frame) pairs until the video ends (or after ``max_frames``; 0: all).

    Each frame's Item is ``LABEL#frame=K`` with image id and frame number K.
    """
    k = 0
    while not max_frames or k < max_frames:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        yield Item(f"{label}#frame={k}", None, k, frame=k), frame
        k += 1


class Mp4Writer:
    """An mp4 written under a temporary name and renamed when complete."""

    def __init__(self, path: Path, fps: float, size_wh):
        import cv2
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"),
                                      fps, tuple(size_wh))
        if not self.writer.isOpened():
            raise BpnetError(f"{path}: OpenCV cannot write an mp4v video here")

    def write(self, frame):
        self.writer.write(frame)

    def close(self, keep: bool):
        """Release the file; ``keep``: give it its name, else delete it."""
        self.writer.release()
        if keep:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
