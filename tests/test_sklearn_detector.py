"""scikit-learn detectors as ONNX: the same raw scores as scikit-learn, oriented higher = more suspicious."""

import numpy as np
import onnxruntime as ort
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, OneClassSVM

from harden.detectors.sklearn_onnx import SklearnDetector


def run(detector, x):
    session = ort.InferenceSession(detector.onnx_model())
    (out,) = session.run(None, {"m.features": x})
    return out


def test_svc_column_and_parity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    est = make_pipeline(StandardScaler(), SVC(gamma="scale")).fit(x, y)
    det = SklearnDetector(est, "m", 6, column=1)
    assert np.allclose(det.score(x), est.decision_function(x), atol=1e-5)
    assert np.abs(run(det, x) - det.score(x)).max() <= 1e-4


def test_one_class_svm_is_negated_so_outliers_score_high():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    est = make_pipeline(StandardScaler(), OneClassSVM(gamma="scale", nu=0.1)).fit(x)
    det = SklearnDetector(est, "m", 4, sign=-1.0)
    far = np.full((5, 4), 8.0, dtype=np.float32)
    assert det.score(far).min() > det.score(x).max() - 1e-6 or det.score(far).mean() > np.quantile(det.score(x), 0.99)
    assert np.abs(run(det, np.concatenate([x, far])) - det.score(np.concatenate([x, far]))).max() <= 1e-4
