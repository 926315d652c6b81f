"""Small character-level GPT-2 students trained from scratch and distilled from a larger teacher, method by method, in the
regime distillation is used in: the teacher has read much more text than the student (no download; models built from
`transformers` configs).

Run: python benchmarks/language_model.py [--jobs 3] [--quick] [--methods scratch,forward_kl,...] [--seeds 0,1,2]
         [--teacher 4x128] [--teacher-epochs 2] [--student 2x64] [--epochs 20] [--student-chars 25000] [--ratio 16]
         [--valid-chars 30000] [--T 1] [--weight 0.5] [--prompt 32] [--out benchmarks/results/language_model]
Data: the `.py` files of this Python's standard library (tests and bundled packages left out), shuffled with a fixed seed
and split BY FILE: whole files to validation (`--valid-chars`), whole files to the students' slice (`--student-chars`),
then more files to the teacher alone until the teacher's text (the slice included) is `--ratio` times the students'.
Characters are the 97 printable ASCII ones plus one id for any other. Validation perplexity is on the held-out files.
`--same-data`: the regime where nothing pays, the earlier setting: teacher and students on the same standard-library
docstrings, split by sequence (defaults teacher 4x128 for 6 epochs, student 2x32 for 6; its table's command in
benchmarks/README.md).
The teacher trains once; for each seed, each method trains a student from the same initialisation in the same batch order:
  scratch; forward_kl (`soft_target`), reverse_kl, jsd (beta 0.5), skew_kl (alpha 0.1): the distillation callback with that
  registered loss at T = `--T` (1 by default: the losses' own default for (B, L, V) sequence logits, said explicitly),
  `shift_labels=True`; onpolicy_forward_kl, onpolicy_jsd (λ = 0.5) and onpolicy_reverse_kl (λ = 1): the same
  with `OnPolicy`, the student continuing the first `--prompt` characters of each sequence (sampled at temperature 1);
  sequence_level: the student trained on the teacher's greedy continuations of the same prompts (`generate_responses`).
Losses are looked up by registered name at run time: a method whose loss is not registered is skipped, with a message.
It prints, per method, the validation perplexity (mean ± std over seeds, per seed, and its change against scratch paired
by seed), the teacher's per-token negative log-likelihood of the student's own sampled continuations of held-out prompts
(what on-policy training targets), the training epoch's process CPU time against (scratch epoch + the teacher's inference
over the same batches), on-policy's generation cost (the student's `generate` CPU time per generated token, and its share of
the epoch) and the fit's memory (peak RSS minus the RSS at its start, in its process, with large freed blocks returned to
the kernel); the table and every figure are also written to `--out` (.md and .json). `--jobs N`: the (method, seed) fits
run in N processes forked after the teacher trains, one thread each (CPU times are per process). `--quick`: small models
and data, a few minutes on one CPU thread.

Cost and memory: python benchmarks/language_model.py --cost [--repeats 5] [--cost-seqs 480] [--cost-epochs 2]
In one process, per repeat and in a rotating order, it times a training epoch of the student from scratch, the teacher's
inference alone over the same batches (eval, no_grad), a distilled epoch with `SoftTarget(T=--T)` (`shift_labels=True`) and
one with `SoftTarget` + `HiddenStateCosine` on the blocks `depth_pairs` pairs (behind its connectors, as in tutorial 8),
on the first `--cost-seqs` training sequences of the docstring text and with untrained models (cost, not perplexity). Ratio = distilled epoch
/ (scratch epoch + teacher inference), medians over repeats; epochs 2+ of each fit are timed, wall and process CPU time.
Then the peak resident memory of a fit per variant, each in a fresh subprocess, measured as `overhead.py` measures it on
a CPU (`reset_peak_rss` / `peak_rss`: the kernel's VmHWM). About 3 minutes on one thread."""
import argparse, importlib, inspect, json, math, os, platform, random, statistics, string, subprocess, sys, sysconfig, time
from pathlib import Path
import torch
import fastai, transformers
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
import fastai.callback.schedule
from fastai.torch_core import set_seed
from transformers import GPT2Config, GPT2LMHeadModel
from kdcb.all import *
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


