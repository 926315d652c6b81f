"Divergences and ULD against their formulas written out in float64; chunks, masks, temperatures; fits through the callback"
import math
import pytest, torch
import torch.nn.functional as F
from torch.autograd import gradcheck
import fastai.callback.core
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from kdcb.all import *

torch.set_num_threads(1)


# ---- the formulas, from explicit probabilities, in float64 ----
def probs(z, T): e = torch.exp(z.double() / T - (z.double() / T).max(-1, keepdim=True).values); return e / e.sum(-1, keepdim=True)
def kl(p, q): return (p * (torch.log(p) - torch.log(q))).sum(-1)

FORMULAS = { # (loss class, kwargs, per-position formula of p_s, p_t)
    'forward_kl': (JSD, dict(beta=0.), lambda ps, pt: kl(pt, ps)),
    'reverse_kl': (ReverseKL, {}, lambda ps, pt: kl(ps, pt)),
    'jsd': (JSD, dict(beta=0.3), lambda ps, pt: 0.3 * kl(pt, 0.3 * pt + 0.7 * ps) + 0.7 * kl(ps, 0.3 * pt + 0.7 * ps)),
    'jsd_half': (JSD, {}, lambda ps, pt: 0.5 * kl(pt, (pt + ps) / 2) + 0.5 * kl(ps, (pt + ps) / 2)),
    'skew_kl': (SkewKL, {}, lambda ps, pt: kl(pt, 0.1 * pt + 0.9 * ps)),
    'skew_reverse_kl': (SkewReverseKL, {}, lambda ps, pt: kl(ps, 0.1 * ps + 0.9 * pt)),
    'skew_kl_03': (SkewKL, dict(alpha=0.3), lambda ps, pt: kl(pt, 0.3 * pt + 0.7 * ps)),
    'tvd': (TVD, {}, lambda ps, pt: 0.5 * (pt - ps).abs().sum(-1)),
}


def reference(name, s, t, y=None, T=1.):
    "T² × the mean of the formula over the positions whose label is not -100 (0 when there are none)"
    per = FORMULAS[name][2](probs(s, T), probs(t, T))
    keep = torch.ones_like(per, dtype=torch.bool) if y is None else y != -100
    return torch.where(keep, per, 0.).sum() / keep.sum().clamp_min(1) * T**2


def make(name, **kw): cls, args, _ = FORMULAS[name]; return cls(**args, **kw)


def data(shape=(3, 6, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(*shape, generator=g) * 2, torch.randn(*shape, generator=g) * 2
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if len(shape) == 2: y[:2] = -100; return s, t, y
    y[0, :2] = -100; y[1] = -100 # a partly masked row and a fully masked one
    return s, t, y


@pytest.mark.parametrize('name', FORMULAS)
@pytest.mark.parametrize('shape', [(5, 9), (3, 6, 13)])
@pytest.mark.parametrize('T', [1., 2.5])
def test_values_and_gradients_match_the_formula(name, shape, T):
    s, t, y = data(shape)
    for target in (y, None):
        a = s.clone().requires_grad_(); b = s.double().clone().requires_grad_()
        v, r = make(name, T=T, chunk_size=4)(a, t, target), reference(name, b, t, target, T)
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), r, rtol=1e-5, atol=1e-6)
        (ga,), (gb,) = torch.autograd.grad(v, a), torch.autograd.grad(r, b)
        torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('name', FORMULAS)
def test_gradcheck_float64_on_a_shifted_view(name):
    "The callback gives a view `logits[:, :-1]`: its gradient goes to the logits through a hook, in float64 exactly"
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    h, t = torch.randn(2, 5, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, 7, dtype=torch.float64, generator=g)
    y = torch.tensor([[-100, 1, 2, 3], [4, -100, 5, -100]])
    loss = make(name, T=2., chunk_size=2)
    assert gradcheck(lambda w: loss((h @ w)[:, :-1], t, y), (w,))


