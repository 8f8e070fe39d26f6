"""One opset for the whole package: torch graphs, skl2onnx detectors and the policy graph share it."""

OPSET = 18
ML_OPSET = 3  # ai.onnx.ml, for scikit-learn converters
IR_VERSION = 10
