"""Accuracy of a small student trained from scratch and with each distillation loss, on MNIST-1D and on digits.

Run: python benchmarks/accuracy.py [--seeds 3] [--epochs 40] [--digits-epochs 30] [--datasets mnist1d,digits] [--weight 0.5]
     python benchmarks/accuracy.py --sweep [--datasets mnist1d] [--temperatures 1,2,4] [--weights 0.5,0.9]
     python benchmarks/accuracy.py --ablation attention,rkd,soft_target [--datasets mnist1d]  # every subset of the losses
Both data sets use the demo's recipe (`kdcb.demo`, trained by `compare_distillation`): function matching (the teacher labels the same randomly augmented
batch the student sees), one-cycle training, the same epochs, seeds and schedule for every row; teacher trained once.
Prints the environment and markdown tables: final validation accuracy, mean ± std over seeds, and the change from scratch."""
import argparse, contextlib, io, itertools, platform, statistics, time
import torch
from torch import nn
import fastai, sklearn
from sklearn.datasets import load_digits
from fastai.torch_core import set_seed
from kdcb.all import *
from kdcb.data import tensor_dls
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from kdcb.distill import LossTerm
from kdcb.examples import mnist1d, ShiftNoise, cnn1d, n_params
from kdcb.demo import parse_loss


def train(dls, model, epochs, lr, teacher=None, losses=None, weight=0.5, aug=None, bar=False, seed=0, student_layers=None, teacher_layers=None):
    "`model` (already built) trained by `compare_distillation` from `seed`, distilling `teacher` with `losses` if given: its `RunHistory`"
    if losses:
        feat = any(LossTerm(l).sources & {'fm_s', 'fm_t'} for l in losses)
        if feat and student_layers is None: student_layers = 'auto'
        if not feat: student_layers = teacher_layers = None
    cbs = (lambda: KnowledgeDistillationCallback(teacher, losses, student_layers, teacher_layers, weight=weight)) if losses else None
    with contextlib.nullcontext() if bar else contextlib.redirect_stdout(io.StringIO()): # its line per run would split the tables
        c = compare_distillation(lambda: Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=aug), {'run': cbs},
                                 [seed], epochs, baseline='run', bar=bar, lr_max=lr)
    return c.histories['run'][0]

OUTPUT_LOSSES = ['soft_target', 'logits', 'mutual', 'decoupled_kd', 'decoupled_kd beta=2', 'normalized_kd', 'logits_distillation_loss', 'mft_loss', 'dist']
WEIGHTS = {'logits': 0.1}  # a pure MSE starts far larger than a cross entropy (see the losses notebook); every other loss `--weight`


def digits(seed=0):
    "scikit-learn's bundled 8x8 digits, (B, 64) features in [0, 1], a fixed 80/20 split"
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    i = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(len(x) * .8)
    return x[i[:n]], y[i[:n]], x[i[n:]], y[i[n:]]


def mlp(width): return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def setups(n_train):
    "Per data set: data loaders, teacher and student constructors, augmentation, learning rate, feature rows"
    return {'mnist1d': dict(dls=lambda: tensor_dls(*mnist1d(n_train)), teacher=lambda: cnn1d(80), student=lambda: cnn1d(11),
                            aug=lambda: ShiftNoise(5, 0.1), lr=1e-2, features=True),
            'digits': dict(dls=lambda: tensor_dls(*digits(), bs=64), teacher=lambda: mlp(256), student=lambda: mlp(16),
                           aug=lambda: ShiftNoise(0, 0.1), lr=1e-2, features=False)}


def fitnet_connected(student, teacher, dls):
    "FitNet on the matched stages, with learned 1x1 connectors from the student's widths to the teacher's"
    pairs = match_feature_layers(student, teacher, dls.valid.one_batch()[0][:2])
    return Connected(FitNet(), pairs.connectors()), pairs


