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


class BoomBeforeFit(Callback):
    "Raises in `before_fit`, after the distillation callback (order 5) has set everything up"
    order = 20
    def before_fit(self): raise KeyboardInterrupt('stopped')


@pytest.mark.parametrize('how', ['fit(cbs=)', 'Learner(cbs=)'])
@pytest.mark.parametrize('exc', [Boom, KeyboardInterrupt, 'before_fit'])
def test_a_fit_that_raises_leaves_nothing_behind(dls, exc, how):
    "A fit that raises (also Ctrl-C, also in another callback's before_fit): no hook on either model, teacher as before, loss parameters out of the optimizer"
    teacher, student = conv(8), conv()
    teacher.train(); teacher[1].weight.requires_grad_(False)
    conn = Connectors({'1': nn.Conv1d(4, 8, 1)})
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', Connected(FitNet(), conn)], ['1'], ['1'], weight=[.4, .1])
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), cbs=kd if how == 'Learner(cbs=)' else None)
    learn.create_opt()
    n0 = len(learn.opt.param_lists[-1])
    boom = BoomBeforeFit() if exc == 'before_fit' else BoomAt(2, exc)
    spy = []
    class Spy(Callback): # records what the fit had set up, to be sure there was something to clean
        order = 8
        def before_batch(self): # after the distillation callback has hooked the student for this forward pass
            if not spy: spy.append((n_hooks(student), len(self.opt.param_lists[-1])))
    with pytest.raises(KeyboardInterrupt if exc == 'before_fit' else exc):
        quiet_fit(learn, 1, cbs=[boom, Spy()] + ([kd] if how == 'fit(cbs=)' else []))
    if exc != 'before_fit': assert spy == [(1, n0 + 2)] # student hooked, connector in the optimizer
    assert n_hooks(student, teacher) == 0
    assert all(m.training for m in teacher.modules()) and [p.requires_grad for p in teacher.parameters()] == [False] + [True]*5
    assert len(learn.opt.param_lists[-1]) == n0
    assert (kd in learn.cbs) == (how == 'Learner(cbs=)') == (kd.columns in learn.cbs) # the columns come and go with the callback
    if how == 'Learner(cbs=)': # still attached: the next fit distils as before
        quiet_fit(learn, 1)
        assert n_hooks(student, teacher) == 0 and len(learn.opt.param_lists[-1]) == n0
        assert all(v is not None for v in kd.averages())


def exportable(dls, bs=32, **kw):
    "The toy data as fastai `Datasets`, which `Learner.export` can empty (`kw`: for `dataloaders`, e.g. `shuffle=False`)"
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    items = list(dls.train.dataset) + list(dls.valid.dataset)
    n = len(dls.train.dataset)
    return Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(n, len(items)))]).dataloaders(bs=bs, **kw)


def test_the_wrappers_of_learner_are_installed_once_and_call_fastais(dls):
    "kdcb wraps `Learner._with_events` and `Learner.export` once, each calling fastai's; nothing is set on a Learner instance"
    import inspect
    from kdcb.callback import extend_learner
    assert Learner.export.kdcb and Learner._with_events.kdcb
    assert inspect.unwrap(Learner.export).__module__ == 'fastai.learner' and inspect.unwrap(Learner._with_events).__module__ == 'fastai.learner'
    before = (Learner.export, Learner._with_events)
    assert extend_learner() and (Learner.export, Learner._with_events) == before # a second call wraps nothing again
    kd = KnowledgeDistillationCallback(conv(8))
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 1)
    assert '_with_events' not in learn.__dict__ and 'export' not in learn.__dict__
    assert [c for c in learn.cbs if isinstance(c, LossColumns)] == [kd.columns] # attached with the callback
    learn.remove_cb(kd)
    assert not any(isinstance(c, LossColumns) for c in learn.cbs)


