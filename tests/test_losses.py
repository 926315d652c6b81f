"Losses: gradients, shapes and masks, dtypes, and a short distillation run with every registered loss on real data"
import math, time
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from kdcb.all import *
import fastai.callback.progress, fastai.callback.schedule # Learner.no_bar, Learner.fit_one_cycle
from fastai.callback.schedule import SchedLin
from fastai.torch_core import set_seed

torch.set_num_threads(1) # tiny tensors: threads only contend on a shared machine

OUTPUT = ['soft_target', 'logits', 'mutual', 'decoupled_kd', 'normalized_kd', 'logits_distillation_loss', 'mft_loss', 'dist']
FEATURE = ['attention', 'fit_net', 'activation_boundaries', 'similarity', 'rkd', 'pkt', 'hidden_state_cosine', 'mgd_loss']
LABELLED = {'decoupled_kd', 'normalized_kd', 'mft_loss'}

def test_registry_has_every_loss():
    assert set(OUTPUT + FEATURE) <= set(available_losses())
    for n in OUTPUT + FEATURE:
        if n != 'mgd_loss': assert isinstance(get_loss(n), ScheduledLoss), n
    with pytest.raises(TypeError): get_loss('mgd_loss') # channel counts are required, as in Model Optimizer

def test_modelopt_signatures():
    import inspect
    sig = lambda f: str(inspect.signature(f))
    assert sig(LogitsDistillationLoss.__init__) .startswith("(self, temperature: 'float | Callable' = 1.0, reduction: 'str' = 'batchmean'")
    assert list(inspect.signature(LogitsDistillationLoss.forward).parameters) == ['self', 'logits_s', 'logits_t']
    assert list(inspect.signature(MFTLoss.__init__).parameters)[:4] == ['self', 'temperature', 'threshold', 'reduction']
    assert list(inspect.signature(MFTLoss.forward).parameters) == ['self', 'logits_s', 'logits_t', 'labels']
    assert list(inspect.signature(MGDLoss.__init__).parameters) == ['self', 'num_student_channels', 'num_teacher_channels', 'alpha_mgd', 'lambda_mgd']
    assert list(inspect.signature(MGDLoss.forward).parameters) == ['self', 'out_s', 'out_t']
    # positional use as in Model Optimizer's examples
    l = LogitsDistillationLoss(2.0, 'sum'); assert (l.temperature, l.reduction) == (2.0, 'sum')
    m = MFTLoss(1.0, 0.3, 'mean'); assert (m.threshold, m.reduction) == (0.3, 'mean')
    g = MGDLoss(8, 16, 2.0, 0.5); assert (g.alpha_mgd, g.lambda_mgd) == (2.0, 0.5)

def test_no_swallowed_keywords():
    for cls in (SoftTarget, Logits, Mutual, DecoupledKD, NormalizedKD, LogitsDistillationLoss, MFTLoss, DIST,
                Attention, FitNet, ActivationBoundaries, Similarity, RKD, PKT, HiddenStateCosine):
        with pytest.raises(TypeError): cls(temprature=2.)

# ---- gradients ----
def _out_loss(name):
    return {'soft_target': SoftTarget(T=3.), 'logits': Logits(), 'mutual': Mutual(), 'decoupled_kd': DecoupledKD(),
            'normalized_kd': NormalizedKD(T=2.), 'logits_distillation_loss': LogitsDistillationLoss(2.),
            'mft_loss': MFTLoss(2.), 'dist': DIST(T=2.)}[name]

def _call_out(name, loss, s, t, y):
    if name in ('logits_distillation_loss',): return loss(s, t)
    return loss(s, t, y)

@pytest.mark.parametrize('name', OUTPUT)
@pytest.mark.parametrize('shape', [(5, 7), (2, 3, 6)])
def test_output_gradcheck(name, shape):
    torch.manual_seed(0)
    s = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1])
    y.view(-1)[1] = -100
    loss = _out_loss(name)
    assert _call_out(name, loss, s, t, y).dtype == torch.float64
    assert gradcheck(lambda s: _call_out(name, loss, s, t, y), (s,), eps=1e-6, atol=1e-5)

def _feat_loss(name):
    return {'attention': Attention(), 'fit_net': FitNet(), 'activation_boundaries': ActivationBoundaries(),
            'similarity': Similarity(), 'rkd': RKD(), 'pkt': PKT(), 'hidden_state_cosine': HiddenStateCosine()}[name]

