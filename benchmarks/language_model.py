"""Perplexity of a small character-level GPT-2 trained from scratch and distilled from a larger one, on text made offline
from the docstrings of Python's standard library (no download; models built from `transformers` configs).

Run: python benchmarks/language_model.py [--teacher 4x128] [--teacher-epochs 6] [--student 2x32] [--epochs 6]
                                         [--student-frac 1.0] [--seeds 0,1] [--T 2] [--weight 0.5]
The teacher trains once on the training text; each seed trains the student from scratch and with `SoftTarget` (per-token
KL, `Outputs(shift_labels=True)`), same initialisation and batch order. Prints the environment, a markdown table of validation
perplexities and training times, and the distilled / scratch time ratio. About 10 minutes on one thread.

Cost and memory: python benchmarks/language_model.py --cost [--repeats 5] [--cost-seqs 480] [--cost-epochs 2]
In one process, per repeat and in a rotating order, it times a training epoch of the student from scratch, the teacher's
inference alone over the same batches (eval, no_grad), a distilled epoch with `SoftTarget(T=2)` (`Outputs(shift_labels=True)`) and
one with `SoftTarget` + `HiddenStateCosine` on the blocks `depth_pairs` pairs (behind its connectors, as in tutorial 8),
on the first `--cost-seqs` training sequences and with untrained models (cost, not perplexity). Ratio = distilled epoch
/ (scratch epoch + teacher inference), medians over repeats; epochs 2+ of each fit are timed, wall and process CPU time.
Then the peak resident memory of a fit per variant, each in a fresh subprocess, measured as `overhead.py` measures it on
a CPU (`reset_peak_rss` / `peak_rss`: the kernel's VmHWM). About 3 minutes on one thread."""
import argparse, importlib, inspect, json, math, os, platform, statistics, subprocess, sys, time
import torch
import fastai, transformers
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
import fastai.callback.schedule
from fastai.torch_core import set_seed
from transformers import GPT2Config, GPT2LMHeadModel
from kdcb.all import *
from overhead import MALLOC_ENV, TrainTimes, clock, peak_rss, reset_peak_rss, since

MODS = ['collections', 'itertools', 'functools', 'json', 're', 'string', 'textwrap', 'argparse', 'pathlib', 'datetime',
        'random', 'statistics', 'fractions', 'decimal', 'heapq', 'bisect', 'csv', 'shutil', 'tempfile', 'logging',
        'unittest', 'typing', 'dataclasses', 'enum', 'inspect', 'difflib', 'pprint', 'operator', 'contextlib', 'copy']


def docstrings(mods=MODS):
    "The docstrings of `mods` and of their public members, each once, in a fixed order"
    out = []
    for name in mods:
        m = importlib.import_module(name)
        out += [d for d in [inspect.getdoc(m)] + [inspect.getdoc(getattr(m, a)) for a in sorted(dir(m)) if not a.startswith('_') and not inspect.ismodule(getattr(m, a))] if d]
    return '\n\n'.join(dict.fromkeys(out))


def corpus(L:int=64):
    "The docstring text as (N, L) character ids: (train, valid, vocabulary size), split with a fixed permutation"
    text = docstrings()
    chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    seqs = ids[:len(ids) // L * L].view(-1, L)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    nv = len(seqs) // 10
    return seqs[perm[nv:]], seqs[perm[:nv]], len(chars), len(text)


def make_dls(x, valid, seed, bs=32):
    set_seed(seed) # torch, and Python's `random`, from which fastai's DataLoader draws its shuffling: same batch order per seed
    return DataLoaders(DataLoader(list(zip(x, x)), bs=bs, shuffle=True, drop_last=True), DataLoader(list(zip(valid, valid)), bs=128))


def gpt2(spec:str, vocab:int, L:int, seed:int):
    "A GPT-2 of `spec` = 'blocks x width' built from its config (no weights downloaded)"
    layers, width = map(int, spec.split('x'))
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(2, width // 32), vocab_size=vocab,
                                      n_positions=L, bos_token_id=0, eos_token_id=0))


def n_par(m): return sum(q.numel() for q in m.parameters())


def environment():
    print(f'python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, '
          f'transformers {transformers.__version__}, {platform.processor() or platform.machine()}, 1 thread')


