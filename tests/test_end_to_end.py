"""The README's main job on small data: train, layers, instrument, export, inspect, certify --check, evaluate."""

import json

from typer.testing import CliRunner

from harden.cli.app import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_main_job_on_small_mnist(tmp_path):
    from harden.examples.train_lenet import train

    checkpoint = tmp_path / "lenet.pt"
    trained = train(checkpoint, epochs=3, limit=1500)   # 900 training digits (the train split only)
    assert trained["test_accuracy"] > 0.7

    layers = json.loads(run("layers", checkpoint, "--arch", "harden.examples.lenet:LeNet5", "--data", "mnist", "--json").stdout)
    assert layers["sites"] == ["relu1", "relu2", "relu3", "relu4"]

    bundle = tmp_path / "lenet.hardened"
    run("instrument", checkpoint, "--arch", "harden.examples.lenet:LeNet5", "--data", "mnist", "--limit", "1500",
        "--method", "ctt-strict:steps=100", "--key", "e2e", "-o", bundle)   # a small budget: the default is slow here
    onnx_path = tmp_path / "lenet.onnx"
    exported = json.loads(run("export", bundle, "-o", onnx_path, "--json").stdout)
    assert exported["parity"]["abs_diff"]["logits"] <= 1e-4

    shown = json.loads(run("inspect", onnx_path, "--json").stdout)
    assert shown["manifest"]["methods"][0]["sites"] == ["relu1", "relu2", "relu3", "relu4"]

    certified = json.loads(run("certify", bundle, "--eps", "0.001", "--limit", "40", "--check", "20", "--json").stdout)
    result = certified["results"]["0.001"]
    assert 0.0 <= result["original"]["robust"] <= 1.0
    assert result["hardened"]["detect_or_robust"] >= result["hardened"]["robust"]
    assert certified["check"]["0.001"]["violations"] == 0
    assert len(result["placement"]) == 4

    # linear-relaxation bounds certify at least what intervals do, on the same samples, still sound
    tight = json.loads(run("certify", bundle, "--eps", "0.001", "--limit", "40", "--check", "20", "--bounds", "crown",
                           "--json").stdout)
    tight_result = tight["results"]["0.001"]
    assert tight_result["original"]["robust"] >= result["original"]["robust"]
    assert tight_result["hardened"]["detect_or_robust"] >= result["hardened"]["detect_or_robust"]
    assert tight["check"]["0.001"]["violations"] == 0

    evaluated = json.loads(run("evaluate", onnx_path, "--attack", "fgsm:eps=0.2", "--limit", "60", "--json").stdout)
    (row,) = evaluated["rows"]
    assert row["attack"] == "fgsm:eps=0.2"
    assert row["accuracy"] < evaluated["clean_accuracy"]
    assert 0.0 <= row["detection_rate"] <= 1.0

    _certified_inputs_resist_the_adaptive_attack(bundle, onnx_path)


def _certified_inputs_resist_the_adaptive_attack(bundle, onnx_path):
    """The line that holds: no adaptive attack within eps succeeds on an input certified detect-or-robust at eps,
    as judged by the exported graph (a success would be a soundness bug, of the bounds or of the export)."""
    import numpy as np

    from harden.evaluation.adaptive import AdaptiveSettings, adaptive_attack
    from harden.api import bundle_data, ctt_traps
    from harden.certification.certify import certify_samples
    from harden.bundle.archive import load_bundle
    from harden.export.runtime import OnnxGraph

    hardened, manifest = load_bundle(bundle)
    data = bundle_data(manifest)
    x, y = data.test.x[:60], data.test.y[:60]
    graph = OnnxGraph(onnx_path)

    def judge(batch):
        out = graph.run(batch)
        return out["logits"].argmax(1), out["alarm"]

    def successes(eps):
        # Fewer restarts than the CLI's (supports and step rules) keep CI quick; each restart only adds wins.
        settings = AdaptiveSettings(eps=eps, steps=30, supports=("all", "ink"), step_rules=("sign",))
        result = adaptive_attack(hardened, x.numpy(), y.numpy(), settings, input_range=data.input_range, judge=judge)
        predicted, alarm = judge(result["x_adv"])
        return (predicted != y.numpy()) & ~alarm

    certified = 0
    for eps in (0.002, 0.005):
        held = certify_samples(hardened.classifier, ctt_traps(hardened), x, y, eps, data.input_range,
                               bounds="crown")["detect_or_robust"].numpy()
        broken = successes(eps) & held
        assert not broken.any(), f"eps {eps}: certified inputs {np.nonzero(broken)[0]} broken"
        certified += int(held.sum())
    assert certified > 0
    assert successes(0.1).any()   # the attack is not vacuous: it breaks inputs no certificate covers
