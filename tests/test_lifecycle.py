"What a fastai user does around a fit, and bad input: each test failed before the callback was rebuilt from its parts"
from functools import partial
import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from kdcb.all import *
from conftest import toy_dls, mlp, conv, quiet_fit


def n_hooks(*models): return sum(len(m._forward_hooks) for model in models for m in model.modules())


class Boom(Exception): pass


class BoomAt(Callback):
    "Raises in the given batch, after the distillation callback has hooked and moved everything"
    order = 7
    def __init__(self, at=2, exc=Boom): self.at, self.exc = at, exc
    def after_loss(self):
        if self.training and self.iter == self.at: raise self.exc('batch failed')


@pytest.mark.parametrize('exc', [Boom, KeyboardInterrupt])
def test_a_fit_that_raises_leaves_nothing_behind(dls, exc):
    "fit(cbs=...) that raises (also Ctrl-C): no hook on either model, teacher as before, loss parameters out of the optimizer"
    teacher, student = conv(8), conv()
    teacher.train(); teacher[1].weight.requires_grad_(False)
    conn = Connectors({'1': nn.Conv1d(4, 8, 1)})
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', Connected(FitNet(), conn)], ['1'], ['1'], weight=[.4, .1])
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat())
    learn.create_opt()
    n0 = len(learn.opt.param_lists[-1])
    with pytest.raises(exc): quiet_fit(learn, 1, cbs=[kd, BoomAt(2, exc)])
    assert n_hooks(student, teacher) == 0
    assert all(m.training for m in teacher.modules()) and [p.requires_grad for p in teacher.parameters()] == [False] + [True]*5
    assert len(learn.opt.param_lists[-1]) == n0
    assert kd not in learn.cbs and kd.columns not in learn.cbs


def test_the_teacher_learner_still_trains_after_a_failed_distillation(dls):
    "The teacher's own Learner can train after a distillation fit raised (before: 'element 0 of tensors does not require grad')"
    tl = Learner(dls, conv(8), loss_func=CrossEntropyLossFlat())
    kd = KnowledgeDistillationCallback(tl, 'soft_target')
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat(), cbs=kd) # attached for good: no detach on failure
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=BoomAt(1))
    before = [p.detach().clone() for p in tl.model.parameters()]
    quiet_fit(tl, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, tl.model.parameters()))


def test_one_callback_in_two_learners_is_refused(dls):
    kd = KnowledgeDistillationCallback(mlp(h=32))
    Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    with pytest.raises(ValueError, match='already attached to another Learner'):
        Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)


def test_teacher_in_float64(dls):
    "A float64 teacher trains a float32 student (before: fastai's Recorder failed on a float64 loss)"
    kd = KnowledgeDistillationCallback(mlp(h=32), 'soft_target', teacher_dtype=torch.float64)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=kd)
    assert learn.recorder.losses and all(torch.isfinite(torch.as_tensor(l)) for l in learn.recorder.losses)
    assert next(kd.teacher.model.parameters()).dtype == torch.float32


def test_fastai_readers_of_the_progress_table(dls, tmp_path):
    "valid_loss where ShowGraphCallback and plot_loss read it; SaveModelCallback can monitor a distillation column"
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=tmp_path)
    kd = KnowledgeDistillationCallback(mlp(h=32), 'soft_target')
    quiet_fit(learn, 2, cbs=kd)
    names, row = list(learn.recorder.metric_names), learn.recorder.values[-1]
    assert row[1] == pytest.approx(learn.validate()[0], rel=1e-5) # ShowGraphCallback plots values[i][1] as the validation loss
    assert names.index('valid_loss') - 1 == 1 and names[-4:] == ['accuracy', 'task_loss', 'soft_target', 'time']
    quiet_fit(learn, 2, cbs=[kd, SaveModelCallback(monitor='soft_target', comp=np.less, fname='best')])
    assert (tmp_path / 'models' / 'best.pth').exists()


@pytest.mark.parametrize('loss', ['soft_target', 'mutual', 'logits_distillation_loss', 'decoupled_kd', 'dist'])
@pytest.mark.parametrize('c_t', [1, 5])
def test_output_shapes_that_would_broadcast_are_an_error(dls, loss, c_t):
    "A 1-logit or 5-logit teacher for a 3-class student: an error naming both shapes, not a silent broadcast"
    kd = KnowledgeDistillationCallback(mlp(h=32, c=c_t), loss)
    with pytest.raises(ValueError, match=rf'Student logits \(32, 3\) and teacher logits \(32, {c_t}\)'):
        quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=kd)


def test_bad_weights_and_temperatures_are_refused_at_construction():
    from fastai.callback.schedule import SchedLin
    t = mlp(h=32)
    for w in (-0.1, float('nan'), SchedLin(0.5, 1.5), SchedLin(0.3, -0.2)):
        with pytest.raises(ValueError, match='each must lie in'): KnowledgeDistillationCallback(t, 'soft_target', weight=w)
    for make in (lambda: SoftTarget(T=0), lambda: LogitsDistillationLoss(temperature=0.), lambda: DecoupledKD(T=-1.),
                 lambda: DIST(T=lambda p: 1 - p)):
        with pytest.raises(ValueError, match='must be > 0'): make()


@pytest.mark.parametrize('bad, msg', [(lambda pred, teacher_pred: 0.5, 'returned 0.5'),
                                      (lambda pred, teacher_pred: None, 'returned None'),
                                      (lambda pred, teacher_pred: (pred.detach() - teacher_pred).pow(2).mean(), 'without gradient'),
                                      (lambda pred, teacher_pred: torch.tensor(1.), 'without gradient')])
def test_custom_losses_that_cannot_teach_are_named(dls, bad, msg):
    kd = KnowledgeDistillationCallback(mlp(h=32), bad)
    with pytest.raises((TypeError, ValueError), match=msg):
        quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=kd)


class RNN(nn.Module):
    def __init__(self, h): super().__init__(); self.rnn, self.head = nn.LSTM(1, h, batch_first=True), nn.Linear(h, 3)
    def forward(self, x): out, _ = self.rnn(x[..., None]); return self.head(out[:, -1])


def test_hooked_layer_returning_a_tuple(dls):
    "An LSTM's (output, state): the loss sees its first tensor, the hidden states (B, L, H)"
    seen = []
    def cos(out_s, out_t): seen.append(out_s.shape); return HiddenStateCosine()(out_s, out_t)
    kd = KnowledgeDistillationCallback(RNN(6), ['soft_target', cos], ['rnn'], ['rnn'])
    quiet_fit(Learner(dls, RNN(6), loss_func=CrossEntropyLossFlat()), 1, cbs=kd)
    assert seen and seen[0] == (32, 8, 6)


def test_rkd_on_a_last_batch_of_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65, 8, generator=g)
    ds = list(zip(x, (x[:, 0] > 0).long()))
    dls = DataLoaders(DataLoader(ds, bs=32), DataLoader(ds[:32], bs=32)) # 65 = 2·32 + 1: the last batch holds one sample
    learn = Learner(dls, mlp(c=2), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(mlp(h=32, c=2), 'rkd', ['1'], ['1']))
    assert all(torch.isfinite(torch.as_tensor(l)) for l in learn.recorder.losses)


def test_fasterai_partial_sets_hyper_parameters(dls):
    kd = KnowledgeDistillationCallback(mlp(h=32), partial(SoftTarget, T=2))
    assert kd.kd_loss.terms[0].loss.T == 2 and kd.column_names == ['task_loss', 'soft_target']
    quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=kd)
