"Regression and adversarial tests of KnowledgeDistillationCallback (the notebook documents the basics)"
import pickle, warnings
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
import fastai.callback.schedule  # Learner.fit_one_cycle
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from kdcb.all import *
from conftest import toy_dls, mlp, conv, digits_dls, quiet_fit


def n_hooks(*models): return sum(len(m._forward_hooks) for model in models for m in model.modules())


class Probe(Callback):
    "Runs after the distillation callback and records what the teacher and the stored activations look like"
    order = 6
    def __init__(self, kd, teacher): self.kd, self.teacher, self.rows = kd, teacher, []
    def after_loss(self):
        if self.training: self.rows.append(dict(teacher_training=self.teacher.training, hooks=n_hooks(self.learn.model, self.teacher),
                                                 loss_grad=self.learn.loss_grad.detach()))
    def after_batch(self):
        if self.training: self.rows[-1].update(freed=self.kd.teacher_pred is None and all(
            h is None or all(k.stored is None for k in h.hooks) for h in (self.kd.student_hooks, self.kd.teacher_hooks)))


def test_one_teacher_forward_per_batch_with_two_losses(dls):
    teacher = conv(8)
    calls = []
    teacher.register_forward_pre_hook(lambda m, i: calls.append(1))
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'])
    learn = Learner(dls, conv(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 2, cbs=kd)
    assert len(calls) == 2 * len(dls.train)  # training batches only: validation does not run the teacher


def test_teacher_frozen_in_eval_and_restored(dls):
    teacher = mlp(h=32)
    teacher.train()
    teacher[0].weight.requires_grad_(False)  # a flag the user set must come back as it was
    before = [p.detach().clone() for p in teacher.parameters()]
    modes = []
    teacher.register_forward_pre_hook(lambda m, i: modes.append(any(c.training for c in m.modules())))
    kd = KnowledgeDistillationCallback(teacher, 'soft_target', weight=0.5)
    probe = Probe(kd, teacher)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=[kd, probe])
    assert modes and not any(modes) # in eval mode for its forward passes...
    assert probe.rows and all(r['teacher_training'] for r in probe.rows) # ...and only for them
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == [False, True, True, True]


def test_activations_freed_after_each_batch(dls):
    teacher = conv(8)
    kd = KnowledgeDistillationCallback(teacher, 'attention', ['1', '3'], ['1', '3'])
    probe = Probe(kd, teacher)
    quiet_fit(Learner(dls, conv(), loss_func=CrossEntropyLossFlat()), 1, cbs=[kd, probe])
    assert probe.rows and all(r['freed'] for r in probe.rows)
    assert all(r['hooks'] == 0 for r in probe.rows) # hooks exist during the forward passes only: none is left at `after_loss`


class Boom(Exception): pass


def test_hooks_cleaned_after_an_exception_and_a_second_fit(dls):
    teacher, student = mlp(h=32), mlp()
    n = [0]
    def flaky(fm_s, fm_t):
        n[0] += 1
        if n[0] == 3: raise Boom('third batch')
        return sum((s - t[:, :s.shape[1]]).pow(2).mean() for s, t in zip(fm_s.values(), fm_t.values()))
    kd = KnowledgeDistillationCallback(teacher, flaky, ['0', '2'], ['0', '2'])
    probe = Probe(kd, teacher)
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), cbs=[kd, probe])
    with pytest.raises(Boom): quiet_fit(learn, 1)
    assert n_hooks(teacher) == 0 and teacher.training # the teacher is never left hooked or in eval mode
    assert n_hooks(student) == 0 # fastai skipped after_fit, but `cleanup` ran as the exception left the fit
    probe.rows.clear()
    quiet_fit(learn, 1)          # the next fit hooks again: the loss sees the maps of every batch
    assert probe.rows and n[0] == 3 + len(dls.train) and all(r['hooks'] == 0 for r in probe.rows)
    assert n_hooks(student, teacher) == 0
    assert teacher.training  # mode restored to what it was (train)
    assert all(p.requires_grad for p in teacher.parameters())


