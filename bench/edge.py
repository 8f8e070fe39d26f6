"""The exported graph on the runtimes a deployer would try: does it load, do logits and alarms agree with
onnxruntime's, does a NaN / inf row still alarm.  Prints JSON (one row per bundle x runtime).

    python -m bench.edge out/edge/ctt-strict.hardened out/edge/safetynet.hardened out/edge/nic.hardened \
        --limit 200 --out out/edge/table.json [--tflite-python /path/to/venv/bin/python]

Runtimes (each cell says why it cannot run when it cannot):

- ``ort-<level>``: onnxruntime at every graph optimisation level (the reference is ``ort-all`` of the default
  export, itself parity-checked against the Python side);
- ``ort-portable``: ``harden export --target portable`` (float32 throughout);
- ``openvino``, ``tvm``: OpenVINO and Apache TVM (relax) on the default graph, and on the portable one;
- ``fp16``: onnxconverter-common's float16 conversion (``keep_io_types``) of the portable graph, on onnxruntime;
- ``int8-dynamic-<recipe>``, ``int8-static-<recipe>``: onnxruntime.quantization with the recipes of
  :mod:`harden.export.quantize` (static: calibrated on 200 calibration-split inputs);
- ``tflite``: onnx2tf (TensorFlow, so in a separate virtual environment given by ``--tflite-python``) of the
  portable graph, run by the TFLite interpreter.

Inputs: the first ``--limit`` test-split inputs, their FGSM and PGD (L-inf 0.1) versions made on the
classifier, and two rows with a NaN and an inf.  Each set is run as its own batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from harden.api import bundle_data
from harden.attacks.catalog import parse_attack, run_attack
from harden.bundle.archive import load_bundle
from harden.export import build_onnx, export_onnx
from harden.export.portable import float32_throughout
from harden.export.quantize import RECIPES, quantize_int8
from harden.export.runtime import OPTIMIZATION_LEVELS, OnnxGraph

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def ort_runner(model: bytes, level: str = "all") -> Runner:
    return OnnxGraph(model, optimization=level).run


def openvino_runner(model: bytes, f32: bool = False) -> Runner:
    """OpenVINO's CPU plugin as configured out of the box, or with its inference precision pinned to f32 (the
    default may compute in bf16 / f16 where the processor supports it)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"} if f32 else {}
    compiled = core.compile_model(core.read_model(model=model), "CPU", config)
    names = [o.get_any_name() for o in compiled.outputs]

    def run(x):
        result = compiled(np.ascontiguousarray(x, dtype=np.float32))
        return {name: np.asarray(result[i]) for i, name in enumerate(names)}

    return run


def tvm_runner(model: bytes) -> Runner:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    proto = onnx.load_from_string(model)
    names = [o.name for o in proto.graph.output]
    mod = from_onnx(proto, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = relax.transform.LegalizeOps()(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

    def run(x):
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32)))
        return {name: np.asarray(out[i].numpy()) for i, name in enumerate(names)}

    return run


def fp16_model(portable: bytes) -> bytes:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load_from_string(portable)
    del model.graph.value_info[:]   # declared float32 types the converter does not update (it re-infers them)
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    return converted.SerializeToString()


TFLITE_SCRIPT = r"""
import json, sys, numpy as np, onnx2tf
from pathlib import Path
folder = Path(sys.argv[1])
onnx2tf.convert(input_onnx_file_path=str(folder / "model.onnx"), output_folder_path=str(folder / "tf"),
                keep_ncw_or_nchw_or_ncdhw_input_names=["input"], non_verbose=True)
from ai_edge_litert.interpreter import Interpreter
model = sorted((folder / "tf").glob("*_float32.tflite"))[0]
inputs = np.load(folder / "inputs.npz")
results = {}
for key in inputs.files:
    x = inputs[key]
    interpreter = Interpreter(model_path=str(model))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    # the signature keeps the ONNX output names; the tensors themselves are named PartitionedCall:N
    signature = interpreter._get_full_signature_list()
    outputs = next(iter(signature.values()))["outputs"] if signature else {}
    named = {v: k for k, v in outputs.items()}
    for detail in interpreter.get_output_details():
        name = named.get(detail["index"], detail["name"])
        results[f"{key}|{name}"] = np.array(interpreter.get_tensor(detail["index"]))
np.savez(folder / "outputs.npz", **results)
"""


def tflite_outputs(portable: bytes, sets: dict[str, np.ndarray], python: str) -> dict[str, dict[str, np.ndarray]]:
    """onnx2tf conversion and the TFLite interpreter, in the interpreter of ``python`` (TensorFlow's venv)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "model.onnx").write_bytes(portable)
        np.savez(folder / "inputs.npz", **sets)
        done = subprocess.run([python, "-c", TFLITE_SCRIPT, str(folder)], capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
            error = next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1] if lines else "")
            raise RuntimeError(f"onnx2tf/TFLite: {error.strip()[:300]}")
        raw = np.load(folder / "outputs.npz")
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in raw.files:
            part, name = key.split("|", 1)
            out.setdefault(part, {})[name] = raw[key]
        return out


def _match(names: list[str], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by the ONNX contract's names (converters sanitise names: '.' and '-' become '_')."""
    def plain(s):
        return "".join(c if c.isalnum() else "_" for c in s).lower()

    by_plain = {plain(k): v for k, v in out.items()}
    return {n: out[n] if n in out else by_plain.get(plain(n)) for n in names}


