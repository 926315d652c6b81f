"""What distillation costs beyond the teacher's own forward pass, on MNIST-1D (built locally).

Run: python benchmarks/overhead.py [--repeats 7] [--n-train 4000] [--epochs 3]

In one process, per repeat and in a rotating order (so drift in machine load hits every variant alike), it times
(a) a plain student training epoch, (b) the teacher's inference alone (eval mode, no_grad) over the same batches,
(c) a distilled epoch with `soft_target` and (d) a distilled epoch with `attention` on 4 layer pairs, and prints
medians and the overhead ratio distilled / (plain + teacher inference): 1.00 would mean distillation costs nothing
beyond running the teacher. A minimal hand-written SoftTarget callback (`by_hand`, no kdcb) is timed alongside: the
teacher's forward inside a training loop costs more than in a loop of its own (caches), and the loss itself costs
something, so `soft_target / by_hand` is what kdcb adds over the least any callback must do. Epoch times are
training phases only, epochs 2+ of each fit (the first warms up).

Two clocks: wall time, and the process's CPU time (`time.process_time`, with one torch thread), which other
processes sharing the machine disturb far less than wall time; on an idle machine the two agree.

Peak memory. CPU: PyTorch's CPU allocator keeps no statistics, so each variant runs in a fresh subprocess that
loads the data and builds both models, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), fits, and
reads the peak (`VmHWM`); "fit" is the peak minus the resident size at the start of the fit: what training itself
needed (activations, gradients, optimizer state, teacher activations, hooked feature maps). glibc's malloc runs
with a fixed mmap threshold there, so large freed blocks go back to the kernel and the peak follows live memory
rather than the allocator's caching. CUDA: `torch.cuda.max_memory_allocated` around each fit, in this process.
Where CUDA is available the same variants are measured there too, under autocast (`learn.to_fp16()`)."""
import argparse, inspect, json, os, platform, tempfile, statistics, subprocess, sys, time
from collections import OrderedDict
import torch
import torch.nn.functional as F
from torch import nn
import fastai
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
import fastai.callback.progress, fastai.callback.fp16
from kdcb.all import *
from kdcb.data import tensor_dls
from kdcb.examples import mnist1d, n_params

VARIANTS = ('plain', 'teacher', 'by_hand', 'soft_target', 'attention') # --losses and --fasterai change it
STAGES = ['s1', 's2', 's3', 's4']


def cnn(widths):
    "1-D CNN over (B, 40) signals: stages s1..s4 (conv, BatchNorm, ReLU; s2..s4 halve the length), pooled, linear"
    layers, c_in = [('unflatten', nn.Unflatten(1, (1, 40)))], 1
    for i, c in enumerate(widths):
        layers.append((STAGES[i], nn.Sequential(nn.Conv1d(c_in, c, 5 if i == 0 else 3, stride=1 if i == 0 else 2,
                                                          padding=2 if i == 0 else 1), nn.BatchNorm1d(c), nn.ReLU())))
        c_in = c
    layers += [('pool', nn.AdaptiveAvgPool1d(1)), ('flatten', nn.Flatten()), ('head', nn.Linear(c_in, 10))]
    return nn.Sequential(OrderedDict(layers))


TEACHER_W, STUDENT_W = (64, 96, 128, 160), (8, 16, 24, 32)
RESNET = False # --resnet: torchvision ResNet-34 teacher, ResNet-18 student on digits at 32x32


def make_teacher():
    if not RESNET: return cnn(TEACHER_W)
    from torchvision.models import resnet34
    return resnet34(num_classes=10)


def make_student():
    if not RESNET: return cnn(STUDENT_W)
    from torchvision.models import resnet18
    return resnet18(num_classes=10)


def digits32():
    "scikit-learn's digits as (B, 3, 32, 32) images: 1,400 training, 397 validation"
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = F.interpolate(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, size=32, mode='bilinear').expand(-1, 3, -1, -1)
    x, y = x.contiguous(), torch.tensor(y)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def clock(): return time.perf_counter(), time.process_time()
def since(t0): return tuple(b - a for a, b in zip(t0, clock()))


class TrainTimes(Callback):
    "(wall, process CPU) time of each training phase (validation excluded); synchronises CUDA at both ends"
    order = 100
    def before_fit(self): self.times = []
    def _sync(self):
        if self.dls.device is not None and torch.device(self.dls.device).type == 'cuda': torch.cuda.synchronize()
    def before_train(self): self._sync(); self.t = clock()
    def after_train(self): self._sync(); self.times.append(since(self.t))


