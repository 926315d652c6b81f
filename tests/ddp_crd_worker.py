"One process of the two-process CRD test (run by tests/test_contrastive.py): distil with CRD, save its heads and bank"
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
from kdcb.contrastive import CRD

torch.set_num_threads(1)


def _broadcast_cpu(self, t, rank):
    "fastai's DistributedDL broadcasts through CUDA tensors (nccl); with gloo on the CPU a CPU tensor does the same"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
fastai.distributed.DistributedDL._broadcast = _broadcast_cpu
out, world = sys.argv[1], int(os.environ.get('WORLD_SIZE', 1))


def mlp(h): return nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Linear(h, 3))


g = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=g)
y = torch.randint(0, 3, (64,), generator=g)
items = list(zip(x, y))
dls = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(64)), list(range(32))]).dataloaders(
    bs=16 // world, shuffle=False)
torch.manual_seed(0)
teacher, student = mlp(32), mlp(16)
kd = KnowledgeDistillationCallback(teacher, CRD(16, 32, dim=8, n_negatives=1000), ['1'], ['1'], weight=.3)
learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.1, wd=0., moms=(0., 0., 0.), cbs=kd)
if world > 1:
    dist.init_process_group('gloo')
    with learn.distrib_ctx(sync_bn=False), learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
else:
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
torch.save({'state': kd.state_dict()['losses'], 'student': student.state_dict()}, out)
if world > 1: dist.destroy_process_group()
