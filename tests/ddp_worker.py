"One process of the two-process DDP test (run by tests/test_ddp.py): distil with a trainable connector, save the weights"
import os, sys
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

torch.set_num_threads(1)


def _broadcast_cpu(self, t, rank):
    "fastai's DistributedDL broadcasts through CUDA tensors (nccl); with gloo on the CPU a CPU tensor does the same"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
fastai.distributed.DistributedDL._broadcast = _broadcast_cpu
out, world = sys.argv[1], int(os.environ.get('WORLD_SIZE', 1))


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
torch.manual_seed(0)
teacher, student, conn = mlp(32), mlp(16), Connector()
conn0 = {k: v.clone() for k, v in conn.state_dict().items()}
kd = KnowledgeDistillationCallback(teacher, ['soft_target', conn], ['0'], ['0'], weight=[.3, .3])
learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.5, wd=0., moms=(0., 0., 0.), cbs=kd)
if world > 1:
    dist.init_process_group('gloo')
    with learn.distrib_ctx(sync_bn=False), learn.no_bar(), learn.no_logging(): learn.fit(1, 0.5)
else:
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.5)
torch.save({'student': student.state_dict(), 'connector': conn.state_dict(), 'connector0': conn0}, out)
if world > 1: dist.destroy_process_group()
