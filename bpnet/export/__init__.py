"""Export: a bpnet Keras model out of the toolkit, in every form a deployment needs.

- ``onnx.py``: the fp32 ONNX file (last stage, TAO's output names and order,
  NHWC input, dynamic or fixed batch and size, the bpnet meta inside);
- ``fp16.py``: the same network with float16 weights and compute;
- ``int8.py``: explicit INT8 quantization (QDQ) calibrated on pictures;
- ``tensorrt.py``: a TensorRT engine from any of those files (needs TensorRT);
- ``deepstream.py``: the DeepStream nvinfer and bodypose2d app files.

The command's body is ``bpnet/tasks/export.py``. Everything heavy (TensorFlow,
tf2onnx, onnx, ONNX Runtime, TensorRT) is imported inside functions.
"""
