"""Perplexity of a small character-level GPT-2 trained from scratch and distilled from a larger one, on text made offline
from the docstrings of Python's standard library (no download; models built from `transformers` configs).

Run: python benchmarks/language_model.py [--teacher 4x128] [--teacher-epochs 6] [--student 2x32] [--epochs 6]
                                         [--student-frac 1.0] [--seeds 0,1] [--T 2] [--weight 0.5]
The teacher trains once on the training text; each seed trains the student from scratch and with `SoftTarget` (per-token
KL, `shift_labels=True`), same initialisation and batch order. Prints the environment, a markdown table of validation
perplexities and training times, and the distilled / scratch time ratio."""
import argparse, importlib, inspect, math, platform, statistics, time
import torch, torch.nn.functional as F
import fastai, transformers
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
import fastai.callback.schedule
from transformers import GPT2Config, GPT2LMHeadModel
from kdcb.all import *

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--teacher', default='4x128'); p.add_argument('--teacher-epochs', type=int, default=6)
    p.add_argument('--student', default='2x32'); p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--student-frac', type=float, default=1.0); p.add_argument('--seeds', default='0,1')
    p.add_argument('--T', type=float, default=2.); p.add_argument('--weight', type=float, default=0.5)
    p.add_argument('--L', type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1); transformers.logging.set_verbosity_error()
    print(f'python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, '
          f'transformers {transformers.__version__}, {platform.processor() or platform.machine()}, 1 thread')
    text = docstrings()
    chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    seqs = ids[:len(ids) // a.L * a.L].view(-1, a.L)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    nv = len(seqs) // 10
    valid, train = seqs[perm[:nv]], seqs[perm[nv:]]
    n_s = int(len(train) * a.student_frac)
    print(f'{len(text):,} characters, vocabulary {len(chars)}, {len(train)} training / {nv} validation sequences of {a.L}; '
          f'students on {n_s}')

    def dls(x, seed):
        torch.manual_seed(seed)
        return DataLoaders(DataLoader(list(zip(x, x)), bs=32, shuffle=True, drop_last=True), DataLoader(list(zip(valid, valid)), bs=128))
    def lm_loss(out, y): return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
    def gpt2(spec, seed):
        layers, width = map(int, spec.split('x'))
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(2, width // 32), vocab_size=len(chars),
                                          n_positions=a.L, bos_token_id=0, eos_token_id=0))
    def fit(model, x, epochs, lr, cbs=(), seed=0):
        learn = Learner(dls(x, seed), model, loss_func=lm_loss, cbs=list(cbs))
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
        secs = time.perf_counter() - t0
        with learn.no_bar(): return math.exp(learn.validate()[0]), secs

    teacher = gpt2(a.teacher, 0)
    ppl_t, secs_t = fit(teacher, train, a.teacher_epochs, 3e-3)
    n_par = lambda m: sum(q.numel() for q in m.parameters())
    print(f'teacher {a.teacher} ({n_par(teacher):,} parameters, {a.teacher_epochs} epochs, {secs_t:.0f} s): perplexity {ppl_t:.2f}')
    print(f'\nstudent {a.student} ({n_par(gpt2(a.student, 0)):,} parameters), {a.epochs} epochs, SoftTarget T={a.T:g} weight {a.weight:g}\n')
    print('| seed | scratch | distilled | change | scratch s | distilled s |\n|---|---|---|---|---|---|')
    rows = []
    for seed in map(int, a.seeds.split(',')):
        s, ts = fit(gpt2(a.student, seed), train[:n_s], a.epochs, 1e-2, seed=seed)
        kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=a.T), weight=a.weight, shift_labels=True)
        d, td = fit(gpt2(a.student, seed), train[:n_s], a.epochs, 1e-2, [kd], seed=seed)
        rows.append((s, d, ts, td))
        print(f'| {seed} | {s:.2f} | {d:.2f} | {d - s:+.2f} | {ts:.0f} | {td:.0f} |', flush=True)
    med = lambda i: statistics.median(r[i] for r in rows)
    print(f'\nmedian perplexity: scratch {med(0):.2f}, distilled {med(1):.2f}; teacher {ppl_t:.2f}. '
          f'Distilled / scratch training time: {med(3) / med(2):.2f}')


if __name__ == '__main__': main()
