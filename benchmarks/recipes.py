"""Distillation recipes when the teacher has seen more data than the student: which ones beat training from the labels.

Run: python benchmarks/recipes.py --probe            # the default grid (60 epochs, width 11): about 6 minutes on one CPU thread
     python benchmarks/recipes.py --full              # student widths 6, 11, 22, 40 at 60 epochs (about 15 minutes)
     python benchmarks/recipes.py --recipes scratch,kd:T=4:w=0.5,kd:T=2:w=0.5,kd:T=4:w=0.9:u --epochs 200  # longer
     python benchmarks/recipes.py --balance           # balancers and contrastive losses against the fixed weights

The regime of kdcb issue 15: a `cnn1d(80)` teacher trained on 16,000 MNIST-1D signals (built locally, no download);
a `cnn1d(width)` student on the first 1,000 of them; validation on the 1,000 signals after those. Every batch is
randomly shifted and noised (`ShiftNoise`), and the teacher labels exactly the view the student sees (function
matching). One-cycle Adam, batch 128. Seed `s` gives every recipe the same initial student, the same augmentation
stream and (for recipes on the same training set) the same batch order: rows are paired, and "vs scratch" is the mean
of the per-seed differences from the `scratch` row of the same epochs and width, ± their std.

A recipe is a string of ':'-separated fields:
  scratch                 the labels alone (a `lr=` field may follow)
  kd                      distil `soft_target` (Hinton) into the student, with the fields
    T=4 | T=4>1           temperature, or a linear schedule from 4 to 1 over training
    w=0.5 | w=0.1>0.9     distillation weight (the task loss gets 1 - w), or a linear schedule
    dkd                   `decoupled_kd` (beta=2, on labelled items only) instead of `soft_target`
    nce | crd             `InfoNCE` (in-batch negatives) or `CRD` (a bank of negatives) instead of `soft_target`: on the
                          penultimate features (the pooled `Flatten` output, layer '6', 2·width wide in the student and
                          160 in the teacher), through projection heads 128 wide, at the losses' temperature 0.07
                          (T= is then refused); the student's classifier learns from the labels alone
    st                    with nce or crd: keep `soft_target` too, the weight split evenly between the two, or
    w=0.1+0.8             one weight per loss (with st: the contrastive loss's, then soft_target's)
    neg=4096              with crd: the bank's size (default: the training set minus a batch, at most 4,096; see `crd_bank`)
    bal=ratio | bal=unc | bal=grad
                          balance the weights: `RatioBalance(w)` (each distillation loss rescaled to the task loss's value,
                          w its share), `UncertaintyBalance(w)` (learned log-variances, w the prior weight) or
                          `GradNorm(w)` (gradient norms on the classifier, or with nce/crd on the last conv stage, kept in
                          the proportion w : 1 - w); w= is then the share or prior, not a fixed weight
    u                     add the other teacher signals WITHOUT labels (`kdcb.data`): they carry the
                          distillation loss only; an epoch then covers all 16,000 signals
    rep=4                 with `u`: repeat the labelled signals this many times in the training set
  lr=3e-3                 peak learning rate (default --lr)
  x=4                     train for this many times the epochs of the grid cell
With `u`, the epochs are scaled by labelled/all signals, so that a `u` run makes about as many optimizer steps as the
labelled-only runs of its cell (`x=` buys more); the `steps` column shows them.

Prints the environment, one markdown table per (epochs, width) cell and a summary; writes `recipes.png`, `results.md`
and the cached teacher to --out."""
from __future__ import annotations
import argparse, math, os, platform, random, statistics, sys, time, warnings
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
from pathlib import Path
import torch
import fastai
from fastai.callback.core import Callback
from fastai.callback.schedule import SchedLin
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from kdcb.all import *
from kdcb.data import tensor_dls, UNLABELLED, add_unlabelled, LabelledOnly
from kdcb.examples import mnist1d, ShiftNoise, cnn1d, n_params

# the question of issue 15 and the hypotheses about it, at 60 epochs: temperature, learning rate (the optimisation budget),
# unlabelled data at the same number of steps and with four times as many ("patient"), and scratch given those steps too
DEFAULT_RECIPES = ('scratch,scratch:x=4,scratch:lr=3e-2,kd:T=4:w=0.5,kd:T=8:w=0.5,kd:T=2:w=0.5,kd:T=4:w=0.5:lr=3e-3,'
                   'kd:T=4:w=0.9:u,kd:T=4:w=0.9:u:lr=3e-2,kd:T=4:w=0.9:u:x=4')