def test_fit_twice_and_remove_callback(dls):
    teacher = mlp(h=32)
    kd = KnowledgeDistillationCallback(teacher)
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 1); quiet_fit(learn, 1)
    assert [c for c in learn.cbs if isinstance(c, LossColumns)] == [kd.columns] # attached with the callback, once
    assert list(learn.recorder.metric_names).count('soft_target') == 1
    learn.remove_cb(kd)
    assert kd not in learn.cbs and kd.columns not in learn.cbs


def test_loss_columns_are_epoch_averages(dls):
    "The progress table's task/distillation columns are the per-sample averages of what was mixed"
    torch.manual_seed(0)
    teacher = mlp(h=32)
    seen = []
    def l1(pred, teacher_pred):
        v = (pred - teacher_pred).abs().mean(); seen.append((v.item(), pred.shape[0])); return v
    kd = KnowledgeDistillationCallback(teacher, [l1, 'soft_target'], weight=[.2, .3])
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    quiet_fit(learn, 2, cbs=kd)
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'task_loss', 'l1', 'soft_target', 'time']
    last = learn.recorder.values[-1]
    per_epoch = len(dls.train)
    ep2 = seen[per_epoch:]
    expected = sum(v * b for v, b in ep2) / sum(b for _, b in ep2)
    assert last[names.index('l1') - 1] == pytest.approx(expected, rel=1e-5)
    assert len(last) == len(names) - 2  # recorder values exclude 'epoch' and 'time'


def test_valid_loss_is_plain_task_loss_unless_asked(dls):
    torch.manual_seed(0)
    teacher, student = mlp(h=32), mlp()
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(teacher, weight=0.5))
    plain = learn.validate()[0]
    kd = KnowledgeDistillationCallback(teacher, weight=0.5)
    with_kd = learn.validate(cbs=kd)[0]
    assert with_kd == pytest.approx(plain)
    mixed = learn.validate(cbs=KnowledgeDistillationCallback(teacher, weight=0.5, distill_valid=True))[0]
    x, y = map(torch.cat, zip(*list(dls.valid)))
    with torch.no_grad():
        p, t = student(x), teacher(x)
    # validate averages per batch weighted by size; recompute batchwise the same way
    exp = sum(len(xb) * (0.5 * F.cross_entropy(student(xb), yb) + 0.5 * SoftTarget()(student(xb), teacher(xb))).item()
              for xb, yb in dls.valid) / len(x)
    assert mixed == pytest.approx(exp, rel=1e-5) and mixed != pytest.approx(plain)


def test_gradient_accumulation_divides_the_mixed_loss_once(dls):
    "With GradientAccumulation the gradients equal those of the mixed loss over the accumulated batches"
    torch.manual_seed(0)
    teacher = mlp(h=32)
    def grads(cbs):
        torch.manual_seed(1)
        student = mlp()
        d = DataLoaders(DataLoader(list(dls.train.dataset)[:64], bs=32), DataLoader(list(dls.valid.dataset), bs=32))
        learn = Learner(d, student, loss_func=CrossEntropyLossFlat(), lr=0., wd=0., moms=(0, 0, 0), opt_func=lambda p, lr: __import__('fastai.optimizer', fromlist=['SGD']).SGD(p, lr))
        g = {}
        class Grab(Callback):
            order = 100
            def before_step(self): g['w'] = [p.grad.clone() for p in student.parameters()]
        quiet_fit(learn, 1, lr=0., cbs=cbs + [Grab()])
        return g['w'], student
    acc, student = grads([KnowledgeDistillationCallback(teacher, weight=.5), GradientAccumulation(64)])
    torch.manual_seed(1)
    ref_student = mlp()
    xs, ys = map(torch.stack, zip(*list(dls.train.dataset)[:64]))
    loss = 0.5 * F.cross_entropy(ref_student(xs), ys) + 0.5 * SoftTarget()(ref_student(xs), teacher(xs).detach())
    ref = torch.autograd.grad(loss, list(ref_student.parameters()))
    for a, r in zip(acc, ref): torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


class TwoInputs(nn.Module):
    def __init__(self, h):
        super().__init__(); self.a, self.b, self.head = nn.Linear(4, h), nn.Linear(4, h), nn.Linear(h, 3)
    def forward(self, x1, x2): return self.head(torch.relu(self.a(x1) + self.b(x2)))


