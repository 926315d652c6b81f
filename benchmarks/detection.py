"""Detection distillation end to end: `DetectionHeadKD` and `ImportanceFeatureKD` on a tiny one-stage detector.

Run: python benchmarks/detection.py                      # 3 paired seeds, the default rows: about 7 minutes on one CPU thread
     python benchmarks/detection.py --seeds 5 --epochs 80 --labelled 500
     python benchmarks/detection.py --rows scratch,head  # some of the rows only

The task, built offline from scikit-learn's bundled digits (no download): one or two digits, each 8×8 scaled to 8, 12
or 16 pixels, pasted without overlap at random positions on a 32×32 canvas with a little noise. Canvases of the
training set use the first 1,400 digit images, the validation canvases the other 397 (digits the models never saw).

The detector is anchor-free and one-stage (CenterNet/FCOS-like): a conv backbone down to an 8×8 grid (stride 4) and a
3×3 conv head whose output (B, 4 + 10, 8, 8) holds, per cell, the box (dx, dy: the centre's offset in the cell, in
cells; log w, log h in cells) and 10 class logits. The cell holding a digit's centre is its positive: the target is
that digit's class there, and its box. Task loss: sigmoid focal loss (α = 0.25, γ = 2) over every cell and class,
divided by the number of objects, plus L1 on the 4 box values of positive cells. Targets travel as (B, 5, 8, 8) maps:
channel 0 the class of each cell (10 = background, `UNLABELLED` on every cell of a canvas without labels), channels
1-4 the encoded box.

Teacher: backbone 16-32-64 (two convs per stage), trained on --n-teacher canvases. Student: 8-16-32 (one conv per
stage), trained on the first --labelled of them. Seed `s` gives every row the same initial student and batch order.
Rows (distillation weight 0.5, the task loss 0.5; 0.9 and 0.1 in the +u rows):
  scratch        the labels alone
  head:mean      + `DetectionHeadKD(10, cls_norm='mean')` on the hooked head output ('head' of both models): the class
                 term a mean over all 8·8·10 cell-class entries, mostly background, so about a hundredth of the task
                 loss, which is normalised by the number of objects
  head           + `DetectionHeadKD(10)` at its defaults (T = 1, fg_threshold = 0.5, cls_weight = 1, cls_norm = 'fg': the
                 class term summed and divided by the teacher's foreground positions, as the task loss is); --T, --fg,
                 --cls-weight, --cls-norm change it (a teacher trained with focal loss gives some objects a top
                 probability under 0.5: the script prints how many)
  head+feat      + `ImportanceFeatureKD` on the three backbone stages (32×32, 16×16, 8×8) that `match_feature_layers`
                 pairs on the models without their head (on the whole models it pairs the head at 8×8, the last map
                 there), through 1×1 connectors, each pair its own loss (`PerPair`)
  head+u         `head`, with the teacher's other canvases added without labels (about as many optimizer steps: the
                 epochs scaled by labelled / all canvases)
  head+feat+u    both, with the unlabelled canvases
Metric: AP@0.5 on the validation canvases. Decoding keeps, per image, the cells that are the maximum of their 3×3
neighbourhood for their class (CenterNet's peak rule), scored by their class probability, at most 10 per image, score
≥ 0.05. All detections of the set are ranked by score; one is a hit when its class is right and its box overlaps a
not-yet-matched ground-truth box of that image with IoU ≥ 0.5. AP = the area under that precision-recall curve
(all points, precision made monotone, as VOC 2010+). Classes are pooled, not averaged.

Prints the environment, the teacher's AP, a markdown table (AP mean ± std over seeds, vs scratch: the mean of the
per-seed differences ± their std) and the seconds per run."""
from __future__ import annotations
from typing import Callable
import argparse, platform, statistics, time, warnings
from collections import OrderedDict
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, Tensor
from sklearn.datasets import load_digits
import sklearn, fastai
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import set_seed
import fastai.callback.schedule  # Learner.fit_one_cycle
from kdcb.all import *
from kdcb.detection import DetectionHeadKD, ImportanceFeatureKD
from kdcb.data import UNLABELLED

K, CANVAS, STRIDE = 10, 32, 4 # classes, canvas side, pixels per grid cell
GRID = CANVAS // STRIDE
BG = K # class value of background cells
ROWS = ('scratch', 'head:mean', 'head', 'head+feat', 'head+u', 'head+feat+u')
SIZES = (8, 12, 16) # a digit's side on the canvas, in pixels

# ---- data ----

