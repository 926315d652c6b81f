"""Peak memory of one distilled training step of a causal language model, divided by the plain fine-tuning step's, at
real vocabularies: each divergence of `kdcb.divergences` (computed over chunks of positions) and `SoftTarget(T=2)`.

Run: python benchmarks/lm_memory.py [--vocabs 50257,128256] [--archs gpt2,llama] [--bs 8] [--L 256] [--variants ...] [--allocator both] [--jobs 1] [--mem-gb 16]

Models: a tiny GPT-2 (`GPT2LMHeadModel`) or Llama (`LlamaForCausalLM`) student, 2 blocks of width 64, distilled from a
teacher of the same family, 4 blocks of width 128, both built from configs with the given vocabulary (nothing
downloaded), float32, one batch of `--bs` random sequences of `--L` tokens with `labels = input_ids`.

The step is a real one: a fastai `Learner` with `causal_lm_loss` fits one epoch of that one batch (its validation
phase is skipped); distilled, `KnowledgeDistillationCallback(teacher, loss, weight=0.5,
outputs=Outputs(shift_labels=True))` is added. Temperatures are 2 for every loss.

How memory is measured. CPU: PyTorch's CPU allocator keeps no statistics, so every (architecture, vocabulary, variant)
runs in a fresh subprocess that builds both models and the learner, fits once to warm up (this also creates the
optimizer state), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, as `overhead.py`), fits again and
reads the peak (`VmHWM`). The figure is that peak minus the resident size just before the second fit: what the step
needed above models, optimizer state and libraries. (The warm-up fit runs on one sequence of 8 tokens: it builds the
optimizer state and lazy buffers without costing a second full step.) `--allocator` chooses how glibc's malloc runs
in the children: `default` as a user runs it (no settings: the peak includes freed memory the allocator keeps),
`mmap` with a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_`), so freed large blocks go back to the kernel and the
peak follows live memory, or `both` (the default), each row measured both ways. CUDA, where it
exists: `torch.cuda.max_memory_allocated` during the second fit minus `memory_allocated` before it, in the same child.
The ratio is distilled / plain for the same architecture and vocabulary; 1 would mean distillation costs no memory.
"""
import argparse, gc, json, os, platform, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch
import fastai, transformers
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.callback.core import Callback, CancelValidException
from kdcb.all import *
from overhead import MALLOC_ENV, peak_rss, reset_peak_rss

VARIANTS = {'plain': None, 'soft_target': lambda: SoftTarget(T=2.), 'forward_kl (jsd β=0)': lambda: JSD(beta=0., T=2.),
            'reverse_kl': lambda: ReverseKL(T=2.), 'jsd β=0.5': lambda: JSD(beta=0.5, T=2.),
            'skew_kl': lambda: SkewKL(T=2.), 'skew_reverse_kl': lambda: SkewReverseKL(T=2.), 'tvd': lambda: TVD(T=2.)}


def kd_callback(teacher, loss):
    "The distillation callback of a distilled step: the one place that says how logits and labels are aligned"
    return KnowledgeDistillationCallback(teacher, loss, weight=0.5, outputs=Outputs(shift_labels=True))


def model(arch:str, V:int, L:int, big:bool):
    "A tiny student (2 blocks of 64) or a bigger teacher (4 blocks of 128) of `arch`, built from its config"
    torch.manual_seed(1 if big else 0)
    n, d = (4, 128) if big else (2, 64)
    if arch == 'gpt2':
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L, n_layer=n, n_embd=d, n_head=d // 32))
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n,
                                        num_attention_heads=d // 32, num_key_value_heads=d // 32, max_position_embeddings=L))


class NoValidation(Callback):
    "Skip the validation phase: the training step is what is measured"
    def before_validate(self): raise CancelValidException()


def available_gb()->float: return int(next(l.split()[1] for l in open('/proc/meminfo') if l.startswith('MemAvailable:'))) / 2**20


