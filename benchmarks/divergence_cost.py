"""What each registered divergence costs in a language-model training step at GPT-2's vocabulary, beyond the teacher's
own forward pass: distilled step / (plain step + teacher inference), process CPU time, over repeats.

Run: python benchmarks/divergence_cost.py [--V 50257] [--widths 256,768] [--layers 2] [--bs 4] [--L 64] [--repeats 9]

Models, per width: a GPT-2 student (`--layers` blocks of that width) and a GPT-2 teacher of twice the blocks and the same width,
built from configs (nothing downloaded), float32, one batch of `--bs` random sequences of `--L` tokens, labels
shifted as a causal language model's (`pred = logits[:, :-1]`). A plain step is forward, cross entropy, backward and
an SGD step; teacher inference is the teacher's forward under `no_grad`; a distilled step adds the teacher's forward
and `cross_entropy + 0.5 · loss(pred, teacher_pred, labels)` with each registered divergence at its defaults
(`soft_target` at T = 1, its default on (B, L, V) logits). Every repeat times each variant once, in a rotated order;
the ratio is given of the medians and of the fastest repeats (the least disturbed by other work on a shared machine).
One table per width: 768 is GPT-2's own width (and DistilGPT-2's); at 256 the language-model head is a third as large,
so the work the loss adds over the vocabulary weighs three times as much against the step.
"""
import argparse, platform, statistics, time
import torch, torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel
from kdcb.all import get_loss # importing kdcb.all registers every loss

NAMES = ['soft_target', 'reverse_kl', 'jsd', 'skew_kl', 'skew_reverse_kl', 'tvd']

def gpt2(V, L, n, d, seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L, n_layer=n, n_embd=d, n_head=d // 64))

def table(a, width:int, names:list):
    "Time every variant at `width`; print the table"
    student, teacher = gpt2(a.V, a.L, a.layers, width, 0), gpt2(a.V, a.L, 2 * a.layers, width, 1).eval().requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=1e-4)
    x = torch.randint(0, a.V, (a.bs, a.L), generator=torch.Generator().manual_seed(0))
    y = x[:, 1:]
    def plain():
        pred = student(x).logits[:, :-1]
        F.cross_entropy(pred.transpose(1, 2), y).backward(); opt.step(); opt.zero_grad()
    def infer():
        with torch.no_grad(): teacher(x).logits
    def distilled(loss):
        def step():
            pred = student(x).logits[:, :-1]
            with torch.no_grad(): tp = teacher(x).logits[:, :-1]
            (F.cross_entropy(pred.transpose(1, 2), y) + 0.5 * loss(pred, tp, y)).backward(); opt.step(); opt.zero_grad()
        return step
    variants = {'plain': plain, 'teacher inference': infer, **{n: distilled(get_loss(n)) for n in names}}
    for f in variants.values(): f() # warm-up
    times = {k: [] for k in variants}
    for r in range(a.repeats):
        ks = list(variants); ks = ks[r % len(ks):] + ks[:r % len(ks)]
        for k in ks:
            t0 = time.process_time(); variants[k](); times[k].append(time.process_time() - t0)
    med, low = ({k: f(v) for k, v in times.items()} for f in (statistics.median, min))
    base, base_low = med['plain'] + med['teacher inference'], low['plain'] + low['teacher inference']
    print(f'\n**Width {width}**: GPT-2 student {a.layers} x {width}, teacher {2 * a.layers} x {width}; plain step {med["plain"]:.3f} s '
          f'(fastest {low["plain"]:.3f}), teacher inference {med["teacher inference"]:.3f} s (fastest {low["teacher inference"]:.3f})\n')
    print('| loss | distilled step s | / (plain + teacher inference), medians | same, fastest repeats |\n|---|---|---|---|')
    for n in names: print(f'| {n} | {med[n]:.3f} | {med[n] / base:.2f} | {low[n] / base_low:.2f} |', flush=True)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--V', type=int, default=50257); p.add_argument('--widths', default='256,768')
    p.add_argument('--layers', type=int, default=2); p.add_argument('--bs', type=int, default=4)
    p.add_argument('--L', type=int, default=64); p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--losses', default=','.join(NAMES))
    a = p.parse_args()
    torch.set_num_threads(1); transformers.logging.set_verbosity_error()
    print(f'python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, 1 thread; V = {a.V:,}, batch {a.bs} x {a.L} '
          f'tokens, float32; {a.repeats} repeats, process CPU s')
    for w in map(int, a.widths.split(',')): table(a, w, a.losses.split(','))

if __name__ == '__main__': main()