# ---- the default regime: Python's standard-library sources, split by file ----
CHARS = [c for c in string.printable if c not in '\r\x0b\x0c'] # 97 characters; any other is written as the unknown id below
UNK = len(CHARS)
SKIP = {'site-packages', 'test', 'tests', 'idlelib', 'lib2to3', 'turtledemo', '__pycache__'}


def stdlib_files()->list[Path]:
    "The `.py` files of this Python's standard library (tests and bundled packages left out), shuffled with a fixed seed"
    root = Path(sysconfig.get_paths()['stdlib'])
    files = sorted(p for p in root.rglob('*.py') if not SKIP & set(p.relative_to(root).parts))
    if not files: raise SystemExit(f'no standard-library sources found under {root}: run with --same-data (docstrings) instead')
    random.Random(0).shuffle(files)
    return files


def encode(text:str, L:int)->torch.Tensor:
    "`text` as (N, L) character ids (the last partial sequence dropped)"
    stoi = {c: i for i, c in enumerate(CHARS)}
    ids = torch.tensor([stoi.get(c, UNK) for c in text])
    return ids[:len(ids) // L * L].view(-1, L)


def split_files(student_chars:int, ratio:float, valid_chars:int)->dict:
    """Whole files, in the fixed shuffled order, to validation (`valid_chars`), to the students' slice (`student_chars`),
    then to the teacher only, until the teacher's text (the students' slice included) is `ratio` × the students'.
    Returns {'teacher', 'student', 'valid'}: lists of (path, text)"""
    files = iter(stdlib_files())
    def take(n, got=()):
        got = list(got)
        for f in files:
            if sum(len(t) for _, t in got) >= n: break
            got.append((f, f.read_text(encoding='utf-8', errors='replace')))
        if sum(len(t) for _, t in got) < n: raise SystemExit(
            f'the standard library has too little text for {n:,} characters in a split: lower --student-chars or --ratio')
        return got
    valid = take(valid_chars)
    student = take(student_chars)
    return dict(teacher=take(ratio * sum(len(t) for _, t in student), student), student=student, valid=valid)


def file_split(L:int, student_chars:int, ratio:float, valid_chars:int):
    """`split_files` as (N, L) ids: (teacher, student, valid), the vocabulary size, and (files, characters) per split"""
    parts = split_files(student_chars, ratio, valid_chars)
    ids = {k: encode('\n'.join(t for _, t in v), L) for k, v in parts.items()}
    info = {k: (len(v), sum(len(t) for _, t in v)) for k, v in parts.items()}
    return ids['teacher'], ids['student'], ids['valid'], len(CHARS) + 1, info


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


class Method:
    "One way to train the student: a registered loss (with its settings), on-policy share λ, or sequence-level data"
    def __init__(self, name, loss=None, kw=None, lmbda=None, seq=False): self.name, self.loss, self.kw, self.lmbda, self.seq = name, loss, kw or {}, lmbda, seq
    def __repr__(self): return self.name

METHODS = [Method('scratch'), Method('forward_kl', 'soft_target'), Method('reverse_kl', 'reverse_kl'), Method('jsd', 'jsd', dict(beta=0.5)),
           Method('skew_kl', 'skew_kl', dict(alpha=0.1)), Method('onpolicy_forward_kl', 'soft_target', lmbda=0.5),
           Method('onpolicy_jsd', 'jsd', dict(beta=0.5), lmbda=0.5), Method('onpolicy_reverse_kl', 'reverse_kl', lmbda=1.),
           Method('sequence_level', seq=True)]


def make_loss(m:Method, T:float):
    "The method's loss, looked up by its registered name (None when no loss of that name is registered yet)"
    if m.loss not in available_losses(): return None
    proto = get_loss(m.loss)
    if not isinstance(proto, torch.nn.Module): return proto
    cls = type(proto)
    return cls(**m.kw, **({'T': T} if 'T' in inspect.signature(cls).parameters else {}))


class TimedOnPolicy(OnPolicy):
    "`OnPolicy` that adds up the process CPU time of its generations and the tokens they wrote"
    def before_train(self): super().before_train(); self.gen_cpu, self.gen_tokens = getattr(self, 'gen_cpu', 0.), getattr(self, 'gen_tokens', 0)
    def before_batch(self):
        t = clock(); super().before_batch()
        if self.on: self.gen_cpu += since(t)[1]; self.gen_tokens += int((self.learn.yb[0] != -100).sum())


class Bench:
    "Corpus, teacher and the measurements every method shares"
    def __init__(self, a):
        self.a = a
        if a.same_data:
            train, valid, self.vocab, n = corpus(a.L)
            self.teacher_x, self.valid = train[:a.train_seqs or len(train)], valid[:a.valid_seqs or len(valid)]
            self.student_x = self.teacher_x[:a.student_seqs]
            self.data = (f'same data: {n:,} characters of standard-library docstrings, vocabulary {self.vocab}, sequences split at random; '
                         f'teacher on {len(self.teacher_x)} training sequences of {a.L}, students on the first {len(self.student_x)} of them, '
                         f'{len(self.valid)} validation sequences')
        else:
            self.teacher_x, self.student_x, valid, self.vocab, info = file_split(a.L, a.student_chars, a.ratio, a.valid_chars)
            self.valid = valid[:a.valid_seqs or len(valid)]
            self.data = (f"Python {platform.python_version()}'s standard-library sources split by file, vocabulary {self.vocab} characters: "
                         f"teacher on {info['teacher'][1]:,} characters ({info['teacher'][0]} files, {len(self.teacher_x)} sequences of {a.L}), "
                         f"students on {info['student'][1]:,} of them ({info['student'][0]} files, {len(self.student_x)} sequences, "
                         f"{len(self.teacher_x) / len(self.student_x):.1f}x fewer), validation on {info['valid'][0]} held-out files "
                         f"({len(self.valid)} sequences)")
        self.no_eos = self.vocab # an id no model writes: continuations run to their full length (text, not turns)
        self.prompts = [v[:a.prompt] for v in self.valid[:a.eval_prompts]]

    def dls(self, x, seed):
        set_seed(seed) # torch, and Python's `random`, from which fastai's DataLoader draws its shuffling: same batch order per seed
        dl = lambda d, bs, shuffle: DataLoader(d, bs=bs, shuffle=shuffle, drop_last=shuffle)
        items = x if isinstance(x, Responses) else list(zip(x, torch.ones_like(x), x)) # (input_ids, attention_mask) -> labels
        return DataLoaders(dl(items, 32, True), dl(list(zip(self.valid, torch.ones_like(self.valid), self.valid)), 128, False))

    def model(self, spec, seed): return KeywordInputs(gpt2(spec, self.vocab, self.a.L, seed))

    def fit(self, model, x, epochs, lr, cbs=(), seed=0):
        "Train; returns the learner and its (wall, CPU) seconds per training epoch"
        learn = Learner(self.dls(x, seed), model, loss_func=causal_lm_loss, cbs=TrainTimes())
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=list(cbs))
        return learn, learn.train_times.times

    def perplexity(self, learn):
        with learn.no_bar(): return math.exp(learn.validate()[0])

    def teacher_nll(self, student, seed):
        "The teacher's per-token negative log-likelihood of the student's own sampled continuations of validation prompts"
        torch.manual_seed(1000 + seed)
        r = generate_responses(student, self.prompts, max_new_tokens=self.a.L - self.a.prompt, bs=64, pad_token_id=0,
                               eos_token_id=self.no_eos, progress=False, do_sample=True, top_k=0)
        self.teacher.eval()
        with torch.no_grad(): return float(causal_lm_loss(self.teacher(r.input_ids, r.attention_mask), r.labels))

    def teacher_epoch(self, seed):
        "CPU seconds of the teacher's inference alone over one epoch of the students' training batches (eval, no_grad)"
        batches = list(self.dls(self.student_x, seed).train)
        self.teacher.eval(); t = clock()
        with torch.no_grad():
            for xb in batches: self.teacher(*xb[:2])
        return since(t)[1]

    def callbacks(self, m:Method, T:float)->list|None:
        if m.loss is None: return []
        loss = make_loss(m, T)
        if loss is None: return None
        kd = KnowledgeDistillationCallback(self.teacher, loss, weight=self.a.weight, outputs=Outputs(shift_labels=True, attention_mask=1))
        if m.lmbda is None: return [kd]
        return [kd, TimedOnPolicy(lmbda=m.lmbda, max_new_tokens=self.a.L - self.a.prompt, prompt=self.a.prompt, pad_token_id=0,
                                  eos_token_id=self.no_eos, top_k=0)]

    def sequence_data(self):
        "The teacher's greedy continuations of the students' training prompts (Kim & Rush), made once; CPU seconds"
        t = clock()
        r = generate_responses(self.teacher, [x[:self.a.prompt] for x in self.student_x], max_new_tokens=self.a.L - self.a.prompt,
                               bs=64, pad_token_id=0, eos_token_id=self.no_eos, progress=False)
        return r, since(t)[1]