def make_canvases(digits:np.ndarray, # (N, 8, 8) digit images in [0, 1]
                  labels:np.ndarray, # their classes
                  n:int, # how many canvases
                  seed:int=0, # the generator's seed
                  noise:float=0.05, # std of the Gaussian noise added to every pixel
                 )->tuple[Tensor, list]: # (n, 1, 32, 32) canvases, and per canvas a list of (class, x0, y0, x1, y1) boxes
    "Canvases with one or two digits each, at random sizes and non-overlapping positions whose centres fall in distinct cells"
    g = np.random.default_rng(seed)
    x, boxes = torch.zeros(n, 1, CANVAS, CANVAS), []
    for i in range(n):
        objs = []
        for _ in range(g.integers(1, 3)):
            for _try in range(50): # rejection: no overlap, a cell of its own
                j, s = g.integers(len(digits)), int(g.choice(SIZES))
                x0, y0 = int(g.integers(0, CANVAS - s + 1)), int(g.integers(0, CANVAS - s + 1))
                b = (int(labels[j]), x0, y0, x0 + s, y0 + s)
                cell = lambda o: (int((o[1] + o[3]) / 2 / STRIDE), int((o[2] + o[4]) / 2 / STRIDE))
                if all(box_iou(b[1:], o[1:]) == 0 and cell(b) != cell(o) for o in objs): break
            else: continue
            d = F.interpolate(torch.tensor(digits[j], dtype=torch.float32)[None, None], size=(s, s), mode='bilinear', align_corners=False)
            x[i, 0, y0:y0 + s, x0:x0 + s] = d[0, 0]
            objs.append(b)
        boxes.append(objs)
    return (x + noise * torch.from_numpy(g.standard_normal(x.shape)).float()).clamp(0, 1), boxes

def box_iou(a, b)->float:
    "IoU of two (x0, y0, x1, y1) boxes"
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

def encode(boxes:list, # one canvas's (class, x0, y0, x1, y1) boxes
          )->Tensor: # (5, GRID, GRID): class per cell (BG where none), then dx, dy, log w, log h in cells
    "The dense target of one canvas: each box at the cell holding its centre"
    y = torch.zeros(5, GRID, GRID); y[0] = BG
    for c, x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        gx, gy = int(cx), int(cy)
        y[:, gy, gx] = torch.tensor([c, cx - gx, cy - gy, np.log((x1 - x0) / STRIDE), np.log((y1 - y0) / STRIDE)])
    return y

def decode(out:Tensor, # (4 + K, GRID, GRID) head output of one image (box values, then class logits)
           max_det:int=10, # at most this many detections
           min_score:float=0.05, # lowest class probability kept
          )->list: # (score, class, x0, y0, x1, y1), best first
    "Detections of one image: per class, the cells that are the maximum of their 3×3 neighbourhood (CenterNet's peaks)"
    p = torch.sigmoid(out[4:])
    peak = (p == F.max_pool2d(p[None], 3, 1, 1)[0]) & (p >= min_score)
    dets = []
    for c, gy, gx in peak.nonzero().tolist():
        dx, dy, lw, lh = out[:4, gy, gx].tolist()
        cx, cy, w, h = (gx + dx) * STRIDE, (gy + dy) * STRIDE, np.exp(lw) * STRIDE, np.exp(lh) * STRIDE
        dets.append((float(p[c, gy, gx]), c, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return sorted(dets, reverse=True)[:max_det]

def average_precision(dets:list, # per image, its detections (score, class, x0, y0, x1, y1)
                      gts:list, # per image, its (class, x0, y0, x1, y1) boxes
                      iou:float=0.5, # the overlap from which a detection of the right class is a hit
                     )->float: # AP over the set, classes pooled
    "The area under the precision-recall curve of all detections ranked by score (all points, monotone precision)"
    n_gt = sum(len(g) for g in gts)
    ranked = sorted(((d[0], i, d) for i, ds in enumerate(dets) for d in ds), key=lambda o: -o[0])
    used, hits = [set() for _ in gts], []
    for _, i, (_, c, *b) in ranked:
        cands = [(box_iou(b, g[1:]), k) for k, g in enumerate(gts[i]) if g[0] == c and k not in used[i]]
        best = max(cands, default=(0., -1))
        if best[0] >= iou: used[i].add(best[1])
        hits.append(best[0] >= iou)
    if not n_gt: return float('nan')
    tp = np.cumsum(hits); recall, precision = tp / n_gt, tp / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else precision
    return float(np.sum(np.diff(np.concatenate([[0.], recall])) * precision))

@torch.no_grad()
def evaluate(model:nn.Module, x:Tensor, gts:list, bs:int=256)->float:
    "AP@0.5 (%) of `model` on canvases `x` with ground truth `gts`"
    model.eval()
    out = torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])
    return 100 * average_precision([decode(o) for o in out], gts)

# ---- model and loss ----

def conv(ci, co, stride=1): return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())