# the capacity axis (--full): the recipe, the labelled-only fix, and unlabelled data at 1x and 4x the steps
FULL_RECIPES = 'scratch,scratch:x=4,kd:T=4:w=0.5,kd:T=2:w=0.5,kd:T=4:w=0.9:u,kd:T=4:w=0.9:u:x=4'
# --balance: the fixed-weight recipes of the labelled-only and the `u` regime, the same with each balancer (w the share or
# prior); InfoNCE and CRD on the penultimate features instead of soft_target at two weights, and at 0.1 next to it
BALANCE_RECIPES = ','.join(['scratch'] + [f'kd:T=4:w={w}{u}{b}' for w, u in (('0.5', ''), ('0.9', ':u')) for b in ('', ':bal=ratio', ':bal=unc', ':bal=grad')]
                           + [r for u, st in (('', '0.4'), (':u', '0.8')) for r in
                              [f'kd:{c}:w={w}{u}' for c in ('nce', 'crd') for w in ('0.1', '0.5')] + [f'kd:{c}:st:w=0.1+{st}{u}' for c in ('nce', 'crd')]])


LOSS_FIELDS = dict(dkd='decoupled_kd', nce='info_nce', crd='crd') # a field that replaces `soft_target`
BALANCERS = dict(ratio=RatioBalance, unc=UncertaintyBalance, grad=GradNorm) # the values of bal=
PENULTIMATE = '6' # cnn1d's `Flatten`: the pooled features its linear head classifies


def parse_recipe(spec:str)->dict:
    "The settings of a recipe string (see the module docstring); an unknown or conflicting field is an error"
    f = spec.split(':')
    if f[0] not in ('scratch', 'kd'): raise ValueError(f"Recipe {spec!r} must start with 'scratch' or 'kd'.")
    r = dict(spec=spec, kd=f[0] == 'kd', T='4', w='0.5', loss='soft_target', st=False, bal=None, neg=None, u=False, rep=1, lr=None, x=1.)
    given = set()
    for fld in f[1:]:
        k, _, v = fld.partition('=')
        if k in ('u', 'st') and not v: r[k] = True
        elif k in LOSS_FIELDS and not v:
            if r['loss'] != 'soft_target': raise ValueError(f"Recipe {spec!r} names two losses ({r['loss']}, {LOSS_FIELDS[k]}): keep one of dkd, nce, crd.")
            r['loss'] = LOSS_FIELDS[k]
        elif k in ('T', 'w') and v: r[k] = v
        elif k == 'bal' and v in BALANCERS: r['bal'] = v
        elif k == 'bal': raise ValueError(f"Field {fld!r} of {spec!r}: the balancers are bal={', bal='.join(BALANCERS)}.")
        elif k in ('lr', 'x') and v: r[k] = float(v)
        elif k in ('rep', 'neg') and v: r[k] = int(v)
        else: raise ValueError(f"Unknown field {fld!r} in recipe {spec!r}: use T=, w=, dkd, nce, crd, st, neg=, bal=, u, rep=, lr=, x=.")
        if not r['kd'] and k not in ('lr', 'x'): raise ValueError(f"Field {fld!r} of {spec!r}: scratch takes lr= and x= only.")
        given.add(k)
    contrastive = r['loss'] in ('info_nce', 'crd')
    if 'st' in given and not contrastive: raise ValueError(f"Recipe {spec!r}: st (keep soft_target) goes with nce or crd.")
    if '+' in r['w'] and (r['w'].count('+') != 1 or not r['st']): raise ValueError(
        f"Recipe {spec!r}: w={r['w']} gives one weight per loss, and only nce or crd with st has two losses (w=0.1+0.8).")
    if 'neg' in given and r['loss'] != 'crd': raise ValueError(f"Recipe {spec!r}: neg= is the size of crd's bank; add the field crd.")
    if 'T' in given and contrastive and not r['st']: raise ValueError(
        f"Recipe {spec!r}: T= is the output losses' temperature; {r['loss']} uses its own (0.07). Drop T=, or add st to keep soft_target.")
    return r


