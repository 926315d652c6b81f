"""Multi-label (sigmoid) distillation, and loss weights that balance themselves, on scikit-learn's bundled digits.

Run: python benchmarks/balance.py                      # multilabel and balance parts, 3 paired seeds: about 3 minutes on one CPU thread
     python benchmarks/balance.py --part multilabel     # or --part balance, --part ablation, --part contrastive, --part overhead (not in 'both')
     python benchmarks/balance.py --seeds 0,1,2,3,4 --epochs 60 --n-student 300

Data: the 1,797 8x8 digits (bundled with scikit-learn, no download), pixels / 16, a fixed shuffled split: the last 360
images validate; a teacher MLP (64-256-256-out) trains on the other 1,437; the student, a small MLP (64-16-out, --hidden), trains
on the first --n-student of them (the teacher has seen more data than the student, the case where distillation pays).
Every run is one-cycle Adam, batch 32, --epochs epochs. Seed s gives every row the same initial student and batch order:
rows are paired, and "vs scratch" is the mean of the per-seed differences from the scratch row ± their std.

Part multilabel: multi-hot labels derived from the digit (even, > 4, prime, has a closed loop (0, 6, 8, 9), multiple of 3),
a BCEWithLogitsLossFlat learner; metrics are the per-label accuracy (fastai's accuracy_multi at 0.5) and the exact-match
rate (all 5 labels right). Rows: scratch, SigmoidKD at T = 1 and 2 (weight 0.5), and, for contrast, the softmax
soft-target loss (which treats the 5 independent sigmoids as one distribution). On its own training items the teacher
mostly repeats their labels; the "+ unlabelled" rows also give the student the other 1,237 training images without their
labels (the task loss, a BCE masked to labelled entries, ignores them; SigmoidKD sees them all), for as many optimizer
steps as the labelled runs (the epochs scaled by 200/1,437); "scratch x7 epochs" gives scratch 7 times the steps.

Part balance: the 10-class task (CrossEntropyLossFlat). Rows: `logits` (MSE between logits) and `fit_net` (MSE between the
hidden activations, through a learned 16->256 regressor) with fixed weights 0.1 and 0.5, with `RatioBalance(0.5)` (each
loss kept at the task loss's value, half of the mixed loss) and with `UncertaintyBalance(0.5)` (learned log-variances).
The `w_*` columns are the effective weights the balancer applied, averaged over the last epoch's batches; `s/epoch` is
the median wall time of an epoch (per-batch overhead of the balancers).

Part ablation (one call, `--part ablation --losses soft_target,fit_net,rkd`): every non-empty subset of the given
losses (response, feature, relation) against scratch on the 10-class task, paired seeds, the total weight balanced by
`RatioBalance(0.5)` (or `--ablation-weight 0.5`), and the contribution of each loss: the full combination's accuracy
minus that of the combination without it.

Part contrastive (`--part contrastive`): in-batch `InfoNCE` and `CRD` (4,096 negatives), projection heads 64 wide at T = 0.1,
on the hidden layers, at weights 0.1 and 0.5, against scratch and `soft_target`.

Part overhead (`--part overhead`): what a balancer or a contrastive loss costs per training step. MNIST-1D, a cnn1d(11)
student distilled from a cnn1d(80) teacher (untrained: the cost does not depend on the values) at batch 128; one step
is the teacher's forward pass, the student's, the mixed loss, its backward pass and an Adam step. The rows: `soft_target`
at a fixed 0.5, with `RatioBalance`, `UncertaintyBalance`, `GradNorm` on the classifier and on the last conv stage;
and `InfoNCE` and `CRD` (872 and 4,096 negatives) on the penultimate features (the pooled `Flatten` output, 22 and 160
wide, projection heads 128 wide) at 0.1. Each row runs 8 steps per round, the rows interleaved (in an order rotated
every round), for --rounds rounds; the figure is the median over rounds of the process CPU time per step (one
thread), and the extra time over the fixed-weight `soft_target` row."""
from __future__ import annotations
import argparse, platform, random, statistics, time, warnings
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
import torch
import torch.nn.functional as F
from torch import nn
import fastai
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
from fastai.metrics import accuracy, accuracy_multi
from fastai.torch_core import set_seed
import fastai.callback.schedule, fastai.callback.progress # Learner.fit_one_cycle, Learner.no_bar
from kdcb.all import *
from kdcb.distill import RatioBalance, UncertaintyBalance, GradNorm
from kdcb.multilabel import SigmoidKD
from kdcb.data import TensorDL