def detector(widths:tuple=(8, 16, 32), # channels of the stages at 32×32, 16×16 and 8×8
             extra:int=0, # additional 3×3 convs per stage
            )->nn.Sequential:
    "Backbone stages 'stem' (32×32), 's1' (16×16), 's2' (8×8), then 'head': a 3×3 conv to 4 + K values per cell"
    c0, c1, c2 = widths
    stage = lambda ci, co, s: nn.Sequential(conv(ci, co, s), *[conv(co, co) for _ in range(extra)])
    return nn.Sequential(OrderedDict(stem=stage(1, c0, 1), s1=stage(c0, c1, 2), s2=stage(c1, c2, 2),
                                     head=nn.Conv2d(c2, 4 + K, 3, 1, 1)))

class DetectionLoss(nn.Module):
    "Sigmoid focal loss over every cell and class / number of objects, + L1 on the positives' boxes; unlabelled canvases left out"
    def __init__(self, alpha:float=0.25, gamma:float=2.): super().__init__(); self.alpha, self.gamma = alpha, gamma
    def forward(self, pred:Tensor, target:Tensor)->Tensor:
        keep = (target[:, 0] != UNLABELLED).flatten(1).all(1) # canvases with labels
        if not keep.any(): return pred.sum() * 0.
        pred, target = pred[keep], target[keep]
        cls = target[:, 0].long()
        pos = cls != BG
        onehot = F.one_hot(cls, K + 1)[..., :K].permute(0, 3, 1, 2).float() # background: all zeros
        logit = pred[:, 4:]
        p = torch.sigmoid(logit)
        ce = F.binary_cross_entropy_with_logits(logit, onehot, reduction='none')
        pt = p * onehot + (1 - p) * (1 - onehot)
        at = self.alpha * onehot + (1 - self.alpha) * (1 - onehot)
        n = pos.sum().clamp_min(1)
        focal = (at * (1 - pt) ** self.gamma * ce).sum() / n
        box = (pred[:, :4] - target[:, 1:]).abs().sum(1)[pos].sum() / n
        return focal + box

# ---- the benchmark ----

def tensor_dls(x, y, xv, yv, bs):
    return DataLoaders(DataLoader(list(zip(x, y)), bs=bs, shuffle=True, drop_last=True), DataLoader(list(zip(xv, yv)), bs=256))