def test_multi_input_models():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(128, 4, generator=g), torch.randn(128, 4, generator=g)
    y = (x1[:, 0] + x2[:, 1] > 0).long() + (x1[:, 2] > 1).long()
    ds = list(zip(x1, x2, y))
    dls = DataLoaders(DataLoader(ds[:96], bs=16, shuffle=True), DataLoader(ds[96:], bs=16))
    teacher, seen = TwoInputs(32), []
    teacher.register_forward_pre_hook(lambda m, i: seen.append(len(i)))
    learn = Learner(dls, TwoInputs(8), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(teacher, ['soft_target', 'similarity'], ['a'], ['a']))
    assert seen and set(seen) == {2}


def test_export_leaves_the_teacher_out(tmp_path):
    items = list(toy_dls().train.dataset)
    dls = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(150)), list(range(150, 192))]).dataloaders(bs=32)
    big = nn.Sequential(nn.Linear(8, 2048), nn.ReLU(), nn.Linear(2048, 3))  # a teacher of about 90 kB
    kd = KnowledgeDistillationCallback(big, 'soft_target')
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=kd)
    quiet_fit(learn, 1)
    learn.export('with_kd.pkl')
    learn.remove_cb(kd)
    learn.export('plain.pkl')
    size_kd, size_plain = (tmp_path / 'with_kd.pkl').stat().st_size, (tmp_path / 'plain.pkl').stat().st_size
    teacher_bytes = sum(p.numel() * 4 for p in big.parameters())
    assert size_kd < size_plain + teacher_bytes / 10, (size_kd, size_plain, teacher_bytes)
    loaded = load_learner(tmp_path / 'with_kd.pkl')
    assert not any(type(c).__module__.startswith('kdcb') for c in loaded.cbs) # the callback stayed out of the file
    loaded.predict(items[0][0]); loaded.predict(items[1][0]) # inference needs no teacher


def test_errors_name_the_problem(dls):
    t = mlp(h=32)
    with pytest.raises(ValueError, match="Did you mean 'soft_target'"): KnowledgeDistillationCallback(t, 'softtarget')
    with pytest.raises(ValueError, match='2 student layers'): KnowledgeDistillationCallback(t, 'attention', ['0', '2'], ['0'])
    with pytest.raises(ValueError, match='or neither'): KnowledgeDistillationCallback(t, 'attention', ['0'])
    with pytest.raises(ValueError, match='more than once'): KnowledgeDistillationCallback(t, 'attention', ['0', '0'], ['0', '2'])
    with pytest.raises(AttributeError, match="teacher has no layer '0.weight'"): KnowledgeDistillationCallback(t, 'attention', ['0'], ['0.weight'])
    with pytest.raises(TypeError, match='nn.Module or a Learner'): KnowledgeDistillationCallback('resnet34')
    with pytest.warns(UserWarning, match='hooked for nothing'): KnowledgeDistillationCallback(t, 'soft_target', ['0'], ['0'])
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=r'\(here 1.3\) at most 1'): KnowledgeDistillationCallback(t, ['soft_target', SoftTarget(T=1)], weight=[.7, .6])
    with pytest.raises(ValueError, match='at pct_train=0.51'): # a schedule that goes above 1 is refused before training
        KnowledgeDistillationCallback(t, 'soft_target', weight=lambda p: p + .5)
    with pytest.raises(ValueError, match='has no map') as e: # attention on a linear layer: an error naming the pair
        quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(t, 'attention', ['0'], ['0']))
    assert "student '0' / teacher '0'" in ' '.join(getattr(e.value, '__notes__', [])) or "student '0' / teacher '0'" in str(e.value)
    with pytest.raises(ValueError, match='needs a scalar'):
        quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(t, lambda pred, teacher_pred: (pred - teacher_pred).pow(2)))
    assert n_hooks(learn.model, t) == 0


def test_trainable_loss_joins_the_optimizer_for_the_fit(dls):
    "A loss with parameters is trained with the student and leaves the optimizer afterwards"
    class Proj(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(16, 32)
        def forward(self, fm_s, fm_t): return sum((self.lin(s) - t).pow(2).mean() for s, t in zip(fm_s.values(), fm_t.values()))
    proj, t = Proj(), mlp(h=32)
    w0 = proj.lin.weight.detach().clone()
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    learn.create_opt()
    n0 = len(learn.opt.param_lists[-1])
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(t, proj, ['0'], ['0']), one_cycle=True)
    assert not torch.equal(w0, proj.lin.weight)
    assert len(learn.opt.param_lists[-1]) == n0


