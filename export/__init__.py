"""Export of the model to ONNX and TensorRT (``aca export``)."""