def test_the_fastai_code_the_wrappers_call_is_what_they_were_written_against():
    "Fails loudly when fastai changes `_with_events`, `fit` or `export`; settings.ini requires the fastai range kdcb tested"
    import fastai, inspect, configparser
    from pathlib import Path
    from packaging.version import Version
    from kdcb.callback import _FASTAI_TESTED, fastai_untested
    lo, hi = ('.'.join(map(str, v)) for v in _FASTAI_TESTED)
    assert Version(lo) <= Version(fastai.__version__) < Version(hi), fastai.__version__
    assert fastai_untested() == ''
    cfg = configparser.ConfigParser(); cfg.read(Path(__file__).parent.parent/'settings.ini')
    from packaging.requirements import Requirement
    fa = [Requirement(r) for r in cfg['DEFAULT']['requirements'].split() if Requirement(r).name == 'fastai']
    assert len(fa) == 1 and set(map(str, fa[0].specifier)) == {f'>={lo}', f'<{hi}'}, fa
    src = lambda f: inspect.getsource(inspect.unwrap(f)).strip()
    assert src(Learner._with_events) == (
        "def _with_events(self, f, event_type, ex, final=noop):\n"
        "        try: self(f'before_{event_type}');  f()\n"
        "        except ex: self(f'after_cancel_{event_type}')\n"
        "        self(f'after_{event_type}');  final()")
    fit = src(Learner.fit)
    assert "with self.added_cbs(cbs):" in fit and "self._with_events(self._do_fit, 'fit', CancelFitException, self._end_cleanup)" in fit
    assert list(inspect.signature(inspect.unwrap(Learner.export)).parameters) == ['self', 'fname', 'pickle_module', 'pickle_protocol']
    assert 'torch.save(self, ' in src(Learner.export)


def _fastais_own(monkeypatch):
    "Learner's two methods as fastai defines them, as before kdcb's import (put back after the test)"
    import inspect
    for name in ('export', '_with_events'): monkeypatch.setattr(Learner, name, inspect.unwrap(getattr(Learner, name)))


def test_an_untested_fastai_gets_one_warning_and_still_trains(dls, monkeypatch, tmp_path):
    "A fastai version kdcb was not tested with: one warning, fastai's methods left alone, and distillation trains as usual"
    import fastai, warnings
    from kdcb.callback import extend_learner
    _fastais_own(monkeypatch)
    monkeypatch.setattr(fastai, '__version__', '2.99.0')
    own = (Learner.export, Learner._with_events)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert extend_learner() is False
    assert len(w) == 1 and 'fastai 2.99.0 is outside the tested range' in str(w[0].message)
    assert (Learner.export, Learner._with_events) == own # not wrapped
    teacher, student = conv(8), conv()
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 2)
    assert learn.recorder.metric_names[-4:] == ['task_loss', 'soft_target', 'attention', 'time'] and all(v is not None for v in kd.averages())
    assert n_hooks(student, teacher) == 0
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=BoomAt(2)) # without the wrapper, the next fit cleans up
    quiet_fit(learn, 1)
    assert n_hooks(student, teacher) == 0 and all(m.training for m in teacher.modules())
    kd2 = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=[kd2, BoomAt(2)]) # fit(cbs=): cleaned up as fastai removes the callback
    assert n_hooks(student, teacher) == 0


@pytest.mark.parametrize('order', ['before kdcb', 'after kdcb'])
def test_wrappers_chain_with_another_librarys(dls, tmp_path, monkeypatch, order):
    "Another library wraps the same two methods, before or after kdcb: both wrappers run, in export and in a fit that raises"
    from kdcb.callback import extend_learner
    calls = []
    def other(name):
        prev = getattr(Learner, name)
        def wrapper(self, *a, **k): calls.append(name); return prev(self, *a, **k) # chains, but keeps no `__wrapped__`
        monkeypatch.setattr(Learner, name, wrapper)
    if order == 'before kdcb':
        _fastais_own(monkeypatch)
        other('export'); other('_with_events')
        assert extend_learner()
    else: other('export'); other('_with_events')
    teacher, student = conv(8), conv()
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    learn = Learner(exportable(dls), student, loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=kd)
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=BoomAt(2))
    assert n_hooks(student, teacher) == 0 and '_with_events' in calls # cleaned up at once: kdcb's wrapper ran too
    learn.export('m.pkl')
    assert 'export' in calls and b'kdcb' not in _exported_bytes(tmp_path/'m.pkl') and kd in learn.cbs


def _exported_bytes(path)->bytes:
    import zipfile
    with zipfile.ZipFile(path) as z: return b''.join(z.read(n) for n in z.namelist() if n.endswith('.pkl'))


