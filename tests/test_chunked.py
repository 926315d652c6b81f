"Chunked losses against their unchunked formulas at GPT-2's vocabulary: values, gradients through every route autograd offers"
import math, pytest, torch
import torch.nn.functional as F
from kdcb.core import get_loss
from kdcb.chunked import chunked_mean, kl_from_logs, chunk_rows
from kdcb.losses import SoftTarget
from kdcb.divergences import Divergence, ReverseKL, JSD, SkewKL, SkewReverseKL, TVD

V = 50_257 # chunk_rows(V) = 5 positions a chunk on a CPU: the batches below span several chunks

def batch(seed=0, teacher_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 17, V, generator=g)).requires_grad_()
    teacher = (3 * torch.randn(2, 17, V, generator=g)).to(teacher_dtype)
    y = torch.randint(0, V, (2, 16), generator=g); y[1, 10:] = -100
    return logits, teacher, y

def unchunked(name, s, t, y):
    "The divergence written out on whole tensors, at T = 1 (the registered defaults), over the kept positions"
    keep = y != -100
    ls, lt = s[keep].float().log_softmax(-1), t[keep].float().log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    kl = lambda p, lp, lq: (p * (lp - lq)).sum(-1)
    if name in ('soft_target', 'mutual'): v = kl(pt, lt, ls)
    elif name == 'reverse_kl': v = kl(ps, ls, lt)
    elif name == 'jsd': m = (0.5 * pt + 0.5 * ps).log(); v = 0.5 * kl(pt, lt, m) + 0.5 * kl(ps, ls, m)
    elif name == 'skew_kl': v = kl(pt, lt, (0.1 * pt + 0.9 * ps).log())
    elif name == 'skew_reverse_kl': v = kl(ps, ls, (0.1 * ps + 0.9 * pt).log())
    elif name == 'tvd': v = (pt - ps).abs().sum(-1) / 2
    return v.mean()

NAMES = ['soft_target', 'mutual', 'reverse_kl', 'jsd', 'skew_kl', 'skew_reverse_kl', 'tvd']

@pytest.mark.parametrize('name', NAMES)
def test_registered_losses_equal_unchunked(name):
    "Every registered divergence (by name, its defaults; (B, L, V) logits give SoftTarget T = 1): value and gradient"
    logits, teacher, y = batch()
    pred = logits[:, :-1] # what `Outputs(shift_labels=True)` passes
    loss = get_loss(name)(pred, teacher[:, :-1], y)
    ref = unchunked(name, pred, teacher[:, :-1], y)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g, r = torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-8)

def test_autograd_grad_and_retain_grad_on_views_and_logits():
    "`autograd.grad` w.r.t. the shifted view, the logits, both at once, a parameter upstream; `retain_grad`: the full gradient"
    logits0, teacher, y = batch(1)
    w = torch.ones((), requires_grad=True) # a parameter the logits come from
    def losses():
        logits = logits0.detach() * w; pred = logits[:, :-1]
        task = F.cross_entropy(pred.transpose(1, 2), y)
        kd, ref = JSD()(pred, teacher[:, :-1], y), unchunked('jsd', pred, teacher[:, :-1], y)
        return logits, pred, task + kd, task + ref
    logits, pred, loss, ref = losses()
    for inputs in [(pred,), (logits,), (pred, logits), (w,)]:
        got, want = torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(ref, inputs, retain_graph=True)
        for a, b in zip(got, want): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    logits, pred, loss, ref = losses(); pred.retain_grad(); logits.retain_grad(); loss.backward()
    got = pred.grad.clone(), logits.grad.clone(), w.grad.clone(); w.grad = None
    logits, pred, loss, ref = losses(); pred.retain_grad(); logits.retain_grad(); ref.backward()
    for a, b in zip(got, (pred.grad, logits.grad, w.grad)): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    seen = []
    logits, pred, loss, ref = losses(); pred.register_hook(lambda g: seen.append(g.clone())); loss.backward()
    torch.testing.assert_close(seen[0], got[0], rtol=1e-4, atol=1e-8) # a tensor hook (a gradient-norm monitor) sees it all

def test_bfloat16_teacher():
    "A bfloat16 teacher is read a chunk at a time in float32: equal to the formula on its float32 copy"
    logits, teacher, y = batch(2, torch.bfloat16)
    loss = SkewKL()(logits[:, :-1], teacher[:, :-1], y)
    ref = unchunked('skew_kl', logits[:, :-1], teacher[:, :-1].float(), y)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], rtol=1e-4, atol=1e-8)

def test_retain_graph_backward_twice():
    "A second backward pass over a kept graph adds the same gradient again"
    logits, teacher, y = batch(3)
    loss = ReverseKL()(logits, teacher, torch.cat([y, y[:, :1]], 1))
    loss.backward(retain_graph=True); g1 = logits.grad.clone(); loss.backward()
    torch.testing.assert_close(logits.grad, 2 * g1)

@pytest.mark.parametrize('loss', [SoftTarget(T=2.), ReverseKL(), JSD(), SkewKL(), SkewReverseKL(), TVD()], ids=lambda l: type(l).__name__)
def test_minus_inf_logits_chunked(loss):
    "−inf logits in both models (padded vocabulary entries): the loss over the other classes, finite gradient, no NaN"
    logits, teacher, y = batch(4)
    s, t = logits.detach().clone(), teacher.clone()
    s[..., -7:] = t[..., -7:] = -math.inf
    s.requires_grad_()
    v = loss(s, t); g = torch.autograd.grad(v, s)[0]
    torch.testing.assert_close(v, loss(s[..., :-7], t[..., :-7]), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g).all()