def data(n_train, bs, device, tensors=None):
    "MNIST-1D built locally (`n_train` training, 1000 validation signals) as tensor batches: loading costs next to nothing"
    return tensor_dls(*(tensors or (digits32() if RESNET else mnist1d(n_train))), bs=bs).to(device)


class ByHand(Callback):
    "The least a distillation callback can do: the teacher's forward under no_grad, KL·T² at T=5 mixed in at weight 0.5"
    def __init__(self, teacher): self.teacher_model = teacher
    def before_fit(self): self.teacher_model.eval()
    def after_pred(self):
        if self.training:
            with torch.no_grad(): self.t_out = self.teacher_model(*self.xb)
    def after_loss(self):
        if not self.training: return
        s, t = F.log_softmax(self.pred.float() / 5, -1), F.log_softmax(self.t_out.float() / 5, -1)
        kl = F.kl_div(s, t, log_target=True, reduction='batchmean') * 25
        self.learn.loss_grad = 0.5 * self.learn.loss_grad + 0.5 * kl
        self.learn.loss = self.learn.loss_grad.detach().clone()
        self.t_out = None


FEATURE_LOSSES = {'attention', 'similarity', 'fit_net', 'activation_boundaries'}
FASTERAI = {'soft_target': 'SoftTarget', 'decoupled_kd': 'DecoupledKD', 'attention': 'Attention', 'similarity': 'Similarity',
            'logits': 'Logits', 'activation_boundaries': 'ActivationBoundaries'} # fasterai 0.4.1's names (fit_net needs equal widths there)


class ByHandLoss(Callback):
    "The same, for any kdcb loss object, called directly: plain forward hooks on the paired layers, no kdcb machinery"
    def __init__(self, teacher, loss):
        self.teacher_model, self.loss, self.feature = teacher, get_loss(loss), loss in FEATURE_LOSSES
        self.with_target = len(inspect.signature(self.loss.forward).parameters) > 2
    def before_fit(self):
        self.teacher_model.eval(); self.fs, self.ft, self.handles = {}, {}, []
        if not self.feature: return
        for model, store in ((self.model, self.fs), (self.teacher_model, self.ft)):
            for n in layer_names():
                self.handles.append(get_module(model, n).register_forward_hook(lambda m, i, o, n=n, store=store: store.__setitem__(n, o)))
    def after_fit(self):
        for h in self.handles: h.remove()
    def after_pred(self):
        if self.training:
            with torch.no_grad(): self.t_out = self.teacher_model(*self.xb)
    def after_loss(self):
        if not self.training: return
        if self.feature: l = sum(self.loss(self.fs[n], self.ft[n]) for n in layer_names())
        else: l = self.loss(self.pred, self.t_out, *self.yb) if self.with_target else self.loss(self.pred, self.t_out)
        self.learn.loss_grad = 0.5 * self.learn.loss_grad + 0.5 * l
        self.learn.loss = self.learn.loss_grad.detach().clone()
        self.t_out = None; self.fs.clear(); self.ft.clear()


def floor(v): return 'by_hand' if v.startswith('by_hand') else f"by_hand:{v.split(':')[-1]}"


def layer_names(): return ['layer1', 'layer2', 'layer3', 'layer4'] if RESNET else STAGES


def kd_cb(variant, teacher):
    "The callback of a variant: 'by_hand', a kdcb loss name, 'by_hand:<loss>' (that loss without kdcb's callback) or 'fasterai:<loss>'"
    if variant == 'by_hand': return ByHand(teacher)
    lib, loss = variant.split(':') if ':' in variant else ('kdcb', variant)
    layers = layer_names() if loss in FEATURE_LOSSES else None
    if lib == 'kdcb': return KnowledgeDistillationCallback(teacher, loss, layers, layers)
    if lib == 'by_hand': return ByHandLoss(teacher, loss)
    from fasterai.distill.all import KnowledgeDistillationCallback as FasteraiKD
    import fasterai.distill.losses
    return FasteraiKD(teacher, getattr(fasterai.distill.losses, FASTERAI[loss]), layers, layers)


def student_learner(dls, seed, fp16):
    torch.manual_seed(seed)
    learn = Learner(dls, make_student(), loss_func=CrossEntropyLossFlat(), cbs=TrainTimes())
    return learn.to_fp16() if fp16 else learn