def child(a):
    "One (arch, vocabulary, variant) in this fresh process: (MiB before the step, peak MiB, CUDA MiB or None)"
    arch, V, variant = a.child.split(':', 2)
    V, dev = int(V), 'cuda' if torch.cuda.is_available() else 'cpu'
    batch = lambda bs, L: [(x := torch.randint(0, V, (bs, L), generator=torch.Generator().manual_seed(0)), x)]
    one = lambda b: DataLoaders(DataLoader(b, bs=None), DataLoader(b, bs=None), device=dev)
    learn = Learner(one(batch(1, 8)), model(arch, V, a.L, False), loss_func=causal_lm_loss, cbs=NoValidation())
    loss = VARIANTS[variant]
    cbs = (lambda: None) if loss is None else (lambda t=model(arch, V, a.L, True): kd_callback(t, loss()))
    fit = lambda: learn.fit(1, 1e-4, cbs=cbs())
    with learn.no_bar(), learn.no_logging():
        fit() # warm-up on a batch of one short sequence: optimizer state, lazily built buffers
        learn.dls = one(batch(a.bs, a.L))
        gc.collect()
        if dev == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); cuda0 = torch.cuda.memory_allocated()
        before = reset_peak_rss()
        fit()
        cuda = (torch.cuda.max_memory_allocated() - cuda0) / 2**20 if dev == 'cuda' else None
    return before, peak_rss(), cuda


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--vocabs', default='50257,128256'); p.add_argument('--archs', default='gpt2,llama')
    p.add_argument('--bs', type=int, default=8); p.add_argument('--L', type=int, default=256)
    p.add_argument('--variants', default=','.join(VARIANTS), help='comma-separated, from: ' + ', '.join(VARIANTS))
    p.add_argument('--allocator', default='both', choices=['default', 'mmap', 'both'],
                   help="glibc malloc in the children: as users run it, with a fixed mmap threshold, or both")
    p.add_argument('--jobs', type=int, default=1, help='children run at once (each measures its own peak; mind the total memory)')
    p.add_argument('--mem-gb', type=float, default=16., help='with --jobs: the estimated peaks of the children running at once stay under this')
    p.add_argument('--child', help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1); transformers.logging.set_verbosity_error()
    if a.child: print(json.dumps(child(a))); return
    variants = ['plain'] + [v for v in a.variants.split(',') if v != 'plain']
    if bad := [v for v in variants if v not in VARIANTS]: p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    print(f'python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, transformers '
          f'{transformers.__version__}, {platform.machine()}, 1 thread; batch {a.bs} x {a.L} tokens, float32 models')
    print('\nstep MiB: peak RSS of the second (measured) one-batch fit minus RSS before it, fresh subprocess per row'
          + ('; cuda MiB: max_memory_allocated above the allocation before it' if torch.cuda.is_available() else '') + '\n')
    cuda = torch.cuda.is_available()
    allocs = ['default', 'mmap'] if a.allocator == 'both' else [a.allocator]
    runs = [(arch, V, v, m) for V in map(int, a.vocabs.split(',')) for arch in a.archs.split(',') for m in allocs
            for v in variants] # smaller vocabularies first
    lock, used = threading.Condition(), [0.]
    def run(r):
        arch, V, v, m = r
        need = 1 + a.bs * a.L * V * 4 / 2**30 * (10 if v == 'soft_target' else 5) # GiB, a generous estimate of the child's peak
        with lock:
            lock.wait_for(lambda: used[0] == 0 or used[0] + need <= a.mem_gb); used[0] += need
        while available_gb() < need + 2: time.sleep(5) # other processes on the machine need their memory too
        try:
            res = measure(arch, V, v, m)
            print(f'  done: {arch} {V} {v} {m}: {res}', file=sys.stderr, flush=True)
            return res
        finally:
            with lock: used[0] -= need; lock.notify_all()
    def measure(arch, V, v, m):
        args = [sys.executable, __file__, '--child', f'{arch}:{V}:{v}', '--bs', str(a.bs), '--L', str(a.L)]
        env = {k: x for k, x in os.environ.items() if not k.startswith('MALLOC_')} # nothing inherited from the caller
        out = subprocess.run(args, capture_output=True, text=True, env={**env, **MALLOC_ENV} if m == 'mmap' else env)
        return (out.stderr.strip().splitlines() or ['?'])[-1] if out.returncode else json.loads(out.stdout.strip().splitlines()[-1])
    with ThreadPoolExecutor(a.jobs) as ex: res = dict(zip(runs, ex.map(run, runs))) # each child measures its own peak
    print('| model | vocabulary | malloc | loss | step MiB | / plain |' + (' cuda MiB | / plain |' if cuda else '') + '\n|---|---|---|---|---|---|' + ('---|---|' if cuda else ''))
    for arch, V, v, m in runs:
        r, p0 = res[arch, V, v, m], res[arch, V, 'plain', m]
        if isinstance(r, str) or isinstance(p0, str): print(f'| {arch} | {V:,} | {m} | {v} | failed: {r if isinstance(r, str) else p0} | |'); continue
        (before, peak, cu), (b0, pk0, cu0) = r, p0
        print(f'| {arch} | {V:,} | {m} | {v} | {peak - before:,.0f} | {(peak - before) / (pk0 - b0):.2f} |'
              + (f' {cu:,.0f} | {cu / cu0:.2f} |' if cuda else ''))

if __name__ == '__main__': main()
