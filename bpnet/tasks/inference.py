"""``bpnet inference``: run a model on an image, a folder, a list, a video or a webcam.

Inputs (--input_type; see bpnet.infer.sources):
- image: one picture file.
- dir: every picture in a folder (sorted by name; not recursive); other
  files are skipped with a warning.
- json: a JSON list of picture paths, or a COCO-style file with
  ``images[].file_name`` (their ``id`` becomes the COCO result's image_id);
  paths are relative to --image_root_path (default: as given, then the JSON
  file's folder).
- video: a video file (anything OpenCV's FFmpeg backend reads: mp4, avi, ...),
  a webcam index (``--input 0``) or a stream address (``rtsp://...``, ``http://...``;
  read live like a webcam, its password never written out). A picture file is refused.

The network runs in the runtime asked for (--runtime / the spec's
``runtime``; auto: the fastest installed for the file; bpnet.infer.runners).
Reading, preprocessing, the network and decoding overlap in threads
(bpnet.infer.detect / overlap), with results in input order.

A picture that cannot be used (missing, corrupt, not an image) is skipped
with a warning and listed under "skipped" in detections.json; every good
picture is still processed. Only when nothing at all can be read does the
command fail.

One results dir holds one run: the outputs of a previous run there
(detections.json, detections_coco_format.json, the frames JSONL,
images_annotated/) are removed, with a warning, before the first new
result is written, so two runs' files never mix. Every file is written
atomically. detections.json (and the frames JSONL) are rewritten every
``CHECKPOINT_S`` seconds while a run goes on, marked ``"complete": false``;
Ctrl-C (or a failure half way) writes what was done, marked ``"complete":
false, "interrupted": true``, keeps the annotated pictures / the annotated
video of the frames done, and status.json says how many of how many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

from ..errors import BpnetError
from ..infer.sources import (INPUT_TYPES, STREAM_TIMEOUT_S, Item, collect_inputs, is_stream,
                             is_webcam)
from ..io import write_bytes_atomic

log = logging.getLogger("bpnet.inference")

#: Seconds between the rewrites of the partial outputs of a running inference.
CHECKPOINT_S = 30.0
#: File signatures of picture formats (an --input_type video given a picture is refused).
PICTURE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
                 b"\x00\x00\x00\x0cjP  ", b"P5", b"P6")


def run_inference(inference_spec, model_filename=None, input_type="dir", input_path=None,
                  results_dir="results/inference", image_root_path=None, key=None,
                  dump_visualizations=False, batch_size=4, max_frames=0, status=None,
                  progress=True, runtime=None, threaded=True, precision=None,
                  streams=None) -> dict:
    """The ``bpnet inference`` task body; returns the summary stored in status.json.

    ``runtime``, ``precision``, ``streams``: override the spec's runtime,
    inference_precision and streams.
    ``threaded``: overlap reading, preprocessing, network and decoding (the
    same outputs as ``False``, which runs them one after the other).
    """
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
    if input_type == "video":
        _check_video_input(input_path)
    predictor = Predictor(spec, model_path=model_filename, key=key, batch_size=batch_size,
                          runtime=runtime, precision=precision, streams=streams)
    log.info("model %s runs in %s", predictor.runner.path, predictor.runner.label)
    doc = spec_doc(predictor, inference_spec)
    run = _Run(predictor, out, doc, dump_visualizations, batch_size, status, progress,
               threaded)
    if input_type == "video":
        return run.video(input_path, max_frames)
    return run.images(items, skipped, single=input_type == "image")


def _check_video_input(source):
    if is_webcam(source) or is_stream(source):
        return
    p = Path(source)
    if not p.exists():
        raise BpnetError(f"--input {p}: video file not found")
    if p.is_dir():
        raise BpnetError(f"--input {p}: is a folder; use --input_type dir for a folder of "
                         "pictures")
    if _is_picture(p):
        raise BpnetError(f"--input {p}: is a picture, not a video; use --input_type image")


def _is_picture(p: Path) -> bool:
    """A picture file, by its extension or its first bytes."""
    from ..infer.preprocess import is_image_file
    if is_image_file(p):
        return True
    from ..tao_files import file_head
    head = file_head(p, 16)
    if head is None:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(m) for m in PICTURE_MAGIC)


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


ANNOTATED_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".mp4")


def clear_previous_outputs(out: Path):
    """Remove what an earlier inference run left in ``out`` (only the files inference writes).

    The results dir is locked for this run (bpnet.cli.run_task), so nothing
    of a concurrent run is touched. Called when this run is about to write its
    first result, so that a run that fails before it leaves the earlier outputs.
    """
    old = [out / "detections.json", out / "detections_coco_format.json",
           *out.glob("*_frames.jsonl")]
    ann = out / "images_annotated"
    if ann.is_dir():
        old += [f for f in ann.iterdir() if f.is_file() and f.suffix.lower() in ANNOTATED_SUFFIXES]
    old = [f for f in old if f.is_file()]
    if not old:
        return
    log.warning("%s holds a previous inference run's outputs (%d files); removing them so that "
                "the two runs do not mix", out, len(old))
    for f in old:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    with contextlib.suppress(OSError):
        ann.rmdir()  # only when empty


class _Run:
    """One inference run: the detections so far and how to write them."""

    def __init__(self, predictor, out: Path, doc, dump, batch_size, status, progress,
                 threaded):
        self.predictor = predictor
        self.out = out
        self.doc = doc
        self.dump = dump
        self.batch_size = batch_size
        self.status = status
        self.progress = progress
        self.threaded = threaded
        self.runner_info = predictor.runner.described
        self.runner_label = predictor.runner.label
        self.entries, self.coco = [], []
        self.n_people = 0
        self._last_checkpoint = time.monotonic()
        self._claimed = False

    # ------------------------------------------------------------ writing

    def _claim_outputs(self):
        """Before this run's first output file: the earlier run's outputs go."""
        if not self._claimed:
            self._claimed = True
            clear_previous_outputs(self.out)

    def _write(self, skipped=None, complete=True, interrupted=False, total=None, lines=None,
               jsonl=None):
        from ..infer.outputs import write_detections
        self._claim_outputs()
        extra = {"complete": complete, **self.runner_info}
        if interrupted:
            extra["interrupted"] = True
        if not complete and total:
            extra["total"] = total
        if jsonl is not None:
            write_bytes_atomic(jsonl, ("\n".join(lines) + "\n" if lines else "").encode())
        write_detections(self.out, self.predictor.pose, self.doc, self.entries, self.coco,
                         skipped, extra=extra)

    def _checkpoint(self, **kw):
        now = time.monotonic()
        if now - self._last_checkpoint >= CHECKPOINT_S:
            self._last_checkpoint = now
            self._write(complete=False, **kw)

    def _interrupted(self, done: int, total, unit: str, **kw) -> dict:
        """Write what was done; the partial summary for status.json."""
        if self.entries:
            self._write(complete=False, interrupted=True, total=total, **kw)
            kept = (f"detections.json holds the {done} {unit} done"
                    + (f" of {total}" if total else ""))
        else:
            kept = f"no {unit[:-1]} was finished; nothing written"
        log.warning("stopped after %d %s%s: %s", done, unit,
                    f" of {total}" if total else "", kept)
        summary = {"interrupted": True, unit: done, "people": self.n_people,
                   **self.runner_info, "kept": kept}
        if total:
            summary["total"] = total
        if self.status is not None:
            self.status.extra.update(summary)
        return summary

    # ------------------------------------------------------------ pictures

    def images(self, items, skipped, single=False) -> dict:
        import cv2

        from ..infer.detect import RunTimer, detect
        from ..infer.draw import draw_people
        from ..infer.outputs import coco_results, image_entry

        pred, out = self.predictor, self.out
        used_names: set = set()
        timer = RunTimer()
        bar = _progress_bar(len(items), "inference", self.progress)
        done = 0
        # A lone --input_type image that cannot be read is the command's error.
        pictures = detect(pred, items, self.batch_size, strict=single, threaded=self.threaded)
        try:
            with contextlib.closing(pictures):
                for done, d in enumerate(pictures, start=1):
                    if d.ok:
                        timer.add(d.timings)
                        if self.dump:
                            vis = draw_people(d.image, d.people.keypoints, pred.pose,
                                              d.people.scores, d.people.boxes)
                            name = _annotated_name(d.item, used_names)
                            ok, buf = cv2.imencode(Path(name).suffix, vis)
                            if ok:
                                self._claim_outputs()
                                write_bytes_atomic(out / "images_annotated" / name,
                                                   buf.tobytes())
                        self.entries.append(image_entry(d.item.path, d.people,
                                                        image_id=d.item.image_id,
                                                        hw=d.image.shape[:2]))
                        self.coco.extend(coco_results(d.people, d.item.image_id))
                        self.n_people += len(d.people)
                    else:
                        log.warning("skipping %s", d.error)
                        skipped.append({"path": d.item.path, "reason": d.error})
                    bar.update(1)
                    if self.status is not None:
                        self.status.progress(done, len(items), "inference", fps=timer.fps())
                    self._checkpoint(skipped=skipped, total=len(items))
        except (KeyboardInterrupt, BpnetError, OSError):
            bar.close()
            if not single:
                self._interrupted(len(self.entries), len(items), "images", skipped=skipped)
            raise
        bar.close()
        if not self.entries:
            raise BpnetError(f"none of the {len(items)} input images could be read "
                             f"(first problem: {skipped[-1]['reason'] if skipped else '?'})")
        summary = {"images": len(self.entries), "skipped": len(skipped),
                   "people": self.n_people, **self.runner_info, **timer.summary()}
        self._write(skipped=skipped)
        log.info("inference: %d images (%d skipped), %d people, %.1f ms/image, %.1f images/s "
                 "(median: network %.1f, decode %.1f ms; %s) -> %s", len(self.entries),
                 len(skipped), self.n_people, summary["ms_per_image"], summary["fps"],
                 summary["network_ms_median"], summary["decode_ms_median"],
                 self.runner_label, out)
        return summary

    # ------------------------------------------------------------ video

    def video(self, source, max_frames) -> dict:
        import cv2

        from ..infer.detect import RunTimer, detect
        from ..infer.draw import draw_people
        from ..infer.outputs import coco_results, image_entry
        from ..infer.sources import Mp4Writer, frames, open_video, video_names
        from ..infer.track import Tracker

        pred, out = self.predictor, self.out
        cap, live = open_video(source)  # live: a webcam or a stream
        stream = is_stream(source)
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if not fps or math.isnan(fps) or fps > 240:  # unknown or nonsense: a common default
            fps = 25.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not live else 0
        if max_frames:
            total = min(total, max_frames) if total > 0 else max_frames
        stem, label = video_names(source)
        jsonl = out / f"{stem}_frames.jsonl"
        tracker = Tracker()
        lines = []
        writer = None
        bar = _progress_bar(total or None, "video", self.progress)
        timer = RunTimer()
        interrupted = False
        # A webcam's or stream's frames are shown as they come: one at a time, no read-ahead.
        bs = 1 if live else self.batch_size
        pictures = detect(pred, frames(cap, label, max_frames), bs, window=1,
                          threaded=self.threaded)
        try:
            with contextlib.closing(pictures):
                for d in pictures:
                    k, frame, people = d.item.frame, d.image, d.people
                    ids = tracker.update(people.keypoints)
                    # A frame's records are made first and kept together, so an interrupt
                    # leaves the JSONL, detections.json and the video at the same frame.
                    entry = image_entry(d.item.path, people, image_id=k, hw=frame.shape[:2],
                                        frame=k, track_ids=[int(i) for i in ids])
                    line = _frame_line(k, fps, people, ids)
                    if self.dump:
                        if writer is None:
                            self._claim_outputs()
                            writer = Mp4Writer(out / "images_annotated" / f"{stem}_annotated.mp4",
                                               fps, (frame.shape[1], frame.shape[0]))
                        writer.write(draw_people(frame, people.keypoints, pred.pose,
                                                 people.scores, people.boxes, ids=ids))
                    self.entries.append(entry)
                    self.coco.extend(coco_results(people, k))
                    lines.append(line)
                    self.n_people += len(people)
                    timer.add(d.timings)
                    bar.update(1)
                    if self.status is not None:
                        self.status.progress(len(self.entries), total or None, "video",
                                             fps=timer.fps())
                    self._checkpoint(total=total or None, lines=lines, jsonl=jsonl)
        except KeyboardInterrupt:
            if not live:
                self._stop_video(cap, bar, writer)
                self._interrupted(len(self.entries), total or None, "frames", lines=lines,
                                  jsonl=jsonl)
                raise
            # Ctrl-C is how a webcam's or a stream's run ends: keep what was seen.
            interrupted = True
        except BaseException:
            self._stop_video(cap, bar, writer)
            if self.entries:
                self._interrupted(len(self.entries), total or None, "frames", lines=lines,
                                  jsonl=jsonl)
            raise
        cap.release()
        bar.close()
        if not self.entries:
            if writer is not None:
                writer.close(keep=False)
            what = "the stream sent no frame" if stream else (
                "no frame could be read (corrupt or empty video)")
            raise BpnetError(f"--input {label}: {what}")
        if total and len(self.entries) < total and not live:
            log.warning("%s: read %d of the %d frames the container announces (the rest is "
                        "unreadable)", source, len(self.entries), total)
        if stream and not interrupted and len(self.entries) != max_frames:
            log.warning("%s: the stream ended (or sent nothing for %d s) after %d frames",
                        label, STREAM_TIMEOUT_S, len(self.entries))
        if writer is not None:
            writer.close(keep=True)
        summary = {"frames": len(self.entries), "skipped": 0, "people": self.n_people,
                   **self.runner_info, **timer.summary(), "tracks": tracker.ids_given}
        self._write(lines=lines, jsonl=jsonl)
        if interrupted:
            summary["interrupted"] = True
        log.info("video: %d frames, %d people, %d tracks, %.1f ms/frame, %.1f fps (%s) -> %s",
                 summary["frames"], self.n_people, summary["tracks"], summary["ms_per_image"],
                 summary["fps"], self.runner_label, out)
        return summary

    def _stop_video(self, cap, bar, writer):
        cap.release()
        bar.close()
        if writer is not None:
            # The frames done make a complete, playable video: keep it.
            writer.close(keep=bool(self.entries))


def _frame_line(k, fps, people, ids) -> str:
    return json.dumps({
        "frame": k, "time_s": round(k / fps, 4),
        "people": [{"id": int(ids[n]),
                    "keypoints": [[round(float(v), 2) for v in j] for j in people.keypoints[n]],
                    "score": round(float(people.scores[n]), 4),
                    "box": [round(float(v), 2) for v in people.boxes[n]]}
                   for n in range(len(people))]})
