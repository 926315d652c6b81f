"""The README's quick start, measured: the student with 200 labelled digits from scratch, distilled on them alone, and
distilled with the other 1,200 training digits given without labels (the teacher saw all 1,400 with labels).

Run: python benchmarks/quickstart.py [--seeds 3] [--labelled 200]
Same teacher for every row; seed `s` gives every row the same initial student. Validation: the 397 digits after the
first 1,400. Prints the environment and a markdown table (mean ± std over seeds, paired change from scratch)."""
import argparse, platform, statistics
import torch
from torch import nn
from sklearn.datasets import load_digits
import fastai
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule
from kdcb.all import *


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=3); p.add_argument('--labelled', type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, 1 torch thread")
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    def dls_from(xt, yt, bs=64): return tensor_dls(xt, yt, x[1400:], y[1400:], bs=bs, drop_last=False)
    def mlp(width): return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    def fit(learn, epochs, lr, cbs=None):
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, lr, cbs=cbs)
            return 100 * float(learn.validate()[1])
    set_seed(0)
    teacher = Learner(dls_from(x[:1400], y[:1400]), mlp(256), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    t_acc = fit(teacher, 10, 3e-3)
    n = a.labelled
    xs, ys = add_unlabelled(x[:n], y[:n], x[n:1400])
    rows = {  # name -> function of the seed returning the student's accuracy; step counts are alike (about 220-280)
        'scratch (40 epochs of the labelled digits)':
            lambda: fit(Learner(dls_from(x[:n], y[:n], 32), mlp(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy), 40, 1e-2),
        'soft_target T=4 w=0.5, labelled digits only (40 epochs)':
            lambda: fit(Learner(dls_from(x[:n], y[:n], 32), mlp(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy), 40, 1e-2,
                        KnowledgeDistillationCallback(teacher, SoftTarget(T=4), weight=0.5)),
        'README: + unlabelled digits, soft_target T=4 w=0.9 (10 epochs)':
            lambda: fit(Learner(dls_from(xs, ys), mlp(16), loss_func=LabelledOnly(), metrics=accuracy), 10, 1e-2,
                        KnowledgeDistillationCallback(teacher, SoftTarget(T=4), weight=0.9))}
    res = {}
    for name, run in rows.items():
        for s in range(a.seeds): set_seed(s); res.setdefault(name, []).append(run())
    base = res[next(iter(rows))]
    print(f"\nteacher (MLP 256, all 1,400 labelled digits): {t_acc:.1f}%; student MLP 16 with {n} labelled digits; seeds 0-{a.seeds - 1}\n")
    print('| student | accuracy (%) | vs scratch |\n|---|---|---|')
    for name, v in res.items():
        d = [b - c for b, c in zip(v, base)]
        sd = lambda l: statistics.stdev(l) if len(l) > 1 else 0.
        print(f"| {name} | {statistics.mean(v):.1f} ± {sd(v):.1f} | {'' if v is base else f'{statistics.mean(d):+.1f} ± {sd(d):.1f}'} |")


if __name__ == '__main__': main()