def test_an_exported_learner_holds_nothing_of_kdcb(dls, tmp_path):
    "Every kdcb callback on the learner: the exported file names no kdcb class, and loads and predicts without kdcb"
    import subprocess, sys
    dls = exportable(dls)
    student = conv()
    cbs = [KnowledgeDistillationCallback(EMATeacher(student), 'soft_target'), MutualLearning(conv()), DeepSupervision(['1']), WeightLog()]
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=cbs)
    quiet_fit(learn, 1)
    learn.export('m.pkl')
    assert all(c in learn.cbs for c in cbs) # back on the learner after export
    assert b'kdcb' not in _exported_bytes(tmp_path/'m.pkl')
    code = ("import sys; sys.modules['kdcb'] = None\n" # any import of kdcb fails
            "import torch\nfrom fastai.learner import load_learner\n"
            f"l = load_learner({str(tmp_path/'m.pkl')!r})\n"
            "print(l.predict(torch.randn(8))[0])")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


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
    first = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    with pytest.raises(ValueError, match='attached to another Learner already'): Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    with pytest.raises(ValueError, match='attached to another Learner already'): quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=kd)
    quiet_fit(first, 1) # still the first learner's
    first.remove_cb(kd); quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=kd) # free again once removed


def test_a_bfloat16_teacher_comes_back_bit_identical(dls):
    "Before: the user's teacher came back float32 but with its weights rounded to bfloat16, also after a fit that raised"
    for boom in (None, BoomAt(1)):
        teacher = conv(8)
        with torch.no_grad(): teacher[1].weight.add_(1e-4 * torch.randn_like(teacher[1].weight)) # values bfloat16 cannot hold
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat())
        kd = KnowledgeDistillationCallback(FrozenTeacher(teacher, dtype=torch.bfloat16), ['soft_target', 'attention'], ['1'], ['1'])
        if boom is None: quiet_fit(learn, 1, cbs=kd)
        else:
            with pytest.raises(Boom): quiet_fit(learn, 1, cbs=[kd, boom])
        after = teacher.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
        assert n_hooks(teacher) == 0


def test_an_ensemble_weights_a_mean():
    "Before: weights=[2, 1] gave 2·z1 + z2 (three times sharper targets), and negative weights were accepted"
    t1, t2, x = nn.Linear(4, 3), nn.Linear(4, 3), torch.randn(5, 4)
    class Stub: model = nn.Linear(4, 3)
    ens = TeacherEnsemble([t1, t2], weights=[2, 1]); ens.enter(Stub())
    with torch.no_grad(): torch.testing.assert_close(ens((x,)), (2 * t1(x) + t2(x)) / 3)
    ens.exit()
    with pytest.raises(ValueError, match=r'weights=\[2, -1\] must be >= 0'): TeacherEnsemble([t1, t2], weights=[2, -1])
    with pytest.raises(ValueError, match='positive sum'): TeacherEnsemble([t1, t2], weights=[0, 0])


def test_teacher_in_float64(dls):
    "A float64 teacher trains a float32 student (before: fastai's Recorder failed on a float64 loss)"
    kd = KnowledgeDistillationCallback(FrozenTeacher(mlp(h=32), dtype=torch.float64), 'soft_target')
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


def test_losses_that_return_nan_are_named(dls):
    "NaN or inf from a loss is named: on the first batch of a fit, or at the end of the epoch where it appears; never per batch"
    def nan_from_start(pred, teacher_pred): return (pred - teacher_pred).pow(2).mean() * float('nan')
    kd = KnowledgeDistillationCallback(mlp(h=32), ['soft_target', nan_from_start])
    student = mlp()
    with pytest.raises(FloatingPointError, match=r"'nan_from_start' is not finite on the first training batch"):
        quiet_fit(Learner(dls, student, loss_func=CrossEntropyLossFlat()), 1, cbs=kd)
    assert n_hooks(student) == 0 and kd.teacher.model.training # nothing left behind
    calls = []
    def nan_later(pred, teacher_pred): # finite on the first batches, inf from the second epoch on
        calls.append(1)
        return (pred - teacher_pred).pow(2).mean() * (float('inf') if len(calls) > len(dls.train) else 1.)
    kd = KnowledgeDistillationCallback(mlp(h=32), nan_later, weight=0.1)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(FloatingPointError, match=r"'nan_later' (is|are) not finite in epoch 1"):
        quiet_fit(learn, 3, cbs=kd)
    assert len(learn.recorder.values) == 1 # the first epoch finished and was logged


