"""CUDA: fine-tuning, bounds, attacks and the exported graph on onnxruntime's CUDA provider.  Skipped where
there is no CUDA device (or no CUDA provider): these tests run only on a machine that has one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harden.export.runtime import cuda_available

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_finetuning_on_cuda_keeps_the_bundle_contract(tiny_model, digits):
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import MethodSpec, Options

    spec = MethodSpec.of("ctt-strict", mask_ratio=0.05, eps=0.01, steps=20, lr=1e-3)
    hardened = instrument(tiny_model, digits, [spec], Options(key="gpu", device="cuda"))
    assert next(hardened.classifier.parameters()).device.type == "cpu"   # the bundle holds CPU weights
    from harden.export import export_onnx

    export_onnx(hardened)   # parity with the Python side


@cuda
def test_certificates_on_cuda_equal_the_cpu_ones(tiny_hardened):
    from harden.api import certify
    from harden.bundle.manifest import build_manifest

    manifest = json.loads(json.dumps(build_manifest(tiny_hardened)))
    on_cpu = certify(tiny_hardened, manifest, [0.01], bounds="crown", limit=64, check=4)
    on_gpu = certify(tiny_hardened, manifest, [0.01], bounds="crown", limit=64, check=4, device="cuda")
    assert on_gpu["results"]["0.01"]["hardened"] == pytest.approx(on_cpu["results"]["0.01"]["hardened"], abs=1 / 64)
    assert on_gpu["check"]["0.01"]["violations"] == 0


@cuda
def test_attacks_on_cuda(tiny_hardened, digits):
    from harden.attacks.catalog import parse_attack, run_attack

    model = tiny_hardened.classifier.to("cuda")
    try:
        x, y = digits.test.x[:32].numpy(), digits.test.y[:32].numpy()
        adv = run_attack(model, parse_attack("pgd:eps=0.1,steps=5"), x, y, input_range=(0.0, 1.0), num_classes=10)
    finally:
        tiny_hardened.classifier.to("cpu")
    assert np.abs(adv - x).max() <= 0.1 + 1e-6


@pytest.mark.skipif(not cuda_available(), reason="onnxruntime has no CUDA provider here (onnxruntime-gpu)")
def test_the_exported_graph_on_the_cuda_provider_keeps_parity(tiny_hardened):
    from harden.export import build_onnx
    from harden.export.parity import compare
    from harden.export.runtime import OnnxGraph

    graph = OnnxGraph(build_onnx(tiny_hardened).SerializeToString(), device="cuda")
    compare(tiny_hardened.golden, graph.run(tiny_hardened.golden["input"]), "onnxruntime CUDA provider")
