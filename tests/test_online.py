"Lifecycle of the methods without a separate teacher: fits that raise, export, resume, other fastai callbacks"
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from kdcb.callback import KnowledgeDistillationCallback, FitCallback, LossColumns
from fastai.torch_core import find_bs
from kdcb.losses import SoftTarget, FitNet
from kdcb.online import EMATeacher, MutualLearning, DeepSupervision, born_again, teacher_chain, _EMAStep
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from conftest import toy_dls, mlp, conv, quiet_fit


def export_dls():
    "fastai Datasets (which `export` can empty), from the toy data"
    items = list(toy_dls().train.dataset)
    return Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(150)), list(range(150, 192))]).dataloaders(bs=32)


def exported_size(learn, path, name):
    learn.export(path/name)
    return (path/name).stat().st_size


class Boom(Exception): pass


class BoomAt(Callback):
    order = 7
    def __init__(self, at=2, exc=Boom): self.at, self.exc = at, exc
    def after_loss(self):
        if self.training and self.iter == self.at: raise self.exc('batch failed')


class Steps(Callback):
    order = 95
    def before_fit(self): self.n = 0
    def after_step(self): self.n += 1


def n_hooks(*models): return sum(len(m._forward_hooks) for model in models for m in model.modules())
def updaters(learn): return [c for c in learn.cbs if isinstance(c, _EMAStep)]
def learner(dls, model, cbs=None): return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)


# ---- EMATeacher

@pytest.mark.parametrize('exc', [Boom, KeyboardInterrupt])
def test_ema_fit_that_raises_leaves_no_updater(dls, exc):
    "fit(cbs=) that raises: the updater leaves the learner with the callback, and the average stopped where the fit did"
    s = conv(); ema = EMATeacher(s, .9)
    learn = learner(dls, s)
    with pytest.raises(exc): quiet_fit(learn, 1, cbs=[KnowledgeDistillationCallback(ema), BoomAt(2, exc)])
    assert updaters(learn) == [] and ema.n_updates == 2
    quiet_fit(learn, 1) # a plain fit afterwards does not move the average
    assert ema.n_updates == 2


def test_ema_in_learner_cbs_after_a_raise_counts_each_step_once(dls):
    "A callback given to Learner(cbs=): its one updater stays attached with it, through a fit that raised; removed with it"
    s = conv(); ema = EMATeacher(s, .9)
    learn = learner(dls, s, cbs=(kd := KnowledgeDistillationCallback(ema)))
    assert updaters(learn) == ema.callbacks()
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=BoomAt(2))
    assert updaters(learn) == ema.callbacks() and ema.n_updates == 2
    steps = Steps()
    quiet_fit(learn, 1, cbs=steps)
    assert ema.n_updates == 2 + steps.n and updaters(learn) == ema.callbacks()
    learn.remove_cb(kd)
    assert updaters(learn) == []


def test_ema_updates_once_per_optimizer_step_with_gradient_accumulation(dls):
    s = conv(); ema = EMATeacher(s, .9); steps = Steps()
    quiet_fit(learner(dls, s), 2, cbs=[KnowledgeDistillationCallback(ema), GradientAccumulation(64), steps])
    assert steps.n == 6 and ema.n_updates == steps.n # 12 batches of 32, a step every 64 samples


def test_ema_export_writes_the_student_alone(tmp_path):
    "The exported file is no bigger than a plain learner's by the size of the average; loaded, it predicts without it"
    dls = export_dls()
    s = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 3)); ema = EMATeacher(s, .9)
    kd = KnowledgeDistillationCallback(ema)
    learn = learner(dls, s, cbs=kd)
    quiet_fit(learn, 1)
    size = exported_size(learn, tmp_path, 'kd.pkl')
    learn.remove_cb(kd)
    plain = exported_size(learn, tmp_path, 'plain.pkl')
    assert size < plain + sum(p.numel() * 4 for p in s.parameters()) / 10, (size, plain)
    l2 = load_learner(tmp_path/'kd.pkl')
    assert not any(type(c).__module__.startswith('kdcb') for c in l2.cbs) and updaters(l2) == [] # the callback stays out of the file
    l2.predict(dls.valid_ds[0][0])


def test_ema_resumes_across_fits_and_pickles_alone(dls, tmp_path):
    "A second fit continues the average; the source pickles without the learner or the updater"
    s = conv(); ema = EMATeacher(s, .9)
    learn = learner(dls, s)
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(ema))
    quiet_fit(learn, 1, cbs=KnowledgeDistillationCallback(ema))
    assert ema.n_updates == 12
    torch.save(ema, tmp_path/'ema.pt')
    e2 = torch.load(tmp_path/'ema.pt', weights_only=False)
    assert e2.n_updates == 12 and e2._step is None
    x = torch.randn(4, 8)
    torch.testing.assert_close(e2((x,)), ema((x,)))