@pytest.mark.parametrize('name', [n for n in FEATURE if n != 'mgd_loss'])
def test_feature_gradcheck(name):
    torch.manual_seed(0)
    shape = (4, 5, 6) if name == 'hidden_state_cosine' else (4, 3, 3, 3)
    s = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, dtype=torch.float64)
    loss = _feat_loss(name)
    assert gradcheck(lambda s: loss(s, t), (s,), eps=1e-6, atol=1e-5)

def test_fitnet_tokens_masked_gradcheck():
    "FitNet on (B, L, D) hidden states behind its regressor, with a ragged attention mask: float64 gradients; padding gets none"
    torch.manual_seed(0)
    fit = FitNet(3, 5, tokens=True).double()
    s = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert fit(s, t, mask).dtype == torch.float64
    assert gradcheck(lambda s: fit(s, t, mask), (s,), eps=1e-6, atol=1e-5)
    s.grad = None; fit(s, t, mask).backward()
    assert s.grad[0, 2:].abs().sum() == 0 and s.grad[0, :2].abs().sum() > 0

def test_mgd_gradcheck_and_mask_ratio():
    torch.manual_seed(0)
    mgd = MGDLoss(3, 4).double()
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    def f(s): torch.manual_seed(1); return mgd(s, t)
    assert gradcheck(f, (s,), eps=1e-6, atol=1e-5)
    # λ = 0 masks nothing; λ = 1 would mask everything (the generator would never see the student): refused
    with pytest.raises(ValueError, match=r'lambda_mgd=1.0 must lie in \[0, 1\)'): MGDLoss(4, 4, lambda_mgd=1.0)
    ident, x = MGDLoss(4, 4, lambda_mgd=0.0), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(ident(x, t.float()), F.mse_loss(ident.generation(x), t.float()))
    # about λ of the positions are masked
    torch.manual_seed(0)
    seen = []
    g = MGDLoss(4, 4, lambda_mgd=0.65)
    g.generation = nn.Identity()
    x = torch.ones(64, 4, 8, 8)
    g(x, torch.zeros_like(x)) # loss = fraction kept
    torch.manual_seed(0)
    kept = g(x, torch.zeros_like(x)).item()
    assert abs(kept - 0.35) < 0.03, kept

def test_teacher_gets_no_gradient():
    s = torch.randn(4, 6, requires_grad=True); t = torch.randn(4, 6, requires_grad=True); y = torch.randint(0, 6, (4,))
    for name in OUTPUT:
        _call_out(name, _out_loss(name), s, t, y).backward()
    fs = torch.randn(4, 3, 3, 3, requires_grad=True); ft = torch.randn(4, 3, 3, 3, requires_grad=True)
    for name in [n for n in FEATURE if n not in ('mgd_loss', 'hidden_state_cosine')]:
        _feat_loss(name)(fs, ft).backward()
    MGDLoss(3, 3)(fs, ft).backward()
    assert t.grad is None and ft.grad is None
    assert s.grad is not None and fs.grad is not None

# ---- shapes, masks, dtypes ----
@pytest.mark.parametrize('name', OUTPUT)
def test_output_sequence_mask(name):
    "(B, L, V) with -100 positions equals the loss on the kept positions only; all masked gives 0"
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 9), torch.randn(3, 5, 9)
    y = torch.randint(0, 9, (3, 5)); y[0, 2:] = -100; y[2, :] = -100
    keep = y != -100
    loss = _out_loss(name)
    if name == 'logits_distillation_loss': # no labels: the user masks 'none'
        l = LogitsDistillationLoss(2., 'none')(s, t)
        assert l.shape == (3, 5)
        torch.testing.assert_close(l[keep].mean(), LogitsDistillationLoss(2.)(s[keep], t[keep]))
        return
    torch.testing.assert_close(loss(s, t, y), loss(s[keep], t[keep], y[keep]))
    z = loss(s, t, torch.full_like(y, -100))
    assert z.item() == 0. and not torch.isnan(z)
    # the class dimension is the last one: a transposed input is a different problem, not the same loss
    assert loss(s, t, y).shape == ()

@pytest.mark.parametrize('name', OUTPUT)
def test_output_half_precision_finite(name):
    torch.manual_seed(0)
    s, t = (torch.randn(4, 3, 50)*30).half(), (torch.randn(4, 3, 50)*30).half()
    y = torch.randint(0, 50, (4, 3))
    l = _call_out(name, _out_loss(name), s, t, y)
    assert l.dtype == torch.float32 and torch.isfinite(l)
    l32 = _call_out(name, _out_loss(name), s.float(), t.float(), y)
    torch.testing.assert_close(l, l32)