torch.set_num_threads(1)


def digits(n_valid:int=360):
    "Digits as (N, 64) floats in [0, 1] and their labels, shuffled once (fixed seed); the last `n_valid` validate"
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16., torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[idx], y[idx], len(x) - n_valid


LABELS = ('even', '> 4', 'prime', 'loop', 'mult. of 3')
def multi_hot(y:torch.Tensor)->torch.Tensor:
    "Five derived binary attributes of each digit"
    sets = [{0, 2, 4, 6, 8}, {5, 6, 7, 8, 9}, {2, 3, 5, 7}, {0, 6, 8, 9}, {0, 3, 6, 9}]
    return torch.stack([torch.tensor([int(v) in s for v in y]) for s in sets], 1).float()


def dls(x, y, n_train, n_valid_from, bs=32, seed=0):
    dl = DataLoaders(TensorDL(torch.utils.data.TensorDataset(x[:n_train], y[:n_train]), bs=bs, shuffle=True, drop_last=True),
                     TensorDL(torch.utils.data.TensorDataset(x[n_valid_from:], y[n_valid_from:]), bs=512))
    dl.train.rng = random.Random(seed) # fastai shuffles with the loader's own generator
    return dl


def mlp(h:int, c:int, depth:int=1)->nn.Sequential:
    layers = [nn.Linear(64, h), nn.ReLU()] + [m for _ in range(depth - 1) for m in (nn.Linear(h, h), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(h, c))


class Weights(Callback):
    "The distillation callback's progress columns averaged over each epoch, kept for the table, and the epoch times"
    order = 56
    def before_fit(self): self.times, self.cols = [], None
    def before_epoch(self): self.t0 = time.perf_counter()
    def after_epoch(self):
        self.times.append(time.perf_counter() - self.t0)
        kd = getattr(self.learn, 'knowledge_distillation', None)
        if kd is not None: self.cols = dict(zip(kd.column_names, kd.averages()))


def fit(d, model, loss_func, metrics, epochs, lr, seed, kd=None):
    "Train with one-cycle Adam; the metrics on the whole validation set, and the epoch log"
    log = Weights()
    learn = Learner(d, model, loss_func=loss_func, metrics=metrics, cbs=[log] + ([kd] if kd else []))
    set_seed(seed); d.train.rng = random.Random(seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    xv, yv = d.valid.dataset.tensors
    with torch.no_grad(): out = model.eval()(xv)
    return [float(m(out, yv)) for m in metrics], log


def teacher(x, y, n_train, n_valid_from, multilabel, epochs, lr=3e-3):
    set_seed(100)
    t = mlp(256, 5 if multilabel else 10, depth=2)
    lf, m = (BCEWithLogitsLossFlat(), [accuracy_multi]) if multilabel else (CrossEntropyLossFlat(), [accuracy])
    vals, _ = fit(dls(x, y, n_train, n_valid_from, seed=100), t, lf, m, epochs, lr, 100)
    return t.eval(), vals[0]


def exact_match(inp, targ): return ((inp > 0) == targ.bool()).all(1).float().mean()


def table(rows:list[dict], metric_names:list[str], extra:list[str]=())->str:
    "One markdown row per recipe: mean ± std of each metric over seeds, and the paired difference from scratch"
    base = rows[0]['vals']
    head = ['recipe'] + [f'{m} %' for m in metric_names] + [f'{metric_names[0]} vs scratch'] + list(extra) + ['s/epoch']
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        ms = [[100 * v[i] for v in r['vals']] for i in range(len(metric_names))]
        diff = [100 * (a[0] - b[0]) for a, b in zip(r['vals'], base)]
        cells = [r['name']] + [f'{statistics.mean(m):.2f} ± {statistics.stdev(m):.2f}' if len(m) > 1 else f'{m[0]:.2f}' for m in ms]
        cells.append('—' if r is rows[0] else f'{statistics.mean(diff):+.2f} ± {statistics.stdev(diff) if len(diff) > 1 else 0:.2f} '
                     f'({sum(d > 0 for d in diff)}/{len(diff)} seeds up)')
        cells += [f"{r['extra'].get(e, float('nan')):.3g}" if e in r['extra'] else '' for e in extra]
        cells.append(f"{statistics.median(r['times']):.3f}")
        out.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


UNLABELLED = -1. # target of the unlabelled items: not -100, which SigmoidKD leaves out

class MaskedBCE(nn.Module):
    "BCE with logits averaged over the target entries that are not `UNLABELLED`: the task loss sees labelled items only"
    def forward(self, inp, targ):
        keep = targ != UNLABELLED
        bce = F.binary_cross_entropy_with_logits(inp, targ.clamp_min(0), reduction='none')
        return torch.where(keep, bce, 0.).sum() / keep.sum().clamp_min(1)


def run(recipes, x, y, a, student, lf, metrics, t):
    "Each recipe (name, callback maker, with unlabelled inputs) on every seed"
    rows = []
    for name, make, *u in recipes:
        vals, times, extra = [], [], {}
        yu, n, ep = y, a.n_student, a.epochs
        if u and u[0] == 'x7': ep = a.epochs * 7 # scratch given 7 times the steps
        elif u and u[0]: # the other training inputs, without their labels, and as many optimizer steps as the labelled runs
            yu, n, ep = y.clone(), a.n_valid_from, max(1, round(a.epochs * a.n_student / a.n_valid_from))
            yu[a.n_student:a.n_valid_from] = UNLABELLED
        for s in a.seeds:
            set_seed(s); model = student()
            kd = make(t) if make else None
            v, log = fit(dls(x, yu, n, a.n_valid_from, seed=s), model, lf, metrics, ep, a.lr, s, kd)
            vals.append([float(m) for m in v]); times += log.times
            for k, w in (log.cols or {}).items():
                if k.startswith('w_'): extra.setdefault(k, []).append(w)
        rows.append(dict(name=name, vals=vals, times=times, extra={k: statistics.mean(v) for k, v in extra.items()}))
        print(f'  {name}: ' + ', '.join(f'{100*statistics.mean(c):.2f}' for c in zip(*vals)), flush=True)
    return rows


def part_multilabel(a, x, y):
    ym = multi_hot(y)
    t, tacc = teacher(x, ym, a.n_valid_from, a.n_valid_from, True, a.teacher_epochs)
    print(f'\n## Multi-label digits: teacher per-label accuracy {100*tacc:.2f}% (trained on {a.n_valid_from} images), '
          f'student 64-{a.hidden}-5 on {a.n_student}, {a.epochs} epochs, seeds {a.seeds}\n', flush=True)
    kd = lambda loss, w=0.5: (lambda t: KnowledgeDistillationCallback(t, loss, weight=w))
    recipes = [('scratch', None), ('sigmoid_kd T=1 w=0.5', kd(SigmoidKD(T=1.))), ('sigmoid_kd T=2 w=0.5', kd(SigmoidKD(T=2.))),
               ('sigmoid_kd T=2 w=0.9', kd(SigmoidKD(T=2.), 0.9)), ('soft_target (softmax) T=2 w=0.5', kd(SoftTarget(T=2.))),
               ('scratch x7 epochs', None, 'x7'),
               ('sigmoid_kd T=1 w=0.5 + unlabelled', kd(SigmoidKD(T=1.)), True), ('sigmoid_kd T=2 w=0.5 + unlabelled', kd(SigmoidKD(T=2.)), True),
               ('sigmoid_kd T=1 w=0.9 + unlabelled', kd(SigmoidKD(T=1.), 0.9), True)]
    rows = run(recipes, x, ym, a, lambda: mlp(a.hidden, 5), MaskedBCE(), [accuracy_multi, exact_match], t)
    print('\n' + table(rows, ['per-label acc', 'exact match']))


def part_balance(a, x, y):
    t, tacc = teacher(x, y, a.n_valid_from, a.n_valid_from, False, a.teacher_epochs)
    print(f'\n## Balancing on digits (10 classes): teacher accuracy {100*tacc:.2f}%, student 64-{a.hidden}-10 on {a.n_student}, '
          f'{a.epochs} epochs, seeds {a.seeds}\n', flush=True)
    def kd(loss, w):
        def make(t):
            l = loss() # a fresh loss (and regressor) per run
            feat = isinstance(l, FitNet)
            return KnowledgeDistillationCallback(t, l, ['1'] if feat else None, ['3'] if feat else None, weight=w)
        return make
    recipes = [('scratch', None)]
    for name, loss in (('logits', Logits), ('fit_net', lambda: FitNet(a.hidden, 256))):
        recipes += [(f'{name} w=0.1', kd(loss, 0.1)), (f'{name} w=0.5', kd(loss, 0.5)),
                    (f'{name} RatioBalance(0.5)', kd(loss, RatioBalance(0.5))),
                    (f'{name} UncertaintyBalance(0.5)', kd(loss, UncertaintyBalance(0.5)))]
    rows = run(recipes, x, y, a, lambda: mlp(a.hidden, 10), CrossEntropyLossFlat(), [accuracy], t)
    print('\n' + table(rows, ['accuracy'], ['w_task', 'w_logits', 'w_fit_net']))


def part_contrastive(a, x, y):
    "In-batch InfoNCE and CRD (projection heads 64 wide) on the hidden layers, against scratch and soft targets"
    from kdcb.contrastive import InfoNCE, CRD
    t, tacc = teacher(x, y, a.n_valid_from, a.n_valid_from, False, a.teacher_epochs)
    print(f'\n## Contrastive distillation on digits (10 classes): teacher accuracy {100*tacc:.2f}%, student 64-{a.hidden}-10 on '
          f'{a.n_student}, {a.epochs} epochs, seeds {a.seeds}; the student\'s hidden ReLU "1" paired with the teacher\'s second "3"\n', flush=True)
    def kd(loss, w, feat=True):
        return lambda t: KnowledgeDistillationCallback(t, loss(), ['1'] if feat else None, ['3'] if feat else None, weight=w)
    recipes = [('scratch', None), ('soft_target T=4 w=0.5', kd(lambda: SoftTarget(T=4.), .5, False))]
    for w in (.1, .5):
        recipes += [(f'info_nce w={w}', kd(lambda: InfoNCE(a.hidden, 256, dim=64, T=.1), w)),
                    (f'crd (4,096 negatives) w={w}', kd(lambda: CRD(a.hidden, 256, dim=64, n_negatives=4096, T=.1), w))]
    rows = run(recipes, x, y, a, lambda: mlp(a.hidden, 10), CrossEntropyLossFlat(), [accuracy], t)
    print('\n' + table(rows, ['accuracy']))


ABLATION_LOSSES = dict(soft_target=lambda a: SoftTarget(T=4.), logits=lambda a: Logits(), fit_net=lambda a: FitNet(a.hidden, 256),
                       rkd=lambda a: RKD(), similarity=lambda a: Similarity(), pkt=lambda a: PKT(), attention=None)

def part_ablation(a, x, y):
    "Every subset of --losses (response, feature, relation) on the 10-class task, the weights balanced by RatioBalance"
    import itertools
    names = a.losses.split(',')
    bad = [n for n in names if ABLATION_LOSSES.get(n) is None]
    if bad: raise ValueError(f"--losses {bad}: the ablation knows {[n for n, f in ABLATION_LOSSES.items() if f]}.")
    t, tacc = teacher(x, y, a.n_valid_from, a.n_valid_from, False, a.teacher_epochs)
    w = 'RatioBalance(0.5)' if a.ablation_weight is None else a.ablation_weight
    print(f'\n## Ablation of {names} on digits (10 classes): teacher accuracy {100*tacc:.2f}%, student 64-{a.hidden}-10 on '
          f'{a.n_student}, {a.epochs} epochs, seeds {a.seeds}, total weight {w} (split evenly); feature and relation '
          'losses on the hidden layers (the student\'s ReLU "1", the teacher\'s second ReLU "3")\n', flush=True)
    def make(subset):
        def mk(t):
            losses = [ABLATION_LOSSES[n](a) for n in subset]
            feat = any(LossTerm(l).sources & {'fm_s', 'fm_t'} for l in losses)
            weight = RatioBalance(0.5) if a.ablation_weight is None else float(a.ablation_weight)
            return KnowledgeDistillationCallback(t, losses, ['1'] if feat else None, ['3'] if feat else None, weight=weight)
        return mk
    subsets = [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    recipes = [('scratch', None)] + [(' + '.join(c), make(c)) for c in subsets]
    rows = run(recipes, x, y, a, lambda: mlp(a.hidden, 10), CrossEntropyLossFlat(), [accuracy], t)
    print('\n' + table(rows, ['accuracy']))
    full = {r['name']: r for r in rows}[' + '.join(names)]
    print(f"\nContribution of each loss to the full combination ({' + '.join(names)}): its accuracy minus that without the loss, "
          "per seed (paired)\n\n| loss removed | full − without (points) |\n|---|---|")
    for n in names:
        rest = ' + '.join(m for m in names if m != n) or 'scratch'
        d = [100 * (f[0] - o[0]) for f, o in zip(full['vals'], {r['name']: r for r in rows}[rest]['vals'])]
        print(f"| {n} | {statistics.mean(d):+.2f} ± {statistics.stdev(d) if len(d) > 1 else 0:.2f} |")


def part_overhead(a):
    "Process CPU time per training step of each weight scheme and contrastive loss, interleaved rounds, medians"
    from kdcb.contrastive import InfoNCE, CRD
    from kdcb.examples import mnist1d, cnn1d
    x, y, _, _ = mnist1d(1024)
    set_seed(0)
    teacher, student = cnn1d(80).eval(), cnn1d(11)
    schemes = {'fixed 0.5': 0.5, 'RatioBalance(0.5)': RatioBalance(.5), 'UncertaintyBalance(0.5)': UncertaintyBalance(.5),
               'GradNorm(0.5), shared: the classifier': GradNorm(.5, shared=student[-1]),
               'GradNorm(0.5), shared: the last conv stage': GradNorm(.5, shared=student[4])}
    kds = {f'soft_target, {n}': DistillationLoss(SoftTarget(T=4.), weight=w) for n, w in schemes.items()}
    kds.update({'info_nce 0.1': DistillationLoss(InfoNCE(22, 160), weight=.1),
                'crd 0.1, 872 negatives': DistillationLoss(CRD(22, 160, n_negatives=872), weight=.1),
                'crd 0.1, 4,096 negatives': DistillationLoss(CRD(22, 160, n_negatives=4096), weight=.1)})
    opt = torch.optim.Adam([*student.parameters(), *(q for kd in kds.values() for q in kd.parameters())], 1e-3)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 1024, 128)]
    def steps(kd):
        t0 = time.process_time()
        for xb, yb in batches:
            with torch.no_grad(): ft = teacher[:-1](xb); tp = teacher[-1](ft)
            fs = student[:-1](xb) # the penultimate features (what a hook on '6' would see), then the classifier
            pred = student[-1](fs)
            mixed, _ = kd(F.cross_entropy(pred, yb), pred=pred, teacher_pred=tp, fm_s={'6': fs}, fm_t={'6': ft})
            opt.zero_grad(); mixed.backward(); opt.step()
        return 1e3 * (time.process_time() - t0) / len(batches)
    for kd in kds.values(): steps(kd) # warm-up
    ms = {n: [] for n in kds}
    names = list(kds)
    for i in range(a.rounds): # interleaved, the order rotated every round so that no row always follows the same one
        for n in names[i % len(names):] + names[:i % len(names)]: ms[n].append(steps(kds[n]))
    print(f'\n## Per-step cost of the weight schemes and contrastive losses: MNIST-1D, cnn1d(11) student, cnn1d(80) teacher, batch 128, '
          f'{a.rounds} interleaved rounds of {len(batches)} steps, process CPU time, one thread\n')
    base = statistics.median(ms['soft_target, fixed 0.5'])
    print('| loss, weight | ms / step (median) | extra ms / step | step time / fixed soft_target |\n|---|---|---|---|')
    for n, v in ms.items():
        m = statistics.median(v)
        print(f'| {n} | {m:.2f} | {m - base:+.2f} | {m / base:.2f} |')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--part', choices=['multilabel', 'balance', 'ablation', 'contrastive', 'overhead', 'both'], default='both')
    p.add_argument('--rounds', type=int, default=20, help='--part overhead: interleaved rounds of 8 steps per weight scheme')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--teacher-epochs', type=int, default=40)
    p.add_argument('--n-student', type=int, default=200)
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--losses', default='soft_target,fit_net,rkd', help='--part ablation: the losses whose subsets are compared')
    p.add_argument('--ablation-weight', default=None, help='--part ablation: a fixed total weight instead of RatioBalance(0.5)')
    p.add_argument('--hidden', type=int, default=16, help="the student's hidden width")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(',')]
    x, y, a.n_valid_from = digits()
    print(f'torch {torch.__version__}, fastai {fastai.__version__}, {platform.processor() or platform.machine()}, 1 thread')
    if a.part in ('multilabel', 'both'): part_multilabel(a, x, y)
    if a.part in ('balance', 'both'): part_balance(a, x, y)
    if a.part == 'ablation': part_ablation(a, x, y)
    if a.part == 'contrastive': part_contrastive(a, x, y)
    if a.part == 'overhead': part_overhead(a)


if __name__ == '__main__': main()
