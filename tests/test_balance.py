"Balanced weights: RatioBalance, UncertaintyBalance and GradNorm against their formulas, in the callback's columns, trained, saved and reloaded"
import math, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.schedule import SchedLin
from kdcb.all import *
from kdcb.distill import Balancer, RatioBalance, UncertaintyBalance, GradNorm
from conftest import toy_dls, mlp, quiet_fit

torch.set_num_threads(1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_()
    t, y = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3, torch.randint(0, 5, (8,), generator=g)
    return s, t, y


def test_default_balancer_is_the_fixed_mix():
    s, t, y = _batch()
    task = F.cross_entropy(s, y)
    plain, _ = DistillationLoss(['logits', 'soft_target'], weight=[.2, .3])(task, pred=s, teacher_pred=t, target=y)
    bal, cols = DistillationLoss(['logits', 'soft_target'], weight=Balancer([.2, .3]))(task, pred=s, teacher_pred=t, target=y)
    torch.testing.assert_close(plain, bal)
    torch.testing.assert_close(cols[2:], torch.tensor([.5, .2, .3]))


def test_ratio_value_and_gradient():
    s, t, y = _batch(1)
    task = F.cross_entropy(s, y)
    kd = DistillationLoss(['logits', 'soft_target'], weight=RatioBalance([.1, .3]))
    assert kd.names == ['logits', 'soft_target', 'w_task', 'w_logits', 'w_soft_target'] and kd.loss_names == ['logits', 'soft_target']
    mixed, cols = kd(task, pred=s, teacher_pred=t, target=y)
    l1, l2 = Logits()(s, t, y), SoftTarget()(s, t, y)
    assert mixed.item() == pytest.approx(task.item(), rel=1e-6) # 0.6·task + 0.1·task + 0.3·task
    r1, r2 = (task / l1).item(), (task / l2).item()
    torch.testing.assert_close(cols, torch.tensor([l1.item(), l2.item(), .6, .1 * r1, .3 * r2]))
    g, = torch.autograd.grad(mixed, s, retain_graph=True)
    ref, = torch.autograd.grad(.6 * task + .1 * r1 * l1 + .3 * r2 * l2, s)
    torch.testing.assert_close(g, ref)


def test_ratio_scale_invariance():
    "A loss multiplied by 1000 gets the same gradient: the point of balancing"
    s, t, y = _batch(2)
    task = F.cross_entropy(s, y)
    big = lambda pred, teacher_pred: 1000 * (pred - teacher_pred).pow(2).mean()
    small = lambda pred, teacher_pred: (pred - teacher_pred).pow(2).mean()
    g = [torch.autograd.grad(DistillationLoss(f, weight=RatioBalance(.5))(task, pred=s, teacher_pred=t)[0], s, retain_graph=True)[0]
         for f in (big, small)]
    torch.testing.assert_close(g[0], g[1])


def test_ratio_loss_at_zero_is_finite():
    s, t, y = _batch(3)
    task = F.cross_entropy(s, y)
    mixed, cols = DistillationLoss('logits', weight=RatioBalance(.5))(task, pred=s, teacher_pred=s.detach(), target=y)
    assert torch.isfinite(mixed) and torch.isfinite(cols).all()


def test_uncertainty_formula_and_schedule():
    s, t, y = _batch(4)
    task = F.cross_entropy(s, y)
    kd = DistillationLoss(['logits', 'soft_target'], weight=UncertaintyBalance(SchedLin(0., .8), init=.5))
    kd.set_progress(.5) # prior weights 0.2 each, task 0.6
    mixed, cols = kd(task, pred=s, teacher_pred=t, target=y)
    l1, l2 = Logits()(s, t, y), SoftTarget()(s, t, y)
    e = math.exp(-.5)
    ref = .6 * (e * task + .5) + .2 * (e * l1 + .5) + .2 * (e * l2 + .5)
    assert mixed.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(cols[2:], torch.tensor([.6 * e, .2 * e, .2 * e]))


def test_uncertainty_learns_log_losses():
    "Minimising e^(-s)·L + s over s alone reaches s = log L"
    L = torch.tensor([0.5, 2., 8.])
    b = UncertaintyBalance(weight=[.3, .3])
    b.setup(2)
    opt = torch.optim.Adam(b.parameters(), lr=.05)
    for _ in range(2000):
        opt.zero_grad(); b(L[0], [L[1], L[2]], [.3, .3])[0].backward(); opt.step()
    torch.testing.assert_close(b.log_vars.detach(), L.log(), atol=1e-2, rtol=0)


def test_balancers_in_the_callback():
    "Weights in the progress columns; the learned log-variances train with the student and save with the callback's state"
    dls = toy_dls()
    teacher = mlp()
    kd = KnowledgeDistillationCallback(teacher, ['logits', 'soft_target'], weight=UncertaintyBalance(.5))
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 2, lr=1e-1)
    assert kd.column_names == ['task_loss', 'logits', 'soft_target', 'w_task', 'w_logits', 'w_soft_target']
    assert 'w_logits' in learn.recorder.metric_names
    lv = kd.kd_loss.balance.log_vars
    assert not torch.equal(lv.detach(), torch.zeros(3)) # trained
    avg = kd.averages()
    assert avg[3] == pytest.approx(.5 * math.exp(-lv[0].item()), rel=.3) # the columns average the weights over the epoch
    kd2 = KnowledgeDistillationCallback(teacher, ['logits', 'soft_target'], weight=UncertaintyBalance(.5))
    kd2.load_state_dict(kd.state_dict())
    torch.testing.assert_close(kd2.kd_loss.balance.log_vars, lv)
    assert not any(p is lv for p, *_ in learn.opt.all_params(with_grad=False)) # out of the optimizer after the fit

    kr = KnowledgeDistillationCallback(teacher, 'logits', weight=RatioBalance(.3))
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=kr)
    quiet_fit(learn, 1)
    task, logits, w_task, w_logits = kr.averages()
    assert w_task == pytest.approx(.7) and w_logits > 0