@pytest.mark.parametrize('name', ['reverse_kl', 'jsd', 'skew_reverse_kl', 'tvd'])
def test_chunked_equals_unchunked_with_a_second_loss_on_the_same_logits(name):
    "A task loss and the divergence on views of one logits tensor: the deferred gradient adds to the task's, as one pass would"
    s, t, y = data((3, 7, 11), 2)
    w = torch.randn(5, 11, requires_grad=True)
    h = torch.randn(3, 7, 5)
    def total(chunk):
        z = h @ w
        ce = F.cross_entropy(z[:, :-1].flatten(0, 1), torch.where(y[:, 1:] < 0, 0, y[:, 1:]).flatten())
        return 0.5 * ce + 0.5 * make(name, T=2., chunk_size=chunk)(z[:, :-1], t[:, :-1], y[:, 1:])
    vals, grads = zip(*[(v.detach(), torch.autograd.grad(v, w)[0]) for v in (total(c) for c in (1, 3, 10**6))])
    for v, g in zip(vals[1:], grads[1:]): torch.testing.assert_close(v, vals[0]); torch.testing.assert_close(g, grads[0])
    z = (h @ w).double() # and against the formula
    ref = reference(name, z[:, :-1], t[:, :-1], y[:, 1:], 2.)
    torch.testing.assert_close(make(name, T=2.)((h @ w)[:, :-1], t[:, :-1], y[:, 1:]).double(), ref, rtol=1e-5, atol=1e-6)


def test_a_second_backward_pass_without_the_hook_gives_the_same_gradient():
    s, t, y = data()
    z = s.clone().requires_grad_()
    v = ReverseKL(T=2., chunk_size=5)(z * 1., t, y) # `z * 1.`: not a view, the loss's own tensor
    g1, = torch.autograd.grad(v, z, retain_graph=True)
    g2, = torch.autograd.grad(v, z) # the hook fired in the first pass: the gradient is computed directly now
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize('name', FORMULAS)
def test_all_masked_batch_is_zero_with_zero_gradient(name):
    s, t, _ = data()
    z = s.clone().requires_grad_()
    v = make(name)(z[:, :-1], t[:, :-1], torch.full((3, 5), -100))
    v.backward()
    assert v.item() == 0 and torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0


def test_masked_positions_may_hold_infinities_and_get_no_gradient():
    s, t, y = data()
    s[1], t[1] = float('inf'), float('nan') # row 1 is fully masked
    z = s.clone().requires_grad_()
    v = JSD(T=2.)(z, t, y)
    v.backward()
    assert torch.isfinite(v) and z.grad[1].abs().sum() == 0 and torch.isfinite(z.grad).all()


def test_beta_ends_are_the_two_kls_exactly():
    s, t, y = data()
    for T in (1., 3.):
        for a, b in ((JSD(beta=0., T=T), SoftTarget(T=T)), (JSD(beta=1., T=T), ReverseKL(T=T))):
            x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
            v1, v2 = a(x1, t, y), b(x2, t, y)
            torch.testing.assert_close(v1, v2)
            torch.testing.assert_close(*(torch.autograd.grad(v, x)[0] for v, x in ((v1, x1), (v2, x2))))
    # inside (0, 1) the formula tends to 0 at both ends, which is why TRL special-cases them
    assert JSD(beta=1e-6)(s, t, y) < 1e-4 * JSD(beta=0.)(s, t, y)


@pytest.mark.parametrize('name', FORMULAS)
def test_temperature_schedules(name):
    s, t, y = data()
    loss = make(name, T=lambda p: 1 + 3 * p)
    for p in (0., 0.5, 1.):
        loss.pct_train = p
        torch.testing.assert_close(loss(s, t, y).double(), reference(name, s, t, y, 1 + 3 * p), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='must be > 0'): make(name, T=lambda p: 1 - p)


def test_hyperparameter_schedules_and_bad_values():
    s, t, y = data()
    j = JSD(beta=lambda p: p)
    j.pct_train = 0.3
    torch.testing.assert_close(j(s, t, y), JSD(beta=0.3)(s, t, y))
    for bad, match in ((lambda: JSD(beta=-0.1), 'beta=-0.1'), (lambda: SkewKL(alpha=1.), r'alpha=1.0 must lie in \[0, 1\)'),
                       (lambda: SkewReverseKL(alpha=lambda p: 2 * p), 'at every pct_train'), (lambda: TVD(chunk_size=0), 'chunk_size=0')):
        with pytest.raises(ValueError, match=match): bad()


def test_teacher_logits_keep_their_dtype_and_values():
    s, t, y = data()
    tb = t.bfloat16()
    before = tb.clone()
    v = SkewReverseKL(T=2.)(s.requires_grad_(), tb, y)
    assert v.dtype == torch.float32 and torch.equal(tb, before)
    torch.testing.assert_close(v.double(), reference('skew_reverse_kl', s, tb.float(), y, 2.), rtol=1e-5, atol=1e-6)