def test_minus_inf_student_where_teacher_has_mass():
    "Forward KL is +inf when the student rules out a class the teacher gives mass; reverse KL and JSD stay finite"
    logits, teacher, y = batch(5)
    s = logits.detach().clone(); s[0, 3, 5] = -math.inf
    assert SoftTarget(T=1.)(s, teacher).item() == math.inf
    assert math.isfinite(ReverseKL()(s, teacher).item()) and math.isfinite(JSD()(s, teacher).item())

@pytest.mark.parametrize('cls', [SoftTarget, ReverseKL, JSD, TVD])
def test_ignore_index_none_refused_at_construction(cls):
    with pytest.raises(ValueError, match='ignore_index=None'): cls(ignore_index=None)

CLOSED = [(ReverseKL(), {})] + [(TVD(), {})] + [(JSD(), dict(beta=b)) for b in (0., 0.1, 0.5, 0.9, 1.)] + [
          (c(), dict(alpha=a)) for c in (SkewKL, SkewReverseKL) for a in (0., 0.1, 0.5, 0.9)]

@pytest.mark.parametrize('div,hp', CLOSED, ids=lambda x: type(x).__name__ if isinstance(x, Divergence) else str(x))
@pytest.mark.parametrize('case', ['gpt2', 'peaked', 'masked_vocab'])
def test_closed_form_gradients_equal_autograd(div, hp, case):
    """Each divergence's `value_and_grad` on GPT-2-sized float32 rows, random, very peaked (probabilities that underflow to 0)
    and with classes masked (−inf) in both models and in the teacher only, against autograd through its `per_position` in
    float64: at most twice the error of float32 autograd (or float32's rounding, 2e-7 in the gradient, 1e-6 in the value)"""
    assert type(div).value_and_grad is not Divergence.value_and_grad # its own closed form, not the autograd it is checked against
    g = torch.Generator().manual_seed(7)
    s, t = 3 * torch.randn(6, V, generator=g), 3 * torch.randn(6, V, generator=g)
    if case == 'peaked': s, t = 40 * s, 40 * t
    if case == 'masked_vocab': s[:, :100] = t[:, :100] = -math.inf; t[:, 100:200] = -math.inf
    v, gr = div.value_and_grad(s.log_softmax(-1), t.log_softmax(-1), **hp)
    v32, g32 = Divergence.value_and_grad(div, s.log_softmax(-1), t.log_softmax(-1), **hp)
    v64, g64 = Divergence.value_and_grad(div, s.double().log_softmax(-1), t.double().log_softmax(-1), **hp)
    ok = v64.isfinite() # reverse KL (and β = 1, α = 0 skew reverse KL) is +inf where only the teacher masks: NaN gradient both ways
    assert torch.equal(v.isfinite(), ok)
    if case != 'masked_vocab': assert ok.all()
    err = lambda a, b: (a[ok].double() - b[ok]).abs().max().item() if ok.any() else 0.
    assert err(gr, g64) <= max(2 * err(g32, g64), 2e-7), (err(gr, g64), err(g32, g64))
    assert err(v, v64) <= max(2 * err(v32, v64), 1e-6), (err(v, v64), err(v32, v64))
    assert not gr[ok].isnan().any()

def test_a_divergence_without_closed_form_uses_autograd():
    "A subclass that writes only `per_position` trains through the base `value_and_grad`: the same gradient as unchunked"
    class Hellinger(Divergence):
        def per_position(self, ls, lt): return 1 - ((ls + lt) / 2).exp().sum(-1)
    logits, teacher, y = batch(2)
    loss = Hellinger()(logits[:, :-1], teacher[:, :-1], y)
    keep = y != -100
    ref = (1 - (logits[:, :-1][keep].softmax(-1) * teacher[:, :-1][keep].softmax(-1)).sqrt().sum(-1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], rtol=1e-4, atol=1e-8)

@pytest.mark.parametrize('name', NAMES)
def test_every_position_kept(name):
    "No position left out: the gradient buffer is written row by row and never zeroed, so every row must be right"
    logits, teacher, _ = batch(3)
    y = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    pred = logits[:, :-1]
    loss, ref = get_loss(name)(pred, teacher[:, :-1], y), unchunked(name, pred, teacher[:, :-1], y)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], rtol=1e-4, atol=1e-8)

@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('name', ['soft_target', 'jsd'])
def test_half_precision_student_logits(name, masked):
    "bfloat16 student logits (a bf16 or mixed-precision model), with and without masked positions: float32 arithmetic, a bf16 gradient"
    logits, teacher, y = batch(4)
    if not masked: y = y.clamp_min(0)
    s = logits.detach().bfloat16().requires_grad_()
    loss = get_loss(name)(s[:, :-1], teacher[:, :-1], y)
    ref = unchunked(name, s.float()[:, :-1], teacher[:, :-1], y)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    g, = torch.autograd.grad(loss, s)
    assert g.dtype == torch.bfloat16
    sf = s.detach().float().requires_grad_()
    r, = torch.autograd.grad(unchunked(name, sf[:, :-1], teacher[:, :-1], y), sf)
    torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=1e-6)