def test_ema_teacher_layers_are_hooked_for_feature_losses(dls):
    s = conv(); ema = EMATeacher(s, .9)
    kd = KnowledgeDistillationCallback(ema, ['soft_target', FitNet()], ['1'], ['1'], weight=[.3, .2])
    quiet_fit(learner(dls, s), 1, cbs=kd)
    assert n_hooks(s, ema.model) == 0 and ema.n_updates == 6


def test_ema_moves_towards_the_student_not_away(dls):
    "After training, the average lies between its start and the student (decay 0.5: close to the student)"
    s = conv(); ema = EMATeacher(s, .5, warmup=False)
    w0 = ema.model[-1].weight.clone()
    quiet_fit(learner(dls, s), 2, cbs=KnowledgeDistillationCallback(ema, weight=0.))
    d_ema, d_start = (ema.model[-1].weight - s[-1].weight).norm(), (w0 - s[-1].weight).norm()
    assert d_ema < 0.5 * d_start


# ---- MutualLearning

@pytest.mark.parametrize('in_learner', [False, True])
@pytest.mark.parametrize('exc', [Boom, KeyboardInterrupt])
def test_mutual_fit_that_raises_leaves_the_optimizer_as_it_was(dls, exc, in_learner):
    ml = MutualLearning([conv(), mlp()])
    learn = learner(dls, conv(), cbs=ml if in_learner else None); learn.create_opt()
    n0 = len(learn.opt.param_lists[-1])
    with pytest.raises(exc): quiet_fit(learn, 1, cbs=[BoomAt(2, exc)] + ([] if in_learner else [ml]))
    assert len(learn.opt.param_lists[-1]) == n0 and (ml in learn.cbs) == in_learner and (ml.columns in learn.cbs) == in_learner


def test_mutual_export_writes_the_learners_model_alone(tmp_path):
    dls = export_dls()
    peer = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 3))
    ml = MutualLearning(peer)
    learn = learner(dls, conv(), cbs=ml)
    quiet_fit(learn, 1)
    size = exported_size(learn, tmp_path, 'ml.pkl')
    learn.remove_cb(ml)
    assert size < exported_size(learn, tmp_path, 'plain.pkl') + sum(p.numel() * 4 for p in peer.parameters()) / 10
    l2 = load_learner(tmp_path/'ml.pkl')
    assert not any(type(c).__module__.startswith('kdcb') for c in l2.cbs) # the callback and its peers stay out of the file
    l2.predict(dls.valid_ds[0][0])
    learn.add_cb(ml)
    pl = ml.peer_learner(1)
    pl.export(tmp_path/'p.pkl')
    assert sum(p.numel() for p in load_learner(tmp_path/'p.pkl').model.parameters()) == sum(p.numel() for p in peer.parameters())


def test_mutual_with_gradient_accumulation_trains_every_student(dls):
    a, b = conv(), conv()
    wa, wb = a[-1].weight.clone(), b[-1].weight.clone()
    quiet_fit(learner(dls, a), 1, cbs=[MutualLearning(b), GradientAccumulation(64)])
    assert not torch.equal(a[-1].weight, wa) and not torch.equal(b[-1].weight, wb)


def test_mutual_with_weight_zero_trains_each_student_as_alone(dls):
    "weight=0: the peer's gradient never reaches the learner's model: same weights as a plain run (SGD, same batches)"
    from fastai.optimizer import SGD
    from fastai.torch_core import set_seed
    def run(cbs):
        set_seed(0); m = mlp()
        l = Learner(toy_dls(), m, loss_func=CrossEntropyLossFlat(), opt_func=SGD)
        set_seed(1); quiet_fit(l, 1, cbs=cbs)
        return m[0].weight
    torch.testing.assert_close(run([MutualLearning(mlp(), weight=0.)]), run([]))


def test_mutual_peers_follow_train_and_eval_modes(dls):
    peer = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.5))
    class Modes(Callback):
        order = 20
        def after_pred(self): self.seen = getattr(self, 'seen', set()) | {(self.training, peer.training)}
    m = Modes()
    quiet_fit(learner(dls, mlp()), 1, cbs=[MutualLearning(peer), m])
    assert m.seen == {(True, True), (False, False)}


def test_mutual_one_callback_for_three_students_has_columns_per_peer(dls):
    learn = learner(dls, conv(), cbs=MutualLearning([conv(), conv(6)]))
    quiet_fit(learn, 1)
    names = learn.recorder.metric_names
    assert [n for n in names if n.startswith(('peer', 'cohort'))] == ['peer1_valid_loss', 'peer1_accuracy', 'peer2_valid_loss',
                                                                     'peer2_accuracy', 'cohort_accuracy']
    row = dict(zip(names[1:], learn.recorder.values[-1]))
    assert all(0 <= row[n] <= 1 for n in ('peer1_accuracy', 'peer2_accuracy', 'cohort_accuracy'))


