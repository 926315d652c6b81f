"""One process of the two-process DDP test of teacher-output stores (run by tests/test_store.py): train a student from the
store given as argument, then the same student from the live teacher, under DDP when WORLD_SIZE > 1; save each batch's
loss, the item indices the store was asked for, and the final weights."""
import os, random, sys
import torch
import torch.distributed as dist
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.progress, fastai.distributed  # Learner.no_bar, Learner.distrib_ctx
from kdcb.all import *
from kdcb.store import IndexedDataset, StoredTeacher
sys.path.insert(0, os.path.dirname(__file__))
from test_store import lm_data, lm, V

torch.set_num_threads(1)
def _broadcast_cpu(self, t, rank): # as in tests/ddp_worker.py: fastai broadcasts through CUDA tensors; gloo takes CPU ones
    t = torch.tensor(t, dtype=torch.long); dist.broadcast(t, rank); return t.tolist()
fastai.distributed.DistributedDL._broadcast = _broadcast_cpu

store, out = sys.argv[1], sys.argv[2]
world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
train, valid = lm_data()
torch.manual_seed(0); teacher = lm(32)


class Record(Callback):
    "Each training batch's loss, and the item indices the store read"
    order = 100
    def __init__(self, source=None): self.source, self.losses, self.read = source, [], []
    def after_loss(self):
        if self.training: self.losses.append(self.loss.item())


def fit(source, ds):
    random.seed(0); torch.manual_seed(0) # the same batches and initial student whatever the source
    dls = DataLoaders(DataLoader(ds, bs=16 // world, shuffle=True, drop_last=True), DataLoader(valid, bs=32))
    learn = Learner(dls, lm(8), loss_func=CrossEntropyLossFlat(), lr=1e-2)
    rec, read = Record(), []
    if isinstance(source, StoredTeacher): # what the store was asked for, batch by batch
        orig = source.store.read
        source.store.read = lambda idx: (read.append(idx.tolist()), orig(idx))[1]
    cbs = [KnowledgeDistillationCallback(source, SoftTarget(T=1.), weight=.5), rec]
    with learn.no_bar(), learn.no_logging():
        if world > 1:
            with learn.distrib_ctx(sync_bn=False): learn.fit(2, 1e-2, cbs=cbs)
        else: learn.fit(2, 1e-2, cbs=cbs)
    return dict(losses=torch.tensor(rec.losses), read=read, weights={k: v.detach().clone() for k, v in learn.model.state_dict().items()})


if world > 1: dist.init_process_group('gloo')
res = {'store': fit(StoredTeacher(store), IndexedDataset(train)), 'live': fit(teacher, train)}
torch.save(res, out)
if world > 1: dist.destroy_process_group()