def test_gradnorm_reaches_the_gradient_shares():
    "On a fixed batch (every r_k = 1) the weighted gradient norms on W settle in the proportions of the weights, whatever the scales"
    torch.manual_seed(0)
    head = nn.Linear(4, 5)
    x, t, y = torch.randn(16, 4), torch.randn(16, 5), torch.randint(0, 5, (16,))
    big = lambda pred, teacher_pred: 1000 * (pred - teacher_pred).pow(2).mean() # a loss a thousand times too large
    kd = DistillationLoss(big, weight=GradNorm(.25, shared=head, lr=.02))
    for _ in range(1500):
        pred = head(x)
        _, cols = kd(F.cross_entropy(pred, y), pred=pred, teacher_pred=t)
    a = cols[1:]
    assert a.sum().item() == pytest.approx(1.)
    g = [torch.cat([q.flatten() for q in torch.autograd.grad(l, list(head.parameters()))]).norm()
         for l in (F.cross_entropy(head(x), y), big(head(x), t))]
    assert (a[1] * g[1] / (a[0] * g[0])).item() == pytest.approx(.25 / .75, rel=.1) # the distillation gradient a third of the task's
    assert a[1].item() < 1e-3 # reached by weighting the large loss down


def test_gradnorm_takes_no_step_without_gradients():
    "A batch whose losses do not move W (all gradient norms 0) leaves λ as it was"
    g = GradNorm(.5, shared=nn.Linear(2, 2))
    g.setup(1)
    g.lam.copy_(torch.tensor([.8, 1.2]))
    g.step([torch.tensor(1.), torch.tensor(2.)], torch.zeros(2), torch.tensor([.5, .5]))
    torch.testing.assert_close(g.lam, torch.tensor([.8, 1.2]))
    assert torch.isfinite(g.lam).all()


def test_gradnorm_in_the_callback():
    "Weights in the columns sum to 1; λ steps in training only, is no optimizer parameter, and saves with the callback"
    dls, teacher, student = toy_dls(), mlp(), mlp()
    kd = KnowledgeDistillationCallback(teacher, 'soft_target', weight=GradNorm(.5, shared=student[-1]))
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 2, lr=1e-2)
    assert kd.column_names == ['task_loss', 'soft_target', 'w_task', 'w_soft_target']
    _, _, w_task, w_st = kd.averages()
    assert w_task + w_st == pytest.approx(1., rel=1e-5)
    lam = kd.kd_loss.balance.lam.clone()
    assert not torch.equal(lam, torch.ones(2)) and list(kd.kd_loss.parameters()) == []
    learn.validate()
    torch.testing.assert_close(kd.kd_loss.balance.lam, lam) # validation batches do not step it
    kd2 = KnowledgeDistillationCallback(teacher, 'soft_target', weight=GradNorm(.5, shared=mlp()[-1]))
    kd2.load_state_dict(kd.state_dict())
    torch.testing.assert_close(kd2.kd_loss.balance.lam, lam)
    torch.testing.assert_close(kd2.kd_loss.balance.initial, kd.kd_loss.balance.initial)


@pytest.mark.parametrize('eps', [0, -1e-8, float('nan')])
def test_ratio_balance_refuses_a_non_positive_eps(eps):
    "Before: eps=0 was taken, and a distillation loss at 0 made the factor infinite at the first such batch"
    with pytest.raises(ValueError, match='eps=.* must be > 0'): RatioBalance(0.5, eps=eps)


@pytest.mark.parametrize('kw', [dict(alpha=-1.), dict(alpha=float('inf')), dict(alpha=float('nan')), dict(alpha='1.5'),
                                dict(lr=0), dict(lr=-0.025), dict(lr=float('nan')), dict(lr=True)])
def test_gradnorm_refuses_bad_alpha_and_lr(kw):
    "Before: a negative alpha or lr was taken, and the weights moved the wrong way without a word"
    (name, v), = kw.items()
    with pytest.raises(ValueError, match=f'{name}='): GradNorm(0.5, shared=nn.Linear(2, 2), **kw)


def test_gradnorm_takes_the_papers_values():
    g = GradNorm(0.5, shared=nn.Linear(2, 2), alpha=0, lr=0.025)
    assert (g.alpha, g.lr) == (0, 0.025)
