"Mixed precision, several teachers, teachers in another dtype or on another device"
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
import fastai.callback.progress  # Learner.no_bar
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from kdcb.all import *
from conftest import mlp, conv, quiet_fit


class CPUAutocast(Callback):
    "bf16 autocast on the CPU from before_batch to after_loss, as fastai's MixedPrecision does on CUDA"
    order = 10
    def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
    def after_loss(self): self.ac.__exit__(None, None, None)


class Record(Callback):
    order = 6
    def before_fit(self): self.rows = []
    def after_pred(self): self.tp = self.kd.teacher_pred # the callback drops it once its losses have run (end of `after_loss`)
    def after_loss(self):
        if self.training: self.rows.append((self.learn.loss_grad.detach(), self.tp.dtype, self.xb[0], self.tp))
    def __init__(self, kd): self.kd = kd


def test_extreme_logits_in_bfloat16_stay_finite():
    s = (torch.randn(16, 10) * 1e4).bfloat16().requires_grad_()
    t = (torch.randn(16, 10) * 1e4).bfloat16()
    for T in (1., 4., 20.):
        loss = SoftTarget(T=T)(s, t)
        ref = F.kl_div(F.log_softmax(s.double() / T, 1), F.log_softmax(t.double() / T, 1), log_target=True, reduction='batchmean') * T * T
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-3, atol=1e-2)
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_fit_under_bf16_autocast_with_huge_logits(dls):
    "The teacher runs inside the student's autocast and the mixed loss stays finite"
    class Loud(nn.Module):
        def __init__(self, w): super().__init__(); self.net = conv(w)
        def forward(self, x): return self.net(x) * 1e4
    kd = KnowledgeDistillationCallback(Loud(8), ['soft_target', 'attention'], ['1'], ['net.1'], weight=.5)
    rec = Record(kd)
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=[kd, rec, CPUAutocast()])
    assert rec.rows and all(torch.isfinite(r[0]) for r in rec.rows)
    assert rec.rows[0][1] == torch.bfloat16  # the teacher ran under autocast


def test_several_teachers_one_forward_each_and_the_mean_of_their_logits(dls):
    torch.manual_seed(0)
    t1, t2 = mlp(h=32), mlp(h=24)
    calls = {1: 0, 2: 0}
    t1.register_forward_pre_hook(lambda m, i: calls.__setitem__(1, calls[1] + 1))
    t2.register_forward_pre_hook(lambda m, i: calls.__setitem__(2, calls[2] + 1))
    seen = []
    def grab(pred, teacher_pred, fm_t):
        seen.append((teacher_pred, list(fm_t.values())[0].shape)); return (pred - teacher_pred).pow(2).mean()
    kd = KnowledgeDistillationCallback(TeacherEnsemble([t1, t2], weights=[.25, .75], feature_index=1), grab, ['0'], ['0'])
    rec = Record(kd)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=[kd, rec])
    assert calls[1] == calls[2] == len(dls.train)
    assert seen[0][1][1] == 24  # features from the chosen teacher
    _, _, x, teacher_pred = rec.rows[0]
    with torch.no_grad(): torch.testing.assert_close(teacher_pred, .25 * t1(x) + .75 * t2(x))
    with pytest.raises(ValueError, match='1 weights for 2 teachers'): TeacherEnsemble([t1, t2], weights=[1.])
    with pytest.raises(ValueError, match='feature_index=2'): TeacherEnsemble([t1, t2], feature_index=2)


def test_teacher_in_bfloat16(dls):
    teacher = mlp(h=32)
    kd = KnowledgeDistillationCallback(FrozenTeacher(teacher, dtype=torch.bfloat16), 'soft_target')
    rec = Record(kd)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=[kd, rec])
    assert next(teacher.parameters()).dtype == torch.float32 # converted for the fit only
    assert rec.rows and rec.rows[0][1] == torch.bfloat16 and all(torch.isfinite(r[0]) for r in rec.rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_teacher_on_another_device(dls):
    "The student trains on the CPU while the teacher runs on the GPU; outputs come back to the student's device"
    teacher, seen = conv(8), []
    teacher.register_forward_pre_hook(lambda m, i: seen.append(next(m.parameters()).device.type))
    kd = KnowledgeDistillationCallback(FrozenTeacher(teacher, device='cuda'), ['soft_target', 'attention'], ['1'], ['1'])
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=kd)
    assert seen and set(seen) == {'cuda'} # it ran on the GPU...
    assert next(teacher.parameters()).device.type == 'cpu' # ...and went back where it was