ORDER = ['scratch', 'forward_kl', 'reverse_kl', 'jsd', 'onpolicy_reverse_kl', 'onpolicy_jsd', 'skew_kl', 'onpolicy_forward_kl', 'sequence_level']
_BENCH = None


def run_one(task):
    "Train the student of one (method, seed) and measure it (in a worker process when `--jobs` > 1)"
    b, (i, (m, seed)) = _BENCH, task
    torch.set_num_threads(1)
    x, extra = (b.seq_data if m.seq else (b.student_x, 0.))
    before, cbs = reset_peak_rss(), b.callbacks(m, b.a.T)
    learn, times = b.fit(b.model(b.a.student, seed), x, b.a.epochs, 1e-2, cbs, seed)
    peak, op = peak_rss(), [c for c in cbs if isinstance(c, TimedOnPolicy)]
    row = dict(seed=seed, ppl=b.perplexity(learn), nll=b.teacher_nll(learn.model, seed), cpu=statistics.median(t[1] for t in times),
                epoch_cpu=[t[1] for t in times], mem=peak - before, gen=extra,
                gen_cpu=op[0].gen_cpu if op else None, gen_tokens=op[0].gen_tokens if op else None)
    return i, row


def mean_std(xs): return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.)


def methods(a):
    "Train the teacher, then every method's student per seed; print the table and write it to `a.out` (.md and .json)"
    wanted = [m for m in METHODS if m.name in a.methods.split(',')]
    if unknown := set(a.methods.split(',')) - {m.name for m in METHODS}: raise SystemExit(f'unknown methods {sorted(unknown)}; known: {METHODS}')
    b, lines = Bench(a), []
    def say(*x, **kw): print(*x, **kw, flush=True); lines.append(' '.join(map(str, x)))
    say(f'command: python benchmarks/language_model.py {" ".join(a.argv)}'.rstrip())
    say(b.data + f'; prompts of {a.prompt} characters')
    t0 = time.time()
    b.teacher = b.model(a.teacher, 0)
    learn_t, _ = b.fit(b.teacher, b.teacher_x, a.teacher_epochs, 3e-3)
    b.teacher = learn_t.model
    t_ppl = b.perplexity(learn_t)
    say(f'teacher {a.teacher} ({n_par(b.teacher):,} parameters, {a.teacher_epochs} epochs): validation perplexity {t_ppl:.2f} '
        f'({time.time() - t0:.0f} s wall)')
    say(f'student {a.student} ({n_par(b.model(a.student, 0)):,} parameters), {a.epochs} epochs; losses at T={a.T:g}, weight {a.weight:g}, '
        f'`Outputs(shift_labels=True)`; on-policy: continuations of {a.L - a.prompt} characters sampled at temperature 1; seeds {a.seeds}')
    seeds, skipped = list(map(int, a.seeds.split(','))), []
    for m in wanted:
        if m.loss is not None and m.loss not in available_losses():
            skipped.append(m); say(f'skipped {m.name}: no loss {m.loss!r} is registered (available_losses())')
    run = [m for m in wanted if m not in skipped]
    meta = dict(command=a.argv, seeds=seeds, teacher_ppl=t_ppl, teacher_inference_cpu=statistics.median(b.teacher_epoch(s) for s in seeds),
                prompts=len(b.prompts), sampled=a.L - a.prompt, head=list(lines), skipped=[m.name for m in skipped], methods=[m.name for m in run])
    if any(m.seq for m in run): b.seq_data = b.sequence_data()
    global _BENCH
    _BENCH = b # what the forked workers read
    tasks = sorted([(m, s) for m in run for s in seeds], key=lambda t: (ORDER.index(t[0].name) if t[0].name in ORDER else len(ORDER), t[1])) # the essential rows first
    out = Path(a.out) if a.out else None
    if out: out.parent.mkdir(parents=True, exist_ok=True)
    def report(results): # each fit's figures as it ends, and the fits so far in the .json
        done = {}
        for i, r in results:
            print(f'done {tasks[i][0].name}, seed {r["seed"]}: ppl {r["ppl"]:.2f}, teacher NLL {r["nll"]:.3f} ({time.time() - t0:.0f} s wall)', flush=True)
            done[i] = r
            if out: out.with_suffix('.json').write_text(json.dumps(dict(meta, complete=len(done) == len(tasks), results=by_method(done)), indent=1))
        return done
    def by_method(done): return {m.name: rows for m in run if (rows := sorted((done[i] for i, (m_, _) in enumerate(tasks) if m_ is m and i in done),
                                                                              key=lambda r: seeds.index(r['seed'])))}
    if a.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context('fork').Pool(a.jobs) as pool: res = by_method(report(pool.imap_unordered(run_one, enumerate(tasks))))
    else: res = by_method(report(map(run_one, enumerate(tasks))))
    for line in table(res, meta)[len(meta['head']):]: say(line)
    say(f'\n{time.time() - t0:.0f} s wall in all')
    if out:
        out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
        print(f'written: {out.with_suffix(".md")}, {out.with_suffix(".json")}')
    return res


