"""What the experiment scripts share: the example LeNet-5 from a checkpoint, and ``--set name=json`` options."""

from __future__ import annotations

import json

import torch


def load_lenet(checkpoint: str) -> torch.nn.Module:
    """The example LeNet-5 with the state_dict at ``checkpoint`` (weights only), in eval mode."""
    from harden.examples.lenet import LeNet5

    model = LeNet5()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def parse_sets(entries: list[str]) -> dict:
    """``["name=json", ...]`` (repeated ``--set``) as a dict of decoded values."""
    out = {}
    for entry in entries:
        name, _, value = entry.partition("=")
        out[name] = json.loads(value)
    return out