def fit(model, dls, epochs, lr, cbs=None):
    learn = Learner(dls, model, loss_func=DetectionLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return learn

def backbone_pairs(student, teacher, xb):
    "`match_feature_layers` on the backbones (the models without 'head'), so the 8×8 stage 's2' is paired rather than the head"
    return match_feature_layers(student[:-1], teacher[:-1], xb) # slicing an `nn.Sequential` keeps its names

def kd_callback(teacher:nn.Module, # the trained detector
                pairs:LayerPairs|None, # backbone layer pairs for `ImportanceFeatureKD` (None: the head loss alone)
                head_kd:Callable, # makes the `DetectionHeadKD` of the hooked 'head' outputs
                weight:float=0.5, # distillation weight
               )->KnowledgeDistillationCallback:
    "`DetectionHeadKD` on 'head', and `ImportanceFeatureKD` through 1×1 connectors on each backbone pair (`PerPair`: one loss per pair)"
    if pairs is None: return KnowledgeDistillationCallback(teacher, head_kd(), 'head', ['head'], weight=weight)
    conns = pairs.connectors() # 1×1 convs from the student's widths to the teacher's, trained with the student
    losses = [head_kd()] + [Connected(ImportanceFeatureKD(), conns) for _ in pairs.rows] # in the order of the layer pairs
    return KnowledgeDistillationCallback(teacher, PerPair(losses), ['head', *pairs['student']], ['head', *pairs['teacher']], weight=weight)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=100, help="student epochs over its labelled canvases")
    p.add_argument('--teacher-epochs', type=int, default=15)
    p.add_argument('--labelled', type=int, default=300, help="canvases the student has labels for")
    p.add_argument('--n-teacher', type=int, default=3000, help="canvases the teacher is trained on (the first --labelled included)")
    p.add_argument('--n-valid', type=int, default=500)
    p.add_argument('--weight', type=float, default=0.5, help="distillation weight (the task loss gets 1 - weight)")
    p.add_argument('--u-weight', type=float, default=0.9, help="distillation weight of the +u rows")
    p.add_argument('--T', type=float, default=1., help="DetectionHeadKD's T")
    p.add_argument('--cls-weight', type=float, default=1., help="DetectionHeadKD's cls_weight")
    p.add_argument('--cls-norm', default='fg', choices=['mean', 'fg'], help="DetectionHeadKD's cls_norm")
    p.add_argument('--fg', type=float, default=0.5, help="DetectionHeadKD's fg_threshold")
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--rows', default=','.join(ROWS))
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    rows = a.rows.split(',')
    bad = set(rows) - set(ROWS)
    if bad: raise SystemExit(f"unknown rows {sorted(bad)}; choose among {', '.join(ROWS)}")
    torch.set_num_threads(a.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, "
          f"scikit-learn {sklearn.__version__}, {platform.machine()}, {a.threads} torch thread(s)")
    d = load_digits()
    imgs, labels = d.images / 16., d.target
    xt, bt = make_canvases(imgs[:1400], labels[:1400], a.n_teacher, seed=0)
    xv, bv = make_canvases(imgs[1400:], labels[1400:], a.n_valid, seed=1)
    yt, yv = torch.stack([encode(b) for b in bt]), torch.stack([encode(b) for b in bv])

    t0 = time.perf_counter()
    set_seed(0)
    teacher = detector((16, 32, 64), extra=1)
    fit(teacher, tensor_dls(xt, yt, xv, yv, a.bs), a.teacher_epochs, a.lr)
    t_ap, t_time = evaluate(teacher, xv, bv), time.perf_counter() - t0
    with torch.no_grad(): # how often the teacher's foreground rule holds where there are objects, and where there are none
        pmax = torch.sigmoid(teacher.eval()(xv[:256])[:, 4:]).amax(1)
        pos = yv[:256, 0] != BG
    print(f"teacher: AP@0.5 {t_ap:.1f} on {a.n_valid} validation canvases, {sum(p.numel() for p in teacher.parameters()):,} params, "
          f"{a.n_teacher} canvases x {a.teacher_epochs} epochs, {t_time:.0f} s; its highest class probability is "
          + '; '.join(f">= {f} at {100 * (pmax[pos] >= f).float().mean():.0f}% of object cells and {100 * (pmax[~pos] >= f).float().mean():.1f}% "
                      "of background cells" for f in sorted({0.5, a.fg})))

    n = a.labelled
    xl, yl = xt[:n], yt[:n]
    yu = yt[n:].clone(); yu[:, 0] = UNLABELLED # the teacher's other canvases, their labels removed
    xlu, ylu = torch.cat([xl, xt[n:]]), torch.cat([yl, yu])
    u_epochs = max(1, round(a.epochs * n / len(xlu))) # about as many optimizer steps as the labelled-only rows

    head_kd = lambda: DetectionHeadKD(K, T=a.T, fg_threshold=a.fg, cls_weight=a.cls_weight, cls_norm=a.cls_norm)
    set_seed(0)
    probe = detector()
    pairs = backbone_pairs(probe, teacher, xv[:2])
    print('ImportanceFeatureKD on the backbone pairs (match_feature_layers):\n' + repr(pairs))

    res, secs = {r: [] for r in rows}, {r: [] for r in rows}
    for s in range(a.seeds):
        for r in rows:
            set_seed(s); student = detector()
            u = r.endswith('+u')
            dls = tensor_dls(xlu, ylu, xv, yv, a.bs) if u else tensor_dls(xl, yl, xv, yv, a.bs)
            hk = (lambda: DetectionHeadKD(K, cls_norm='mean')) if r == 'head:mean' else head_kd
            cbs = None if r == 'scratch' else kd_callback(teacher, pairs if 'feat' in r else None, hk, a.u_weight if u else a.weight)
            set_seed(s); t0 = time.perf_counter()
            fit(student, dls, u_epochs if u else a.epochs, a.lr, cbs)
            secs[r].append(time.perf_counter() - t0); res[r].append(evaluate(student, xv, bv))
            print(f"seed {s} {r}: AP {res[r][-1]:.1f} ({secs[r][-1]:.0f} s)", flush=True)

    sd = lambda l: statistics.stdev(l) if len(l) > 1 else 0.
    n_s = sum(p.numel() for p in detector().parameters())
    print(f"\nstudent ({n_s:,} params) with labels for {n} canvases, {a.epochs} epochs (+u rows: {len(xlu)} canvases x {u_epochs} "
          f"epochs), DetectionHeadKD(T={a.T}, fg_threshold={a.fg}, cls_weight={a.cls_weight}, cls_norm={a.cls_norm!r}), weight {a.weight} (+u rows {a.u_weight}); "
          f"teacher AP {t_ap:.1f}; seeds 0-{a.seeds - 1}\n")
    print('| student | AP@0.5 (%) | vs scratch | s / run |\n|---|---|---|---|')
    base = res.get('scratch')
    for r, v in res.items():
        diff = '' if base is None or r == 'scratch' else (lambda dd: f"{statistics.mean(dd):+.1f} ± {sd(dd):.1f}")([b - c for b, c in zip(v, base)])
        print(f"| {r} | {statistics.mean(v):.1f} ± {sd(v):.1f} | {diff} | {statistics.median(secs[r]):.0f} |")


if __name__ == '__main__': main()
