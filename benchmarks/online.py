"""Distillation without a separate pretrained teacher on MNIST-1D: mean teacher, mutual learning, deep supervision,
born-again generations, and (with --chain) a teacher-assistant chain.

Run: python benchmarks/online.py                  # 3 seeds, 30 epochs, width 11, 4,000 signals: about 7 minutes on one CPU thread (15 with --chain)
     python benchmarks/online.py --epochs 60 --seeds 5
     python benchmarks/online.py --chain          # also teacher cnn1d(80) -> assistant cnn1d(24) -> student vs teacher -> student

MNIST-1D is built locally (no download); `cnn1d(width)` from `kdcb.demo`; every training batch is randomly shifted and
noised (`ShiftNoise`). One-cycle Adam, batch 128, lr 1e-2. Seed `s` gives the student of every row the same initial
weights, the same batch order and (except where a method draws random numbers of its own, e.g. the auxiliary heads'
initialisation) the same augmentation stream: rows are paired, and "vs scratch" is the mean ± std of the per-seed
differences from the scratch row. Generation 1 of born-again IS the scratch row (same seed, same procedure).
Prints the environment and one markdown table; accuracy is the final epoch's validation accuracy on 1,000 held-out signals.
"""
from __future__ import annotations
import argparse, platform, random, statistics, time, warnings
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
import torch
import fastai
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.progress, fastai.callback.schedule
from kdcb.callback import KnowledgeDistillationCallback
from kdcb.losses import SoftTarget
from kdcb.data import tensor_dls
from kdcb.examples import mnist1d, ShiftNoise, cnn1d, n_params
from kdcb.online import EMATeacher, MutualLearning, DeepSupervision, born_again, teacher_chain


def fit(dls, make, epochs, lr, seed, cbs=()):
    "A model built after `set_seed(seed)`, trained with the same batch order and augmentation stream for every `seed`"
    set_seed(seed); model = make()
    set_seed(seed); dls.train.rng = random.Random(seed)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=[ShiftNoise(), *cbs])
    return learn, time.perf_counter() - t0


