"""Where NIC's export parity error comes from: the head (torch vs onnxruntime, amplified by g's ramps) or the SVMs.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.experiments.nic_parity --checkpoint out/lenet5_mnist.pt \
        --key nic-results --fpr 0.05 --variant both --variant value --variant provenance --variant both-no-output

Each variant is instrumented as ``harden instrument --method nic`` does, then on the bundle's held-out inputs (the
ones ``harden export`` checks) the ``nic.score`` scale (``(raw - threshold) / scale``, the exported output) is
compared stage by stage, with the export check's measure (absolute below 1, relative above):

* ``head``: max |feature difference| between torch and onnxruntime (the head alone exported), value columns and
  probe columns, and how many value entries lie on a ramp of g in torch;
* ``svm_skl2onnx`` / ``svm_dense``: the composite ONNX detector against scikit-learn on the SAME (torch) features:
  the SVMs' own error, float32 skl2onnx against the float64 dense graph;
* ``head_through_sklearn``: scikit-learn on onnxruntime's features against scikit-learn on torch's: the head's
  error as the exact SVMs see it; ``head_off_ramps``: the same with the value entries that lie on a ramp taken
  from torch (what is left once the ramps are out);
* ``total_skl2onnx`` / ``total_dense``: what ``harden export`` measures, old and new graph;
* ``head.per_site``: per value site, the largest feature difference, the std of that feature's channel and
  ``score_diff_alone`` (torch's features but that site's value columns from onnxruntime);
* ``head.reduce``: per conv site, the per-channel means in torch and onnxruntime against float64 means of the
  same activations (``float64_means`` 0 = the activations themselves are identical: summation order is all).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench.experiments.example import load_lenet

VARIANTS = {
    "both": {},
    "value": {"nic_invariants": "value"},
    "provenance": {"nic_invariants": "provenance"},
    "both-no-output": {"nic_output": False},
}


def diff(ref, got) -> float:
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return float((np.abs(ref - got) / np.maximum(1.0, np.abs(ref))).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--key", default="nic-results")
    parser.add_argument("--fpr", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from harden.detectors.nic_onnx import build_composite
    from harden.export import INPUT_NAME
    from harden.export.torch_graph import export_module
    from harden.instrumentation.pipeline import instrument
    from harden.io.data import load_data
    from harden.methods.base import Options
    from harden.methods.nic import layout
    from harden.export.runtime import OnnxGraph

    model = load_lenet(args.checkpoint)
    data = load_data("mnist", seed=0)
    for variant in args.variant or list(VARIANTS):
        hardened = instrument(model, data, ["nic"], Options(key=args.key, fpr=args.fpr, extra=VARIANTS[variant]))
        method = hardened.method("nic")
        j = [m.name for m in hardened.methods].index("nic")
        threshold, scale = float(hardened.policy.thresholds[j]), float(hardened.policy.scales[j])

        def scored(raw):
            return (np.asarray(raw, dtype=np.float64) - threshold) / scale

        x = torch.as_tensor(hardened.golden["input"])
        x = x[torch.isfinite(x.flatten(1)).all(1)]  # the export check compares values on finite rows only
        f_torch = hardened.torch_outputs(x)["nic.features"]
        head = export_module(hardened.graph, (x[:2],), [INPUT_NAME], hardened.output_names())
        f_ort = OnnxGraph(head.SerializeToString()).session.run(["nic.features"], {INPUT_NAME: x.numpy()})[0]

        # Which value entries lie on a ramp of g: record g's input (torch's joined standardised features) on the way.
        config, h = method.config, method.head
        seen: list[np.ndarray] = []
        plain_joined = h.from_joined

        def recording_joined(z, logits=None):
            seen.append(z.detach().numpy().copy())
            return plain_joined(z, logits)

        reduced_torch: dict[int, list[np.ndarray]] = {}
        plain_reduce = h.reduce

        def recording_reduce(i, activation):
            out = plain_reduce(i, activation)
            if h.spatial[i]:
                exact = activation.detach().double().flatten(2).mean(2)
                reduced_torch.setdefault(i, []).append((out.detach().double().numpy(), exact.numpy()))
            return out

        h.from_joined, h.reduce = recording_joined, recording_reduce
        try:
            f_torch = hardened.torch_outputs(x)["nic.features"]
        finally:
            del h.from_joined, h.reduce
        # onnxruntime's reduced features: the outputs of the head's ReduceMean nodes, in site order.
        import onnx
        probe_head = onnx.ModelProto()
        probe_head.CopyFrom(head)
        means = [n.output[0] for n in probe_head.graph.node if n.op_type == "ReduceMean"]
        acts = [n.input[0] for n in probe_head.graph.node if n.op_type == "ReduceMean"]
        inferred = onnx.shape_inference.infer_shapes(probe_head)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        for name in means + acts:
            probe_head.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
        run = OnnxGraph(probe_head.SerializeToString()).session.run(means + acts, {INPUT_NAME: x.numpy()})
        r_ort, a_ort = run[: len(means)], run[len(means):]
        reduce_report = []
        for i, r_o, a_o in zip(sorted(reduced_torch), r_ort, a_ort):
            r_t, r_exact = (np.concatenate(v) for v in zip(*reduced_torch[i]))
            r_o = r_o.reshape(r_t.shape).astype(np.float64)
            reduce_report.append({"torch_vs_ort": float(np.abs(r_t - r_o).max()),
                                  "torch_vs_float64_mean": float(np.abs(r_t - r_exact).max()),
                                  "ort_vs_float64_mean": float(np.abs(r_o - r_exact).max()),
                                  # both sides averaged in float64: what is left is the classifier's activations
                                  "float64_means": float(np.abs(a_o.reshape(len(x), r_t.shape[1], -1)
                                                                .astype(np.float64).mean(2) - r_exact).max())})
        on_ramp = np.zeros_like(f_torch, dtype=bool)
        (entry,) = layout(config)  # one detector set in these variants
        for i, (a, b) in enumerate(entry["value"]):
            v = np.concatenate(seen)[:, a:b].astype(np.float32) * getattr(h, f"scale_0_{i}").numpy()
            frac = v - np.floor(v)
            ceil = getattr(h, f"ceil_0_{i}").numpy()
            on_ramp[:, a:b] = np.where(ceil, frac < h.ramp, frac > 1 - h.ramp) & (frac != 0)
        value_cols = np.zeros(f_torch.shape[1], dtype=bool)
        for a, b in entry["value"]:
            value_cols[a:b] = True
        fdiff = np.abs(f_torch - f_ort)
        per_site = []
        for i, (a, b) in enumerate(entry["value"]):
            col = int(fdiff[:, a:b].max(0).argmax())
            per_site.append({"max": float(fdiff[:, a:b].max()), "std": float(getattr(h, f"std_{i}")[col]),
                             "mean": float(getattr(h, f"mean_{i}")[col]),
                             "min_std": float(getattr(h, f"std_{i}").min())})
        mixed = np.where(on_ramp, f_torch, f_ort)

        detector = method.detector
        composite = {k: OnnxGraph(build_composite("f", "r", detector.n_features, detector.sets, detector.vote,
                                                  kernel=k).SerializeToString()) for k in ("skl2onnx", "dense")}

        def onnx_raw(kernel, f):
            return composite[kernel].session.run(None, {"f": np.ascontiguousarray(f, dtype=np.float32)})[0]

        ref = scored(detector.score(f_torch))
        # each site's share: torch's features but for that site's value columns, taken from onnxruntime
        for i, (a, b) in enumerate(entry["value"]):
            only = f_torch.copy()
            only[:, a:b] = f_ort[:, a:b]
            per_site[i]["score_diff_alone"] = diff(ref, scored(detector.score(only)))
        row = {
            "variant": variant, "samples": len(x),
            "head": {"value_max": float(fdiff[:, value_cols].max(initial=0.0)),
                     "probe_max": float(fdiff[:, ~value_cols].max(initial=0.0)),
                     "value_on_ramp": int(on_ramp.sum()), "value_entries": int(value_cols.sum() * len(x)),
                     "per_site": per_site, "reduce": reduce_report, "max_off_ramp_value": float(fdiff[:, value_cols][~on_ramp[:, value_cols]].max(initial=0.0))},
            "svm_skl2onnx": diff(ref, scored(onnx_raw("skl2onnx", f_torch))),
            "svm_dense": diff(ref, scored(onnx_raw("dense", f_torch))),
            "head_through_sklearn": diff(ref, scored(detector.score(f_ort))),
            "head_off_ramps": diff(ref, scored(detector.score(mixed))),
            "total_skl2onnx": diff(ref, scored(onnx_raw("skl2onnx", f_ort))),
            "total_dense": diff(ref, scored(onnx_raw("dense", f_ort))),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
