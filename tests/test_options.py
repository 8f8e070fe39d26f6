"""Typed method options: `--method NAME:key=value,...`, `harden methods`, recipes and their round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harden.core.options import Param, split_spec, split_top
from harden.errors import HardenError
from harden.methods import load_all  # noqa: F401
from harden.methods.base import METHODS, MethodSpec, parse_method


def invoke(*args):
    from harden.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- the text syntax


def test_split_respects_brackets():
    assert split_top("a=1,b=[x,y],c=[p:q=1,r=2]", ",") == ["a=1", "b=[x,y]", "c=[p:q=1,r=2]"]
    assert split_top("fgsm:eps=auto+[pgd:eps=0.1,steps=20]", "+") == ["fgsm:eps=auto", "pgd:eps=0.1,steps=20"]
    assert split_spec("ctt-strict:eps=auto,layers=[relu1,relu2]", "method") == (
        "ctt-strict", {"eps": "auto", "layers": "relu1,relu2"})
    for bad, message in [("x:a=[1", "never closed"), ("x:a=1]", "closes no"), ("x:a", "not key=value"),
                         ("x:a=1,a=2", "given twice"), (":a=1", "has no name"), ("x:", "nothing after")]:
        with pytest.raises(HardenError, match=message):
            split_spec(bad, "method")


def _valid_text(param: Param) -> str:
    """A value of the option's type inside its range (its default where there is one)."""
    if param.many:
        return "+".join(f"[{v}]" for v in param.default) if param.default else "x"
    if param.choices:
        return param.choices[-1]
    if param.kind is bool:
        return "true"
    if param.keywords:
        return param.keywords[0]
    if param.kind is str:
        return str(param.default) if param.default is not None else "x"
    low = param.minimum if param.minimum is not None else 0.0
    high = param.maximum if param.maximum is not None else low + 10
    value = (low + high) / 2 if param.kind is float else int(low) + 1
    return str(value)


def _ill_typed(param: Param) -> str | None:
    if param.kind in (int, float) and not param.many:
        return "lots"
    if param.kind is bool:
        return "maybe"
    if param.choices:
        return "nonsense"
    return None


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_schema_parses_valid_and_refuses_unknown_and_ill_typed_options(name):
    method = METHODS.get(name)
    params = method.option_set.params()
    assert all(p.doc and p.describe_kind() for p in params)
    defaults = parse_method(name)
    assert defaults.label() == name   # nothing differs from the defaults
    for param in params:
        if param.name in ("second_model", "second_arch", "train_second"):
            continue   # mutually dependent: checked together in test_cross_option_checks
        text = f"{name}:{param.name}={_valid_text(param)}"
        spec = parse_method(text)
        assert parse_method(spec.label()) == spec, text   # the label parses back to the same options
        bad = _ill_typed(param)
        if bad is not None:
            with pytest.raises(HardenError, match=f"method '{name}': {param.name}="):
                parse_method(f"{name}:{param.name}={bad}")
    with pytest.raises(HardenError) as err:
        parse_method(f"{name}:no_such_option=1")
    message = str(err.value)
    assert "no option 'no_such_option'" in message and "\n" not in message
    assert all(p.name in message for p in params)   # the valid ones are listed


def test_ranges_are_enforced():
    for text, message in [("ctt-lite:mask_ratio=0", "must be > 0"), ("ctt-lite:mask_ratio=1.5", "must be <= 1"),
                          ("ctt-strict:eps=-1", "must be > 0"), ("ctt-strict:eps=nan", "must be finite"),
                          ("ctt-strict:steps=2.5", "whole number"), ("nic:nu=0", "must be > 0")]:
        with pytest.raises(HardenError, match=message):
            parse_method(text)


def test_cross_option_checks():
    with pytest.raises(HardenError, match="not both"):
        parse_method("ctt-strict:steps=10,epochs=2")
    with pytest.raises(HardenError, match="not both"):
        parse_method("mismatch:second_model=a.pt2,train_second=true")
    with pytest.raises(HardenError, match="give second_model too"):
        parse_method("mismatch:second_arch=a.b:c")
    with pytest.raises(HardenError, match="attacks: unknown attack 'nosuch'"):
        parse_method("safetynet:attacks=nosuch")
    assert parse_method("mismatch:attacks=saltpepper+[fgsm:eps=auto]").settings.attacks == ("saltpepper", "fgsm:eps=auto")


