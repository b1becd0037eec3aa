"""``bpnet inference``: run a model on an image, a folder, a list, a video or a webcam.

Inputs (--input_type; see bpnet.infer.sources):
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

import json
import logging
import math
import os
from pathlib import Path

from ..errors import BpnetError
from ..infer.sources import INPUT_TYPES, Item, collect_inputs, is_webcam
from ..io import write_bytes_atomic

log = logging.getLogger("bpnet.inference")


def run_inference(inference_spec, model_filename=None, input_type="dir", input_path=None,
                  results_dir="results/inference", image_root_path=None, key=None,
                  dump_visualizations=False, batch_size=4, max_frames=0, status=None,
                  progress=True) -> dict:
    """The ``bpnet inference`` task body; returns the summary stored in status.json."""
    if input_type not in INPUT_TYPES:
        raise BpnetError(f"--input_type {input_type!r}: choose one of {', '.join(INPUT_TYPES)}")
    if input_path is None:
        raise BpnetError("--input is required")
    from ..infer.outputs import spec_doc
    from ..infer.predictor import Predictor
    from ..specs import load_inference_spec
    spec = load_inference_spec(inference_spec) if inference_spec else None
    out = Path(results_dir)
    # Check inputs before paying for the model load.
    items, skipped = ([], []) if input_type == "video" else collect_inputs(
        input_type, input_path, image_root_path)
    if input_type == "video" and not is_webcam(input_path) and not Path(input_path).is_file():
        raise BpnetError(f"--input {input_path}: video file not found")
    predictor = Predictor(spec, model_path=model_filename, key=key, batch_size=batch_size)
    doc = spec_doc(predictor, inference_spec)
    if input_type == "video":
        return _run_video(predictor, input_path, out, doc, dump_visualizations, batch_size,
                          max_frames, status, progress)
    return _run_images(predictor, items, skipped, out, doc, dump_visualizations,
                       batch_size, status, progress, single=input_type == "image")


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


def _run_images(predictor, items, skipped, out: Path, doc, dump, batch_size, status,
                progress, single=False) -> dict:
    import cv2

    from ..infer.detect import RunTimer, detect
    from ..infer.draw import draw_people
    from ..infer.outputs import coco_results, image_entry, write_detections

    entries, coco = [], []
    used_names: set = set()
    n_people = 0
    timer = RunTimer()
    bar = _progress_bar(len(items), "inference", progress)
    # A lone --input_type image that cannot be read is the command's error.
    for done, d in enumerate(detect(predictor, items, batch_size, strict=single), start=1):
        if d.ok:
            timer.add(d.timings)
            entries.append(image_entry(d.item.path, d.people, image_id=d.item.image_id,
                                       hw=d.image.shape[:2]))
            coco.extend(coco_results(d.people, d.item.image_id))
            n_people += len(d.people)
            if dump:
                vis = draw_people(d.image, d.people.keypoints, predictor.pose, d.people.scores,
                                  d.people.boxes)
                name = _annotated_name(d.item, used_names)
                ok, buf = cv2.imencode(Path(name).suffix, vis)
                if ok:
                    write_bytes_atomic(out / "images_annotated" / name, buf.tobytes())
        else:
            log.warning("skipping %s", d.error)
            skipped.append({"path": d.item.path, "reason": d.error})
        bar.update(1)
        if status is not None:
            status.progress(done, len(items), "inference")
    bar.close()
    if not entries:
        raise BpnetError(f"none of the {len(items)} input images could be read "
                         f"(first problem: {skipped[-1]['reason'] if skipped else '?'})")
    summary = {"images": len(entries), "skipped": len(skipped), "people": n_people,
               **timer.summary()}
    write_detections(out, predictor.pose, doc, entries, coco, skipped)
    log.info("inference: %d images (%d skipped), %d people, %.1f ms/image (median: network "
             "%.1f, decode %.1f) -> %s", len(entries), len(skipped), n_people,
             summary["ms_per_image"], summary["network_ms_median"], summary["decode_ms_median"],
             out)
    return summary


def _run_video(predictor, source, out: Path, doc, dump, batch_size, max_frames, status,
               progress) -> dict:
    import cv2

    from ..infer.detect import RunTimer, detect
    from ..infer.draw import draw_people
    from ..infer.outputs import coco_results, image_entry, write_detections
    from ..infer.sources import Mp4Writer, frames, open_video
    from ..infer.track import Tracker

    cap, is_cam = open_video(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not fps or math.isnan(fps) or fps > 240:  # unknown or nonsense: a common default
        fps = 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not is_cam else 0
    if max_frames:
        total = min(total, max_frames) if total > 0 else max_frames
    stem = f"webcam{int(source)}" if is_cam else Path(source).stem
    label = f"webcam:{int(source)}" if is_cam else str(source)
    tracker = Tracker()
    entries, coco, lines = [], [], []
    n_people = 0
    writer = None
    bar = _progress_bar(total or None, "video", progress)
    timer = RunTimer()
    interrupted = False
    # A webcam's frames are shown as they come: no waiting for a batch.
    pictures = detect(predictor, frames(cap, label, max_frames), 1 if is_cam else batch_size)
    try:
        for d in pictures:
            k, frame, people = d.item.frame, d.image, d.people
            ids = tracker.update(people.keypoints)
            entries.append(image_entry(d.item.path, people, image_id=k, hw=frame.shape[:2],
                                       frame=k, track_ids=[int(i) for i in ids]))
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
            timer.add(d.timings)
            if dump:
                if writer is None:
                    writer = Mp4Writer(out / "images_annotated" / f"{stem}_annotated.mp4",
                                       fps, (frame.shape[1], frame.shape[0]))
                writer.write(draw_people(frame, people.keypoints, predictor.pose,
                                         people.scores, people.boxes, ids=ids))
            bar.update(1)
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
    summary = {"frames": len(entries), "skipped": 0, "people": n_people, **timer.summary(),
               "tracks": tracker.ids_given}
    write_bytes_atomic(out / f"{stem}_frames.jsonl", ("\n".join(lines) + "\n").encode())
    write_detections(out, predictor.pose, doc, entries, coco)
    if interrupted:
        summary["interrupted"] = True
    log.info("video: %d frames, %d people, %d tracks, %.1f ms/frame -> %s", summary["frames"],
             n_people, summary["tracks"], summary["ms_per_image"], out)
    return summary
