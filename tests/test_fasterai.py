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


def fasterai_public_names()->list[str]:
    "What `from fasterai.distill.all import *` gives, read from the installed fasterai"
    import fasterai.distill.all as fa_all
    names = getattr(fa_all, '__all__', None) or [n for n in vars(fa_all) if not n.startswith('_')]
    return sorted(n for n in names if not isinstance(getattr(fa_all, n), type(fa_all))) # not submodules


def test_every_public_name_of_fasterais_distillation():
    import kdcb.fasterai
    names = fasterai_public_names()
    assert {'KnowledgeDistillationCallback', 'SoftTarget', 'match_feature_layers', 'get_module_by_name'} <= set(names)
    assert not (missing := [n for n in names if n not in kdcb.fasterai.__all__]), f"kdcb.fasterai lacks fasterai's {missing}"
    ns = {}
    exec('from kdcb.fasterai import *', ns)
    assert not (missing := [n for n in names if n not in ns]), missing


@pytest.mark.parametrize('name', fa_losses.__all__)
def test_each_loss_as_fasterais_function(name):
    "kdcb's class of the same name, with its defaults, gives fasterai's function's value, with the arguments the callback offers"
    from kdcb.distill import LossTerm
    g = torch.Generator().manual_seed(0)
    pred, tp, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    fs = {'a': torch.randn(8, 4, 6, 6, generator=g), 'b': torch.randn(8, 8, 3, 3, generator=g)}
    ft = {'x': torch.randn(8, 4, 6, 6, generator=g), 'y': torch.randn(8, 8, 3, 3, generator=g)}
    src = dict(pred=pred, teacher_pred=tp, target=y, fm_s=fs, fm_t=ft)
    torch.testing.assert_close(LossTerm(globals()[name])(**src), getattr(fa_losses, name)(**src), rtol=1e-5, atol=1e-6)


def test_get_module_by_name_as_fasterai():
    m = conv()
    learn = Learner(_dls(), m, loss_func=CrossEntropyLossFlat())
    for obj, path in [(m, '1'), (m, '3'), (learn, 'model.1'), (m, '1.weight')]:
        assert get_module_by_name(obj, path) is fa_distill.get_module_by_name(obj, path)
    assert fa_distill.get_module_by_name(m, '9') is None # fasterai's silent None ...
    with pytest.raises(AttributeError, match='Closest layer names'): get_module_by_name(m, '9') # ... is an error here
    with pytest.raises(AttributeError, match='Closest layer names'): get_module_by_name(learn, 'model.9')


def cnn(c):
    def block(i, o, s): return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, c, 1), block(c, 2 * c, 2), block(2 * c, 4 * c, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))


def test_match_feature_layers_as_fasterai():
    x = torch.randn(2, 3, 16, 16)
    s, t = cnn(4), cnn(8)
    assert dict(match_feature_layers(s, t, x)) == fa_distill.match_feature_layers(s, t, x) # blocks: the same pairs
    from torchvision.models import resnet18, resnet50
    s, t, x = resnet18(), resnet50(), torch.randn(1, 3, 64, 64)
    ours, theirs = match_feature_layers(s, t, x), fa_distill.match_feature_layers(s, t, x)
    # the same resolutions in the same order; at the first, kdcb takes the stage's output ('relu') where fasterai takes 'conv1'
    assert ours['student'][1:] == theirs['student'][1:] and ours['teacher'][1:] == theirs['teacher'][1:]
    assert (ours['student'][0], theirs['student'][0]) == ('relu', 'conv1')
    kd = KnowledgeDistillationCallback(t, Attention, ours['student'], ours['teacher']) # straight into the callback
    assert list(kd.activations_teacher) == ours['teacher']