# ---- DeepSupervision

@pytest.mark.parametrize('exc', [Boom, KeyboardInterrupt])
def test_deep_supervision_fit_that_raises_leaves_nothing_behind(dls, exc):
    m = conv(); learn = learner(dls, m); learn.create_opt()
    n0 = len(learn.opt.param_lists[-1])
    with pytest.raises(exc): quiet_fit(learn, 1, cbs=[DeepSupervision(['1', '3']), BoomAt(2, exc)])
    assert n_hooks(m) == 0 and len(learn.opt.param_lists[-1]) == n0


def test_deep_supervision_probe_leaves_batchnorm_statistics_alone(dls):
    m = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    ds = DeepSupervision(['2'])
    ds.build_heads(learner(dls, m))
    assert m[1].num_batches_tracked == 0 and m.training


def test_deep_supervision_export_and_resume(tmp_path):
    dls = export_dls()
    m = conv(); ds = DeepSupervision(['1', '3'])
    learn = learner(dls, m, cbs=ds)
    quiet_fit(learn, 1)
    state = {k: v.clone() for k, v in ds.state_dict()['heads'].items()}
    quiet_fit(learn, 1) # the same heads keep training in a second fit
    assert any(not torch.equal(state[k], v) for k, v in ds.state_dict()['heads'].items())
    learn.export(tmp_path/'m.pkl')
    l2 = load_learner(tmp_path/'m.pkl')
    assert set(l2.model.state_dict()) == set(conv().state_dict()) and n_hooks(l2.model) == 0
    l2.predict(dls.valid_ds[0][0])


def test_deep_supervision_heads_get_the_formula(dls):
    "One head, weight 0.4, T=2, aux_weight 0.5: loss_grad = CE(z) + 0.5·[(0.6·CE(a) + 0.4·T²·KL(σ(z/T) ‖ σ(a/T)))]"
    m = conv(); ds = DeepSupervision(['3'], T=2., weight=.4, aux_weight=.5)
    class Grab(Callback):
        order = 20
        def after_loss(self):
            if self.training and self.iter == 0:
                x = self.xb[0]
                ds.hooks.collecting = False # recompute without storing again
                with torch.no_grad(): f = m[:4](x); z = m(x); a = ds.heads[0](f)
                ds.hooks.collecting = True
                self.got = (self.learn.loss_grad.detach().clone(), z, a, self.yb[0])
    g = Grab()
    learn = learner(dls, m)
    quiet_fit(learn, 1, cbs=[ds, g])
    lg, z, a, y = g.got
    # the weights were not stepped yet at iter 0's after_loss: recomputing from the same weights gives the same outputs
    kl = F.kl_div(F.log_softmax(a / 2, -1), F.softmax(z / 2, -1), reduction='batchmean') * 4
    want = F.cross_entropy(z, y) + .5 * (.6 * F.cross_entropy(a, y) + .4 * kl)
    torch.testing.assert_close(lg, want, rtol=1e-4, atol=1e-5)


# ---- generations

def test_born_again_ensemble_teaches_with_all_previous_generations(dls):
    g = born_again(lambda: conv(), dls, 3, epochs=1, ensemble=True, seed=0)
    assert list(g.table.taught_by) == ['labels', 'generation 1', 'generations 1-2']
    assert all(n_hooks(l.model) == 0 and all(p.requires_grad for p in l.model.parameters()) for l in g.learners)


def test_born_again_from_a_given_teacher(dls):
    g = born_again(lambda: conv(), dls, 2, epochs=1, teacher=conv(8))
    assert list(g.table.taught_by) == ['teacher', 'generation 1'] and 'accuracy' in g.table.columns


def test_generations_refuse_nothing_to_train(dls):
    with pytest.raises(ValueError, match='at least one'): born_again(conv, dls, 0)


# ---- mixed precision (bf16 autocast on the CPU, as fastai's MixedPrecision does on CUDA)

class CPUAutocast(Callback):
    order = 10
    def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
    def after_loss(self): self.ac.__exit__(None, None, None)


class Dtypes(Callback):
    order = 6
    def before_fit(self): self.seen, self.losses = set(), []
    def after_loss(self):
        if not self.training: return
        self.losses.append(float(self.learn.loss_grad))
        ml = getattr(self.learn, 'mutual_learning', None)
        if ml is not None: self.seen.add(ml.peer_preds[0].dtype)