def crd_bank(n_train:int, bs:int=128)->int:
    """CRD's bank for a training set of `n_train`: at most one epoch minus a batch, so that a signal seldom meets an
    earlier view of itself among its negatives (CRD excludes it by index, a queue cannot), and at most 4,096 = 32
    batches, so that no negative was projected by heads more than 32 steps older (CRD's own bank is indexed by sample
    and moves by momentum; a queue of 16,384 over 1,000 signals would hold each one 16 times)"""
    return max(1, min(4096, n_train - bs))


def kd_callback(r:dict, teacher, student, n_train:int)->KnowledgeDistillationCallback:
    "The distillation callback of recipe `r` for `student`, on a training set of `n_train` signals"
    T, output = _value(r['T']), r['loss'] in ('soft_target', 'decoupled_kd')
    w = [_value(v) for v in r['w'].split('+')] if '+' in r['w'] else _value(r['w'])
    # GradNorm's shared parameters: the last layer every loss reaches (features at '6' do not reach the classifier)
    weight = w if not r['bal'] else GradNorm(w, shared=student[-1] if output else student[4]) if r['bal'] == 'grad' else BALANCERS[r['bal']](w)
    if output:
        loss = SoftTarget(T=T) if r['loss'] == 'soft_target' else DecoupledKD(T=T, beta=2., ignore_index=UNLABELLED)
        return KnowledgeDistillationCallback(teacher, loss=loss, weight=weight)
    cs, ct = student[-1].in_features, teacher[-1].in_features # the widths the projection heads take
    c = InfoNCE(cs, ct) if r['loss'] == 'info_nce' else CRD(cs, ct, n_negatives=r['neg'] or crd_bank(n_train))
    return KnowledgeDistillationCallback(teacher, loss=[c, SoftTarget(T=T)] if r['st'] else c,
                                         student_layers=[PENULTIMATE], teacher_layers=[PENULTIMATE], weight=weight)


def _value(v:str): # '4' -> 4.0; '4>1' -> a linear schedule of pct_train from 4 to 1
    a, _, b = v.partition('>')
    return SchedLin(float(a), float(b)) if b else float(a)


class AccLog(Callback):
    "Validation accuracy after every epoch, and the optimizer steps"
    order = 51 # after `Recorder` (50)
    def before_fit(self): self.accs, self.steps = [], 0
    def after_step(self): self.steps += 1
    def after_epoch(self): self.accs.append(float(self.recorder.final_record[self.recorder.metric_names.index('accuracy') - 1]))


class GradProbe(Callback):
    "At a few points of training, the gradients of the weighted task and distillation terms: their norm ratio and cosine"
    order,run_valid = 6,False # after KnowledgeDistillationCallback (5) has mixed the loss
    def __init__(self, teacher, kd_loss, w, task_loss, at=(0., .25, .5, .9)): self.teacher,self.kd_loss,self.w,self.task_loss,self.at = teacher,kd_loss,w,task_loss,at
    def before_fit(self): self.rows, self.i = [], 0
    def after_loss(self):
        p = self.pct_train
        if self.i >= len(self.at) or p < self.at[self.i]: return
        self.i += 1
        ps = [q for q in self.model.parameters() if q.requires_grad]
        with torch.no_grad(): t = self.teacher(*self.xb)
        w = float(self.w(p)) if callable(self.w) else self.w
        self.kd_loss.pct_train = p # a temperature schedule reads it
        g = [torch.cat([x.flatten() for x in torch.autograd.grad(l, ps, retain_graph=True)])
             for l in ((1 - w) * self.task_loss(self.pred, *self.yb), w * self.kd_loss(self.pred, t, *self.yb))]
        self.rows.append((p, (g[1].norm() / g[0].norm()).item(), torch.cosine_similarity(g[0], g[1], 0).item()))


@torch.no_grad()
def _evaluate(model, teacher, xl, yl, xv, yv)->dict:
    "Clean-input accuracy on the labelled training signals and on validation, and agreement with the teacher there"
    model.eval(); teacher.eval()
    pv, pt = model(xv).argmax(-1), teacher(xv).argmax(-1)
    return dict(acc=100 * (pv == yv).float().mean().item(), train_acc=100 * (model(xl).argmax(-1) == yl).float().mean().item(),
                agree=100 * (pv == pt).float().mean().item())


