"""fp16 ONNX: float16 weights and compute, float32 input and outputs.

Converted with ONNX Runtime's own float16 tool (``onnxruntime.transformers.
float16``, shipped with the onnxruntime package bpnet already needs). The
input and the two outputs stay float32 (a Cast at each end), so every runner
feeds and reads the file as the fp32 one.

fp16 is fast where the hardware computes in half precision: NVIDIA GPUs
(TensorRT, ONNX Runtime's CUDA provider). ONNX Runtime's CPU provider has no
fast fp16 convolutions for most CPUs: there the file runs about as fast as
fp32, or slower (docs/benchmarks.md#export).
"""

from __future__ import annotations

from ..errors import BpnetError


def to_fp16(proto):
    """An fp16 copy of an fp32 ONNX ModelProto (inputs and outputs stay float32)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:  # an onnxruntime build without its transformers tools
        raise BpnetError(f"--data_type fp16 needs onnxruntime's float16 converter "
                         f"(onnxruntime.transformers.float16): {e}") from None
    # The meta travels in metadata_props, which the converter keeps.
    return convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