@pytest.mark.parametrize('make_cb', [lambda: MutualLearning(conv()), lambda: DeepSupervision(['1', '3']),
                                     lambda: None])
def test_under_bf16_autocast_the_losses_stay_finite(dls, make_cb):
    s = conv()
    cb = make_cb() or KnowledgeDistillationCallback(EMATeacher(s, .9))
    d = Dtypes()
    quiet_fit(learner(dls, s), 1, cbs=[cb, CPUAutocast(), d])
    assert d.losses and all(torch.isfinite(torch.tensor(d.losses)))
    if isinstance(cb, MutualLearning): assert d.seen == {torch.bfloat16} # the peer ran inside the autocast


# ---- fastai's tools: lr_find, export then fit again

@pytest.mark.parametrize('which', ['ema', 'mutual', 'deep'])
def test_lr_find_leaves_the_average_peers_and_heads_as_they_were(dls, which):
    import fastai.callback.schedule # Learner.lr_find
    s = conv()
    if which == 'ema': src = EMATeacher(s, .9); cb = KnowledgeDistillationCallback(src); parts = lambda: [src.model]
    elif which == 'mutual': peer = conv(); cb = MutualLearning(peer); parts = lambda: [peer]
    else: cb = DeepSupervision(['1', '3']); parts = lambda: [cb.heads]
    learn = learner(dls, s, cbs=cb)
    quiet_fit(learn, 1)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in parts()]
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=20, show_plot=False)
    for m, b in zip(parts(), before):
        for k, v in m.state_dict().items(): torch.testing.assert_close(v, b[k], rtol=0, atol=0)
    if which == 'ema': assert src.n_updates == 6
    quiet_fit(learn, 1) # and training goes on


@pytest.mark.parametrize('which', ['mutual', 'deep'])
def test_fit_again_after_export(which, tmp_path):
    "export saves and reloads the optimizer's state in a plain dict: the peers or heads rejoin it in the next fit"
    dls = export_dls()
    cb = MutualLearning(conv()) if which == 'mutual' else DeepSupervision(['1', '3'])
    learn = learner(dls, conv(), cbs=cb)
    quiet_fit(learn, 1)
    learn.export(tmp_path/'m.pkl')
    before = [p.detach().clone() for m in cb.trained().values() for p in m.parameters()]
    quiet_fit(learn, 1)
    after = [p.detach() for m in cb.trained().values() for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) # they trained: they rejoined the optimizer


# ---- a new online callback: a FitCallback subclass with its own events only

class Shadow(FitCallback):
    "The worked example of 09_online: a small model trained alongside the learner's from its softened predictions"
    order = 5
    def __init__(self, shadow): self.shadow, self.columns = shadow, LossColumns(['shadow_kl'])
    def trained(self): return {'shadow': self.shadow}
    def after_loss(self):
        if not self.training: return
        kl = SoftTarget(T=2.)(self.shadow(*self.xb), self.pred.detach())
        self.set_loss(self.learn.loss_grad + kl)
        self.columns.accumulate(kl.detach()[None], find_bs(self.yb))


def test_a_subclass_with_its_own_events_gets_the_whole_lifecycle(tmp_path):
    "Device and dtype, the optimizer for the fit only, lr_find leaving it as it was, state_dict, columns, export without it"
    import warnings
    import fastai.callback.schedule
    dls = export_dls()
    sh = Shadow(nn.Linear(8, 3).double()) # a float64 shadow for a float32 model: it follows the model
    learn = learner(dls, conv(), cbs=sh); learn.path = tmp_path
    learn.create_opt(); n0 = len(learn.opt.param_lists[-1])
    quiet_fit(learn, 2)
    assert sh.shadow.weight.dtype == torch.float32 and len(learn.opt.param_lists[-1]) == n0
    assert learn.recorder.metric_names[-2:] == ['shadow_kl', 'time'] and sh.averages()[0] > 0
    before = {k: v.clone() for k, v in sh.shadow.state_dict().items()}
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
        warnings.simplefilter('ignore'); learn.lr_find(num_it=3, show_plot=False, suggest_funcs=None)
    assert all(torch.equal(before[k], v) for k, v in sh.shadow.state_dict().items()) # lr_find put it back
    state = sh.state_dict()
    assert set(state) == {'shadow', 'optimizer'} and len(state['optimizer']) == 2 # weight and bias, with their Adam state
    sh2 = Shadow(nn.Linear(8, 3)); sh2.load_state_dict(state)
    assert torch.equal(sh2.shadow.weight, sh.shadow.weight) and sh2.parts.saved == state['optimizer']
    learn.export('m.pkl')
    assert sh in learn.cbs and not any(isinstance(c, FitCallback) for c in load_learner(tmp_path/'m.pkl').cbs)