def run_one(r:dict, data:dict, teacher, epochs:int, width:int, seed:int, lr:float, probe:bool=False)->dict:
    "Train one student with recipe `r`; the final metrics, the accuracy curve, steps and seconds"
    xl, yl, xu, xv, yv = data['xl'], data['yl'], data['xu'], data['xv'], data['yv']
    if r['u']:
        x, y = add_unlabelled(torch.cat([xl] * r['rep']), torch.cat([yl] * r['rep']), xu)
        ep = max(1, round(epochs * r['x'] * len(xl) / len(x)))
    else: x, y, ep = xl, yl, max(1, round(epochs * r['x']))
    dls = tensor_dls(x, y, xv, yv)
    set_seed(seed)
    student = cnn1d(width)
    set_seed(seed) # the same augmentation stream and, on the same data, the same batch order for every recipe
    dls.train.rng = random.Random(seed)
    log, cbs = AccLog(), [ShiftNoise()]
    if r['kd']: cbs.append(kd := kd_callback(r, teacher, student, len(x)))
    task = LabelledOnly() if r['u'] else CrossEntropyLossFlat()
    probe = probe and r['kd'] and r['bal'] is None and r['loss'] in ('soft_target', 'decoupled_kd') # one output loss at a fixed weight
    if probe: cbs.append(gp := GradProbe(teacher, kd.kd_loss.terms[0].loss, _value(r['w']), task))
    learn = Learner(dls, student, loss_func=task, metrics=accuracy, cbs=[log] + cbs)
    t0 = time.perf_counter()
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(ep, r['lr'] or lr)
    secs = time.perf_counter() - t0
    out = _evaluate(student, teacher, xl, yl, xv, yv)
    if r['bal']: out['w'] = {k[2:]: v for k, v in zip(kd.columns.names, kd.columns.averages()) if k.startswith('w_')} # last epoch
    return dict(out, curve=log.accs, steps=log.steps, epochs=ep, secs=secs,
                probe=gp.rows if probe else None)


def get_teacher(data:dict, epochs:int, out:Path, width:int=80)->tuple:
    "The teacher trained on all teacher signals (cached in `out`), and its validation accuracy"
    f = out / f"teacher_w{width}_n{len(data['xt'])}_e{epochs}.pt"
    set_seed(0)
    teacher = cnn1d(width)
    if f.exists(): teacher.load_state_dict(torch.load(f))
    else:
        dls = tensor_dls(data['xt'], data['yt'], data['xv'], data['yv'])
        dls.train.rng = random.Random(0)
        learn = Learner(dls, teacher, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=ShiftNoise())
        with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, 1e-2)
        torch.save(teacher.state_dict(), f)
    teacher.eval()
    with torch.no_grad(): acc = 100 * (teacher(data['xv']).argmax(-1) == data['yv']).float().mean().item()
    return teacher, acc


def _ms(v): return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.)