def test_python_values_and_text_agree():
    by_text = parse_method("safetynet:layers=[relu1,relu2],attacks=fgsm:eps=0.1+[pgd:eps=0.1,steps=3],svm_c=2")
    by_value = MethodSpec.of("safetynet", layers="relu1,relu2", attacks=["fgsm:eps=0.1", "pgd:eps=0.1,steps=3"],
                             svm_c=2)
    assert by_text == by_value
    assert by_value.settings.svm_c == 2.0 and isinstance(by_value.settings.svm_c, float)


# --------------------------------------------------------------------------- the CLI


def test_methods_command_lists_methods_and_options():
    listing = invoke("methods", "--json")
    assert listing.exit_code == 0, listing.output
    assert {m["name"] for m in json.loads(listing.stdout)} == set(METHODS.names())
    shown = json.loads(invoke("methods", "ctt-strict", "--json").stdout)
    options = {o["name"]: o for o in shown["options"]}
    assert options["eps"]["default"] == "scaled" and "auto" in options["eps"]["type"]
    assert options["mask_ratio"]["type"] == "float (> 0, <= 1)"
    text = invoke("methods", "nic")
    assert text.exit_code == 0 and "detectors" in text.stdout
    one_line_error(invoke("methods", "magic"), "unknown method 'magic'", "ctt-strict")


def test_help_shows_flags_without_a_value():
    out = invoke("instrument", "--help").stdout
    line = next(line for line in out.splitlines() if "--json" in line)
    assert "<bool>" not in line and "bool" not in line.split("--json")[1].split("Print")[0]


def test_bad_method_options_on_the_command_line_are_one_line_and_write_nothing(tiny_model, tmp_path):
    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    out = tmp_path / "x.hardened"
    base = ("instrument", state, "--arch", "conftest:TinyCNN", "--data", "digits", "--key", "k", "-o", out)
    one_line_error(invoke(*base, "--method", "ctt-lite:ratio=0.1"), "method 'ctt-lite' has no option 'ratio'",
                   "mask_ratio")
    one_line_error(invoke(*base, "--method", "ctt-strict:steps=many"), "steps='many' is not a number")
    one_line_error(invoke(*base), "choose at least one --method")
    assert not out.exists()


# --------------------------------------------------------------------------- recipes


RECIPE = """
data = "digits"
fpr = 0.05
fpr_confidence = 0.0
policy = "any"
limit = 700

[methods.ctt-lite]
mask_ratio = 0.05
quantile = 0.99

[methods.safetynet]
layers = "last:1"
code = "binary"
attacks = ["fgsm:eps=0.2"]
max_train = 120
svm_c = 1.0
svm_gamma = 0.05
"""


def _arrays(path):
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if n.endswith(".npy") and "golden" not in n}


def test_recipe_round_trip_gives_the_same_bundle(tiny_model, tmp_path, one_thread):
    """recipe -> bundle -> manifest's recipe -> the same bundle (weights, thresholds, every method's options)."""
    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    (tmp_path / "r.toml").write_text(RECIPE)
    first, second = tmp_path / "a.hardened", tmp_path / "b.hardened"
    made = invoke("instrument", state, "--arch", "conftest:TinyCNN", "--recipe", tmp_path / "r.toml",
                  "--key", "k", "-o", first, "--json")
    assert made.exit_code == 0, made.output
    manifest = json.loads(made.stdout)["manifest"]
    recipe = manifest["recipe"]
    assert recipe["fpr"] == 0.05 and recipe["limit"] == 700 and recipe["data"] == "digits"
    assert recipe["methods"]["ctt-lite"]["quantile"] == 0.99
    assert recipe["methods"]["safetynet"]["attacks"] == ["fgsm:eps=0.2"]
    assert [m["config"]["options"] for m in manifest["methods"]] == list(recipe["methods"].values())

    printed = invoke("inspect", first, "--recipe")
    assert printed.exit_code == 0, printed.output
    (tmp_path / "again.toml").write_text(printed.stdout)
    again = invoke("instrument", state, "--arch", "conftest:TinyCNN", "--recipe", tmp_path / "again.toml",
                   "--key", "k", "-o", second, "--json")
    assert again.exit_code == 0, again.output
    manifest2 = json.loads(again.stdout)["manifest"]
    assert manifest2["recipe"] == recipe
    for a, b in zip(manifest["methods"], manifest2["methods"]):
        assert a["threshold"] == b["threshold"] and a["config"]["options"] == b["config"]["options"]
    arrays_a, arrays_b = _arrays(first), _arrays(second)
    assert arrays_a.keys() == arrays_b.keys() and arrays_a == arrays_b