def table(res:dict, meta:dict)->list:
    "The printed report of `res` (method -> rows per seed): the run's header lines, then the table"
    seeds, t_inf = meta['seeds'], meta['teacher_inference_cpu']
    med = lambda name, k: statistics.median(r[k] for r in res[name])
    sc = 'scratch' in res
    base = (med('scratch', 'cpu') + t_inf) if sc else float('nan')
    lines = list(meta['head']) + [
        f'\nValidation perplexity, mean ± std over seeds {" / ".join(map(str, seeds))} (teacher: {meta["teacher_ppl"]:.2f}); vs scratch: the change in '
        f'perplexity paired by seed, mean ± std; the teacher\'s per-token NLL of the student\'s own samples ({meta["prompts"]} held-out '
        f'prompts, {meta["sampled"]} sampled characters each), mean; training-epoch CPU time, median, and its ratio to '
        f'(scratch epoch + the teacher\'s inference over the same batches = {base:.1f} s); on-policy generation: the student\'s '
        f'`generate` CPU time per generated token and its share of the epoch; fit memory: peak RSS minus RSS at the fit\'s start, first seed\n',
        '| method | perplexity | per seed | vs scratch (paired) | teacher NLL of own samples | epoch CPU s | cost ratio | generation ms/token | fit MiB |',
        '|---|---|---|---|---|---|---|---|---|']
    for name, rows in res.items():
        m_, s_ = mean_std([r['ppl'] for r in rows])
        delta = ''
        if sc and name != 'scratch':
            d = [r['ppl'] - s['ppl'] for r in rows for s in res['scratch'] if s['seed'] == r['seed']]
            dm, ds = mean_std(d); delta = f'{dm:+.2f} ± {ds:.2f}' + ('' if len(d) == len(seeds) else f' ({len(d)} seeds)')
        cost = '' if name == 'scratch' or not sc else f'{med(name, "cpu") / base:.2f}'
        gen = ''
        if rows[0]['gen_cpu'] is not None:
            g, tok, ep = sum(r['gen_cpu'] for r in rows), sum(r['gen_tokens'] for r in rows), sum(sum(r['epoch_cpu']) for r in rows)
            gen = f'{1000 * g / tok:.3f} ({100 * g / ep:.0f}% of epoch)'
        per_seed = ' / '.join(f"{r['ppl']:.2f}" for r in rows)
        lines.append(f'| {name} | {m_:.2f} ± {s_:.2f} | {per_seed} | {delta} | '
                     f'{statistics.mean(r["nll"] for r in rows):.3f} | {med(name, "cpu"):.2f} | {cost} | {gen} | {rows[0]["mem"]:.0f} |')
    if 'sequence_level' in res: lines.append(f'\nsequence_level: generating its data took {res["sequence_level"][0]["gen"]:.1f} s CPU once, not in its epochs.')
    if meta['skipped']: lines.append(f'skipped (their losses are not registered): {", ".join(meta["skipped"])}')
    if not meta.get('complete', True): lines.append(f'not run (the run was stopped): ' + ', '.join(
        f'{m} seed {s}' for m in meta['methods'] for s in seeds if s not in [r['seed'] for r in res.get(m, [])]))
    return lines


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


