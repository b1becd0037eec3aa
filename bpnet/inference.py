"""`bpnet inference`: run a model on an image, a folder, a list, a video or a webcam.

Inputs (--input_type):
- image: one picture file.
- dir: every picture in a folder (sorted by name; not recursive); other
  files are skipped with a warning.
- json: a JSON list of picture paths, or a COCO-style file with
  ``images[].file_name`` (their ``id`` becomes the COCO result's image_id);
  paths are relative to --image_root_path (default: as given, then the JSON
  file's folder).
- video: a video file (anything OpenCV's FFmpeg backend reads: mp4, avi, ...)
  or a webcam index (``--input 0``).

A picture that cannot be used (missing, corrupt, not an image) is skipped
with a warning and listed under "skipped" in detections.json; every good
picture is still processed. Only when nothing at all can be read does the
command fail. Outputs are written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .errors import BpnetError
from .io import write_bytes_atomic, write_json_atomic

log = logging.getLogger("bpnet.inference")

INPUT_TYPES = ("image", "dir", "json", "video")


@dataclasses.dataclass
class Item:
    path: str  # as shown in detections.json
    file: Optional[Path]  # where to read it
    image_id: object


# ----------------------------------------------------------------- inputs

def collect_inputs(input_type: str, input_path: str, image_root_path=None) -> Tuple[List[Item], list]:
    """Pictures to process, and the inputs skipped before reading any pixel."""
    from .infer.preprocess import is_image_file
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


# ----------------------------------------------------------------- run

def run_inference(inference_spec, model_filename=None, input_type="dir", input_path=None,
                  results_dir="results/inference", image_root_path=None, key=None,
                  dump_visualizations=False, batch_size=4, max_frames=0, status=None,
                  progress=True) -> dict:
    if input_type not in INPUT_TYPES:
        raise BpnetError(f"--input_type {input_type!r}: choose one of {', '.join(INPUT_TYPES)}")
    if input_path is None:
        raise BpnetError("--input is required")
    from .infer.predictor import Predictor
    from .specs import load_inference_spec
    spec = load_inference_spec(inference_spec) if inference_spec else None
    out = Path(results_dir)
    # Check inputs before paying for the model load.
    items, skipped = ([], []) if input_type == "video" else collect_inputs(
        input_type, input_path, image_root_path)
    if input_type == "video" and not _is_webcam(input_path) and not Path(input_path).is_file():
        raise BpnetError(f"--input {input_path}: video file not found")
    predictor = Predictor(spec, model_path=model_filename, key=key, batch_size=batch_size)
    spec_doc = _spec_doc(predictor, inference_spec)
    if input_type == "video":
        return _run_video(predictor, input_path, out, spec_doc, dump_visualizations, batch_size,
                          max_frames, status, progress)
    return _run_images(predictor, items, skipped, out, spec_doc, dump_visualizations,
                       batch_size, status, progress, single=input_type == "image")


def _spec_doc(predictor, spec_path) -> dict:
    d = dataclasses.asdict(predictor.spec)
    d["model_path"] = predictor.runner.path
    d["spec_file"] = str(spec_path) if spec_path else None
    # What was actually used when the model forced changes (fixed-size ONNX).
    d["input_shape_used"] = predictor.input_shape
    d["keep_aspect_ratio_mode_used"] = predictor.mode
    return d


def _progress_bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                leave=False)


def _annotated_name(item: Item, used: set) -> str:
    base = Path(item.path).name
    stem, suf = os.path.splitext(base)
    suf = suf.lower() if suf.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".png"
    name, k = stem + suf, 1
    while name in used:
        name, k = f"{stem}_{k}{suf}", k + 1
    used.add(name)
    return name


def _run_images(predictor, items, skipped, out: Path, spec_doc, dump, batch_size, status,
                progress, single=False) -> dict:
    from .infer.draw import draw_people
    from .infer.outputs import coco_results, detections_doc, image_entry
    from .infer.preprocess import ImageReadError, read_image
    import cv2

    entries, coco = [], []
    used_names: set = set()
    times = {"network_s": [], "decode_s": [], "preprocess_s": []}
    n_people = 0
    t_start = time.perf_counter()
    bar = _progress_bar(len(items), "inference", progress)
    done = 0
    for c0 in range(0, len(items), max(1, batch_size)):
        chunk = items[c0:c0 + batch_size]
        good, pics = [], []
        for it in chunk:
            try:
                pics.append(read_image(it.file))
                good.append(it)
            except ImageReadError as e:
                if single:
                    raise
                log.warning("skipping %s", e)
                skipped.append({"path": it.path, "reason": str(e)})
        results = predictor.predict_many(pics) if pics else []
        for it, img, (people, t) in zip(good, pics, results):
            entries.append(image_entry(it.path, people, image_id=it.image_id, hw=img.shape[:2]))
            coco.extend(coco_results(people, it.image_id))
            n_people += len(people)
            for k in times:
                times[k].append(t[k])
            if dump:
                vis = draw_people(img, people.keypoints, predictor.pose, people.scores,
                                  people.boxes)
                name = _annotated_name(it, used_names)
                ok, buf = cv2.imencode(Path(name).suffix, vis)
                if ok:
                    write_bytes_atomic(out / "images_annotated" / name, buf.tobytes())
        done += len(chunk)
        bar.update(len(chunk))
        if status is not None:
            status.progress(done, len(items), "inference")
    bar.close()
    if not entries:
        raise BpnetError(f"none of the {len(items)} input images could be read "
                         f"(first problem: {skipped[-1]['reason'] if skipped else '?'})")
    wall = time.perf_counter() - t_start
    write_json_atomic(out / "detections.json",
                      detections_doc(predictor.pose, spec_doc, entries, skipped))
    write_json_atomic(out / "detections_coco_format.json", coco, indent=None)
    summary = _summary(len(entries), len(skipped), n_people, times, wall)
    log.info("inference: %d images (%d skipped), %d people, %.1f ms/image (median: network "
             "%.1f, decode %.1f) -> %s", len(entries), len(skipped), n_people,
             summary["ms_per_image"], summary["network_ms_median"], summary["decode_ms_median"],
             out)
    return summary


def _summary(n, n_skipped, n_people, times, wall) -> dict:
    # Medians: the first picture also pays one-off costs (graph tracing, the
    # decoder's JIT cache) that a mean would spread over a short run.
    def ms(v):
        return round(1000 * float(np.median(v)), 2) if v else 0.0
    return {"images": n, "skipped": n_skipped, "people": n_people,
            "ms_per_image": round(1000 * wall / max(n, 1), 2),
            "preprocess_ms_median": ms(times["preprocess_s"]),
            "network_ms_median": ms(times["network_s"]),
            "decode_ms_median": ms(times["decode_s"])}


# ----------------------------------------------------------------- video

def _is_webcam(source) -> bool:
    return str(source).strip().isdigit() and not Path(str(source)).exists()


def open_video(source: str):
    """cv2.VideoCapture for a file or a webcam index; BpnetError if it cannot be read."""
    import cv2
    is_cam = _is_webcam(source)
    if is_cam:
        cap = cv2.VideoCapture(int(source))
        if not cap.isOpened():
            raise BpnetError(f"--input {source}: cannot open webcam {int(source)}")
        return cap, True
    p = Path(source)
    if not p.is_file():
        raise BpnetError(f"--input {p}: video file not found")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise BpnetError(f"--input {p}: cannot open as a video (corrupt or unsupported format)")
    return cap, False


def _frames(cap, max_frames) -> Iterator[Tuple[int, np.ndarray]]:
    k = 0
    while not max_frames or k < max_frames:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        yield k, frame
        k += 1


class _VideoOut:
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
        self.writer.release()
        if keep:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()


def _run_video(predictor, source, out: Path, spec_doc, dump, batch_size, max_frames, status,
               progress) -> dict:
    import cv2
    from .infer.draw import draw_people
    from .infer.outputs import coco_results, detections_doc, image_entry
    from .infer.track import Tracker

    cap, is_cam = open_video(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not fps or fps != fps or fps > 240:
        fps = 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not is_cam else 0
    if max_frames:
        total = min(total, max_frames) if total > 0 else max_frames
    stem = f"webcam{int(source)}" if is_cam else Path(source).stem
    label = f"webcam:{int(source)}" if is_cam else str(source)
    tracker = Tracker()
    entries, coco, lines = [], [], []
    times = {"network_s": [], "decode_s": [], "preprocess_s": []}
    n_people = 0
    writer = None
    bar = _progress_bar(total or None, "video", progress)
    t_start = time.perf_counter()
    frames = _frames(cap, max_frames)
    interrupted = False
    try:
        while True:
            batch = []
            for _ in range(max(1, batch_size if not is_cam else 1)):
                nxt = next(frames, None)
                if nxt is None:
                    break
                batch.append(nxt)
            if not batch:
                break
            results = predictor.predict_many([f for _, f in batch])
            for (k, frame), (people, t) in zip(batch, results):
                ids = tracker.update(people.keypoints)
                entries.append(image_entry(f"{label}#frame={k}", people, image_id=k,
                                           hw=frame.shape[:2], frame=k,
                                           track_ids=[int(i) for i in ids]))
                coco.extend(coco_results(people, k))
                lines.append(json.dumps({
                    "frame": k, "time_s": round(k / fps, 4),
                    "people": [{"id": int(ids[n]),
                                "keypoints": [[round(float(v), 2) for v in j]
                                              for j in people.keypoints[n]],
                                "score": round(float(people.scores[n]), 4),
                                "box": [round(float(v), 2) for v in people.boxes[n]]}
                               for n in range(len(people))]}))
                n_people += len(people)
                for key in times:
                    times[key].append(t[key])
                if dump:
                    if writer is None:
                        writer = _VideoOut(out / "images_annotated" / f"{stem}_annotated.mp4",
                                           fps, (frame.shape[1], frame.shape[0]))
                    writer.write(draw_people(frame, people.keypoints, predictor.pose,
                                             people.scores, people.boxes, ids=ids))
            bar.update(len(batch))
            if status is not None:
                status.progress(len(entries), total or None, "video")
    except KeyboardInterrupt:
        if not is_cam:
            if writer is not None:
                writer.close(keep=False)
            raise
        # Ctrl-C is how a webcam run ends: keep what was seen.
        interrupted = True
    except BaseException:
        if writer is not None:
            writer.close(keep=False)
        raise
    finally:
        cap.release()
        bar.close()
    if not entries:
        if writer is not None:
            writer.close(keep=False)
        raise BpnetError(f"--input {source}: no frame could be read (corrupt or empty video)")
    if total and len(entries) < total and not is_cam:
        log.warning("%s: read %d of the %d frames the container announces (the rest is "
                    "unreadable)", source, len(entries), total)
    if writer is not None:
        writer.close(keep=True)
    wall = time.perf_counter() - t_start
    write_bytes_atomic(out / f"{stem}_frames.jsonl", ("\n".join(lines) + "\n").encode())
    write_json_atomic(out / "detections.json", detections_doc(predictor.pose, spec_doc, entries))
    write_json_atomic(out / "detections_coco_format.json", coco, indent=None)
    summary = _summary(len(entries), 0, n_people, times, wall)
    summary["frames"] = summary.pop("images")
    summary["tracks"] = int(tracker._next_id - 1)
    if interrupted:
        summary["interrupted"] = True
    log.info("video: %d frames, %d people, %d tracks, %.1f ms/frame -> %s", summary["frames"],
             n_people, summary["tracks"], summary["ms_per_image"], out)
    return summary