def test_lr_find_is_not_stopped_by_a_diverging_loss(dls):
    "lr_find diverges on purpose and stops itself at the first loss that is not finite: the checks do not get in its way"
    calls = []
    def blows_up(pred, teacher_pred): # inf after 30 steps, at high learning rates
        calls.append(1)
        return (pred - teacher_pred).pow(2).mean() * (float('inf') if len(calls) > 30 else 1.)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=KnowledgeDistillationCallback(mlp(h=32), blows_up, weight=.1))
    with learn.no_bar(), learn.no_logging(): learn.lr_find(show_plot=False) # fastai's own NaN stop ends it, no FloatingPointError
    assert len(calls) > 30


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


# ---- fastai's tools with trainable loss parts: lr_find, save/load, export, resume ----
def _fitnet_kd(teacher):
    "FitNet through a connector: a loss part with parameters that train with the student"
    return KnowledgeDistillationCallback(teacher, ['soft_target', Connected(FitNet(), Connectors({'1': nn.Conv1d(4, 8, 1)}))],
                                         ['1'], ['1'], weight=[.4, .1])


@pytest.mark.parametrize('how', ['save_load', 'export'])
def test_fit_again_after_save_load_or_export(dls, tmp_path, how):
    "Before: KeyError 'Parameter containing' (the loaded optimizer had no state for the loss parameters)"
    dls = exportable(dls)
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    kd = _fitnet_kd(conv(8))
    quiet_fit(learn, 1, cbs=kd)
    if how == 'export': learn.export('s.pkl')
    else: learn.save('s', with_opt=True); learn.load('s', with_opt=True)
    quiet_fit(learn, 1, cbs=kd)
    assert learn.recorder.losses and all(torch.isfinite(torch.as_tensor(l)) for l in learn.recorder.losses)


def test_mixup_refuses_losses_that_need_labels(dls):
    from fastai.callback.mixup import MixUp, CutMix
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=r"MixUp mixes pairs of items.*\['decoupled_kd'\]"):
        quiet_fit(learn, 1, cbs=[MixUp(), KnowledgeDistillationCallback(mlp(h=32), ['soft_target', 'decoupled_kd'])])
    seen = []
    teacher = mlp(h=32)
    teacher.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    class Grab(Callback):
        order = 6
        def after_pred(self):
            if self.training: seen.append(('student', self.xb[0]))
    quiet_fit(learn, 1, cbs=[MixUp(), KnowledgeDistillationCallback(teacher, 'soft_target'), Grab()])
    assert torch.equal(seen[0], seen[1][1]) # the teacher labels the mixed batch the student sees


def test_a_teacher_learner_with_another_pipeline_is_named(tmp_path):
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter, Normalize
    items = list(toy_dls().train.dataset)
    def dls(after_batch=None):
        return Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(150)), list(range(150, 192))]).dataloaders(
            bs=32, after_batch=after_batch)
    tl = Learner(dls([Normalize(torch.full((1, 8), 2.), torch.full((1, 8), 3.))]), mlp(h=32), loss_func=CrossEntropyLossFlat())
    with pytest.warns(UserWarning, match="The teacher's Learner prepares its inputs with .*Normalize"):
        quiet_fit(Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=KnowledgeDistillationCallback(tl))
    with warnings_as_errors(): # the same pipeline: no warning
        quiet_fit(Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat()), 1,
                  cbs=KnowledgeDistillationCallback(Learner(dls(), mlp(h=32), loss_func=CrossEntropyLossFlat())))


def warnings_as_errors():
    import warnings
    w = warnings.catch_warnings(); w.__enter__(); warnings.simplefilter('error', UserWarning)
    class _Ctx:
        def __enter__(self): return self
        def __exit__(self, *a): w.__exit__(*a)
    return _Ctx()


