"""Cross-check of CROWN soundness: no image certified robust at eps may be broken by a strong PGD attack.

    OMP_NUM_THREADS=1 python bench/experiments/crown_vs_pgd.py 0.01

PGD: ART, 60 steps of eps/8, 5 random restarts, on the first 200 MNIST test digits of the example LeNet-5.
"""
import sys, numpy as np, torch
sys.path.insert(0, '.')
torch.set_num_threads(1)
from bench.latency import load_lenet
from pathlib import Path
from harden.graph.trace import trace
from harden.io.data import load_data
from harden.certification.certify import certify_samples
from art.estimators.classification import PyTorchClassifier
from art.attacks.evasion import ProjectedGradientDescent
eps = float(sys.argv[1]) if len(sys.argv) > 1 else 0.01
data = load_data("mnist", seed=0)
model = load_lenet(Path("out/lenet5_mnist.pt"))
gm = trace(model)
x, y = data.test.x[:200], data.test.y[:200]
cert = certify_samples(gm, [], x, y, eps, (0.0, 1.0), bounds="crown")
robust = cert["robust"].numpy()
clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10, clip_values=(0, 1))
broken = np.zeros(len(x), bool)
for restart in range(5):
    atk = ProjectedGradientDescent(clf, eps=eps, eps_step=eps / 8, max_iter=60, num_random_init=1, verbose=False)
    adv = atk.generate(x.numpy(), y=y.numpy())
    with torch.no_grad():
        broken |= model(torch.from_numpy(adv)).argmax(1).numpy() != y.numpy()
print({"eps": eps, "certified": int(robust.sum()), "pgd_broken": int(broken.sum()),
       "certified_and_broken": int((robust & broken).sum()), "unknown": int((~robust & ~broken).sum())})