def test_labelled_losses_need_labels():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    for loss in (DecoupledKD(), NormalizedKD()):
        with pytest.raises(ValueError, match='use SoftTarget instead'): loss(s, t)
        with pytest.raises(ValueError, match='use SoftTarget instead'): loss(s, t, torch.rand(4, 6)) # soft labels
        with pytest.raises(ValueError, match='does not match the logits'): loss(s, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match='differ in shape'): DecoupledKD()(s, t[:, :5], torch.zeros(4, dtype=torch.long))

def test_schedules():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    for sched, fixed in ((DecoupledKD(T=lambda p: 1 + 3*p), DecoupledKD(T=4.)), (DIST(T=lambda p: 1 + 3*p), DIST(T=4.)),
                         (LogitsDistillationLoss(lambda p: 1 + 3*p), LogitsDistillationLoss(4.)),
                         (NormalizedKD(T=lambda p: 1 + 3*p), NormalizedKD(T=4.))):
        sched.pct_train = 1.
        args = (s, t) if isinstance(fixed, LogitsDistillationLoss) else (s, t, y)
        torch.testing.assert_close(sched(*args), fixed(*args))
    ab, ab2 = ActivationBoundaries(margin=lambda p: 2*p), ActivationBoundaries(margin=1.)
    ab.pct_train = .5
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ab(fs, ft), ab2(fs, ft))

def test_dkd_against_mdistiller_formulation():
    "The reference code's cat-mask / −1000 formulation, written out"
    torch.manual_seed(0)
    s, t, y, T = torch.randn(16, 10)*2, torch.randn(16, 10)*2, torch.randint(0, 10, (16,)), 4.
    gt = F.one_hot(y, 10).bool()
    ps, pt = F.softmax(s/T, 1), F.softmax(t/T, 1)
    cat = lambda p: torch.stack([(p*gt).sum(1), (p*~gt).sum(1)], 1)
    bs, bt = cat(ps), cat(pt)
    tckd = F.kl_div(bs.log(), bt, reduction='sum') * T**2 / 16
    nckd = F.kl_div(F.log_softmax(s/T - 1000*gt, 1), F.softmax(t/T - 1000*gt, 1), reduction='sum') * T**2 / 16
    torch.testing.assert_close(DecoupledKD()(s, t, y), tckd + 8*nckd, rtol=1e-4, atol=1e-5)

def test_nkd_against_authors_formulation():
    "The authors' NKDLoss (yzd-v/cls_KD), written out with numpy"
    torch.manual_seed(0)
    s, t, y, T, g = torch.randn(8, 5).double()*2, torch.randn(8, 5).double()*2, torch.randint(0, 5, (8,)), 2., 1.5
    S, Tt = s.numpy(), t.numpy()
    sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    idx = np.arange(8)
    ys, wt = sm(S)[idx, y], sm(Tt)[idx, y]
    mask = np.zeros_like(S); mask[idx, y] = 1
    Ti, Si = sm((Tt - 1000*mask)/T), sm((S - 1000*mask)/T)
    npt, nps = Ti / (1 - Ti[idx, y])[:, None], Si / (1 - Si[idx, y])[:, None]
    npt[mask == 1], nps[mask == 1] = 0, 1
    ref = -(wt*np.log(ys)).mean() - g*T**2*(npt*np.log(nps)).sum(1).mean()
    assert abs(NormalizedKD(T=T, gamma=g)(s, t, y).item() - ref) < 1e-8

def test_mft_reductions_and_corrections():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)*3
    y = t.argmin(-1) # the teacher is always wrong
    q = mft_target(F.softmax(t, -1), y, 0.2)
    top_other = q.scatter(-1, y[..., None], -1.).max(-1).values
    torch.testing.assert_close(q.gather(-1, y[..., None])[..., 0] - top_other, torch.full((2, 4), 0.2))
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 4))
    none = MFTLoss(reduction='none')(s, t, y)
    torch.testing.assert_close(MFTLoss()(s, t, y), none.mean())
    torch.testing.assert_close(MFTLoss(reduction='sum')(s, t, y), none.sum())
    torch.testing.assert_close(MFTLoss(reduction='mean')(s, t, y), none.mean() / 6)
    with pytest.raises(ValueError, match='threshold'): MFTLoss(threshold=1.5)

