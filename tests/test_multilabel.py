"Multi-label and detection-style losses: independent formulas, gradients, masks, and a run with a BCEWithLogitsLossFlat learner"
import pytest, torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.distributions import Bernoulli, kl_divergence
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat
from kdcb.all import *
from kdcb.multilabel import SigmoidKD, binary_kl
from kdcb.detection import DetectionHeadKD, ImportanceFeatureKD
from conftest import quiet_fit

torch.set_num_threads(1)


def test_registered():
    assert {'sigmoid_kd', 'detection_head_kd', 'importance_feature_kd'} <= set(available_losses())
    assert isinstance(get_loss('sigmoid_kd'), SigmoidKD)


@pytest.mark.parametrize('T', [1., 3.])
def test_sigmoid_kd_matches_bernoulli_kl(T):
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64) * 4
    ref = kl_divergence(Bernoulli(logits=t / T), Bernoulli(logits=s / T)) # torch's own Bernoulli KL
    y = torch.randint(0, 2, (4, 3, 6)).double()
    y[0] = -100; y[2, 1, :3] = -100
    keep = y != -100
    torch.testing.assert_close(SigmoidKD(T=T)(s, t, y), ref[keep].mean() * T**2)
    torch.testing.assert_close(SigmoidKD(T=T)(s, t), ref.mean() * T**2)
    # as binary cross-entropy to the teacher's soft labels, less their entropy
    pt = torch.sigmoid(t / T)
    bce = F.binary_cross_entropy_with_logits(s / T, pt, reduction='none') - F.binary_cross_entropy(pt, pt, reduction='none')
    torch.testing.assert_close(SigmoidKD(T=T)(s, t), bce.mean() * T**2)


def test_sigmoid_kd_gradcheck_and_masked_gradient():
    torch.manual_seed(1)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    y = torch.ones(5, 4, dtype=torch.float64); y[1] = -100
    assert gradcheck(lambda z: SigmoidKD(T=2.)(z, t, y), (s,))
    g, = torch.autograd.grad(SigmoidKD(T=2.)(s, t, y), s)
    assert (g[1] == 0).all() and (g[0] != 0).all() # masked labels get no gradient
    assert torch.isfinite(binary_kl(torch.tensor([-100., 100.]), torch.tensor([100., -100.]))).all()


def test_sigmoid_kd_bad_target():
    with pytest.raises(ValueError, match='multi-hot'): SigmoidKD()(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='differ in shape'): SigmoidKD()(torch.randn(4, 3), torch.randn(4, 2))


def test_detection_head_independent():
    torch.manual_seed(2)
    B, K, N = 3, 2, 7
    s, t = torch.randn(B, N, 4 + K, dtype=torch.float64), torch.randn(B, N, 4 + K, dtype=torch.float64) * 3
    # written out position by position
    box_terms, cls_terms = [], []
    for b in range(B):
        for n in range(N):
            pt = torch.sigmoid(t[b, n, 4:])
            cls_terms += [kl_divergence(Bernoulli(logits=t[b, n, 4 + k] / 2), Bernoulli(logits=s[b, n, 4 + k] / 2)) for k in range(K)]
            if pt.max() >= .3:
                d = (s[b, n, :4] - t[b, n, :4]).abs()
                box_terms.append(torch.where(d < .5, .5 * d**2 / .5, d - .25).mean())
    ref = 0.7 * torch.stack(cls_terms).mean() * 4 + 2. * torch.stack(box_terms).mean()
    loss = DetectionHeadKD(K, T=2., fg_threshold=.3, beta=.5, cls_weight=.7, box_weight=2., dim=-1, cls_norm='mean')
    torch.testing.assert_close(loss(s, t), ref)
    x = s.clone().requires_grad_()
    assert gradcheck(lambda z: loss(z, t), (x,))
    # the default 'fg': the class terms summed and divided by the number of foreground positions, as a detector's loss
    fg_ref = 0.7 * torch.stack(cls_terms).sum() * 4 / len(box_terms) + 2. * torch.stack(box_terms).mean()
    fg_loss = DetectionHeadKD(K, T=2., fg_threshold=.3, beta=.5, cls_weight=.7, box_weight=2., dim=-1)
    torch.testing.assert_close(fg_loss(s, t), fg_ref)
    assert gradcheck(lambda z: fg_loss(z, t), (x,))


def test_detection_head_background_gets_no_box_gradient():
    s = torch.randn(1, 6, 3, requires_grad=True)
    t = torch.randn(1, 6, 3); t[0, 4:, 0] = 10.; t[0, 4:, 1:] = -10. # only position 0 is foreground
    g, = torch.autograd.grad(DetectionHeadKD(2, cls_weight=0.)(s, t), s)
    assert (g[0, :4, 0] != 0).all() and (g[0, :4, 1:] == 0).all()


def test_importance_feature_independent():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 3, 5, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    ref = 0.
    for b in range(2):
        a = t[b].abs()
        sp = torch.exp(a.mean(0) / .7); sp = 15 * sp / sp.sum()          # (3, 5)
        ch = torch.exp(a.mean((1, 2)) / .7); ch = 4 * ch / ch.sum()     # (4,)
        ref = ref + (ch[:, None, None] * sp * (s[b] - t[b])**2).sum()
    torch.testing.assert_close(ImportanceFeatureKD(T=.7)(s, t), ref / s.numel())
    x = s.clone().requires_grad_()
    assert gradcheck(lambda z: ImportanceFeatureKD(T=.7)(z, t), (x,))


def test_importance_feature_every_pyramid_level():
    "Applied to every layer pair, as the callback does: the sum over the levels"
    fs = {'p3': torch.randn(2, 4, 8, 8), 'p4': torch.randn(2, 4, 4, 4)}
    ft = {'q3': torch.randn(2, 4, 8, 8), 'q4': torch.randn(2, 4, 4, 4)}
    term = LossTerm(ImportanceFeatureKD())
    torch.testing.assert_close(term(fm_s=fs, fm_t=ft), ImportanceFeatureKD()(fs['p3'], ft['q3']) + ImportanceFeatureKD()(fs['p4'], ft['q4']))


def test_sigmoid_kd_with_bce_learner():
    "A multi-label learner distils with SigmoidKD through the callback; the loss column is reported"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 0] + x[:, 2] > 0], 1).float()
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds[:96], bs=32, shuffle=True, drop_last=True), DataLoader(ds[96:], bs=32))
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    kd = KnowledgeDistillationCallback(teacher, SigmoidKD(T=2.))
    learn = Learner(dls, nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)), loss_func=BCEWithLogitsLossFlat(), cbs=kd)
    quiet_fit(learn, 1)
    task, sig = kd.averages()
    assert kd.column_names == ['task_loss', 'sigmoid_kd'] and sig > 0 and task > 0
