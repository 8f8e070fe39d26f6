"""Run a function as the ranks of a gloo process group, as torchrun would start them (its environment variables),
for tests that compare several ranks with one process.  The work itself is harden's API, unchanged."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, task, folder: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from harden.core.distributed import session

    with session("cpu") as world:
        result = task(Path(folder))
    if world.writer:
        (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))


def run_ranks(task, folder: Path, size: int = 2):
    """``task(folder)`` on ``size`` ranks (spawned processes, one gloo group); rank 0's result."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(size, free_port(), task, str(folder)), nprocs=size, join=True)
    return pickle.loads((Path(folder) / "result.pkl").read_bytes())


# ------------------------------------------------------------------------------------------------ workloads

INSTRUMENT = {"limit": 600}   # 360 train, 120 calibration, 120 test digits
FINETUNE = {"steps": 20, "lr": 3e-4}
ATTACKS = ["pgd:eps=0.1,steps=3", "noise"]   # both random: PGD starts at a random point


def harden_pipeline(folder: Path) -> dict:
    """ctt-strict fine-tuning, then certify (crown, with the sampling check) and evaluate (ART attacks and the
    adaptive attack) of the result, in small batches so that the ranks split them: everything that runs on
    several ranks, on the tiny digits model in ``folder``."""
    import numpy as np

    from conftest import TinyCNN
    from harden.api import bundle_data, certify, evaluate
    from harden.bundle.archive import load_bundle, save_bundle
    from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import MethodSpec, Options

    model = TinyCNN()
    model.load_state_dict(torch.load(folder / "tiny.pt", weights_only=True))
    data = load_data("digits", seed=0, **INSTRUMENT)
    spec = MethodSpec.of("ctt-strict", mask_ratio=0.05, eps=0.01, **FINETUNE)
    hardened = instrument(model, data, [spec], Options(key="dist"))
    path = folder / f"pipeline-{os.environ.get('WORLD_SIZE', '1')}.hardened"
    save_bundle(hardened, path)
    bundle, manifest = load_bundle(path)
    heads = {k: v.clone() for k, v in bundle.methods[0].head.state_dict().items()}
    certificates = certify(bundle, manifest, [0.02], bounds="crown", check=4, limit=60, batch_size=16)
    attacked = evaluate(bundle, manifest, ATTACKS, split="train", limit=90, batch_size=32).to_dict()
    test = bundle_data(manifest).test
    settings = AdaptiveSettings(eps=0.1, steps=3, lams=(1.0,), supports=("all",), step_factors=(1.0,),
                                step_rules=("sign",), batch_size=8)
    adaptive = adaptive_attack(bundle, test.x[:20].numpy(), test.y[:20].numpy(), settings,
                               input_range=tuple(manifest["input"]["range"]))
    return {"manifest": manifest, "heads": heads, "certify": certificates, "evaluate": attacked,
            "adaptive": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in adaptive.items()}}


LAN = {"g_steps": 200, "f2_steps": 300, "beta": 2.0, "batch_size": 45}   # 45 rows a batch: uneven shares
FLOW = "flow:delta=0.3,steps=6,check_every=3,batch_size=45"


def training_pipeline(folder: Path) -> dict:
    """The other trainings that run data-parallel: lan's g and f2, on a classifier fine-tuned by ``--finetune
    flow`` (the digits model in ``folder``)."""
    from conftest import TinyCNN
    from harden.bundle.archive import load_bundle, save_bundle
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import MethodSpec, Options

    model = TinyCNN()
    model.load_state_dict(torch.load(folder / "tiny.pt", weights_only=True))
    data = load_data("digits", seed=0, **INSTRUMENT)
    hardened = instrument(model, data, [MethodSpec.of("lan", **LAN)], Options(key="dist"), finetune=FLOW)
    path = folder / f"training-{os.environ.get('WORLD_SIZE', '1')}.hardened"
    save_bundle(hardened, path)
    bundle, manifest = load_bundle(path)
    tensors = {f"head.{k}": v.clone() for k, v in bundle.methods[0].head.state_dict().items()}
    tensors.update({f"classifier.{k}": v.clone() for k, v in bundle.classifier.state_dict().items()})
    return {"manifest": manifest, "tensors": tensors}


def mask_classifier_task(folder: Path) -> dict:
    """lan's f2 alone, trained on fixed masks (so that both runs see the same input bit for bit)."""
    from harden.methods.lan import LanOptions, train_mask_classifier

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(360, 1, 8, 8, generator=generator)
    labels = (masks.mean((1, 2, 3)) * 1000).long() % 10
    f2 = train_mask_classifier(masks, labels, 10, LanOptions(f2_steps=300, batch_size=45), seed=1)
    return {k: v.clone() for k, v in f2.state_dict().items()}