def test_distillation_moves_the_student_towards_the_teacher():
    "On real data (scikit-learn digits) SoftTarget ends closer to the teacher than the same student from scratch"
    dls = digits_dls()
    torch.manual_seed(0)
    tl = Learner(dls, mlp(64, 256, 10), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    quiet_fit(tl, 10, 3e-3, one_cycle=True)
    assert tl.validate()[1] > 0.9
    xv = torch.cat([x for x, _ in dls.valid])
    with torch.no_grad(): lt = F.log_softmax(tl.model.eval()(xv), 1)

    def kl_to_teacher(distil):
        torch.manual_seed(0)
        learn = Learner(dls, mlp(64, 16, 10), loss_func=CrossEntropyLossFlat())
        torch.manual_seed(0)
        quiet_fit(learn, 15, 1e-2, one_cycle=True, cbs=KnowledgeDistillationCallback(tl, 'soft_target', weight=0.9) if distil else None)
        with torch.no_grad(): ls = F.log_softmax(learn.model.eval()(xv), 1)
        return F.kl_div(ls, lt, log_target=True, reduction='batchmean').item()

    scratch, distilled = kl_to_teacher(False), kl_to_teacher(True)
    assert distilled < scratch, (distilled, scratch)


def test_fastai_schedules_as_weights_and_multiplier(dls):
    "combine_scheds times SchedLin (a fasterai-style multiplier) as one callable weight: the mixed loss follows both at every batch"
    from fastai.callback.schedule import combine_scheds, SchedCos, SchedLin, SchedNo
    torch.manual_seed(0)
    teacher, student = conv(8), conv()
    w, mult = combine_scheds([0.3, 0.7], [SchedCos(0., .6), SchedNo(.6, .6)]), SchedLin(1., .5)

    class Rec(Callback):
        order = 6
        def before_fit(self): self.rows = []
        def after_loss(self):
            if self.training: self.rows.append(dict(pct=self.pct_train, mixed=self.learn.loss_grad.detach(), pred=self.pred.detach(),
                                                    x=self.xb[0], y=self.yb[0], fs=student[:2](self.xb[0]).detach()))
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'attention'], ['1'], ['1'], weight=lambda p: w(p) * mult(p))
    rec = Rec()
    quiet_fit(Learner(dls, student, loss_func=CrossEntropyLossFlat()), 3, cbs=[kd, rec])
    assert len(rec.rows) == 3 * len(dls.train)
    for r in rec.rows[::4]:
        wt = w(r['pct']) * mult(r['pct'])
        with torch.no_grad():
            exp = ((1 - wt) * F.cross_entropy(r['pred'], r['y']) + wt / 2 * SoftTarget()(r['pred'], teacher(r['x']))
                   + wt / 2 * Attention()(r['fs'], teacher[:2](r['x'])))
        torch.testing.assert_close(r['mixed'], exp)


def test_mixed_loss_keeps_fastai_loss_type_and_gradients(dls):
    "The mixing runs on plain tensor views; the learner still sees the loss type fastai's loss function gave"
    from fastai.torch_core import TensorBase
    seen = []
    class Look(Callback):
        order = 7 # after the distillation callback (5) has mixed the loss
        def after_loss(self):
            if self.training: seen.append((type(self.learn.loss_grad), type(self.learn.loss), self.learn.loss_grad.requires_grad))
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    before = [p.detach().clone() for p in learn.model.parameters()]
    quiet_fit(learn, 1, cbs=[KnowledgeDistillationCallback(mlp(h=32), 'soft_target', weight=0.5), Look()])
    assert seen and all(s == (TensorBase, TensorBase, True) for s in seen), seen[:2]
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_teacher_runs_on_plain_tensors(dls):
    "fastai's tensor subclasses (TensorImage...) are unwrapped for the teacher: no `__torch_function__` per teacher op"
    from fastai.torch_core import TensorImage
    class Wrap(Callback):
        order = 4
        def before_batch(self): self.learn.xb = (TensorImage(self.xb[0]),)
    seen = []
    teacher = mlp(h=32)
    teacher.register_forward_pre_hook(lambda m, i: seen.append(type(i[0])))
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat())
    quiet_fit(learn, 1, cbs=[Wrap(), KnowledgeDistillationCallback(teacher, 'soft_target')])
    assert seen and set(seen) == {torch.Tensor}


