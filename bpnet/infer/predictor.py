"""Predictor: images in, people in original-image pixels out.

One picture becomes one or more network inputs ("jobs": one per scale of
multi-scale inference, twice that with flip_test). Jobs of the same shape,
from one picture or from several, run as one batch. Each picture's maps are
then brought onto one grid (its scale-1 input's stride grid; mirrored maps
are mirrored back with the pose config's flip pairs), averaged, decoded,
with the inference spec's decoder section, and the people are mapped back
through the exact inverse of the preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import BpnetError
from ..specs import InferenceSpec, load_inference_spec
from .preprocess import (InputTransform, Normalization, apply_geometry, plan_geometry,
                         to_bgr8, unflip_maps, warp_maps)
from .runners import Runner, load_runner

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    image: int
    tensor: np.ndarray
    transform: InputTransform
    flipped: bool


def _normalization(runner: Runner, spec: InferenceSpec) -> Normalization:
    recorded = runner.model_meta.normalization
    if recorded is not None:
        return Normalization(*recorded)
    if spec.train_spec:
        from ..specs import load_train_spec
        n = load_train_spec(spec.train_spec).dataloader.normalization_params
        return Normalization(tuple(n.image_scale), tuple(n.image_offset))
    log.warning("model %s has no normalization in its meta and the inference spec names no "
                "train_spec; using x/256 - 0.5", runner.path)
    return Normalization()


class Predictor:
    """Runs a model on BGR pictures and returns people in their pixels."""

    def __init__(self, infer_spec=None, model_path=None, key: Optional[str] = None,
                 runner: Optional[Runner] = None, batch_size: int = 8,
                 runtime: Optional[str] = None, precision: Optional[str] = None,
                 streams: Optional[int] = None):
        """``runtime``: what runs the network (bpnet.infer.runners.RUNTIMES); None: the
        spec's ``runtime`` (default auto, the fastest installed for the file).
        ``precision``: OpenVINO's f32 or bf16; None: the spec's ``inference_precision``.
        ``streams``: OpenVINO's network calls in flight; None: the spec's ``streams``."""
        if infer_spec is None:
            spec = InferenceSpec()
        elif isinstance(infer_spec, InferenceSpec):
            spec = infer_spec
        else:
            spec = load_inference_spec(infer_spec)
        self.spec = spec
        self.runner = runner if runner is not None else load_runner(
            model_path or spec.model_path, key=key, stage=spec.output_stage_to_use,
            runtime=runtime or spec.runtime, precision=precision or spec.inference_precision,
            streams=streams or spec.streams)
        self.pose = self.runner.pose
        self.stride = self.runner.stride
        self.norm = _normalization(self.runner, spec)
        self.batch_size = max(1, int(batch_size))
        self.input_shape = [int(v) for v in spec.input_shape]
        self.mode = spec.keep_aspect_ratio_mode
        self.scales = [float(s) for s in spec.scales] if spec.multi_scale_inference else [1.0]
        self.flip = bool(spec.flip_test)
        fixed = self.runner.fixed_input_hw
        if fixed is not None:
            self._fit_fixed_input(fixed)

    def _fit_fixed_input(self, fixed):
        if any(v % self.stride for v in fixed):
            raise BpnetError(f"{self.runner.path}: fixed input {fixed[0]}x{fixed[1]} is not a "
                             f"multiple of the stride {self.stride}")
        if list(fixed) != self.input_shape:
            log.warning("model %s takes a fixed %dx%d input; using it instead of input_shape %s",
                        self.runner.path, fixed[0], fixed[1], self.input_shape)
            self.input_shape = list(fixed)
        if self.mode == "adjust_network_input":
            log.warning("model %s takes a fixed input size; keep_aspect_ratio_mode "
                        "adjust_network_input becomes pad_image_input", self.runner.path)
            self.mode = "pad_image_input"
        if self.scales != [1.0]:
            log.warning("model %s takes a fixed input size; multi-scale inference is off",
                        self.runner.path)
            self.scales = [1.0]

    # ------------------------------------------------------------ public API

    def predict(self, image_bgr: np.ndarray):
        """One picture -> (People in its pixels, timings dict)."""
        return self.predict_many([image_bgr])[0]

    def predict_many(self, images: Sequence[np.ndarray]):
        """Pictures -> [(People, timings)], batching same-shape network inputs."""
        if not len(images):
            return []
        return self.finish(self.infer(self.prepare(images)))

    # The three steps of predict_many, apart so that a pipeline can overlap them
    # (bpnet.infer.detect, threaded): preprocessing and decoding run NumPy/OpenCV/numba
    # code that releases the GIL for most of its time, the network runs in its
    # runtime's own threads.

    def prepare(self, images: Sequence[np.ndarray]) -> "Prepared":
        """Step 1: the network inputs of each picture (every scale, mirrored too)."""
        n = len(images)
        prep = Prepared(jobs=[], refs=[], t_pre=np.zeros(n), t_net=np.zeros(n))
        for i, img in enumerate(images):
            t = time.perf_counter()
            img = self._as_bgr8(img)
            prep.refs.append(plan_geometry(img.shape[:2], self.input_shape, self.mode,
                                           self.stride, 1.0).transform)
            prep.jobs.extend(self._jobs(i, img))
            prep.t_pre[i] = time.perf_counter() - t
        return prep

    def infer(self, prep: "Prepared", batch_size: Optional[int] = None) -> "Prepared":
        """Step 2: the network on every input, same shapes ``batch_size`` at a time (default:
        the predictor's); fills ``prep.maps``."""
        prep.maps = self._run_jobs(prep.jobs, prep.t_net, batch_size)
        return prep

    def finish(self, prep: "Prepared"):
        """Step 3: each picture's maps combined and decoded -> [(People, timings)]."""
        jobs, maps = prep.jobs, prep.maps
        by_image: Dict[int, List[int]] = defaultdict(list)
        for k, job in enumerate(jobs):
            by_image[job.image].append(k)
        out = []
        from .decode import decode
        for i in range(len(prep.refs)):
            t = time.perf_counter()
            hm, paf, ref = self._combine([jobs[k] for k in by_image[i]],
                                         [maps[k] for k in by_image[i]], prep.refs[i])
            people = decode(hm, paf, self.pose, stride=self.stride, config=self.spec.decoder)
            people = to_original(people, ref)
            out.append((people, {"preprocess_s": float(prep.t_pre[i]),
                                 "network_s": float(prep.t_net[i]),
                                 "decode_s": time.perf_counter() - t}))
        return out

    def planned_shape(self, image_hw) -> tuple:
        """The network input shape (H, W) of a picture of this size at scale 1."""
        return plan_geometry(tuple(image_hw), self.input_shape, self.mode, self.stride,
                             1.0).net_hw

    def maps(self, image_bgr: np.ndarray):
        """The averaged (heatmaps, PAFs) of one picture and the transform of their grid."""
        img = self._as_bgr8(image_bgr)
        ref = plan_geometry(img.shape[:2], self.input_shape, self.mode, self.stride, 1.0).transform
        jobs = self._jobs(0, img)
        maps = self._run_jobs(jobs, np.zeros(1))
        return self._combine(jobs, maps, ref)

    # ------------------------------------------------------------ steps

    @staticmethod
    def _as_bgr8(img):
        if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 \
                and img.shape[2] == 3:
            return img
        return to_bgr8(img)

    def _jobs(self, i: int, img: np.ndarray) -> List[_Job]:
        jobs = []
        for s in self.scales:
            geo = plan_geometry(img.shape[:2], self.input_shape, self.mode, self.stride, s)
            x = self.norm.apply(apply_geometry(img, geo), self.runner.input_channels)
            jobs.append(_Job(i, x, geo.transform, False))
            if self.flip:
                # The whole padded input is mirrored, so cell i of the mirrored
                # maps is exactly cell w-1-i of the unmirrored ones.
                jobs.append(_Job(i, np.ascontiguousarray(x[:, ::-1]), geo.transform, True))
        return jobs

    def _run_jobs(self, jobs: List[_Job], t_net: np.ndarray, batch_size: Optional[int] = None):
        groups: Dict[tuple, List[int]] = defaultdict(list)
        for k, job in enumerate(jobs):
            groups[job.tensor.shape].append(k)
        fixed_batch = self.runner.fixed_batch
        bs = fixed_batch or max(1, int(batch_size or self.batch_size))
        results = [None] * len(jobs)
        for shape, ks in groups.items():
            for c0 in range(0, len(ks), bs):
                chunk = ks[c0:c0 + bs]
                batch = np.stack([jobs[k].tensor for k in chunk])
                if fixed_batch and len(chunk) < fixed_batch:
                    batch = np.concatenate(
                        [batch, np.zeros((fixed_batch - len(chunk),) + batch.shape[1:],
                                         batch.dtype)])
                t = time.perf_counter()
                hm, paf = self.runner.run(batch)
                dt = time.perf_counter() - t
                self._check_maps(hm, paf, shape)
                for b, k in enumerate(chunk):
                    results[k] = (hm[b], paf[b])
                    t_net[jobs[k].image] += dt / len(chunk)
        return results

    def _check_maps(self, hm, paf, shape):
        want = (math.ceil(shape[0] / self.stride), math.ceil(shape[1] / self.stride))
        if tuple(hm.shape[1:3]) != want or tuple(paf.shape[1:3]) != want:
            raise BpnetError(
                f"{self.runner.path}: a {shape[0]}x{shape[1]} input gave {hm.shape[1]}x"
                f"{hm.shape[2]} maps; with stride {self.stride} expected {want[0]}x{want[1]} "
                "(is the meta's stride right?)")

    def _combine(self, jobs: List[_Job], maps, ref: InputTransform):
        if len(jobs) == 1 and not jobs[0].flipped:
            hm, paf = maps[0]
            return hm, paf, jobs[0].transform
        out_hw = (ref.net_hw[0] // self.stride, ref.net_hw[1] // self.stride)
        acc_h = acc_p = None
        for job, (hm, paf) in zip(jobs, maps):
            if job.flipped:
                hm, paf = unflip_maps(hm, paf, self.pose)
            hm = warp_maps(hm, job.transform, ref, self.stride, out_hw)
            paf = warp_maps(paf, job.transform, ref, self.stride, out_hw)
            if acc_h is None:
                acc_h, acc_p = hm.astype(np.float32, copy=True), paf.astype(np.float32, copy=True)
            else:
                acc_h += hm
                acc_p += paf
        return acc_h / len(jobs), acc_p / len(jobs), ref


@dataclasses.dataclass
class Prepared:
    """Pictures on their way through Predictor.prepare -> infer -> finish."""

    jobs: List[_Job]
    refs: List[InputTransform]  # each picture's scale-1 transform (its maps' grid)
    t_pre: np.ndarray  # seconds per picture
    t_net: np.ndarray
    maps: Optional[list] = None  # (heatmaps, PAFs) per job, after infer


def to_original(people, transform: InputTransform):
    """People in network-input pixels -> original pixels, clipped to the image.

    Clipping commutes with the min/max that makes a box, so clipping the
    boxes gives the boxes of the clipped joints.
    """
    t = transform
    out = people.transformed(1.0 / t.ax, 1.0 / t.ay, -t.bx / t.ax, -t.by / t.ay)
    h, w = t.image_hw
    out.keypoints[..., 0] = np.clip(out.keypoints[..., 0], 0, w - 1)
    out.keypoints[..., 1] = np.clip(out.keypoints[..., 1], 0, h - 1)
    out.boxes[:] = np.clip(out.boxes, 0, [w - 1, h - 1, w - 1, h - 1])
    return out