def compare_sets(reference: dict[str, dict[str, np.ndarray]], got: dict[str, dict[str, np.ndarray]]) -> dict:
    """Agreement of ``got`` with ``reference`` per input set: logits (argmax agreement, largest difference),
    alarms (fraction equal), and whether both non-finite rows alarm."""
    row: dict = {}
    for part, ref in reference.items():
        out = _match(list(ref), got[part])
        if out.get("logits") is None or out.get("alarm") is None:
            row[part] = {"error": f"outputs {sorted(got[part])} lack logits or alarm"}
            continue
        logits, alarm = out["logits"].astype(np.float64), out["alarm"].astype(bool).reshape(-1)
        if part == "nonfinite":
            row[part] = {"alarms": int(alarm.sum()), "of": len(alarm)}
            continue
        row[part] = {
            "argmax_agreement": float((logits.argmax(1) == ref["logits"].argmax(1)).mean()),
            "max_logit_diff": float(np.nanmax(np.abs(logits - ref["logits"]))),
            "alarm_agreement": float((alarm == ref["alarm"].astype(bool)).mean()),
            "alarm_rate": float(alarm.mean()), "reference_alarm_rate": float(ref["alarm"].mean()),
        }
    return row


def run_cell(name: str, make: Callable[[], Runner], sets: dict[str, np.ndarray], reference) -> dict:
    start = time.perf_counter()
    try:
        runner = make()
    except Exception as exc:
        return {"runtime": name, "loads": False, "error": _first_line(exc)}
    got = {}
    for part, x in sets.items():
        try:
            got[part] = runner(x)
        except Exception as exc:
            return {"runtime": name, "loads": True, "runs": False, "error": f"{part}: {_first_line(exc)}"}
    return {"runtime": name, "loads": True, "runs": True, **compare_sets(reference, got),
            "seconds": round(time.perf_counter() - start, 2)}


def bench_bundle(path: Path, limit: int, attacks: list[str], tflite_python: str | None,
                 only: list[str] | None = None) -> list[dict]:
    hardened, manifest = load_bundle(path)
    export_onnx(hardened)                                   # parity of the default graph with the Python side
    data = bundle_data(manifest)
    x, y = data.test.x[:limit].numpy(), data.test.y[:limit].numpy()
    lo, hi = manifest["input"]["range"]
    sets = {"clean": x}
    for text in attacks:
        sets[text] = run_attack(hardened.classifier, parse_attack(text), x, y, input_range=(lo, hi),
                                num_classes=manifest["num_classes"], seed=0)
    bad = x[:2].copy()
    bad[0].reshape(-1)[0], bad[1].reshape(-1)[-1] = np.nan, np.inf
    sets["nonfinite"] = bad
    default_model = build_onnx(hardened)
    default = default_model.SerializeToString()
    portable = float32_throughout(default_model)[0].SerializeToString()
    reference_run = ort_runner(default, "all")
    reference = {part: reference_run(v) for part, v in sets.items()}
    calibration = data.calibration.x[:200].numpy()

    cells: list[tuple[str, Callable[[], Runner]]] = []
    cells += [(f"ort-{level}", lambda level=level: ort_runner(default, level)) for level in OPTIMIZATION_LEVELS]
    cells += [("ort-portable", lambda: ort_runner(portable))]
    cells += [("openvino", lambda: openvino_runner(default)), ("openvino-f32", lambda: openvino_runner(default, True)),
              ("openvino-portable", lambda: openvino_runner(portable))]
    cells += [("tvm", lambda: tvm_runner(default)), ("tvm-portable", lambda: tvm_runner(portable))]
    cells += [("fp16-portable", lambda: ort_runner(fp16_model(portable)))]
    for mode in ("dynamic", "static"):
        for recipe in RECIPES:
            cells.append((f"int8-{mode}-{recipe}",
                          lambda mode=mode, recipe=recipe: ort_runner(quantize_int8(default_model, mode, recipe, calibration))))
    if only:
        cells = [(name, make) for name, make in cells if any(name.startswith(prefix) for prefix in only)]
        tflite_python = tflite_python if any("tflite".startswith(p) or p.startswith("tflite") for p in only) else None
    rows = []
    for name, make in cells:
        row = run_cell(name, make, sets, reference)
        rows.append({"bundle": path.name, "methods": [m.name for m in hardened.methods], **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if tflite_python:
        start = time.perf_counter()
        try:
            got = tflite_outputs(portable, sets, tflite_python)
            row = {"runtime": "tflite-portable", "loads": True, "runs": True, **compare_sets(reference, got),
                   "seconds": round(time.perf_counter() - start, 2)}
        except Exception as exc:
            row = {"runtime": "tflite-portable", "loads": False, "error": _first_line(exc)}
        rows.append({"bundle": path.name, "methods": [m.name for m in hardened.methods], **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--attack", action="append", default=None)
    parser.add_argument("--tflite-python", default=None, help="python of a venv with onnx2tf and ai-edge-litert")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runtime", action="append", default=None,
                        help="only the cells whose name starts with this (repeatable): e.g. fp16, int8-static, tflite")
    args = parser.parse_args(argv)
    rows = []
    for path in args.bundles:
        rows += bench_bundle(path, args.limit, args.attack or ["fgsm:eps=0.1", "pgd:eps=0.1"], args.tflite_python, args.runtime)
    text = json.dumps({"rows": rows}, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
