"""TensorRT engines from exported ONNX files (TensorRT 10/11's Python API).

The network is parsed strongly typed (``NetworkDefinitionCreationFlag.
STRONGLY_TYPED``): every layer runs in the precision the ONNX file gives it,
so the fp32 file makes an fp32 engine, the fp16 file an fp16 engine and the
QDQ file an INT8 engine (explicit quantization; TensorRT 11 has no implicit
INT8 calibrators). One optimization profile: batch min 1 / opt / max (or the
static batch), and the input dims (fixed by ``--input_dims``, else a range
around bpnet's default inference sizes). The bpnet meta rides beside the
engine in ``<engine>.json``; the TensorRT runner reads that, or else the ONNX
file of the same name beside the engine.

TensorRT is imported lazily; without it ``build_or_explain`` writes the
``<engine>.json`` the engine will need and returns the ``trtexec`` command
that builds the engine there, so that the engine trtexec writes is read by
``bpnet inference`` / ``evaluate`` as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ..errors import BpnetError

log = logging.getLogger("bpnet.export")

#: Input height/width range of the profile when the ONNX file's size is dynamic.
DYNAMIC_HW = {"min": (128, 128), "opt": (368, 496), "max": (1024, 1024)}
DEFAULT_WORKSPACE_MB = 1024


def meta_path(engine_path) -> Path:
    return Path(str(engine_path) + ".json")


def profile_shapes(dims, batch: Optional[int], max_batch: int, opt_batch: int, channels: int):
    """{"min"|"opt"|"max": (N, H, W, C)} of the one optimization profile."""
    out = {}
    for k, b in (("min", 1), ("opt", opt_batch), ("max", max_batch)):
        n = batch if batch else b
        h, w = (dims[0], dims[1]) if dims else DYNAMIC_HW[k]
        out[k] = (int(n), int(h), int(w), int(channels))
    return out


def trtexec_command(onnx_path, engine_path, shapes, workspace_mb: int, input_name: str) -> str:
    def s(t):
        return "x".join(str(v) for v in t)
    # trtexec wants names with a colon quoted: 'input_1:0':1x368x496x3
    q = f"\\'{input_name}\\'"
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --stronglyTyped "
            f"--minShapes={q}:{s(shapes['min'])} --optShapes={q}:{s(shapes['opt'])} "
            f"--maxShapes={q}:{s(shapes['max'])} --memPoolSize=workspace:{workspace_mb}M")


def build_or_explain(onnx_path, engine_path, meta: dict, dims, data_type: str,
                     batch: Optional[int], max_batch: int, opt_batch: int,
                     workspace_bytes: Optional[int]) -> dict:
    """Build the engine where TensorRT is importable; else say how (one log line)."""
    channels = int(meta.get("input_channels", 3))
    shapes = profile_shapes(dims, batch, max_batch, opt_batch, channels)
    ws_mb = int(workspace_bytes // (1 << 20)) if workspace_bytes else DEFAULT_WORKSPACE_MB
    cmd = trtexec_command(onnx_path, engine_path, shapes, ws_mb, meta.get("input_name", "input_1:0"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        # The meta of the engine the command builds (an engine already at that path is
        # about to be replaced by it; a stale meta would outlive the rebuild).
        _write_meta(engine_path, meta)
        log.warning("TensorRT is not installed here: wrote %s and the engine's meta %s (keep "
                    "it beside the engine); build the engine on the target GPU with: %s",
                    onnx_path, meta_path(engine_path), cmd)
        return {"built": False, "trtexec": cmd, "meta": str(meta_path(engine_path))}
    build_engine(onnx_path, engine_path, shapes, ws_mb << 20)
    _write_meta(engine_path, meta)
    return {"built": True, "path": str(engine_path), "precision": data_type,
            "meta": str(meta_path(engine_path))}


def _write_meta(engine_path, meta):
    from ..io import write_text_atomic
    write_text_atomic(meta_path(engine_path), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def build_engine(onnx_path, engine_path, shapes, workspace_bytes: int):
    """Parse ``onnx_path`` strongly typed and write the serialized engine (atomically)."""
    import tensorrt as trt

    from ..io import write_bytes_atomic
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BpnetError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BpnetError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    write_bytes_atomic(engine_path, bytes(blob))
    log.info("wrote TensorRT engine %s", engine_path)
    return Path(engine_path)
