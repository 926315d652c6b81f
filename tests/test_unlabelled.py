"Unlabelled-data distillation: the task loss sees labelled items only, the distillation loss sees every item"
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from kdcb.all import *
from kdcb.examples import cnn1d
from kdcb.data import tensor_dls, UNLABELLED, add_unlabelled, LabelledOnly
from conftest import quiet_fit

torch.set_num_threads(1)


def kl_items(s, t, T):  # KL(σ(t/T) ‖ σ(s/T)) per item, written out independently of kdcb
    pt = F.softmax(t / T, -1)
    return (pt * (pt.log() - F.log_softmax(s / T, -1))).sum(-1)


def test_sentinel_is_not_the_losses_ignore_index():
    assert UNLABELLED != SoftTarget().ignore_index  # else SoftTarget would leave the unlabelled items out


def test_add_unlabelled_appends_with_sentinel():
    x, y, xu = torch.randn(5, 3, 7), torch.arange(5), torch.randn(9, 3, 7)
    xa, ya = add_unlabelled(x, y, xu)
    assert torch.equal(xa, torch.cat([x, xu])) and ya.dtype == y.dtype
    assert ya[:5].tolist() == list(range(5)) and (ya[5:] == UNLABELLED).all() and len(ya) == 14
    with pytest.raises(ValueError, match='do not match'): add_unlabelled(x, y, torch.randn(9, 3, 6))
    with pytest.raises(ValueError, match='pass another'): add_unlabelled(x, torch.tensor([0, 1, -1, 3, 4]), xu)


@pytest.mark.parametrize('n_lab', [1, 5, 12])
def test_task_loss_ignores_unlabelled_items(n_lab):
    g = torch.Generator().manual_seed(n_lab)
    pred, y = torch.randn(12, 10, generator=g), torch.randint(0, 10, (12,), generator=g)
    lab = torch.randperm(12, generator=g)[:n_lab]
    target = torch.full_like(y, UNLABELLED); target[lab] = y[lab]
    expected = sum(F.cross_entropy(pred[i:i + 1], y[i:i + 1]) for i in lab.tolist()) / n_lab  # item by item
    assert torch.allclose(LabelledOnly()(pred, target), expected, atol=1e-6)
    # whatever the model predicts for unlabelled items changes nothing
    pred2 = pred.clone(); unl = target == UNLABELLED; pred2[unl] = torch.randn(int(unl.sum()), 10) * 50
    assert torch.allclose(LabelledOnly()(pred2, target), expected, atol=1e-6)


def test_all_unlabelled_batch_is_finite_zero_with_a_gradient():
    p = torch.randn(4, 10, requires_grad=True)
    l = LabelledOnly()(p, torch.full((4,), UNLABELLED))
    assert torch.isfinite(l) and l.item() == 0
    l.backward()
    assert p.grad is not None and (p.grad == 0).all()
    # the bare cross entropy would give nan here: the reason for the wrapper
    assert torch.isnan(F.cross_entropy(p.detach(), torch.full((4,), -100)))


class Grab(Callback):
    "Keeps the batch, predictions and mixed loss of the first training batch"
    order = 7  # after KnowledgeDistillationCallback (5) has mixed the loss
    def after_loss(self):
        if self.training and not hasattr(self, 'xb_'):
            self.xb_, self.yb_, self.pred_, self.loss_ = self.xb[0].clone(), self.yb[0].clone(), self.pred.detach().clone(), self.learn.loss_grad.detach().clone()


def _one_batch(target_fn, w=0.5, T=2., loss=None):
    set_seed(0)
    teacher, student = cnn1d(6).eval(), cnn1d(3)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    xa, ya = add_unlabelled(x[:8], y[:8], x[8:])
    ya = target_fn(ya)
    dls = tensor_dls(xa, ya, x[:16], y[:16], bs=32)
    grab = Grab()
    kd = KnowledgeDistillationCallback(teacher, loss=loss or SoftTarget(T=T), weight=w)
    learn = Learner(dls, student, loss_func=LabelledOnly(), cbs=[kd, grab])
    quiet_fit(learn, 1, lr=0.)
    with torch.no_grad(): t = teacher(grab.xb_)
    return grab, t


def test_mixed_loss_covers_every_item():
    "The callback's loss on a mixed batch is (1 − w)·CE over labelled items + w·T²·KL averaged over ALL items"
    g, t = _one_batch(lambda y: y)
    lab = g.yb_ != UNLABELLED
    assert 0 < lab.sum() < len(lab)
    expected = 0.5 * F.cross_entropy(g.pred_[lab], g.yb_[lab]) + 0.5 * 4 * kl_items(g.pred_, t, 2.).mean()
    assert torch.allclose(g.loss_, expected, rtol=1e-5)
    only_labelled = 0.5 * F.cross_entropy(g.pred_[lab], g.yb_[lab]) + 0.5 * 4 * kl_items(g.pred_[lab], t[lab], 2.).mean()
    assert not torch.allclose(g.loss_, only_labelled, rtol=1e-3)  # the check above can tell the two apart


def test_minus_100_sentinel_would_hide_unlabelled_items_from_distillation():
    "Why the sentinel is -1: SoftTarget leaves out ignore_index (-100) items, so they would carry no loss at all"
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.tensor([1, 2, -100, -100, -100, -100])
    assert torch.allclose(SoftTarget(T=2)(s, t, y), 4 * kl_items(s[:2], t[:2], 2.).mean(), rtol=1e-5)
    y1 = y.masked_fill(y == -100, UNLABELLED)
    assert torch.allclose(SoftTarget(T=2)(s, t, y1), 4 * kl_items(s, t, 2.).mean(), rtol=1e-5)