def test_registered_names_and_shape_errors():
    for n, cls in dict(reverse_kl=ReverseKL, jsd=JSD, skew_kl=SkewKL, skew_reverse_kl=SkewReverseKL, tvd=TVD, uld=ULD).items():
        assert type(get_loss(n)) is cls
    s, t, y = data()
    with pytest.raises(ValueError, match='the student has 13 classes and the teacher 9.*ULD'): ReverseKL()(s, t[..., :9], y)
    with pytest.raises(ValueError, match='does not match the loss positions'): JSD()(s, t, y[:, :3])


# ---- through the callback, GPT-2 and Llama ----
def lm(arch, V, d, n, L=16, seed=0):
    torch.manual_seed(seed)
    if arch == 'gpt2':
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L, n_layer=n, n_embd=d, n_head=2,
                                          resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.))
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=L))


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_a_distilled_step_through_the_callback_has_the_formulas_gradient(arch):
    "One training batch through fastai and the callback: the student's gradient is the one of (1-w)·CE + w·divergence written out"
    V, x = 50, torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    teacher, student = lm(arch, V, 32, 2, seed=1), lm(arch, V, 16, 1)
    ref = lm(arch, V, 16, 1)
    ref.load_state_dict(student.state_dict())
    learn = Learner(DataLoaders(DataLoader([(x, x)], bs=None), DataLoader([(x, x)], bs=None)), student, loss_func=causal_lm_loss)
    kd = KnowledgeDistillationCallback(teacher, JSD(beta=0.5, T=2.), weight=0.3, outputs=Outputs(shift_labels=True))
    grads = {}
    class Grab(fastai.callback.core.Callback):
        def before_step(self): grads.update({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}); raise fastai.callback.core.CancelBatchException()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[kd, Grab()])
    zs = ref(x).logits
    with torch.no_grad(): zt = teacher.eval()(x).logits
    ce = causal_lm_loss(zs, x)
    div = reference('jsd_half', zs[:, :-1].double(), zt[:, :-1], None, 2.)
    (0.7 * ce + 0.3 * div).backward()
    for n, p in ref.named_parameters():
        if p.grad is not None: torch.testing.assert_close(grads[n], p.grad, rtol=2e-4, atol=1e-6)


# ---- ULD: two tokenizers built here, two GPT-2 models ----
WORDS = 'the a cat dog bird sat ran flew on under over mat tree house red blue small big quickly slowly'.split()


def corpus(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [' '.join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(3, 7, (1,), generator=g)),), generator=g))
            for _ in range(n)]


def tokenizer(vocab:int, model:str):
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers
    if model == 'bpe':
        tok = Tokenizer(models.BPE(unk_token='[UNK]'))
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=['[PAD]', '[UNK]', '[EOS]', '[SEP]'])
    else:
        tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=['[PAD]', '[UNK]', '[EOS]', '[SEP]'])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus(), trainer)
    return tok


def encode(tok, prompt, response, L):
    "Prompt, [SEP], response, [EOS], right-padded: ids, mask, labels (-100 but on the response and [EOS])"
    p = tok.encode(prompt).ids + [tok.token_to_id('[SEP]')]
    r = tok.encode(response).ids + [tok.token_to_id('[EOS]')]
    ids = (p + r)[:L]
    n = len(ids)
    lab = ([-100] * len(p) + r)[:L]
    pad = L - n
    return torch.tensor(ids + [0] * pad), torch.tensor([1] * n + [0] * pad), torch.tensor(lab + [-100] * pad)


@pytest.fixture(scope='module')
def two_tokenizers():
    tok_s, tok_t = tokenizer(40, 'bpe'), tokenizer(90, 'wordpiece')
    assert tok_s.get_vocab_size() != tok_t.get_vocab_size()
    items = []
    for text in corpus(48, seed=1):
        prompt, response = text, ' '.join(reversed(text.split())) # the response: the prompt's words backwards
        s_ids, s_mask, s_lab = encode(tok_s, prompt, response, 40)
        t_ids, t_mask, t_lab = encode(tok_t, prompt, response, 24)
        items.append((s_ids, s_mask, t_ids, t_mask, t_lab, s_lab))
    return tok_s, tok_t, items


