"""Cost of a training epoch after the first with a `CachedTeacher` vs without, on MNIST-1D (built locally).

Run: python benchmarks/teacher_cache.py [--repeats 5] [--n-train 4000]
Prints the environment, per-epoch medians over repeats and their ratio, all measured in this one process."""
import argparse, platform, statistics, time
import torch
from torch import nn
import fastai
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
import fastai.callback.progress
from mnist1d.data import make_dataset, get_dataset_args
from kdcb.all import *


def cnn(c):
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, c, 5, padding=2), nn.ReLU(), nn.Conv1d(c, c, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, 10))


class EpochTimes(Callback):
    order = 100
    def before_fit(self): self.times = []
    def before_epoch(self): self.t = time.perf_counter()
    def after_train(self): self.times.append(time.perf_counter() - self.t)


def main(repeats=5, n_train=4000, epochs=4):
    args = get_dataset_args(); args.num_samples = n_train + 1000
    d = make_dataset(args)
    ds = lambda k: list(zip(torch.tensor(d['x' + k], dtype=torch.float32), torch.tensor(d['y' + k])))
    dls = DataLoaders(DataLoader(ds('')[:n_train], bs=128, shuffle=True, drop_last=True), DataLoader(ds('_test'), bs=512))
    teacher = cnn(128)  # an untrained wide teacher: cost, not accuracy, is measured here
    res = {False: [], True: []}
    for r in range(repeats):
        for cache in (False, True):
            torch.manual_seed(r)
            timer = EpochTimes()
            learn = Learner(dls, cnn(16), loss_func=CrossEntropyLossFlat(), cbs=timer)
            with learn.no_bar(), learn.no_logging():
                learn.fit(epochs, 1e-3, cbs=KnowledgeDistillationCallback(CachedTeacher(teacher) if cache else teacher, 'soft_target'))
            res[cache] += timer.times[1:]  # epochs 2+
    print(f"torch {torch.__version__}, fastai {fastai.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device cpu; MNIST-1D {n_train} training samples, teacher 1-D CNN "
          f"{sum(p.numel() for p in teacher.parameters()):,} params, student {sum(p.numel() for p in cnn(16).parameters()):,}")
    a, b = statistics.median(res[False]), statistics.median(res[True])
    print(f"epoch 2+ median over {len(res[False])} epochs: live teacher {a:.3f} s, cached teacher {b:.3f} s, ratio {b / a:.2f}")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--n-train', type=int, default=4000)
    a = p.parse_args()
    main(a.repeats, a.n_train)