@pytest.mark.parametrize('name', [n for n in FEATURE if n not in ('mgd_loss', 'hidden_state_cosine')])
def test_feature_shapes(name):
    "4-D maps (also channels_last and of different sizes), 3-D maps, several pairs summed"
    torch.manual_seed(0)
    loss = _feat_loss(name)
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)
    cl = a.contiguous(memory_format=torch.channels_last)
    l = loss(a, b)
    assert l.shape == () and torch.isfinite(l)
    torch.testing.assert_close(loss(cl, b), l)
    c, d = torch.randn(4, 3, 10), torch.randn(4, 3, 10)
    term = LossTerm(loss) # applies the loss of one pair to every layer pair, and adds the results
    torch.testing.assert_close(term(fm_s={'a': a, 'c': c}, fm_t={'b': b, 'd': d}), l + loss(c, d))
    with pytest.raises(ValueError, match='pair them one to one'): term(fm_s={'a': a, 'c': c}, fm_t={'b': b})

def test_channel_mismatch():
    a, b = torch.randn(4, 3, 4, 4), torch.randn(4, 8, 4, 4)
    for loss in (FitNet(), ActivationBoundaries()):
        with pytest.raises(ValueError, match='add a connector'): loss(a, b)
    fit = FitNet(3, 8)
    assert torch.isfinite(fit(a, b)) and torch.isfinite(fit(torch.randn(4, 3, 7), torch.randn(4, 8, 7)))
    with pytest.raises(ValueError, match='maps 3 student channels'): fit(b, b)
    with pytest.raises(ValueError, match='or neither'): FitNet(3)
    for loss in (Attention(), Similarity(), RKD(), PKT()): assert torch.isfinite(loss(a, b))

def test_relational_losses_are_invariant():
    "SP, RKD and PKT compare sample relations: an orthogonal rotation and (for RKD, PKT) a scale of the teacher change nothing"
    torch.manual_seed(0)
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    Q = torch.linalg.qr(torch.randn(8, 8)).Q
    for loss in (Similarity(), RKD(), PKT()):
        torch.testing.assert_close(loss(s, t @ Q), loss(s, t), rtol=1e-4, atol=1e-6)
    for loss in (RKD(), PKT()):
        torch.testing.assert_close(loss(s, 3*t), loss(s, t), rtol=1e-4, atol=1e-6)
    for loss in (Similarity(), RKD(), PKT(), FitNet(), HiddenStateCosine()):
        assert loss(t, t.clone()) < 1e-6

# ---- a real distillation run with every loss ----
def _digits(n_train=1400):
    from sklearn.datasets import load_digits
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)
    ds = list(zip(x[idx], y[idx]))
    return lambda: DataLoaders(DataLoader(ds[:n_train], bs=64, shuffle=True, drop_last=True), DataLoader(ds[n_train:], bs=256))

def cnn(c):
    "conv(c) → conv(2c, stride 2) → flatten → linear(32) → linear(10); '3' is a (B, 2c, 4, 4) map, '5' a (B, 32) embedding"
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2*c, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2*c*16, 32), nn.ReLU(), nn.Linear(32, 10))

@pytest.fixture(scope='module')
def digits_teacher():
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    set_seed(0)
    dls = _digits()
    learn = Learner(dls(), cnn(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 1e-2)
    acc = learn.validate()[1]
    assert acc > 0.9, acc
    return dls, learn.model

def _layers(name):
    if name in ('fit_net', 'activation_boundaries', 'hidden_state_cosine'): return ['5'], ['5'] # (B, 32) embeddings, pre-ReLU
    if name in FEATURE + ['fit_net_regressor']: return ['3'], ['3'] # (B, 16, 4, 4) vs (B, 32, 4, 4)
    return None, None

# unnormalised MSE losses are ~30x larger than the task loss at the start, and DecoupledKD (β·T² = 128) needs the
# linear warm-up of its authors: the weights below are the usual practice, not tuned to pass
WEIGHTS = dict(logits=0.1, fit_net=0.1, fit_net_regressor=0.1, decoupled_kd=SchedLin(0., 0.5))

@pytest.mark.parametrize('name', OUTPUT + FEATURE + ['fit_net_regressor'])
def test_distil_digits(digits_teacher, name):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    dls, teacher = digits_teacher
    set_seed(1) # also seeds `random`, which fastai's DataLoader shuffles with
    loss = {'mgd_loss': MGDLoss(16, 32), 'fit_net_regressor': FitNet(16, 32)}.get(name, name)
    trained = isinstance(loss, nn.Module)
    before = [p.detach().clone() for p in loss.parameters()] if trained else []
    sl, tl = _layers(name)
    learn = Learner(dls(), cnn(8), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher, loss, sl, tl, weight=WEIGHTS.get(name, 0.5))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2, cbs=kd)
    losses = [float(l) for l in learn.recorder.losses]
    assert all(math.isfinite(l) for l in losses), name
    task, kdl = kd.averages()
    assert math.isfinite(task) and math.isfinite(kdl), (name, task, kdl)
    acc = learn.validate()[1]
    assert acc > 0.5, (name, acc) # chance is 0.1
    if trained: # the generator / regressor trained with the student, and left the optimizer after the fit
        assert any(not torch.equal(b, p) for b, p in zip(before, loss.parameters()))
        ids = {id(p) for p in loss.parameters()}
        assert not any(id(p) in ids for p in learn.opt.all_params(with_grad=False).itemgot(0))