def test_all_unlabelled_batch_through_the_callback():
    g, t = _one_batch(lambda y: torch.full_like(y, UNLABELLED), w=0.3)
    assert torch.isfinite(g.loss_)
    assert torch.allclose(g.loss_, 0.3 * 4 * kl_items(g.pred_, t, 2.).mean(), rtol=1e-5)


def test_label_losses_on_labelled_items_only():
    "DecoupledKD needs labels: with ignore_index=UNLABELLED it uses the labelled items of the batch alone"
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.tensor([3, -1, -1, 0, 9, -1, -1, -1])
    k = y != -1
    assert torch.allclose(DecoupledKD(T=4, beta=2, ignore_index=UNLABELLED)(s, t, y), DecoupledKD(T=4, beta=2)(s[k], t[k], y[k]), rtol=1e-5)
    g, tt = _one_batch(lambda y: y, loss=DecoupledKD(T=2, beta=2, ignore_index=UNLABELLED))
    lab = g.yb_ != UNLABELLED
    expected = 0.5 * F.cross_entropy(g.pred_[lab], g.yb_[lab]) + 0.5 * DecoupledKD(T=2, beta=2)(g.pred_[lab], tt[lab], g.yb_[lab])
    assert torch.allclose(g.loss_, expected, rtol=1e-5)


def test_unlabelled_items_alone_pull_the_student_to_the_teacher():
    "Training on unlabelled items only (no labels at all) lowers the student's KL to the teacher on held-out inputs"
    set_seed(0)
    teacher, student = cnn1d(8).eval(), cnn1d(4)
    x = torch.randn(512, 40)
    xa, ya = add_unlabelled(x[:0], torch.zeros(0, dtype=torch.long), x[:384])
    assert (ya == UNLABELLED).all()
    xv = x[384:]
    def kl():
        student.eval()
        with torch.no_grad(): return kl_items(student(xv), teacher(xv), 1.).mean().item()
    before = kl()
    learn = Learner(tensor_dls(xa, ya, xv, torch.zeros(len(xv), dtype=torch.long), bs=64), student, loss_func=LabelledOnly(),
                    cbs=KnowledgeDistillationCallback(teacher, loss=SoftTarget(T=1), weight=1.))
    quiet_fit(learn, 5, lr=1e-2)
    assert kl() < 0.5 * before


def test_get_preds_decodes_through_the_wrapper():
    set_seed(0)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    xa, ya = add_unlabelled(x[:16], y[:16], x[16:48])
    learn = Learner(tensor_dls(xa, ya, x[48:], y[48:], bs=16), cnn1d(3), loss_func=LabelledOnly())
    with learn.no_bar():
        probs, targ, dec = learn.get_preds(with_decoded=True)
    assert torch.allclose(probs.sum(-1), torch.ones(16), atol=1e-5)  # softmax applied, as for CrossEntropyLossFlat
    assert torch.equal(dec, probs.argmax(-1)) and torch.equal(targ, y[48:])


def test_pickled_labelled_only_is_the_loss_it_wraps():
    "Pickled (as `export` does), `LabelledOnly` is its task loss: the file needs no kdcb; copies in memory keep the wrapper"
    import copy, pickle
    lo = LabelledOnly(nn.CrossEntropyLoss(label_smoothing=0.1))
    back = pickle.loads(pickle.dumps(lo))
    assert type(back) is nn.CrossEntropyLoss and back.label_smoothing == 0.1
    for c in (copy.copy(lo), copy.deepcopy(lo)): assert type(c) is LabelledOnly and c.label == UNLABELLED
    assert copy.deepcopy(lo).loss_func is not lo.loss_func


def test_loaded_loss_refuses_unlabelled_items_loudly():
    "Training the loaded learner again on unlabelled items fails at once, never silently: the cross entropy refuses −1"
    import pickle
    back = pickle.loads(pickle.dumps(LabelledOnly()))
    with pytest.raises(IndexError, match='out of bounds'): back(torch.randn(4, 10), torch.tensor([1, UNLABELLED, 2, 3]))
    # labelled batches: the same loss as before pickling
    pred, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(back(pred, y), LabelledOnly()(pred, y))
    # a sentinel equal to the cross entropy's ignore_index: the unpickled loss gives the same answer on a mixed batch
    lo = LabelledOnly(label=-100)
    y2 = y.clone(); y2[::2] = -100
    assert torch.allclose(pickle.loads(pickle.dumps(lo))(pred, y2), lo(pred, y2))


def test_save_and_load_keep_the_learner_and_its_loss(tmp_path):
    "`learn.save`/`load` store weights only: the learner keeps `LabelledOnly` and resumes on unlabelled items"
    set_seed(0)
    x, y = torch.randn(96, 40), torch.randint(0, 10, (96,))
    xa, ya = add_unlabelled(x[:16], y[:16], x[16:64])
    dls = tensor_dls(xa, ya, x[64:], y[64:], bs=16)
    learn = Learner(dls, cnn1d(3), loss_func=LabelledOnly(), path=tmp_path)
    quiet_fit(learn, 1, lr=1e-2)
    learn.save('w')
    other = Learner(dls, cnn1d(3), loss_func=LabelledOnly(), path=tmp_path).load('w')
    assert all(torch.equal(a, b) for a, b in zip(learn.model.state_dict().values(), other.model.state_dict().values()))
    assert type(other.loss_func) is LabelledOnly and type(learn.loss_func) is LabelledOnly
    quiet_fit(other, 1, lr=1e-2)  # unlabelled items in every batch: no error