class Seg(nn.Module):
    "Per-position classifier on (B, 8) inputs seen as (B, 1, 8): (B, 3, 8) logits, classes on axis 1"
    def __init__(self, w): super().__init__(); self.net = nn.Sequential(nn.Conv1d(1, w, 3, padding=1), nn.ReLU(), nn.Conv1d(w, 3, 1))
    def forward(self, x): return self.net(x[:, None])[..., None] # (B, 3, 8, 1): a 2-D segmentation map


def test_segmentation_logits_take_the_class_axis_from_the_task_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x > 0).long()[..., None] + (x > 1).long()[..., None] # (B, 8, 1) classes per position
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds[:48], bs=16, shuffle=True), DataLoader(ds[48:], bs=16))
    teacher, seen = Seg(8), []
    def grab(pred, teacher_pred, target): seen.append((pred.shape, target.shape)); return SoftTarget()(pred, teacher_pred, target)
    learn = Learner(dls, Seg(4), loss_func=CrossEntropyLossFlat(axis=1))
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(teacher, grab))
    assert seen[0] == ((16, 8, 1, 3), (16, 8, 1)) # classes moved last, positions match the targets
    learn = Learner(dls, Seg(4), loss_func=lambda p, t: F.cross_entropy(p, t))
    with pytest.raises(ValueError, match=r'say which axis holds the classes'):
        quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(teacher, 'soft_target'))
    # feature losses alone (e.g. on a detector's head maps) compare no classes: 4-D outputs need no class axis then
    learn = Learner(dls, Seg(4), loss_func=lambda p, t: F.cross_entropy(p, t))
    kd = KnowledgeDistillationCallback(Seg(4), 'fit_net', ['net.0'], ['net.0'])
    quiet_fit(learn, 1, cbs=kd)
    assert kd.averages()[1] > 0


class TokenModel(nn.Module):
    "(B, L) token ids -> (B, L, V) logits"
    def __init__(self, d, v=7): super().__init__(); self.emb, self.head = nn.Embedding(v, d), nn.Linear(d, v)
    def forward(self, x): return self.head(self.emb(x))


def test_label_free_losses_warn_once_when_the_target_masks_positions():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (64, 6), generator=g)
    y = x.clone(); y[:, :2] = -100 # a prompt: no loss there
    dls = DataLoaders(DataLoader(list(zip(x, y)), bs=16), DataLoader(list(zip(x, y)), bs=16))
    lf = CrossEntropyLossFlat(ignore_index=-100)
    with pytest.warns(UserWarning, match=r"\['logits_distillation_loss'\] take no target") as rec:
        quiet_fit(Learner(dls, TokenModel(4), loss_func=lf), 1, cbs=KnowledgeDistillationCallback(TokenModel(8), LogitsDistillationLoss(2.)))
    assert sum('take no target' in str(w.message) for w in rec) == 1 # once per fit, not per batch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        quiet_fit(Learner(dls, TokenModel(4), loss_func=lf), 1, cbs=KnowledgeDistillationCallback(TokenModel(8), SoftTarget(T=2)))


def test_export_and_cleanup_with_the_module_loaded_twice(dls, tmp_path):
    """`kdcb.callback` run a second time in one process (a notebook run of `05_callback` after `import kdcb`, or a reload):
    its callbacks are new classes, while `Learner.export` stays wrapped by the first run. Export still leaves them out and a
    fit that raises still cleans them up (before: the wrapper recognised only the first run's `FitCallback`, and the exported
    file held the callback and its teacher)"""
    import importlib.util, kdcb.callback
    spec = importlib.util.spec_from_file_location('kdcb.callback', kdcb.callback.__file__)
    again = importlib.util.module_from_spec(spec); spec.loader.exec_module(again) # not put in sys.modules: the first run stays
    assert again.FitCallback is not kdcb.callback.FitCallback and getattr(Learner.export, 'kdcb', False)
    dls = exportable(dls)
    student, teacher = conv(), conv(8)
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), path=tmp_path)
    kd = again.KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    learn.add_cb(kd)
    learn.export('m.pkl')
    assert b'kdcb' not in _exported_bytes(tmp_path/'m.pkl') and kd in learn.cbs
    with pytest.raises(Boom): learn.fit(1, cbs=BoomAt())
    assert n_hooks(student, teacher) == 0 # cleaned up by the wrapper although the fit raised
