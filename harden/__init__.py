"""harden: compile adversarial-input detectors into a PyTorch classifier and export one ONNX graph."""

__version__ = "0.1.0"