STUDENT_CHARS, VALID_CHARS, TEACHER_EPOCHS, EPOCHS, PROMPT = 25_000, 30_000, 2, 20, 32
QUICK = dict(teacher='2x64', teacher_epochs=2, student='1x32', epochs=1, student_chars=40_000, valid_chars=20_000, valid_seqs=64,
             eval_prompts=32, seeds='0,1,2')
QUICK_SAME = dict(teacher='2x64', teacher_epochs=2, student='1x32', epochs=1, train_seqs=640, student_seqs=320, valid_seqs=64,
                  eval_prompts=32, seeds='0,1,2') # `--same-data --quick`
SAME = dict(teacher='4x128', teacher_epochs=6, student='2x32', epochs=6, prompt=16, out='benchmarks/results/language_model_same_data')


def arguments(argv:list|None=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--same-data', action='store_true', help="the regime where nothing pays: teacher and students on the same docstring text")
    p.add_argument('--teacher', default='4x128'); p.add_argument('--teacher-epochs', type=int, default=TEACHER_EPOCHS)
    p.add_argument('--student', default='2x64'); p.add_argument('--epochs', type=int, default=EPOCHS)
    p.add_argument('--student-chars', type=int, default=STUDENT_CHARS, help="characters of whole files in the students' slice")
    p.add_argument('--ratio', type=float, default=16., help="the teacher's text / the students' (the students' slice included)")
    p.add_argument('--valid-chars', type=int, default=VALID_CHARS, help='characters of whole held-out files for validation')
    p.add_argument('--train-seqs', type=int, default=0, help="--same-data: the teacher's training sequences (0: all)")
    p.add_argument('--student-seqs', type=int, default=100_000, help="--same-data: the students' training sequences (the first ones)")
    p.add_argument('--valid-seqs', type=int, default=0, help='validation sequences (0: all)')
    p.add_argument('--seeds', default='0,1,2'); p.add_argument('--T', type=float, default=1.); p.add_argument('--weight', type=float, default=0.5)
    p.add_argument('--L', type=int, default=64)
    p.add_argument('--prompt', type=int, default=PROMPT, help='characters of each sequence that prompt the generations')
    p.add_argument('--eval-prompts', type=int, default=128, help="validation prompts the student continues for the teacher's NLL")
    p.add_argument('--methods', default=','.join(m.name for m in METHODS))
    p.add_argument('--out', default='benchmarks/results/language_model', help="where the table (.md) and every figure (.json) go; '' for nowhere")
    p.add_argument('--table', help='print the table of a results .json (one a stopped run wrote holds the fits it finished)')
    p.add_argument('--jobs', type=int, default=1, help='worker processes (forked after the teacher trains), one thread each')
    p.add_argument('--quick', action='store_true', help='small models and data: ' + ', '.join(f'{k}={v}' for k, v in QUICK.items()))
    p.add_argument('--cost', action='store_true', help='time and memory of distillation instead of perplexity')
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--cost-seqs', type=int, default=480)
    p.add_argument('--cost-epochs', type=int, default=2, help='epochs per cost fit; the first is not timed')
    p.add_argument('--mem-child', help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    same = '--same-data' in argv
    if same: p.set_defaults(**SAME)
    if '--quick' in argv: p.set_defaults(**(QUICK_SAME if same else QUICK)) # options given explicitly still win
    a = p.parse_args(argv)
    a.argv = list(argv)
    return a


def main():
    a = arguments()
    if not a.cost and not a.mem_child and os.environ.get('MALLOC_MMAP_THRESHOLD_') is None: # fit memory measured in this process:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV}) # large freed blocks go back to the kernel
    torch.set_num_threads(1); transformers.logging.set_verbosity_error()
    if a.mem_child: print(json.dumps(fit_memory(a, a.mem_child))); return
    if a.table:
        d = json.loads(Path(a.table).read_text()); print('\n'.join(table(d['results'], d))); return
    environment()
    (cost if a.cost else methods)(a)


if __name__ == '__main__': main()
