"""The example LeNet-5 and its seeded training script (short runs only)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx

from harden.examples.lenet import LeNet5
from harden.examples.train_lenet import main, train
from harden.errors import HardenError

LAYERS = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2", "relu4", "fc3"]


def test_lenet_shape_and_readable_fx_names():
    model = LeNet5()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert [name for name, _ in model.named_children()] == LAYERS
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == LAYERS
    assert sum(p.numel() for p in model.parameters()) == 61706  # the classic LeNet-5 size


def test_short_training_beats_chance_and_saves_a_state_dict(tmp_path):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    out = tmp_path / "lenet.pt"
    result = train(out, epochs=2, seed=0, limit=1000)
    assert result["train_samples"] == 600 and result["test_samples"] == 200   # the train split only
    assert result["losses"][1] < result["losses"][0] < 2.3  # ln(10) is chance
    assert result["test_accuracy"] > 0.3  # chance is 0.1 (this seeded run gets about 0.5)
    model = LeNet5()
    model.load_state_dict(torch.load(out, weights_only=True))
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.pt"]  # no temporary left behind
    assert torch.get_num_threads() == threads  # global torch settings restored
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    again = train(None, epochs=1, seed=0, limit=300)
    assert train(None, epochs=1, seed=0, limit=300)["losses"] == again["losses"]  # seeded


def test_cli_prints_json(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["--out", str(out), "--epochs", "1", "--limit", "300"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"test_accuracy", "seconds"} and out.is_file()


def test_missing_output_folder_fails_before_training(tmp_path):
    with pytest.raises(HardenError, match="does not exist"):
        train(tmp_path / "no" / "m.pt", epochs=1, limit=300)