def fit_times(variant, dls, teacher, seed, epochs, fp16):
    "Training-phase times of epochs 2+ of one fit of `variant`"
    learn = student_learner(dls, seed, fp16)
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3, cbs=None if variant == 'plain' else kd_cb(variant, teacher))
    return learn.train_times.times[1:]


def teacher_times(dls, teacher, epochs, fp16):
    "The teacher's inference alone over one epoch of the same batches (drawn beforehand), epochs 2+"
    dev = torch.device(dls.device or 'cpu')
    teacher.to(dev).eval()
    res = []
    for _ in range(epochs):
        batches = list(dls.train)
        if dev.type == 'cuda': torch.cuda.synchronize()
        t = clock()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
            for xb, _ in batches: teacher(xb)
        if dev.type == 'cuda': torch.cuda.synchronize()
        res.append(since(t))
    return res[1:]


def measure_speed(device, repeats, n_train, epochs, bs):
    fp16 = device == 'cuda'
    dls = data(n_train, bs, device)
    torch.manual_seed(0)
    teacher = make_teacher().to(device) # untrained: cost, not accuracy, is measured here
    global VARIANTS
    res = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]: # rotate the order from repeat to repeat
            if v not in VARIANTS: continue
            try: res[v] += (teacher_times(dls, teacher, epochs, fp16) if v == 'teacher' else fit_times(v, dls, teacher, r, epochs, fp16))
            except Exception as e:
                if ':' not in v: raise
                print(f"  {v} fails on these models, left out: {str(e).splitlines()[-1].strip()}")
                VARIANTS = tuple(x for x in VARIANTS if x != v)
    clocks = ('wall', 'CPU') if device == 'cpu' else ('wall',) # CUDA: the host's CPU time says nothing of the GPU's
    med = {c: {v: statistics.median(t[i] for t in res[v]) for v in VARIANTS} for i, c in enumerate(clocks)}
    print(f"\n[{device}{', fp16 autocast' if fp16 else ''}] medians over {len(res['plain'])} epochs "
          f"({repeats} repeats x {epochs - 1} timed epochs, {len(dls.train)} batches of {bs}); ratio = distilled epoch / "
          "(plain epoch + teacher inference alone); floor: the same loss in a minimal hand-written callback (by_hand:<loss>; by_hand: "
          "KL written out), the least any callback must do; '/ floor' on the last clock")
    print(f"  {'variant':24s}" + ''.join(f'{c + " ms":>11s}' for c in clocks) + ''.join(f'{"ratio " + c:>11s}' for c in clocks)
          + f'{"/ floor":>11s}')
    for v in VARIANTS:
        ratios = [med[c][v] / (med[c]['plain'] + med[c]['teacher']) for c in clocks] if v not in ('plain', 'teacher') else []
        print(f"  {v:24s}" + ''.join(f'{med[c][v]*1000:11.1f}' for c in clocks) + ''.join(f'{r:11.3f}' for r in ratios)
              + (f"{med[clocks[-1]][v] / med[clocks[-1]][floor(v)]:11.3f}" if ratios else ''))
    return med


def _status_kib(key): return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key + ':')))


def reset_peak_rss()->float:
    "Linux: reset this process's peak RSS (VmHWM) to its current RSS, returned in MiB"
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')
    return _status_kib('VmRSS') / 1024


def peak_rss()->float: return _status_kib('VmHWM') / 1024 # MiB, since the last `reset_peak_rss`


MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'} # for memory children: large freed blocks go back to the kernel


def fit_memory(variant, device, n_train, epochs, bs, tensors=None):
    "Peak memory of one fit of `variant`: returns (before, peak) in MiB"
    fp16 = device == 'cuda'
    dls = data(n_train, bs, device, tensors)
    torch.manual_seed(0)
    teacher = make_teacher().to(device)
    learn = student_learner(dls, 0, fp16)
    if device == 'cuda':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else: before = reset_peak_rss()
    if variant == 'teacher': teacher_times(dls, teacher, epochs, fp16)
    else:
        with learn.no_bar(), learn.no_logging():
            learn.fit(epochs, 1e-3, cbs=None if variant == 'plain' else kd_cb(variant, teacher))
    if device == 'cuda': torch.cuda.synchronize(); return before, torch.cuda.max_memory_allocated() / 2**20
    return before, peak_rss()


