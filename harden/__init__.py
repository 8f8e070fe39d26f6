"""harden: compile adversarial-input detectors into a PyTorch classifier and export one ONNX graph.

The Python API mirrors the CLI::

    import harden
    model = harden.load_model("lenet.pt", arch="harden.examples.lenet:LeNet5")
    data = harden.load_data("mnist")
    hardened = harden.instrument(model, data, ["ctt-lite"])
    harden.save_bundle(hardened, "lenet.hardened")
    harden.export_onnx(hardened, "lenet.onnx")
"""

__version__ = "0.1.0"

_API = ("load_model", "load_data", "instrument", "save_bundle", "load_bundle", "export_onnx", "certify", "evaluate",
        "evaluate_adaptive", "make_report")
__all__ = list(_API)


def __getattr__(name: str):
    # Lazy, so `import harden` (and the CLI's --help) does not import torch.
    if name in _API:
        from harden import api

        return getattr(api, name)
    raise AttributeError(f"module 'harden' has no attribute {name!r}")
