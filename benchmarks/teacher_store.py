"""A student trained from a teacher-output store on disk (`kdcb.store`) vs from the live teacher: step time, peak memory, store size.

Run: python benchmarks/teacher_store.py [--repeats 3] [--n-seq 64] [--seq-len 128] [--vocab 50257]
A GPT-2 teacher (4 blocks x 256 wide) and student (2 x 128), built from their configs (no weights downloaded), over byte-level
tokens of the Python standard library's sources, with output layers of `--vocab` classes (default 50,257, GPT-2's vocabulary
size; the text uses ids below 256). The teacher is untrained: cost, not accuracy, is measured. One CPU thread, or CUDA when
available. Each fit runs in a fresh child process: step time is the median over the fit's training steps after the first,
peak memory the child's peak RSS (CUDA: peak allocated) above its memory once the data is loaded, before
the models are built (the live teacher's weights count, a store run never builds the teacher); medians over repeats, and
ratios to the live teacher within this run."""
import argparse, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
from torch import nn
import fastai, transformers
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.progress
from transformers import GPT2Config, GPT2LMHeadModel
from kdcb.callback import KnowledgeDistillationCallback
from kdcb.losses import SoftTarget
from kdcb.store import IndexedDataset, StoredTeacher, write_teacher_store

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
MODES = {'plain': 'no distillation', 'live': 'live teacher', 'store64': 'store, k = 64', 'store8': 'store, k = 8'}


class Logits(nn.Module):
    "A Hugging Face causal LM as a plain (B, L) -> (B, L, V) module"
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(input_ids=x).logits


def gpt2(layers, width, vocab, L, seed):
    torch.manual_seed(seed)
    return Logits(GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(2, width // 64), vocab_size=vocab, n_positions=L,
                                             bos_token_id=0, eos_token_id=0)))


def data(n, L):
    "`n` (x, y) items of `L` byte tokens of the standard library's sources, y = x shifted by one"
    text, need = b'', n * (L + 1)
    for f in sorted(Path(os.__file__).parent.glob('*.py')):
        text += f.read_bytes()
        if len(text) >= need: break
    t = torch.tensor(list(text[:need]), dtype=torch.long).view(n, L + 1)
    return list(zip(t[:, :-1], t[:, 1:]))


class StepTimes(Callback):
    "Wall time of each training step, from `before_batch` to `after_step` (CUDA synchronised)"
    order = 100
    def before_fit(self): self.times = []
    def before_batch(self):
        if DEVICE == 'cuda': torch.cuda.synchronize()
        self.t = time.perf_counter()
    def after_step(self):
        if DEVICE == 'cuda': torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t)


def _kib(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key + ':')).split()[1])


def child(a):
    "One fit in this process; prints its median step time and peak memory above the memory before it"
    torch.set_num_threads(1)
    train = data(a.n_seq, a.seq_len)
    ds = IndexedDataset(train) if a.child.startswith('store') else train
    dls = DataLoaders(DataLoader(ds, bs=a.bs, shuffle=True, drop_last=True), DataLoader(train[:a.bs], bs=a.bs), device=DEVICE)
    if DEVICE == 'cuda': torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    else:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5') # the peak RSS starts again from here, before the models
        before = _kib('VmRSS') * 1024
    teacher = gpt2(4, 256, a.vocab, a.seq_len, 0) if a.child == 'live' else None # the store runs never build the teacher
    source = StoredTeacher(Path(a.stores)/a.child) if a.child.startswith('store') else teacher
    timer = StepTimes()
    learn = Learner(dls, gpt2(2, 128, a.vocab, a.seq_len, 1), loss_func=CrossEntropyLossFlat(), cbs=timer)
    cbs = [] if a.child == 'plain' else [KnowledgeDistillationCallback(source, SoftTarget(T=1.), weight=.5)]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)
    peak = torch.cuda.max_memory_allocated() if DEVICE == 'cuda' else _kib('VmHWM') * 1024
    print(json.dumps(dict(step=statistics.median(timer.times[1:]), peak=(peak - before) / 2**20)))


def main(a):
    torch.set_num_threads(1)
    stores = Path(tempfile.mkdtemp(prefix='teacher_store_'))
    train, tokens = data(a.n_seq, a.seq_len), a.n_seq * a.seq_len
    teacher = gpt2(4, 256, a.vocab, a.seq_len, 0).to(DEVICE)
    print(f"python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {'1 thread' if DEVICE == 'cpu' else torch.cuda.get_device_name()}; V = {a.vocab:,}, "
          f"{a.n_seq} sequences of {a.seq_len} tokens, batches of {a.bs}; teacher GPT-2 4x256 "
          f"{sum(p.numel() for p in teacher.parameters()):,} params, student 2x128 {sum(p.numel() for p in gpt2(2, 128, a.vocab, a.seq_len, 1).parameters()):,}")
    print(f"\n| store | bytes per token | written in (s per 1,000 tokens) |\n|---|---|---|")
    for k in (64, 8):
        t = time.perf_counter()
        s = write_teacher_store(stores/f'store{k}', teacher, DataLoader(IndexedDataset(train), bs=a.bs, device=DEVICE), k=k)
        print(f"| k = {k}, float16 | {s.nbytes / tokens:,.0f} | {(time.perf_counter() - t) / tokens * 1000:.2f} |")
    print(f"| every logit, float16 (formula, not written) | {a.vocab * 2:,} | |")
    del teacher
    res = {m: [] for m in MODES}
    for r in range(a.repeats):
        for m in MODES:
            p = subprocess.run([sys.executable, __file__, '--child', m, '--stores', str(stores), '--n-seq', str(a.n_seq), '--seq-len', str(a.seq_len),
                                '--vocab', str(a.vocab), '--bs', str(a.bs)], capture_output=True, text=True)
            if p.returncode: sys.exit(f"the {m} child failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
            res[m].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in v) for k in ('step', 'peak')} for m, v in res.items()}
    mem = 'peak RSS above the data' if DEVICE == 'cpu' else 'peak CUDA memory allocated above the data'
    print(f"\nmedians over {a.repeats} repeats (each a fresh process; step time: median over the fit's steps after the first)\n")
    print(f"| student trained with | step time (s) | vs live teacher | {mem} (MiB) | vs live teacher |\n|---|---|---|---|---|")
    shutil.rmtree(stores)
    for m, name in MODES.items():
        print(f"| {name} | {med[m]['step']:.3f} | {med[m]['step'] / med['live']['step']:.2f} | {med[m]['peak']:,.0f} | {med[m]['peak'] / med['live']['peak']:.2f} |")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--n-seq', type=int, default=64)
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--vocab', type=int, default=50257); p.add_argument('--bs', type=int, default=8)
    p.add_argument('--child', choices=list(MODES)); p.add_argument('--stores')
    a = p.parse_args()
    child(a) if a.child else main(a)