def uld_reference(zs, zt, ys, yt, Ts=1., Tt=1.):
    "Per sequence, the i-th response position of each (labels shifted by one) paired; sorted probabilities, zero-padded, L1; mean over pairs"
    d = []
    for b in range(len(zs)):
        ps = [i for i in range(zs.shape[1] - 1) if ys[b, i + 1] != -100]
        pt = [i for i in range(zt.shape[1] - 1) if yt[b, i + 1] != -100]
        for i, j in zip(ps, pt):
            a, c = probs(zs[b, i], Ts).sort(descending=True).values, probs(zt[b, j], Tt).sort(descending=True).values
            V = max(len(a), len(c))
            d.append((F.pad(a, (0, V - len(a))) - F.pad(c, (0, V - len(c)))).abs().sum())
    return torch.stack(d).mean()


def test_uld_distils_across_tokenizers_through_the_callback(two_tokenizers):
    tok_s, tok_t, items = two_tokenizers
    Vs, Vt = tok_s.get_vocab_size(), tok_t.get_vocab_size()
    student = KeywordInputs(lm('gpt2', Vs, 32, 1, L=40), {'input_ids': 0, 'attention_mask': 1})
    teacher = KeywordInputs(lm('gpt2', Vt, 48, 2, L=24, seed=1), {'input_ids': 2, 'attention_mask': 3}, labels=4)
    with torch.no_grad(): teacher.model.lm_head.weight.mul_(100) # a confident teacher: its sorted probabilities are peaked, the untrained student's flat
    batch = [torch.stack(x) for x in zip(*items[:8])]
    uld = ULD(T_student=2., T_teacher=1.5)
    def value(grad=False):
        with torch.set_grad_enabled(grad):
            zs, zt = student(*batch[:5]).logits, teacher.eval()(*batch[:5])['logits']
            return uld(zs[:, :-1], zt[:, :-1], batch[5][:, 1:], dict(labels=batch[4])), zs, zt
    v0, zs, zt = value()
    torch.testing.assert_close(v0.double(), uld_reference(zs, zt, batch[5], batch[4], 2., 1.5), rtol=1e-5, atol=1e-6)
    dls = DataLoaders(DataLoader(items, bs=8, shuffle=True), DataLoader(items[:8], bs=8))
    learn = Learner(dls, student, loss_func=causal_lm_loss)
    kd = KnowledgeDistillationCallback(teacher, uld, weight=0.8, outputs=Outputs(shift_labels=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(8, 1e-2, cbs=kd)
    v1 = value()[0]
    assert v1 < 0.8 * v0, (v0, v1)
    # an ordinary output loss refuses the two vocabularies and points to ULD
    kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=2.), weight=0.5, outputs=Outputs(shift_labels=True))
    with pytest.raises(ValueError, match=f'the student has {Vs} classes and the teacher {Vt}.*ULD'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=kd)


def test_uld_gradient_matches_its_formula(two_tokenizers):
    _, _, items = two_tokenizers
    b = [torch.stack(x) for x in zip(*items[:4])]
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(4, 40, 9, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(4, 24, 14, generator=g, dtype=torch.float64)
    v = ULD(T_student=1.5)(zs[:, :-1], zt[:, :-1], b[5][:, 1:], dict(labels=b[4]))
    r = uld_reference(zs, zt, b[5], b[4], 1.5)
    torch.testing.assert_close(v, r)
    torch.testing.assert_close(torch.autograd.grad(v, zs)[0], torch.autograd.grad(r, zs)[0])
    assert gradcheck(lambda z: ULD(chunk_size=3)(z[:, :-1], zt[:, :-1], b[5][:, 1:], dict(labels=b[4])), (zs,))


def test_two_chunked_losses_on_the_same_logits_add_up():
    s, t, y = data((2, 5, 9), 4)
    w, h = torch.randn(3, 9, requires_grad=True), torch.randn(2, 5, 3)
    z = h @ w
    v = 0.4 * ReverseKL(T=2., chunk_size=3)(z[:, :-1], t[:, :-1], y[:, 1:]) + 0.6 * TVD(chunk_size=2)(z[:, 1:], t[:, 1:], y[:, :-1])
    g, = torch.autograd.grad(v, w)
    zd = (h @ w).double()
    r = 0.4 * reference('reverse_kl', zd[:, :-1], t[:, :-1], y[:, 1:], 2.) + 0.6 * reference('tvd', zd[:, 1:], t[:, 1:], y[:, :-1])
    torch.testing.assert_close(v.double(), r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), torch.autograd.grad(r, w)[0].double(), rtol=1e-4, atol=1e-7)