def measure_memory(device, n_train, epochs, bs):
    res = {}
    # the children load the data from a file: building MNIST-1D would only add noise
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, 'mnist1d.pt'); torch.save(mnist1d(n_train), f)
        for v in VARIANTS:
            if device == 'cuda': res[v] = fit_memory(v, device, n_train, epochs, bs)
            else:
                out = subprocess.run([sys.executable, __file__, '--mem-child', v, '--data', f, '--n-train', str(n_train),
                                      '--epochs', str(epochs), '--bs', str(bs)], capture_output=True, text=True, check=True,
                                     env={**os.environ, **MALLOC_ENV})
                res[v] = tuple(json.loads(out.stdout.strip().splitlines()[-1]))
    how = ('torch.cuda.max_memory_allocated' if device == 'cuda' else
           'peak RSS (VmHWM) of a fresh subprocess per variant; "fit" = peak minus the RSS at the start of the fit')
    print(f"\n[{device}] peak memory over a {epochs}-epoch fit with batches of {bs}, {how}:")
    for v, (b, p) in res.items(): print(f"  {v:12s} before fit {b:8.1f} MiB, peak {p:8.1f} MiB, fit {p - b:7.1f} MiB")
    (pb, pp), (tb, tp) = res['plain'], res['teacher']
    for v in VARIANTS[2:]:
        b, p = res[v]
        print(f"  {v:12s} / plain: peak {p / pp:.3f}, fit increase {(p - b) / max(pp - pb, 1e-9):.2f}; "
              f"fit increase / (plain's + teacher inference's) {(p - b) / max(pp - pb + tp - tb, 1e-9):.2f}")


def environment(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): pass
    gpu = torch.cuda.get_device_name() if device == 'cuda' else 'none'
    t, s = make_teacher(), make_student()
    print(f"torch {torch.__version__}, fastai {fastai.__version__}, python {platform.python_version()}; CPU {cpu}, "
          f"{torch.get_num_threads()} torch thread(s) of {torch.multiprocessing.cpu_count()} cores; GPU {gpu}")
    if RESNET: print(f"digits at 32x32 (scikit-learn); teacher ResNet-34 {n_params(t):,} params, student ResNet-18 {n_params(s):,} params "
                     "(torchvision, no weights); attention pairs layer1..layer4")
    else: print(f"MNIST-1D (built locally); teacher 1-D CNN {n_params(t):,} params, stages {TEACHER_W}; "
                f"student {n_params(s):,} params, stages {STUDENT_W}; attention pairs {STAGES}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=7); p.add_argument('--n-train', type=int, default=4000)
    p.add_argument('--epochs', type=int, default=3, help='epochs per fit; the first is not timed')
    p.add_argument('--bs', type=int, default=128)
    p.add_argument('--mem-bs', type=int, default=1024, help='batch size of the memory runs (large, so activations show)')
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--resnet', action='store_true', help='ResNet-34 -> ResNet-18 (torchvision, no weights) on digits at 32x32, batch --bs')
    p.add_argument('--losses', default='soft_target,attention', help='kdcb losses to time, comma-separated')
    p.add_argument('--fasterai', action='store_true', help="also time fasterai 0.4.1's callback with the same losses, where it has them "
                   '(pip install fasterai==0.4.1 --no-deps)')
    p.add_argument('--mem-child', help=argparse.SUPPRESS); p.add_argument('--data', help=argparse.SUPPRESS)
    a = p.parse_args()
    global RESNET, VARIANTS
    RESNET, losses = a.resnet, a.losses.split(',')
    unknown = [l for l in losses if l not in available_losses()]
    if unknown: p.error(f'--losses: {unknown} are not registered losses; available: {available_losses()}')
    VARIANTS = (('plain', 'teacher', 'by_hand') + tuple(v for l in losses for v in (f'by_hand:{l}', l)) +
                tuple(f'fasterai:{l}' for l in losses if a.fasterai and l in FASTERAI))
    if RESNET and not a.no_memory: p.error('--resnet measures time only: add --no-memory')
    torch.set_num_threads(1) # a shared 2-core machine: one thread each, medians of repeats
    if a.mem_child:
        print(json.dumps(fit_memory(a.mem_child, 'cpu', a.n_train, a.epochs, a.bs, torch.load(a.data)))); return
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    environment(devices[-1])
    for d in devices:
        measure_speed(d, a.repeats, a.n_train, a.epochs, a.bs)
        if not a.no_memory: measure_memory(d, a.n_train, a.epochs, a.mem_bs)


if __name__ == '__main__': main()