def _tfmd_dls(after_batch=None, shuffle=True):
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 8, generator=g), torch.randint(0, 3, (192,), generator=g)
    return Datasets(list(zip(x, y)), [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(160)), list(range(160, 192))]
                    ).dataloaders(bs=32, shuffle=shuffle, after_batch=after_batch)


def test_cached_teacher_trains_exactly_like_the_live_teacher():
    teacher = mlp(h=32)
    def train(cache):
        set_seed(0)  # torch and python's random, which drives fastai's shuffling
        dls, student = _tfmd_dls(), mlp()
        learn = Learner(dls, student, loss_func=CrossEntropyLossFlat())
        quiet_fit(learn, 3, cbs=KnowledgeDistillationCallback(CachedTeacher(teacher) if cache else teacher, 'soft_target'))
        return [p.detach() for p in student.parameters()]
    for a, b in zip(train(False), train(True)): torch.testing.assert_close(a, b)


def test_cache_refuses_random_augmentation():
    from fasttransform import Transform
    class Jitter(Transform):
        split_idx = 0  # training only, like fastai's RandTransform
        def encodes(self, x: torch.Tensor): return x + torch.randn_like(x) if x.is_floating_point() else x
    learn = Learner(_tfmd_dls(after_batch=[Jitter()]), mlp(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=r"random augmentations \(training only\)"):
        quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(CachedTeacher(mlp(h=32))))

    class SneakyJitter(Transform):  # random, but not declared training-only: caught by the input fingerprints
        def encodes(self, x: torch.Tensor): return x + torch.randn_like(x) if x.is_floating_point() else x
    learn = Learner(_tfmd_dls(after_batch=[SneakyJitter()]), mlp(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(RuntimeError, match='changed between epochs'):
        quiet_fit(learn, 2, cbs=KnowledgeDistillationCallback(CachedTeacher(mlp(h=32))))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@cuda
@pytest.mark.parametrize('half', ['to_fp16', 'to_bf16'])
def test_mixed_precision_on_cuda(half):
    "fastai's MixedPrecision on the GPU: the teacher runs inside its autocast and the mixed loss stays finite"
    from conftest import toy_dls
    dls = toy_dls(); dls.to('cuda')
    kd = KnowledgeDistillationCallback(conv(8), ['soft_target', 'attention'], ['1'], ['1'])
    rec = Record(kd)
    learn = getattr(Learner(dls, conv(), loss_func=CrossEntropyLossFlat()), half)()
    quiet_fit(learn, 2, cbs=[kd, rec])
    assert rec.rows and all(torch.isfinite(r[0]) for r in rec.rows)
    assert rec.rows[0][1] == (torch.float16 if half == 'to_fp16' else torch.bfloat16)
    assert all(p.grad is None for p in kd.teacher.model.parameters())
    assert next(learn.model.parameters()).is_cuda and next(kd.teacher.model.parameters()).is_cuda


@cuda
def test_no_teacher_activation_outlives_its_batch_on_cuda():
    "GPU memory after a distilled fit is back where it was before it, beyond the student's optimizer state"
    from conftest import toy_dls
    dls = toy_dls(); dls.to('cuda')
    teacher = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 4096, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                            nn.Flatten(), nn.Linear(4096, 3)).cuda()
    learn = Learner(dls, conv().cuda(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1)  # optimizer state exists from here on
    torch.cuda.synchronize(); before = torch.cuda.memory_allocated()
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    quiet_fit(learn, 1, cbs=kd)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 32 * 4096 * 8 * 4  # less than one batch of the teacher's hidden layer