def table(rows:list[dict])->str:
    "One cell's markdown table: accuracy, change from scratch (paired), train accuracy, agreement with the teacher"
    base = next((r for r in rows if r['spec'] == 'scratch'), None)
    lines = ['| recipe | epochs | steps | accuracy (%) | vs scratch | at half time (%) | train acc (%) | agrees with teacher (%) | s / run | ms / step |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        m, s = _ms([x['acc'] for x in r['runs']])
        if base is None: d = '—'
        else:
            dm, ds = _ms([x['acc'] - b['acc'] for x, b in zip(r['runs'], base['runs'])])
            d = f"{dm:+.1f} ± {ds:.1f}"
        tm, am = (statistics.mean(x[k] for x in r['runs']) for k in ('train_acc', 'agree'))
        half = statistics.mean(100 * x['curve'][(len(x['curve']) - 1) // 2] for x in r['runs']) # after half the epochs
        lines.append(f"| {r['spec']} | {r['runs'][0]['epochs']} | {r['runs'][0]['steps']} | {m:.1f} ± {s:.1f} | {d} | {half:.1f} | {tm:.1f} | "
                     f"{am:.1f} | {statistics.mean(x['secs'] for x in r['runs']):.1f} | "
                     f"{statistics.median(1e3 * x['secs'] / x['steps'] for x in r['runs']):.1f} |")
    ws = [r for r in rows if 'w' in r['runs'][0]]
    if ws: lines += ['', "Weights the balancers applied, mean over the last epoch's batches and the seeds: " + '; '.join(
        f"{r['spec']}: " + ', '.join(f"{k} {statistics.mean(x['w'][k] for x in r['runs']):.3g}" for k in r['runs'][0]['w']) for r in ws)]
    return '\n'.join(lines)


def plot(cells:dict, fname:Path):
    "Left: mean change from scratch of every recipe, per grid cell. Right: validation accuracy over training, first cell"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    specs = list(dict.fromkeys(r['spec'] for rows in cells.values() for r in rows if r['spec'] != 'scratch'))
    keys = list(cells)
    bw = 0.8 / max(1, len(keys))
    for j, k in enumerate(keys):
        base = {r['spec']: r for r in cells[k]}.get('scratch')
        if base is None: continue
        ms = [(_ms([x['acc'] - b['acc'] for x, b in zip(r['runs'], base['runs'])]) if r else (math.nan, 0.))
              for r in ({r['spec']: r for r in cells[k]}.get(s) for s in specs)]
        a1.barh([i + j * bw for i in range(len(specs))], [m for m, _ in ms], bw, xerr=[s for _, s in ms],
                label=f"{k[0]} epochs, width {k[1]}", color=f'C{j}')
    a1.axvline(0, color='k', lw=.8)
    a1.set_yticks([i + bw * (len(keys) - 1) / 2 for i in range(len(specs))], specs, fontsize=8)
    a1.invert_yaxis()
    a1.set(xlabel='validation accuracy − scratch (points, mean ± std of paired seeds)', title='change from scratch')
    a1.legend(fontsize=8)
    for i, r in enumerate(cells[keys[0]]):
        c = torch.tensor([x['curve'] for x in r['runs']]).mean(0) * 100
        a2.plot(torch.linspace(0, 1, len(c) + 1)[1:], c, f'C{i % 10}', marker='.' if len(c) < 10 else None,
                label=r['spec'], ls='--' if r['spec'].startswith('scratch') else '-')
    a2.set(xlabel='training progress', ylabel='validation accuracy (%)', ylim=(60, 100),
           title=f"{keys[0][0]} epochs, width {keys[0][1]}, mean over seeds")
    a2.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(fname, dpi=100); plt.close(fig)


def get_parser()->argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Recipe strings: see the top of benchmarks/recipes.py.')
    p.add_argument('--recipes', default=None, help=f'comma list of recipes (default: {DEFAULT_RECIPES})')
    p.add_argument('--epochs', default='60', help='comma list of epochs over the labelled signals (default 60)')
    p.add_argument('--widths', default=None, help='comma list of student widths (default 11; --full: 6,11,22,40)')
    p.add_argument('--seeds', type=int, default=3, help='paired seeds per recipe (default 3)')
    p.add_argument('--seed', type=int, default=0, help='first seed (default 0)')
    p.add_argument('--lr', type=float, default=1e-2, help='peak learning rate of one-cycle training (default 1e-2)')
    p.add_argument('--n-labelled', type=int, default=1000, help="labelled student signals, the first of the teacher's (default 1000)")
    p.add_argument('--n-teacher', type=int, default=16000, help='teacher training signals (default 16000)')
    p.add_argument('--teacher-epochs', type=int, default=30, help='teacher training epochs (default 30)')
    p.add_argument('--probe', action='store_true', help='also measure, in the first seed of every distillation recipe with one output loss at a fixed weight, the gradients '
                   'of the weighted task and distillation terms at 0, 25, 50 and 90%% of training: norm ratio and cosine')
    p.add_argument('--full', action='store_true', help=f'the capacity grid: widths 6,11,22,40 (unless --widths), recipes {FULL_RECIPES} (unless --recipes)')
    p.add_argument('--balance', action='store_true', help=f'recipes {BALANCE_RECIPES} (unless --recipes)')
    p.add_argument('--out', default='recipes-out', help='folder for the plot, results.md and the cached teacher (default ./recipes-out)')
    return p


def main(argv=None):
    p = get_parser()
    a = p.parse_args(argv)
    torch.set_num_threads(1) # tiny models: one thread is as fast, and leaves the machine's other cores alone
    recipes = [parse_recipe(s.strip()) for s in (a.recipes or (FULL_RECIPES if a.full else BALANCE_RECIPES if a.balance else DEFAULT_RECIPES)).split(',') if s.strip()]
    epochs = [int(e) for e in a.epochs.split(',')]
    widths = [int(w) for w in (a.widths or ('6,11,22,40' if a.full else '11')).split(',')]
    if not 0 < a.n_labelled < a.n_teacher: p.error(f"--n-labelled must be in (0, --n-teacher), got {a.n_labelled}.")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    env = (f"python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"## Environment\n{env}\ncommand: python benchmarks/recipes.py {' '.join(sys.argv[1:] if argv is None else argv)}\n", flush=True)
    xt, yt, xv, yv = mnist1d(a.n_teacher)
    n = a.n_labelled
    data = dict(xt=xt, yt=yt, xl=xt[:n], yl=yt[:n], xu=xt[n:], xv=xv, yv=yv)
    t0 = time.perf_counter()
    teacher, tacc = get_teacher(data, a.teacher_epochs, out)
    seeds = list(range(a.seed, a.seed + a.seeds))
    with torch.no_grad(): z = teacher(data['xl'])
    soft = ', '.join(f"T={T}: {100 * (z / T).softmax(-1).max(-1)[0].mean():.0f}%" for T in (1, 2, 4, 8))
    head = (f"Teacher cnn1d(80), {n_params(teacher):,} parameters, trained on {a.n_teacher:,} signals for {a.teacher_epochs} "
            f"epochs: {tacc:.1f}% ({time.perf_counter() - t0:.0f} s); its mean top-class probability on the student's signals at "
            f"{soft}; logit spread (std over classes) {z.std(-1).mean():.1f}. Students on the first {n:,} signals "
            f"(`u`: plus the other {a.n_teacher - n:,} without labels); 1,000 validation signals; lr {a.lr:g}; seeds {seeds}.")
    print(head + '\n', flush=True)
    cells, md = {}, [f"Environment: {env}\n", head + '\n']
    for ep in epochs:
        for width in widths:
            rows = []
            for r in recipes:
                rows.append(dict(spec=r['spec'], runs=[run_one(r, data, teacher, ep, width, s, a.lr, a.probe and s == seeds[0]) for s in seeds]))
                print(f"  {ep} epochs, width {width}, {r['spec']}: " + ', '.join(f"{x['acc']:.1f}" for x in rows[-1]['runs']), flush=True)
            cells[(ep, width)] = rows
            t = f"### {ep} epochs, student cnn1d({width}), {n_params(cnn1d(width)):,} parameters\n\n{table(rows)}\n"
            pr = [(r['spec'], r['runs'][0]['probe']) for r in rows if r['runs'][0]['probe']]
            if pr: t += ("\nGradients of the weighted terms, seed {}: ‖w·∇distillation‖ / ‖(1 − w)·∇task‖ and their cosine, at a point of "
                         "training\n\n| recipe | ".format(seeds[0]) + ' | '.join(f"{100 * q:.0f}%" for q, _, _ in pr[0][1]) + ' |\n|---|' +
                         '---|' * len(pr[0][1]) + '\n' + '\n'.join(f"| {s} | " + ' | '.join(f"{n:.2f}, cos {c:+.2f}" for _, n, c in rows_)
                                                                    + ' |' for s, rows_ in pr) + '\n')
            print('\n' + t, flush=True); md.append(t)
    # the summary: each recipe's change from scratch in every cell, and its worst cell in units of that cell's std
    specs = [r['spec'] for r in recipes if r['spec'] != 'scratch']
    if any(r['spec'] == 'scratch' for r in recipes) and specs:
        lines = ['| recipe | ' + ' | '.join(f"{e} ep, w{w}" for e, w in cells) + ' | worst (in scratch stds) |',
                 '|---|' + '---|' * (len(cells) + 1)]
        for s in specs:
            ds, worst = [], math.inf
            for rows in cells.values():
                by = {r['spec']: r for r in rows}
                dm, _ = _ms([x['acc'] - b['acc'] for x, b in zip(by[s]['runs'], by['scratch']['runs'])])
                sd = _ms([x['acc'] for x in by['scratch']['runs']])[1]
                ds.append(f"{dm:+.1f}"); worst = min(worst, dm / sd if sd else math.copysign(math.inf, dm) if dm else 0.)
            lines.append(f"| {s} | " + ' | '.join(ds) + f" | {worst:+.1f} |")
        t = "### Change from scratch (points, mean of paired seeds) in every cell\n\n" + '\n'.join(lines) + '\n'
        print(t, flush=True); md.append(t)
    plot(cells, out / 'recipes.png')
    (out / 'results.md').write_text('\n'.join(md))
    print(f"plot: {out / 'recipes.png'}; tables: {out / 'results.md'}; total {time.perf_counter() - t0:.0f} s")
    return cells


if __name__ == '__main__': main()