def perplexity(a):
    train, valid, vocab, n_chars = corpus(a.L)
    n_s = int(len(train) * a.student_frac)
    print(f'{n_chars:,} characters, vocabulary {vocab}, {len(train)} training / {len(valid)} validation sequences of {a.L}; '
          f'students on {n_s}')
    def fit(model, x, epochs, lr, cbs=(), seed=0):
        learn = Learner(make_dls(x, valid, seed), model, loss_func=causal_lm_loss, cbs=list(cbs))
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
        secs = time.perf_counter() - t0
        with learn.no_bar(): return math.exp(learn.validate()[0]), secs

    teacher = gpt2(a.teacher, vocab, a.L, 0)
    ppl_t, secs_t = fit(teacher, train, a.teacher_epochs, 3e-3)
    print(f'teacher {a.teacher} ({n_par(teacher):,} parameters, {a.teacher_epochs} epochs, {secs_t:.0f} s): perplexity {ppl_t:.2f}')
    print(f'\nstudent {a.student} ({n_par(gpt2(a.student, vocab, a.L, 0)):,} parameters), {a.epochs} epochs, SoftTarget T={a.T:g} weight {a.weight:g}\n')
    print('| seed | scratch | distilled | change | scratch s | distilled s |\n|---|---|---|---|---|---|')
    rows = []
    for seed in map(int, a.seeds.split(',')):
        s, ts = fit(gpt2(a.student, vocab, a.L, seed), train[:n_s], a.epochs, 1e-2, seed=seed)
        kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=a.T), weight=a.weight, outputs=Outputs(shift_labels=True))
        d, td = fit(gpt2(a.student, vocab, a.L, seed), train[:n_s], a.epochs, 1e-2, [kd], seed=seed)
        rows.append((s, d, ts, td))
        print(f'| {seed} | {s:.2f} | {d:.2f} | {d - s:+.2f} | {ts:.0f} | {td:.0f} |', flush=True)
    med = lambda i: statistics.median(r[i] for r in rows)
    print(f'\nmedian perplexity: scratch {med(0):.2f}, distilled {med(1):.2f}; teacher {ppl_t:.2f}. '
          f'Distilled / scratch training time: {med(3) / med(2):.2f}')


# ---- cost and memory ----
VARIANTS = ('scratch', 'teacher', 'soft_target', 'soft_target+hidden')


class Setup:
    "What every cost variant shares: the first `n` training sequences, an untrained teacher, the block pairs"
    def __init__(self, a):
        train, valid, self.vocab, _ = corpus(a.L)
        self.a, self.x, self.valid = a, train[:a.cost_seqs], valid[:128]
        self.teacher = gpt2(a.teacher, self.vocab, a.L, 0)
        self.pairs = depth_pairs(self.student(0), self.teacher, self.x[:2])

    def student(self, seed): return gpt2(self.a.student, self.vocab, self.a.L, seed)
    def dls(self, seed): return make_dls(self.x, self.valid, seed)

    def callback(self, variant):
        "The distillation callback of `variant` (None for scratch): T and weight as in the perplexity runs"
        soft = SoftTarget(T=self.a.T)
        if variant == 'soft_target': return KnowledgeDistillationCallback(self.teacher, soft, weight=self.a.weight, outputs=Outputs(shift_labels=True))
        return KnowledgeDistillationCallback(self.teacher, [soft, Connected(HiddenStateCosine(), self.pairs.connectors())],
                                             self.pairs['student'], self.pairs['teacher'], weight=[0.45, 0.05], outputs=Outputs(shift_labels=True))

    def fit(self, variant, seed):
        "Training-phase (wall, CPU) times of epochs 2+ of one fit of `variant` ('teacher': inference alone, same batches)"
        dls = self.dls(seed)
        if variant == 'teacher': return self.teacher_times(dls)
        learn = Learner(dls, self.student(seed), loss_func=causal_lm_loss, cbs=TrainTimes())
        with learn.no_bar(), learn.no_logging():
            learn.fit(self.a.cost_epochs, 1e-3, cbs=None if variant == 'scratch' else self.callback(variant))
        return learn.train_times.times[1:]

    def teacher_times(self, dls):
        self.teacher.eval(); res = []
        for _ in range(self.a.cost_epochs):
            batches = list(dls.train)
            t = clock()
            with torch.no_grad():
                for xb, _ in batches: self.teacher(xb)
            res.append(since(t))
        return res[1:]


