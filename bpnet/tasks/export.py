"""``bpnet export``: a Keras model file -> ONNX (fp32 / fp16 / INT8 QDQ), and on request a
TensorRT engine and the DeepStream files.

The flow: read the model (plain or encrypted), check every option against it
(input dims, paths, calibration inputs) before any work, convert the last
stage to ONNX (bpnet.export.onnx), make it fp16 or INT8 when asked
(bpnet.export.fp16 / int8), write it atomically with the bpnet meta, then
the DeepStream files (--sdk_compatible_model) and the engine (--engine_file;
without TensorRT one line says which trtexec command builds it). Exporting
needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

from ..errors import BpnetError
from ..io import check_not_input, output_lock, same_file

log = logging.getLogger("bpnet.export")

DATA_TYPES = ("fp32", "fp16", "int8")


def default_output(model_path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".onnx") if p.suffix else p.with_name(p.name + ".onnx")


def _check_output(out: Path, model_path: Path, what: str):
    if out.exists() and out.is_dir():
        raise BpnetError(f"{what} {out}: is a folder; give a file name (e.g. {out / 'model.onnx'})")
    if same_file(out, model_path):
        raise BpnetError(f"{what} {out}: is the model being exported; give another file name")


def _outputs(out, engine_file, data_type, cal_image_dir, cal_data_file, cal_cache_file):
    """[(option, path)] of the files this run writes."""
    int8 = data_type == "int8"
    writes_cal_data = int8 and bool(cal_image_dir and cal_data_file)
    writes_cache = int8 and bool(cal_cache_file) and not Path(cal_cache_file).is_file()
    outputs = [("-o", out), ("--engine_file", engine_file),
               ("--cal_data_file", cal_data_file if writes_cal_data else None),
               ("--cal_cache_file", cal_cache_file if writes_cache else None)]
    return [(n, Path(o)) for n, o in outputs if o is not None]


def _check_outputs_against_inputs(outputs, model_path, experiment_spec, data_type,
                                  cal_data_file, cal_cache_file):
    """No file this run writes (``outputs``, of ``_outputs``) is one it reads, or another file
    it writes."""
    written = {n for n, _ in outputs}
    int8 = data_type == "int8"
    inputs = [("the model (-m)", model_path), ("the experiment spec (-e)", experiment_spec),
              ("the calibration data read (--cal_data_file)",
               cal_data_file if int8 and "--cal_data_file" not in written else None),
              ("the calibration cache read (--cal_cache_file)",
               cal_cache_file if int8 and "--cal_cache_file" not in written else None)]
    for i, (name, path) in enumerate(outputs):
        others = [(f"the {n} output", o) for n, o in outputs[i + 1:]]
        check_not_input(path, inputs + others, name)


def export(model_path, output_path=None, *, key: Optional[str] = None,
           experiment_spec=None, data_type: str = "fp32", cal_image_dir=None,
           cal_data_file=None, cal_cache_file=None, cal_method: Optional[str] = None,
           int8_scope: str = "auto", int8_weight_bits: int = 8,
           batches: int = 10, batch_size: int = 1, max_batch_size: int = 1,
           opt_batch_size: int = 1, static_batch_size: int = -1,
           max_workspace_size: Optional[int] = None, engine_file=None,
           input_dims: Optional[str] = None, sdk_compatible_model: bool = False,
           upsample_ratio: int = 4, data_format: str = "channels_last",
           status=None, progress: bool = False) -> dict:
    """The task body; returns the summary status.json gets."""
    from ..export import int8 as q8
    from ..export.onnx import file_sha256, parse_input_dims

    model_path = Path(model_path)
    if data_type not in DATA_TYPES:
        raise BpnetError(f"--data_type {data_type!r}: choose one of {', '.join(DATA_TYPES)}")
    if data_format != "channels_last":
        raise BpnetError(f"--data_format {data_format}: bpnet exports NHWC (channels_last) "
                         "models only; DeepStream reads them with network-input-order=1")
    if not model_path.exists():
        raise BpnetError(f"-m {model_path}: model file not found")
    if model_path.is_dir():
        raise BpnetError(f"-m {model_path}: is a folder; give the model file (.keras)")
    out = Path(output_path) if output_path else default_output(model_path)
    _check_output(out, model_path, "-o")
    if engine_file:
        _check_output(Path(engine_file), model_path, "--engine_file")
        if Path(engine_file).resolve() == out.resolve():
            raise BpnetError(f"--engine_file {engine_file}: is the ONNX output file; give another name")
    outputs = _outputs(out, engine_file, data_type, cal_image_dir, cal_data_file, cal_cache_file)
    _check_outputs_against_inputs(outputs, model_path, experiment_spec, data_type, cal_data_file,
                                  cal_cache_file)
    if static_batch_size == 0 or static_batch_size < -1:
        raise BpnetError(f"--static_batch_size {static_batch_size}: give a batch size >= 1, "
                         "or -1 for a dynamic batch")
    for name, v in (("--batches", batches), ("--batch_size", batch_size),
                    ("--max_batch_size", max_batch_size), ("--opt_batch_size", opt_batch_size),
                    ("-u/--upsample_ratio", upsample_ratio)):
        if v < 1:
            raise BpnetError(f"{name} {v}: must be >= 1")
    if opt_batch_size > max_batch_size:
        raise BpnetError(f"--opt_batch_size {opt_batch_size} is larger than --max_batch_size "
                         f"{max_batch_size}")
    method = cal_method or q8.DEFAULT_CAL_METHOD
    if method not in q8.CAL_METHODS:
        raise BpnetError(f"--cal_method {method!r}: choose one of {', '.join(q8.CAL_METHODS)}")
    if int8_scope not in q8.SCOPES:
        raise BpnetError(f"--int8_scope {int8_scope!r}: choose one of {', '.join(q8.SCOPES)}")
    if int8_weight_bits not in q8.WEIGHT_BITS:
        raise BpnetError(f"--int8_weight_bits {int8_weight_bits}: choose 8 or 7")
    if data_type == "int8":
        cache_ok = cal_cache_file and Path(cal_cache_file).is_file()
        if not (cal_image_dir or cal_data_file or cache_ok):
            raise BpnetError("--data_type int8 needs calibration pictures: give --cal_image_dir "
                             "(or --cal_data_file, or an existing --cal_cache_file)")
        if cal_cache_file and Path(cal_cache_file).is_dir():
            raise BpnetError(f"--cal_cache_file {cal_cache_file}: is a folder; give a file name")
        if cal_image_dir:
            q8.list_cal_images(cal_image_dir)  # fails early on an empty folder

    # Every file this run writes is locked: two runs writing one file at once (with
    # different results dirs) would both report success while one's file is lost.
    with contextlib.ExitStack() as locks:
        for _, path in outputs:
            locks.enter_context(output_lock(path, "export"))
        # The model (a wrong or missing key is one clear error there).
        from ..model.meta import parse_meta
        from ..model.weights import load_model_file
        model, meta = load_model_file(model_path, key, "-m")
        parsed = parse_meta(meta, str(model_path))
        meta = dict(parsed.raw)
        if experiment_spec:
            meta = _apply_experiment_spec(meta, experiment_spec, model_path)
        channels = parsed.input_channels
        dims = parse_input_dims(input_dims, channels, parsed.stride)
        if sdk_compatible_model and dims is None:
            dims = (288, 384, channels)  # the bodypose2d app's input
            log.info("--sdk_compatible_model without --input_dims: using DeepStream's 288,384,%d",
                     channels)
        batch = None if static_batch_size == -1 else int(static_batch_size)
        sha = file_sha256(model_path)
        if status is not None:
            status.progress(0, message="converting to ONNX")

        from ..export.onnx import (HEATMAP_NAME, INPUT_NAME, OPSET, PAF_NAME, SDK_PAF_NAME,
                                   keras_to_onnx, save_onnx, set_meta)
        upsample = upsample_ratio if sdk_compatible_model else None
        proto = keras_to_onnx(model, batch=batch, input_hw=dims[:2] if dims else None,
                              channels=channels, paf_upsample=upsample)
        meta.pop("num_stages", None)  # the file carries one stage
        meta.update(precision=data_type, input_dims=list(dims) if dims else None,
                    source_model_sha256=sha, opset=OPSET, input_name=INPUT_NAME,
                    output_names=[SDK_PAF_NAME if upsample else PAF_NAME, HEATMAP_NAME])
        if upsample:
            meta["paf_upsample"] = int(upsample)
        if data_type == "int8":
            meta["int8_weight_bits"] = int(int8_weight_bits)  # runners warn where 8 saturates
            scope = q8.resolve_scope(proto, int8_scope)
            meta["int8_scope"] = scope
            if int8_scope == "auto":
                log.info("INT8: --int8_scope auto quantizes %s", {
                    "backbone": "the backbone; the refinement stages stay float (--int8_scope "
                                "all puts them in int8 too: faster, and less accurate; check "
                                "with bpnet evaluate)",
                    "all": "every layer (the network has no refinement stages)"}[scope])
        set_meta(proto, meta)
        summary = {"output": str(out), "precision": data_type, "input_dims": meta["input_dims"],
                   "batch": batch if batch else "dynamic", "opset": OPSET,
                   "source_model_sha256": sha}

        if data_type == "fp16":
            from ..export.fp16 import to_fp16
            proto = to_fp16(proto)
        elif data_type == "int8":
            proto, cal = _int8(proto, parsed, sha, method, scope, int8_weight_bits, dims,
                               batch, cal_image_dir, cal_data_file, cal_cache_file, batches,
                               batch_size, status, progress)
            summary.update(cal, int8_scope_asked=int8_scope)
        save_onnx(proto, out)
        log.info("wrote %s (%s, %.1f MB)", out, data_type, out.stat().st_size / 1e6)

        if sdk_compatible_model:
            from ..export.deepstream import write_deepstream_files
            summary["deepstream_files"] = [str(p) for p in write_deepstream_files(
                out, meta, dims, data_type, max_batch_size, upsample_ratio)]

        if engine_file:
            from ..export import tensorrt as trt_export
            summary["engine"] = trt_export.build_or_explain(
                out, Path(engine_file), meta, dims, data_type, batch, max_batch_size,
                opt_batch_size, max_workspace_size)
        return summary


def _apply_experiment_spec(meta: dict, spec_path, model_path) -> dict:
    """-e: the train spec's normalization overrides the model's (with a warning when they differ)."""
    from ..specs import load_train_spec
    spec = load_train_spec(spec_path)
    n = spec.dataloader.normalization_params
    new = {"image_scale": [float(v) for v in n.image_scale],
           "image_offset": [float(v) for v in n.image_offset]}
    old = meta.get("normalization")
    if old and old != new:
        log.warning("-e %s: its normalization %s replaces the one %s carries (%s)",
                    spec_path, new, model_path, old)
    meta = dict(meta)
    meta["normalization"] = new
    return meta


def _int8(proto, parsed, sha, method, scope, weight_bits, dims, batch, cal_image_dir,
          cal_data_file, cal_cache_file, batches, batch_size, status, progress):
    from ..export import int8 as q8
    from ..export.onnx import graph_fingerprint
    from ..infer.preprocess import Normalization
    info = {"cal_method": method}
    proto = q8.merge_sibling_convs(proto)
    graph_sha = graph_fingerprint(proto)
    if cal_cache_file and Path(cal_cache_file).is_file():
        doc = q8.read_cache(cal_cache_file, sha, method, graph_sha, weight_bits)
        cal = q8.Calibration.from_cache(doc)
        info.update(cal_cache="reused", cal_images=doc.get("images"))
        log.info("INT8: ranges from %s (%s images, %s)", cal_cache_file, doc.get("images"), method)
    else:
        hw = tuple(dims[:2]) if dims else q8.DEFAULT_CAL_HW
        norm = parsed.normalization
        normalization = Normalization(*norm) if norm else Normalization()
        want = batches * batch_size
        if cal_image_dir:
            files = q8.sample_images(q8.list_cal_images(cal_image_dir), want)
            if status is not None:
                status.progress(0, len(files), message="reading calibration pictures")
            skipped: list = []
            data = q8.calibration_inputs(files, hw, normalization, parsed.input_channels, progress,
                                         skipped)
            if skipped:  # in status.json, as inference and evaluate list theirs
                info["cal_skipped"] = skipped
            if cal_data_file:
                q8.save_cal_data_file(cal_data_file, data)
                info["cal_data_file"] = str(cal_data_file)
        else:
            data = q8.load_cal_data_file(cal_data_file, dims[:2] if dims else None,
                                         parsed.input_channels)
            if len(data) < want:
                log.warning("calibration wants %d inputs (--batches x --batch_size) but %s holds "
                            "%d; using all %d", want, cal_data_file, len(data), len(data))
            data = data[:want]
        if status is not None:
            status.progress(0, message=f"calibrating on {len(data)} pictures ({method})")
        cal = q8.calibrate(proto, q8.batches_of(data, batch_size, batch), method, progress,
                           weight_bits)
        info.update(cal_images=int(len(data)), cal_input_hw=list(data.shape[1:3]))
        if cal_cache_file:
            q8.write_cache(cal_cache_file, sha, method, cal, len(data), data.shape[1:3],
                           graph_sha)
            info["cal_cache"] = "written"
    qproto = q8.quantize_calibrated(proto, cal, scope)
    info.update(q8.count_qdq(qproto), int8_scope=scope, int8_weight_bits=weight_bits)
    return qproto, info