@pytest.mark.parametrize('name', ['soft_target', 'logits', 'logits_distillation_loss', 'dist'])
def test_distil_without_labels(digits_teacher, name):
    "Weight 1: the student learns from the teacher's outputs alone, so the loss must carry the teacher's knowledge"
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    dls, teacher = digits_teacher
    set_seed(2)
    learn = Learner(dls(), cnn(8), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher, name, weight=1.)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2, cbs=kd)
    assert learn.validate()[1] > 0.3, name # chance is 0.1; raw-logit MSE alone learns slowest (~0.45)

def test_degenerate_features_have_finite_gradients():
    "Duplicate samples, all-zero (dead ReLU) samples and constant batches must not give NaN losses or gradients"
    torch.manual_seed(0)
    s = torch.randn(5, 6); s[1] = s[0]; s[2] = 0
    t = torch.randn(5, 6); t[3] = t[4]
    for loss in (RKD(), PKT(), Similarity(), HiddenStateCosine(), FitNet(), ActivationBoundaries()):
        for a, b in ((s, t), (torch.zeros(4, 6), torch.zeros(4, 6)), (torch.ones(4, 6), torch.randn(4, 6))):
            a = a.clone().requires_grad_()
            l = loss(a, b)
            l.backward()
            assert torch.isfinite(l) and torch.isfinite(a.grad).all(), type(loss).__name__
    s4 = torch.zeros(3, 2, 4, 4, requires_grad=True)
    l = Attention()(s4, torch.randn(3, 2, 4, 4)); l.backward()
    assert torch.isfinite(l) and torch.isfinite(s4.grad).all()


def test_loss_names_follow_one_convention():
    "Every registered loss class is registered under the snake_case of its CamelCase name (acronyms one word: DecoupledKD, decoupled_kd)"
    from fastcore.basics import camel2snake
    from kdcb.core import _LOSSES
    import kdcb.all # every module that registers losses
    classes = {k: v for k, v in _LOSSES.items() if isinstance(v, type)}
    assert len(classes) >= 20
    for key, cls in classes.items(): assert key == camel2snake(cls.__name__).lower(), (key, cls.__name__)


@pytest.mark.parametrize('teacher_dtype', [torch.float32, torch.bfloat16])
def test_soft_target_chunked_equals_unchunked(teacher_dtype):
    "SoftTarget on (B, L, V) runs a chunk of positions at a time; value and gradient are the plain formula's"
    torch.manual_seed(0)
    V = 40_000 # chunks of 2**18 // V = 6 positions on a CPU: 11 chunks over the 2 × 32 positions
    s = torch.randn(2, 33, V, requires_grad=True)
    t = torch.randn(2, 33, V).to(teacher_dtype)
    y = torch.randint(0, V, (2, 32)); y[0, :5] = -100; y[1, -3:] = -100
    pred, tp = s[:, :-1], t[:, :-1] # shifted, as with `shift_labels=True`: a view of the logits
    loss = SoftTarget(T=2.)(pred, tp, y)
    g, = torch.autograd.grad(loss, s)
    keep = y != -100
    ls, lt = F.log_softmax(pred.detach()[keep] / 2, -1), F.log_softmax(tp[keep].float() / 2, -1)
    s_ref = s.detach().clone().requires_grad_()
    ls_ref = F.log_softmax(s_ref[:, :-1][keep] / 2, -1)
    ref = (lt.exp() * (lt - ls_ref)).sum(-1).mean() * 4
    g_ref, = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-9)
    assert g[:, -1].abs().sum() == 0 and g[0, :5].abs().sum() == 0 # masked and cut-off positions get no gradient