def cost(a):
    su = Setup(a)
    nb = len(su.x) // 32
    print(f'{len(su.x)} training sequences of {a.L} ({nb} batches of 32); teacher {a.teacher} ({n_par(su.teacher):,} parameters), '
          f'student {a.student} ({n_par(su.student(0)):,}), untrained; hidden states: student {su.pairs["student"]} with '
          f'teacher {su.pairs["teacher"]}')
    res = {v: [] for v in VARIANTS}
    for r in range(a.repeats):
        for v in VARIANTS[r % 4:] + VARIANTS[:r % 4]: res[v] += su.fit(v, r) # rotated, so drift in load hits every variant
    print(f'\nmedians over {len(res["scratch"])} epochs ({a.repeats} repeats x {a.cost_epochs - 1} timed epochs); '
          'ratio = distilled epoch / (scratch epoch + teacher inference alone)\n')
    print('| variant | wall ms | CPU ms | ratio wall | ratio CPU |\n|---|---|---|---|---|')
    med = [{v: statistics.median(t[i] for t in res[v]) for v in VARIANTS} for i in (0, 1)]
    for v in VARIANTS:
        ratios = '' if v in ('scratch', 'teacher') else ''.join(f' {m[v] / (m["scratch"] + m["teacher"]):.2f} |' for m in med)
        print(f'| {v} | {med[0][v] * 1000:.0f} | {med[1][v] * 1000:.0f} |' + (ratios or ' | |'), flush=True)
    memory(a)


def fit_memory(a, variant):
    "Peak resident memory of one fit of `variant` in this (fresh) process: (RSS before the fit, peak) in MiB"
    su = Setup(a)
    dls = su.dls(0)
    learn = Learner(dls, su.student(0), loss_func=causal_lm_loss)
    cb = None if variant in ('scratch', 'teacher') else su.callback(variant)
    before = reset_peak_rss()
    if variant == 'teacher': su.teacher_times(dls)
    else:
        with learn.no_bar(), learn.no_logging(): learn.fit(a.cost_epochs, 1e-3, cbs=cb)
    return before, peak_rss()


def memory(a):
    args = ['--cost-seqs', str(a.cost_seqs), '--cost-epochs', str(a.cost_epochs), '--teacher', a.teacher, '--student', a.student,
            '--T', str(a.T), '--weight', str(a.weight), '--L', str(a.L)]
    res = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, '--mem-child', v, *args], capture_output=True, text=True, check=True,
                             env={**os.environ, **MALLOC_ENV})
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f'\npeak memory of a {a.cost_epochs}-epoch fit (batches of 32), peak RSS (VmHWM) of a fresh subprocess per variant; '
          '"fit" = peak minus the RSS at the start of the fit\n')
    print('| variant | before fit MiB | peak MiB | fit MiB | peak / scratch | fit / (scratch + teacher) |\n|---|---|---|---|---|---|')
    fit = {v: p - b for v, (b, p) in res.items()}
    for v, (b, p) in res.items():
        print(f'| {v} | {b:.0f} | {p:.0f} | {fit[v]:.1f} | {p / res["scratch"][1]:.3f} |'
              + (' |' if v in ('scratch', 'teacher') else f' {fit[v] / (fit["scratch"] + fit["teacher"]):.2f} |'))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--teacher', default='4x128'); p.add_argument('--teacher-epochs', type=int, default=6)
    p.add_argument('--student', default='2x32'); p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--student-frac', type=float, default=1.0); p.add_argument('--seeds', default='0,1')
    p.add_argument('--T', type=float, default=2.); p.add_argument('--weight', type=float, default=0.5)
    p.add_argument('--L', type=int, default=64)
    p.add_argument('--cost', action='store_true', help='time and memory of distillation instead of perplexity')
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--cost-seqs', type=int, default=480)
    p.add_argument('--cost-epochs', type=int, default=2, help='epochs per cost fit; the first is not timed')
    p.add_argument('--mem-child', help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1); transformers.logging.set_verbosity_error()
    if a.mem_child: print(json.dumps(fit_memory(a, a.mem_child))); return
    environment()
    (cost if a.cost else perplexity)(a)


if __name__ == '__main__': main()