def test_the_teachers_output_is_freed_before_the_backward_pass(dls):
    "The teacher's logits do not count towards the backward pass's memory: nothing holds them once the losses have run"
    import weakref
    refs = []
    class Teacher(nn.Module):
        def __init__(self): super().__init__(); self.net = mlp(h=32)
        def forward(self, x):
            out = self.net(x) * 1. # a tensor of the teacher's own, as a model returns
            refs.append(weakref.ref(out)); return out
    seen = []
    class AtBackward(Callback):
        order = 7 # after the distillation callback and GradientAccumulation
        def before_backward(self): seen.append((kd.teacher_pred, refs[-1]()))
    kd = KnowledgeDistillationCallback(Teacher(), ['soft_target', 'logits'], weight=[.3, .2])
    quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=[kd, AtBackward()])
    assert len(seen) == len(dls.train) and all(p is None and r is None for p, r in seen)


def test_the_current_weights_are_public(dls):
    "`current_weights` (each loss's) and `current_weight` (their sum) follow the schedule, as fasterai's `current_weight` does"
    from fastai.callback.schedule import SchedLin
    import kdcb.fasterai
    seen = []
    class Read(Callback):
        order = 6
        def after_loss(self):
            if self.training: seen.append((self.pct_train, kd.current_weights, kd.current_weight))
    kd = KnowledgeDistillationCallback(mlp(h=32), ['soft_target', 'logits'], weight=SchedLin(0., .6))
    quiet_fit(Learner(dls, mlp(), loss_func=CrossEntropyLossFlat()), 1, cbs=[kd, Read()])
    for pct, ws, w in seen:
        assert ws == pytest.approx([0.3 * pct, 0.3 * pct]) and w == pytest.approx(0.6 * pct)
    fk = kdcb.fasterai.KnowledgeDistillationCallback(mlp(h=32), kdcb.fasterai.SoftTarget, weight=0.4)
    assert fk.current_weight == pytest.approx(0.4) and fk.weight == 0.4


@pytest.mark.parametrize('kw, where', [(dict(shift_labels=True), 'outputs=Outputs(shift_labels=...)'),
                                       (dict(attention_mask=1), 'outputs=Outputs(attention_mask=...)'),
                                       (dict(output_fn=lambda o: o), 'outputs=Outputs(output_fn=...)'),
                                       (dict(teacher_dtype=torch.bfloat16), 'FrozenTeacher(teacher, dtype=...)'),
                                       (dict(teacher_device='cpu'), 'FrozenTeacher(teacher, device=...)'),
                                       (dict(teacher_weights=[1, 2]), 'TeacherEnsemble(teachers, weights=...)'),
                                       (dict(ensemble_weights=[1, 2]), 'TeacherEnsemble(teachers, weights=...)'),
                                       (dict(feature_teacher=1), 'TeacherEnsemble(teachers, feature_index=...)'),
                                       (dict(feature_index=1), 'TeacherEnsemble(teachers, feature_index=...)'),
                                       (dict(cache_teacher=True), 'CachedTeacher(teacher)'),
                                       (dict(activations_student=['0']), 'student_layers='),
                                       (dict(schedule=lambda p: p), 'weight=lambda pct_train: w * schedule(pct_train)')])
def test_the_old_constructors_arguments_point_to_where_they_went(kw, where):
    with pytest.raises(TypeError) as e: KnowledgeDistillationCallback(mlp(h=32), 'soft_target', **kw)
    msg = str(e.value)
    assert f'no longer takes {list(kw)[0]!r}' in msg and where in msg and 'unexpected keyword' not in msg
    with pytest.raises(TypeError, match='unexpected keyword'): KnowledgeDistillationCallback(mlp(h=32), bogus=1) # other names: Python's error