def run_rows(name, s, seeds, epochs, T, specs, a):
    bar = a.bar
    dls = s['dls']()
    set_seed(0)
    teacher = s['teacher']()
    tlog = train(dls, teacher, epochs, s['lr'], aug=s['aug'](), bar=bar, seed=0)
    n_s = n_params(s['student']())
    print(f"\n### {name}: teacher {n_params(teacher):,} params, {100 * tlog.final('accuracy'):.1f}%; student {n_s:,} params; "
          f"{len(dls.train.dataset)} training / {len(dls.valid.dataset)} validation samples, {epochs} epochs, "
          f"seeds {list(seeds)}, T={T:g} for soft_target and decoupled_kd, other losses at their defaults\n", flush=True)
    print('| loss | weight | accuracy (%) | vs scratch | s / epoch |\n|---|---|---|---|---|', flush=True)
    base, means = None, {}
    for spec in specs:
        accs, times = [], []
        for seed in seeds:  # seed fixes the initial student, the batch order and the augmentation: rows are paired
            set_seed(seed)
            student = s['student']()
            kw, weight = {}, WEIGHTS.get(spec, a.weight)
            if spec == 'scratch': losses = None
            elif spec == 'fit_net+soft_target':  # connectors: the student's stages are narrower than the teacher's
                fit, pairs = fitnet_connected(student, teacher, dls)
                losses, weight = [fit, parse_loss('soft_target', T)[0]], [0.1, a.weight - 0.1]
                kw = dict(student_layers=pairs['student'], teacher_layers=pairs['teacher'])
            elif spec == 'decoupled_kd beta=2': losses = parse_loss('decoupled_kd', T, {'decoupled_kd': dict(beta=2.)})  # the demo's
            else: losses = parse_loss(spec, T, options={})  # registered defaults
            log = train(dls, student, epochs, s['lr'], teacher, losses, weight, s['aug'](), bar, seed=seed, **kw)
            accs.append(100 * log.final('accuracy')); times += log.times
        m, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.
        if base is None: base = m
        w = '—' if spec == 'scratch' else '+'.join(f'{x:g}' for x in weight) if isinstance(weight, list) else f'{weight:g}'
        print(f"| {spec} | {w} | {m:.1f} ± {sd:.1f} | {m - base:+.1f} | {statistics.mean(times):.2f} |", flush=True)
        means[spec] = m
    return means


def sweep(name, s, seeds, epochs, temps, weights, bar):
    dls = s['dls']()
    set_seed(0)
    teacher = s['teacher']()
    tlog = train(dls, teacher, epochs, s['lr'], aug=s['aug'](), bar=bar, seed=0)
    def acc(losses=None, w=0.):
        a = []
        for seed in seeds:
            set_seed(seed)
            a.append(100 * train(dls, s['student'](), epochs, s['lr'], teacher, losses, w, s['aug'](), bar, seed=seed).final('accuracy'))
        return statistics.mean(a), statistics.stdev(a) if len(a) > 1 else 0.
    m, sd = acc()
    print(f"\n### soft_target sweep on {name}: teacher {100 * tlog.final('accuracy'):.1f}%, scratch {m:.1f} ± {sd:.1f}; "
          f"{epochs} epochs, seeds {list(seeds)}; rows temperature T, columns total distillation weight\n", flush=True)
    print('| T | ' + ' | '.join(f'w={w:g}' for w in weights) + ' |\n|---|' + '---|' * len(weights), flush=True)
    for T in temps:
        cells = [acc(parse_loss('soft_target', T, options={}), w) for w in weights]
        print(f'| {T:g} | ' + ' | '.join(f'{m:.1f} ± {sd:.1f}' for m, sd in cells) + ' |', flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=3); p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--digits-epochs', type=int, default=30); p.add_argument('--n-train', type=int, default=4000)
    p.add_argument('--datasets', default='mnist1d,digits'); p.add_argument('--temperature', type=float, default=4.)
    p.add_argument('--weight', type=float, default=0.5, help='total distillation weight of every row (MSE logits: 0.1)')
    p.add_argument('--losses', default=None, help='comma list of rows (default: scratch, every output loss, feature rows)')
    p.add_argument('--sweep', action='store_true', help='sweep temperature x weight for soft_target instead')
    p.add_argument('--temperatures', default='1,2,4'); p.add_argument('--weights', default='0.5,0.9')
    p.add_argument('--ablation', default=None, help="comma list of losses: a row for every non-empty subset (joined by '+'), "
                   "and what removing each loss from the full set changes")
    p.add_argument('--bar', action='store_true', help="show fastai's progress bars")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, fastai {fastai.__version__}, scikit-learn {sklearn.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), device cpu")
    seeds = range(a.seeds)
    t0 = time.perf_counter()
    for name in a.datasets.split(','):
        s, epochs = setups(a.n_train)[name], a.epochs if name == 'mnist1d' else a.digits_epochs
        if a.sweep:
            sweep(name, s, seeds, epochs, [float(t) for t in a.temperatures.split(',')], [float(w) for w in a.weights.split(',')], a.bar)
            continue
        if a.ablation:
            names = a.ablation.split(',')
            specs = ['scratch'] + ['+'.join(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]
        else: specs = a.losses.split(',') if a.losses else ['scratch'] + OUTPUT_LOSSES + (
            ['attention+soft_target', 'fit_net+soft_target'] if s['features'] else [])
        means = run_rows(name, s, seeds, epochs, a.temperature, specs, a)
        if a.ablation and len(names) > 1:
            full = '+'.join(names)
            print(f"\nRemoving one loss from {full} ({means[full]:.1f}) changes the accuracy by: " + ', '.join(
                f"{n} {means['+'.join(m for m in names if m != n)] - means[full]:+.1f}" for n in names), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == '__main__': main()
