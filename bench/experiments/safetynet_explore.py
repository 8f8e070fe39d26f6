"""SafetyNet design experiments on the example LeNet-5 / bundled MNIST (numpy + scikit-learn, no export).

    python bench/experiments/safetynet_explore.py --checkpoint /tmp/safetynet/lenet.pt --adv /tmp/safetynet/adv.npz \
        --grid sites            # or codes, training, svm, budget ...

Reads the adversarial examples cached by ``safetynet_attacks.py``. For each configuration: fit the SVM on
natural (0) vs adversarial (1) codes of the cached training-split inputs, set the threshold on the natural
calibration split at --fpr (harden's own calibration rule), and report, per test attack, the detection rate on
adversarial examples from correctly classified inputs ("det", as ``harden evaluate``'s detection rate) and among
those that also fool the classifier ("det_succ"), the natural test FPR, ROC-AUC (natural test vs each set) and
the number of support vectors. One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harden.examples.lenet import LeNet5  # noqa: E402
from harden.detectors.calibration import calibrate  # noqa: E402
from harden.graph.analyse import feature_extractor  # noqa: E402
from harden.graph.trace import sites as graph_sites, trace  # noqa: E402
from harden.io.data import load_data  # noqa: E402
from harden.methods.safetynet import fit_svm, positive_quantiles  # noqa: E402

ATTACKS = ["fgsm:eps=0.1", "bim:eps=0.1", "pgd:eps=0.1", "deepfool", "cw"]


def acts_of(gm, names, x):
    ext = feature_extractor(gm, names)
    out = {n: [] for n in names}
    logits = []
    with torch.no_grad():
        for s in range(0, len(x), 500):
            lg, *acts = ext(torch.as_tensor(x[s:s + 500]))
            logits.append(lg.numpy())
            for n, a in zip(names, acts):
                out[n].append(a.numpy())
    return np.concatenate(logits), {n: np.concatenate(v) for n, v in out.items()}


def reduce(a, how):
    if a.ndim == 2 or how == "none":
        return a.reshape(len(a), -1)
    if how.startswith("max") and how[3:].isdigit():  # KxK max pool, stride K, ceil mode
        k = int(how[3:])
        return torch.nn.functional.max_pool2d(torch.from_numpy(a), k, ceil_mode=True).flatten(1).numpy()
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    return flat.max(2) if how == "max" else flat.mean(2)


def code(a, thresholds):
    return (a[:, None, :] > thresholds[None]).sum(1).astype(np.float32)


def latency(est, feats, model, rounds=30, threads=1):
    """Detector alone vs the plain LeNet-5 in onnxruntime at batch 256, and each export's error.

    One intra-op thread and process CPU time (not wall time): on a shared, saturated machine wall time mostly
    measures the neighbours; CPU time of a single-threaded session measures the work.
    """
    import statistics
    from harden.detectors.sklearn_onnx import SklearnDetector
    from harden.export.torch_graph import export_module
    from harden.methods.safetynet import RbfSvmDetector
    from harden.export.runtime import OnnxGraph

    x = torch.rand(256, 1, 28, 28)
    plain = OnnxGraph(export_module(trace(model), (x[:2],), ["input"], ["logits"]).SerializeToString(), threads=threads)
    dets = {"svmclassifier": SklearnDetector(est, "m", feats.shape[1], column=1),
            "matmul64": RbfSvmDetector(est, "m", feats.shape[1]),
            "matmul32": RbfSvmDetector(est, "m", feats.shape[1], gemm="float32")}
    ref = est.decision_function(feats)
    graphs = {k: OnnxGraph(d.onnx_model(), threads=threads) for k, d in dets.items()}
    runs = [(plain, {plain.input_name: x.numpy()})] + [(g, {g.input_name: feats}) for g in graphs.values()]
    times = [[] for _ in runs]
    for r in range(rounds + 3):
        for t, (g, feed) in zip(times, runs):
            t0 = time.process_time(); g.session.run(None, feed); dt = time.process_time() - t0
            if r >= 3:
                t.append(dt)
    med = [statistics.median(t) for t in times]
    row = {"plain_cpu_ms": round(med[0] * 1e3, 3), "threads": threads}
    for (k, g), m in zip(graphs.items(), med[1:]):
        err = float(np.abs(g.run(feats)["m.raw"] - ref).max()) if "m.raw" in g.run(feats) else None
        row[k] = {"ms": round(m * 1e3, 3), "ratio": round((med[0] + m) / med[0], 3), "max_err": err}
    print(json.dumps({"latency": row}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--adv", type=Path, required=True)
    p.add_argument("--grid", default="sites")
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument("--ntrain", type=int, default=1000)
    p.add_argument("--latency", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_data("mnist", seed=0)
    model = LeNet5()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    gm = trace(model.eval())
    names = [n.name for n in graph_sites(gm)]
    adv = dict(np.load(args.adv))
    ntr = args.ntrain
    xtr, ytr = data.train.x[:ntr].numpy(), data.train.y[:ntr].numpy()
    nte = len(adv["test/pgd:eps=0.1"])
    yte = data.test.y[:nte].numpy()

    _, A_all = acts_of(gm, names, data.train.x.numpy())
    _, A_nat = acts_of(gm, names, xtr)
    _, A_cal = acts_of(gm, names, data.calibration.x.numpy())
    lg_te, A_te = acts_of(gm, names, data.test.x.numpy())
    correct = lg_te[:nte].argmax(1) == yte
    A_tradv, fool_tr, A_teadv, keep_te, succ_te = {}, {}, {}, {}, {}
    for a in ATTACKS:
        lg, A_tradv[a] = acts_of(gm, names, adv[f"train/{a}"][:ntr])
        fool_tr[a] = lg.argmax(1) != ytr
        lg, A_teadv[a] = acts_of(gm, names, adv[f"test/{a}"])
        keep_te[a] = correct
        succ_te[a] = (lg.argmax(1) != yte)[correct]
    from sklearn.metrics import roc_auc_score

    def run(sites=("relu4",), codename="binary", how="none", train=("pgd:eps=0.1",), success_only=True,
            scaler=True, C=None, gamma=None, n=ntr, quantiles=(0.25, 0.5, 0.75), combine="concat", grid=None):
        t0 = time.perf_counter()
        feats = {}
        for s in sites:
            base = reduce(A_all[s], how)
            th = np.zeros((1, base.shape[1]), np.float32) if codename == "binary" else positive_quantiles(torch.from_numpy(base), quantiles).numpy()
            if codename == "raw":  # baseline: the continuous activations, no code
                feats[s] = lambda A, s=s: reduce(A[s], how).astype(np.float32)
            elif codename.startswith("levels"):  # baseline: finer codes, K quantiles of positive values
                k = int(codename[6:])
                thk = positive_quantiles(torch.from_numpy(base), [i / k for i in range(k)]).numpy()
                feats[s] = lambda A, s=s, th=thk: code(reduce(A[s], how), th)
            else:
                feats[s] = lambda A, s=s, th=th: code(reduce(A[s], how), th)
        def F(A, only=None):
            return np.concatenate([feats[s](A) for s in (only or sites)], axis=1)
        chunks = np.array_split(np.arange(n), len(train))
        Xa = []
        for a, ch in zip(train, chunks):
            sel = ch[fool_tr[a][ch]] if success_only else ch
            Xa.append((a, sel))
        def fitone(only=None):
            Xn = F(A_nat, only)[:n]
            Xadv = np.concatenate([F(A_tradv[a], only)[sel] for a, sel in Xa])
            X = np.concatenate([Xn, Xadv]); y = np.r_[np.zeros(len(Xn)), np.ones(len(Xadv))]
            return fit_svm(X, y, C=C, gamma=gamma, scaler=scaler, seed=0, grid=grid)
        if combine == "concat":
            est = fitone()
            if args.latency:
                latency(est, F(A_te)[:256], model)
            score = lambda A: est.decision_function(F(A))
            nsv = int(est[-1].n_support_.sum()); chosen = {k: v for k, v in est[-1].get_params().items() if k in ("C", "gamma")}
        else:  # one SVM per site, scores normalised on calibration data, max
            ests = {s: fitone([s]) for s in sites}
            cal = {s: ests[s].decision_function(F(A_cal, [s])) for s in sites}
            norm = {s: (np.median(cal[s]), np.subtract(*np.percentile(cal[s], [75, 25]))) for s in sites}
            score = lambda A: np.max([(ests[s].decision_function(F(A, [s])) - norm[s][0]) / norm[s][1] for s in sites], axis=0)
            nsv = int(sum(e[-1].n_support_.sum() for e in ests.values())); chosen = {}
        s_cal = score(A_cal)
        cal = calibrate(s_cal[:, None], 1, args.fpr)
        t = cal.thresholds[0]
        s_te = score(A_te)
        res = {"sites": list(sites), "code": codename, "reduce": how, "train": list(train), "success_only": success_only,
               "scaler": scaler, "combine": combine, "n": n, "D": int(F(A_nat[:1] if False else {k: v[:2] for k, v in A_nat.items()}).shape[1]),
               "nsv": nsv, **chosen, "cal_fpr": round(cal.achieved_fpr, 4), "test_fpr": round(float((s_te > t).mean()), 4)}
        if codename == "quaternary":
            res["quantiles"] = list(quantiles)
        for a in ATTACKS:
            sa = score({k: v[keep_te[a]] for k, v in A_teadv[a].items()})
            ss = sa[succ_te[a]]
            if len(ss) < 5:
                ss = sa  # too few successful examples (cw) to say anything separately
            auc = lambda pos: round(float(roc_auc_score(np.r_[np.zeros(len(s_te)), np.ones(len(pos))], np.r_[s_te, pos])), 4)
            res[a] = {"det": round(float((sa > t).mean()), 3), "det_succ": round(float((ss > t).mean()), 3),
                      "auc": auc(sa), "auc_succ": auc(ss), "n": int(len(sa)), "n_succ": int(len(ss))}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res), flush=True)

    g = args.grid
    if g == "sites":
        for sites, how in [(("relu4",), "none"), (("relu3",), "none"), (("relu2",), "max"), (("relu2",), "mean"), (("relu2",), "none"),
                           (("relu1",), "max"), (("relu3", "relu4"), "none")]:
            for c in ("binary", "quaternary"):
                run(sites=sites, how=how, codename=c)
    elif g == "df":
        pd = ("pgd:eps=0.1", "deepfool")
        run(codename="quaternary", train=pd)
        run(codename="quaternary", train=pd, success_only=False)
        run(sites=("relu3", "relu4"), codename="quaternary", train=pd)
        run(sites=("relu2",), how="max2", codename="quaternary")
        run(sites=("relu2",), how="max2", codename="quaternary", train=pd)
        run(sites=("relu2",), how="max2", codename="binary", train=pd)
        run(sites=("relu2",), codename="quaternary", train=pd)
        run(sites=("relu2", "relu4"), how="max2", codename="quaternary", train=pd)
    elif g == "df2":
        pd = ("pgd:eps=0.1", "deepfool")
        run(codename="quaternary", train=("deepfool",))
        run(codename="quaternary", train=pd, quantiles=(0.0, 0.33, 0.67))
        run(codename="quaternary", train=pd, quantiles=(0.5, 0.75, 0.9))
        run(codename="quaternary", train=pd, scaler=False)
        run(codename="quaternary", train=pd, grid={"svc__C": [1.0, 10.0, 100.0], "svc__gamma": [0.003, 0.01, 0.03, 0.1]})
        run(codename="binary", train=("deepfool",))
        run(sites=("relu2",), how="max2", codename="quaternary", train=("deepfool",))
    elif g == "raw":
        pd = ("pgd:eps=0.1", "deepfool")
        run(codename="raw", train=pd)
        run(codename="levels8", train=pd)
        run(codename="raw", train=("deepfool",))
        run(sites=("relu2",), how="max2", codename="raw", train=pd)
    elif g == "pool":
        for how in ("max5", "max3", "max2"):
            run(sites=("relu2",), how=how, codename="quaternary", success_only=False)
        run(sites=("relu2", "relu4"), how="max5", codename="quaternary", success_only=False)
    elif g == "budget2":
        for n in (400, 600, 1000):
            for C in (10.0, 100.0):
                run(sites=("relu2",), how="max3", codename="quaternary", success_only=False, n=n, C=C)
    elif g == "codes":
        for c, q in [("binary", None), ("quaternary", (0.25, 0.5, 0.75)), ("quaternary", (0.0, 0.33, 0.67)), ("quaternary", (0.5, 0.75, 0.9))]:
            for scaler in (True, False):
                run(codename=c, quantiles=q, scaler=scaler)
    elif g == "training":
        for c in ("binary", "quaternary"):
            for so in (True, False):
                for train in (("pgd:eps=0.1",), ("fgsm:eps=0.1",), ("pgd:eps=0.1", "deepfool")):
                    run(codename=c, success_only=so, train=train)
    elif g == "multi":
        for c in ("quaternary", "binary"):
            for combine in ("concat", "max"):
                run(sites=("relu2", "relu4"), how="max2", codename=c, combine=combine)
                run(sites=("relu2", "relu3", "relu4"), how="max2", codename=c, combine=combine)
    elif g == "budget":
        for c in ("quaternary", "binary"):
            for n in (250, 500, 1000):
                run(sites=("relu2",), how="max2", codename=c, n=n)
                run(sites=("relu2",), how="max2", codename=c, n=n, success_only=False)
    else:
        run(**json.loads(g))


if __name__ == "__main__":
    main()
