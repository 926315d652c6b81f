"""One process of the two-process DDP tests (run by tests/test_ddp.py and tests/test_ddp_online.py): train, save the weights.
`--method kd` (default): distil with a trainable connector; `mutual`: MutualLearning with one peer; `deep`: DeepSupervision with
one head; `ema`: distil from an EMATeacher; several, comma-separated, run one after another in this process and are saved as
{method: weights}. For the online methods every rank starts from its own random weights (seed = rank), as processes that
were not seeded alike do: what DDP does not broadcast itself (peers, heads, the average) must still agree."""
import argparse, os, sys
import torch
import torch.distributed as dist
from torch import nn
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
import fastai.callback.progress, fastai.distributed  # Learner.no_bar, Learner.distrib_ctx
from kdcb.all import *
from kdcb.online import DeepSupervision, EMATeacher, MutualLearning

torch.set_num_threads(1)


def _broadcast_cpu(self, t, rank):
    "fastai's DistributedDL broadcasts through CUDA tensors (nccl); with gloo on the CPU a CPU tensor does the same"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
fastai.distributed.DistributedDL._broadcast = _broadcast_cpu
ap = argparse.ArgumentParser()
ap.add_argument('out'); ap.add_argument('--method', default='kd', help='kd, mutual, deep, ema, or several comma-separated')
args = ap.parse_args()
out, methods, world, rank = args.out, args.method.split(','), int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))


class Connector(nn.Module):
    "A trainable map from student to teacher features, trained with the student"
    def __init__(self): super().__init__(); self.lin = nn.Linear(16, 32)
    def forward(self, fm_s, fm_t): return sum((self.lin(s) - t).pow(2).mean() for s, t in zip(fm_s.values(), fm_t.values()))


def mlp(h): return nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Linear(h, 3))


g = torch.Generator().manual_seed(0)
x = torch.randn(32, 8, generator=g)
y = torch.randint(0, 3, (32,), generator=g)
items = list(zip(x, y))
dls = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(32)), list(range(32))]).dataloaders(
    bs=32 // world, shuffle=False)
def fit(learn, epochs):
    if world > 1:
        with learn.distrib_ctx(sync_bn=False), learn.no_bar(), learn.no_logging(): learn.fit(epochs, 0.5)
    else:
        with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 0.5)


def sd(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


def make_learner(student, cbs): return Learner(dls, student, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.5, wd=0.,
                                               moms=(0., 0., 0.), cbs=cbs)


def train(method):
    if method == 'kd':
        torch.manual_seed(0)
        teacher, student, conn = mlp(32), mlp(16), Connector()
        conn0 = sd(conn)
        kd = KnowledgeDistillationCallback(teacher, ['soft_target', conn], ['0'], ['0'], weight=[.3, .3])
        fit(make_learner(student, kd), 1)
        return {'student': student.state_dict(), 'connector': conn.state_dict(), 'connector0': conn0}
    torch.manual_seed(rank) # each rank its own initial weights: DDP makes the students agree, the callbacks the rest
    student = mlp(16)
    if method == 'mutual':
        peer = mlp(16); peer0 = sd(peer)
        fit(make_learner(student, MutualLearning(peer)), 2)
        return {'student': sd(student), 'peer': sd(peer), 'peer0': peer0}
    if method == 'deep':
        ds = DeepSupervision(['1'], T=2.)
        fit(make_learner(student, ds), 2)
        return {'student': sd(student), 'heads': ds.state_dict()}
    if method == 'ema':
        ema = EMATeacher(student, decay=0.5)
        fit(make_learner(student, KnowledgeDistillationCallback(ema, 'soft_target', weight=.5)), 2)
        return {'student': sd(student), 'ema': sd(ema.model), 'n_updates': torch.tensor(ema.n_updates)}
    raise ValueError(f"Unknown method {method!r}: use kd, mutual, deep or ema.")


if world > 1: dist.init_process_group('gloo')
res = {m: train(m) for m in methods}
torch.save(res[methods[0]] if len(methods) == 1 else res, out)
if world > 1: dist.destroy_process_group()