def acc(learn, model=None):
    "Validation accuracy (%) of `model` (default: the learner's)"
    l = learn if model is None else Learner(learn.dls, model, loss_func=learn.loss_func, metrics=accuracy)
    with l.no_bar(), l.no_logging(): return 100 * float(l.validate()[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--width', type=int, default=11, help='student width (cnn1d)')
    p.add_argument('--n-train', type=int, default=4000)
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--decay', type=float, default=0.99, help='EMA teacher decay')
    p.add_argument('--generations', type=int, default=3)
    p.add_argument('--chain', action='store_true', help='also the teacher-assistant chain (trains a cnn1d(80) teacher per seed)')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, fastai {fastai.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{a.threads} thread(s)")
    print(f"MNIST-1D {a.n_train} train / 1000 valid, cnn1d({a.width}) ({n_params(cnn1d(a.width)):,} params), {a.epochs} epochs, lr {a.lr}, "
          f"seeds 0..{a.seeds-1}, ShiftNoise on every training batch\n", flush=True)
    dls = tensor_dls(*mnist1d(a.n_train))
    make = lambda: cnn1d(a.width)
    rows = {} # name -> list of accuracies per seed
    secs = {}
    def add(name, v, t=None):
        rows.setdefault(name, []).append(v)
        if t is not None: secs.setdefault(name, []).append(t)
        print(f"  {name}: {v:.2f}%" + (f" ({t:.0f} s)" if t is not None else ''), flush=True)
    for s in range(a.seeds):
        print(f"seed {s}", flush=True)
        # born-again: generation 1 is the scratch row
        t0 = time.perf_counter()
        g = born_again(make, dls, a.generations, epochs=a.epochs, lr=a.lr, loss=SoftTarget(T=4.), weight=0.5, seed=s, cbs=[ShiftNoise()])
        tg = (time.perf_counter() - t0) / a.generations
        add('scratch', 100 * g.rows[0]['accuracy'], tg)
        for r in g.rows[1:]: add(f"born-again generation {r['generation']} (T=4, w=0.5)", 100 * r['accuracy'], tg)
        # mean teacher: the student distils the EMA of its own weights
        set_seed(s); m = make() # the same initial weights as `fit` builds: the EMA starts from them
        ema = EMATeacher(m, a.decay)
        learn, t = fit(dls, lambda: m, a.epochs, a.lr, s, [KnowledgeDistillationCallback(ema, SoftTarget(T=1.), weight=0.5)])
        add(f'EMA teacher (decay {a.decay}, T=1, w=0.5): student', acc(learn), t)
        add(f'EMA teacher (decay {a.decay}, T=1, w=0.5): the EMA model itself', acc(learn, ema.model))
        # the EMA of a plain run's weights, no distillation: what averaging alone gives
        set_seed(s); m = make()
        ema0 = EMATeacher(m, a.decay)
        learn, t = fit(dls, lambda: m, a.epochs, a.lr, s, [KnowledgeDistillationCallback(ema0, SoftTarget(T=1.), weight=0.)])
        add(f'scratch, EMA of its weights (decay {a.decay})', acc(learn, ema0.model))
        # mutual learning: the scratch student (same init) with one peer of the same architecture
        set_seed(s + 1000); peer = make()
        ml = MutualLearning([peer], T=1., weight=0.5)
        learn, t = fit(dls, make, a.epochs, a.lr, s, [ml])
        rec = learn.recorder # read before `validate` below starts a new table
        cohort = 100 * float(rec.values[-1][rec.metric_names.index('cohort_accuracy') - 1])
        add('mutual learning, 2 students (T=1, w=0.5): student 1', acc(learn), t)
        add('mutual learning, 2 students: student 2 (its peer)', acc(learn, peer))
        add('mutual learning, 2 students: their mean prediction', cohort)
        # deep supervision: auxiliary heads after stages 2 and 3 (of 4)
        ds = DeepSupervision(['2', '3'], T=3., weight=0.5)
        learn, t = fit(dls, make, a.epochs, a.lr, s, [ds])
        add('deep supervision, heads on stages 2-3 (T=3, w=0.5)', acc(learn), t)
        learn, t = fit(dls, make, a.epochs, a.lr, s, [DeepSupervision(['3'], T=3., weight=0.5, aux_weight=0.3)])
        add('deep supervision, head on stage 3, aux_weight 0.3', acc(learn), t)
        if a.chain:
            teacher, _ = fit(dls, lambda: cnn1d(80), a.epochs, a.lr, s)
            add('chain: teacher cnn1d(80)', acc(teacher))
            direct, t = fit(dls, make, a.epochs, a.lr, s, [KnowledgeDistillationCallback(teacher.model, SoftTarget(T=4.), weight=0.5)])
            add('chain: teacher -> student directly', acc(direct), t)
            c = teacher_chain(teacher.model, [lambda: cnn1d(24), make], dls, a.epochs, a.lr, loss=SoftTarget(T=4.), weight=0.5, seed=s, cbs=[ShiftNoise()])
            add('chain: teacher -> cnn1d(24) assistant', 100 * c.rows[0]['accuracy'])
            add('chain: teacher -> assistant -> student', 100 * c.rows[1]['accuracy'])
    base = rows['scratch']
    print('\n| method | accuracy (%) | vs scratch (pts, paired) | s / run |\n|---|---|---|---|')
    for name, v in rows.items():
        d = [x - b for x, b in zip(v, base)]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.
        vs = '' if name == 'scratch' or name.startswith(('chain: teacher cnn1d(80)', 'chain: teacher -> cnn1d(24)')) else f"{statistics.mean(d):+.2f} ± {sd(d):.2f} ({sum(x > 0 for x in d)}/{len(d)} seeds up)"
        ts = f"{statistics.median(secs[name]):.0f}" if name in secs else ''
        print(f"| {name} | {statistics.mean(v):.2f} ± {sd(v):.2f} | {vs} | {ts} |")


if __name__ == '__main__': main()