def test_flags_win_over_the_recipe_and_merge_method_options(tiny_model, tmp_path):
    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    (tmp_path / "r.toml").write_text('data = "digits"\nfpr = 0.2\n\n[methods.ctt-lite]\nmask_ratio = 0.05\n')
    made = invoke("instrument", state, "--arch", "conftest:TinyCNN", "--recipe", tmp_path / "r.toml", "--fpr", "0.1",
                  "--method", "ctt-lite:quantile=0.9", "--key", "k", "-o", tmp_path / "m.hardened", "--json")
    assert made.exit_code == 0, made.output
    recipe = json.loads(made.stdout)["manifest"]["recipe"]
    assert recipe["fpr"] == 0.1
    assert recipe["methods"]["ctt-lite"]["mask_ratio"] == 0.05 and recipe["methods"]["ctt-lite"]["quantile"] == 0.9


@pytest.mark.parametrize("text, message", [
    ("data = 3\n", "data = 3 has the wrong type"),
    ("dta = 'digits'\n", "unknown setting(s) dta"),
    ("key = 'secret'\n", "the key is never part of a recipe"),
    ("[methods.magic]\n", "unknown method 'magic'"),
    ("[methods.ctt-lite]\nmask_ratio = 'x'\n", "mask_ratio='x' is not a number"),
    ("data = [\n", "not valid TOML"),
])
def test_bad_recipes_are_one_line(tiny_model, tmp_path, text, message):
    state = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), state)
    (tmp_path / "r.toml").write_text(text)
    out = tmp_path / "x.hardened"
    one_line_error(invoke("instrument", state, "--arch", "conftest:TinyCNN", "--recipe", tmp_path / "r.toml",
                          "--key", "k", "-o", out), message)
    assert not out.exists()


def test_toml_writer_reads_back():
    from harden.instrumentation.recipe import recipe_from_dict, to_toml, tomllib

    recipe = {"data": "a \"quoted\" path", "input_range": [0.0, 1.0], "limit": None, "seed": 3, "fpr": 0.02,
              "methods": {"nic": {"provenance_gamma": None, "layers": "all", "transform": False, "nu": 0.01}}}
    back = tomllib.loads(to_toml(recipe))
    assert back["data"] == recipe["data"] and back["input_range"] == [0.0, 1.0] and "limit" not in back
    assert back["methods"]["nic"]["provenance_gamma"] == "none"
    parsed = recipe_from_dict(back)
    assert parsed.specs()[0].settings.provenance_gamma is None
    assert np.isclose(parsed.shared["fpr"], 0.02)


def test_attacks_command_and_evaluate_help_name_every_attack():
    from harden.attacks.catalog import ATTACKS
    from harden.cli.attacks import ATTACK_NAMES

    canonical = {n for n in ATTACKS.names() if ATTACKS.get(n).name == n}
    assert set(ATTACK_NAMES) == canonical
    help_text = " ".join(invoke("evaluate", "--help").stdout.split())
    assert all(name in help_text for name in ATTACK_NAMES)
    listing = json.loads(invoke("attacks", "--json").stdout)
    assert {a["name"] for a in listing} == canonical
    pgd = json.loads(invoke("attacks", "pgd", "--json").stdout)
    assert {p["name"] for p in pgd["parameters"]} >= {"eps", "eps_step", "steps"}
    one_line_error(invoke("attacks", "nope"), "unknown attack 'nope'")


def test_usage_errors_are_one_line_and_point_old_flags_at_the_method_option(tmp_path):
    one_line_error(invoke("instrument", tmp_path / "m.pt", "--data", "digits", "--method", "ctt-strict", "--eps", "0.1"),
                   "No such option: --eps",
                   "--method abstain:eps=... or ctt-loose:eps=... or ctt-strict:eps=...")
    one_line_error(invoke("instrument", tmp_path / "m.pt", "--nic-detectors", "3"), "nic:detectors=...")
    one_line_error(invoke("certify"), "Missing argument", "harden certify --help")
