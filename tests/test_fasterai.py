"fasterai 0.4.1 itself (`pip install --no-deps fasterai==0.4.1`) against `kdcb.fasterai`: its schedules, losses, callback and helpers"
from functools import partial
import pytest, torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
import kdcb.callback, kdcb.losses
from conftest import conv, mlp, quiet_fit

schedule = pytest.importorskip('fasterai.core.schedule') # imports without fasterai's dependencies
fa_distill = pytest.importorskip('fasterai.distill.distillation_callback') # needs fastai.vision, which fastai installs
fa_losses = pytest.importorskip('fasterai.distill.losses')
from kdcb.fasterai import * # what code written for fasterai imports instead of `fasterai.distill.all`


def _dls():
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0)); y = x[:, :3].argmax(1)
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:96], bs=16), DataLoader(ds[96:], bs=32)) # no shuffling: the same batches for both


class Weights(Callback):
    "The distillation weight and the mixed loss at every training batch"
    order = 50
    def __init__(self, kd): self.kd, self.rows = kd, []
    def after_loss(self):
        if self.training: self.rows.append((self.pct_train, float(self.kd.current_weight), float(self.learn.loss)))


@pytest.mark.parametrize('sched', ['cos', 'lin'])
def test_fasterai_schedules_work_as_schedule(sched):
    "Before: fasterai 0.4.1's `Schedule` objects (`.progress`, not callable) failed with \"'Schedule' object is not callable\""
    s = getattr(schedule, sched)
    assert not callable(s) and hasattr(s, 'progress')
    kd = KnowledgeDistillationCallback(mlp(h=32), partial(SoftTarget, T=3), weight=0.8, schedule=s)
    w = Weights(kd)
    quiet_fit(Learner(_dls(), mlp(), loss_func=CrossEntropyLossFlat()), 2, cbs=[kd, w])
    assert len(w.rows) == 12 and w.rows[-1][1] > w.rows[0][1]
    for pct, cw, _ in w.rows: assert cw == pytest.approx(0.8 * s.progress(pct))


def test_kdcb_core_names_the_compatibility_module_for_fasterai_schedules():
    with pytest.raises(TypeError, match='kdcb.fasterai'):
        kdcb.callback.KnowledgeDistillationCallback(mlp(h=32), schedule=schedule.cos)


def _train(make_cb, loss):
    set_seed(0); teacher, student = mlp(h=32), mlp()
    learn = Learner(_dls(), student, loss_func=CrossEntropyLossFlat())
    kd = make_cb(teacher, loss, weight=0.5, schedule=schedule.lin)
    w = Weights(kd)
    quiet_fit(learn, 2, cbs=[kd, w])
    return [p.detach() for p in student.parameters()], w.rows


def test_the_same_training_as_fasterais_own_callback():
    "fasterai's callback with its own SoftTarget function, and kdcb.fasterai's with the same arguments: the same losses, weights and student"
    (p1, r1), (p2, r2) = _train(fa_distill.KnowledgeDistillationCallback, fa_losses.SoftTarget), _train(KnowledgeDistillationCallback, fa_losses.SoftTarget)
    assert len(r1) == len(r2) == 12
    for a, b in zip(r1, r2): assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(p1, p2): torch.testing.assert_close(a, b)
    (p3, r3) = _train(KnowledgeDistillationCallback, SoftTarget) # kdcb's SoftTarget class, under fasterai's name: the same loss
    for a, b in zip(r1, r3): assert a == pytest.approx(b, rel=1e-4)


def test_fasterai_style_calls_and_attributes():
    "Code written for fasterai's callback runs unchanged: the loss class or partial, positional layers, activations_* keywords"
    t, learn = conv(8), Learner(_dls(), conv(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(t, SoftTarget, weight=0.5))
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(t, Attention, ['1'], ['1'], weight=0.9))
    kd = KnowledgeDistillationCallback(t, Attention, activations_student='1', activations_teacher='1', weight=0.3)
    quiet_fit(learn, 1, cbs=kd)
    assert (list(kd.activations_student), list(kd.activations_teacher), kd.weight, kd.current_weight) == (['1'], ['1'], 0.3, 0.3)
    assert sum(len(m._forward_hooks) for m in [*learn.model.modules(), *t.modules()]) == 0
    assert not hasattr(kdcb.callback.KnowledgeDistillationCallback(t), 'activations_student') # kdcb's own class keeps its names


def test_get_model_layers_as_fasterai():
    m = conv()
    assert get_model_layers(m) == fa_distill.get_model_layers(m)
    assert get_model_layers(m, get_layer_repr=True) == dict(fa_distill.get_model_layers(m, get_layer_repr=True))
