"On-policy distillation (`OnPolicy`) and token-normalised gradient accumulation, with tiny GPT-2 and Llama models built from configs"
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, Learner.lr_find
from kdcb.callback import KnowledgeDistillationCallback, Outputs
from kdcb.losses import SoftTarget
from kdcb.teachers import CachedTeacher
from kdcb.lm import OnPolicy, TokenAccumulation, Responses, KeywordInputs, causal_lm_loss

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()
V, EOS = 24, 0
KINDS = ['gpt2', 'llama']


def lm(kind, layers, d, seed):
    "A tiny causal LM without dropout, called as `model(input_ids, attention_mask)` (GPT-2 through `KeywordInputs`)"
    torch.manual_seed(seed)
    if kind == 'gpt2':
        return KeywordInputs(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=layers, n_embd=d, n_head=2, vocab_size=V, n_positions=64, bos_token_id=EOS, eos_token_id=EOS,
            resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.)))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS))


def distiller(teacher, weight=1.):
    "The distillation callback of these tests: the one place that says how causal-LM outputs are aligned"
    return KnowledgeDistillationCallback(teacher, SoftTarget(T=1), weight=weight, outputs=Outputs(shift_labels=True, attention_mask=1))


def responses(n=16, seed=0):
    "Random prompts (2 to 6 tokens) with random responses (1 to 5 tokens, without eos): items labelled on the responses"
    g = torch.Generator().manual_seed(seed)
    length = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    prompts = [torch.randint(1, V, (length(2, 7),), generator=g) for _ in range(n)]
    return Responses(prompts, [torch.randint(1, V, (length(1, 6),), generator=g) for _ in range(n)], pad_token_id=EOS)


def learner(kind, data=None, bs=4, seed=1, **kw):
    set_seed(0)
    return Learner((data or responses()).dls(bs=bs, valid_pct=0.25, shuffle=False), lm(kind, 1, 16, seed), loss_func=causal_lm_loss, **kw)


def fit(learn, *cbs, n=1, lr=1e-2):
    set_seed(0)
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr, cbs=list(cbs))
    return torch.cat([p.detach().flatten().clone() for p in learn.model.parameters()])


class Recording(nn.Module):
    "A teacher that records the inputs it is called with"
    def __init__(self, model): super().__init__(); self.model, self.calls = model, []
    def forward(self, *xb): self.calls.append([x.clone() for x in xb]); return self.model(*xb)


class Spy(Callback):
    "Records each training batch before `OnPolicy` (order 3) and what the distillation callback scored (after it)"
    def __init__(self, op, kd): self.op, self.kd, self.seen, self.order = op, kd, [], 3
    def before_batch(self): self.before = [x.clone() for x in (*self.xb, *self.yb)]
    def record(self): # called after the distillation callback, before the step: the weights that generated and scored
        if not self.training: return
        with torch.no_grad(): logits = self.model(*self.xb).logits
        self.seen.append(dict(on=self.op.on, before=self.before, xb=[x.clone() for x in self.xb], y=self.yb[0].clone(),
                              last=self.kd.columns.last.clone(), logits=logits, loss=self.learn.loss_grad.detach().clone()))

def spied(*cbs): # the spy runs before OnPolicy for `before_batch` and after the distillation callback for `after_loss`
    spy = Spy(*cbs)
    class After(Callback):
        order = KnowledgeDistillationCallback.order + 0.5
        def after_loss(self): spy.record()
    return spy, [spy, After()]


def expected(prompt, continuation, L):
    "Independently: ids, mask and labels of `prompt + continuation` right-padded to L, labelled on the continuation only"
    P, G = len(prompt), len(continuation)
    ids = prompt.tolist() + continuation.tolist() + [EOS] * (L - P - G)
    return ids, [1] * (P + G) + [0] * (L - P - G), [-100] * P + continuation.tolist() + [-100] * (L - P - G)


@pytest.mark.parametrize('kind', KINDS)
def test_generated_tokens_only_in_the_loss_and_the_teacher_scores_exactly_them(kind):
    "λ = 1, sampled: each new row is prompt + the student's continuation; labels, mask and the KL follow it exactly"
    teacher = Recording(lm(kind, 2, 32, 0))
    learn, op = learner(kind), OnPolicy(lmbda=1., max_new_tokens=5, pad_token_id=EOS, top_k=0)
    kd = distiller(teacher)
    spy, cbs = spied(op, kd)
    fit(learn, kd, op, *cbs)
    assert op.generated == op.batches == len(spy.seen) == 3
    assert len(teacher.calls) == len(spy.seen) # training batches only
    for s, scored in zip(spy.seen, teacher.calls):
        ids, mask = s['xb']
        assert all(torch.equal(a, b) for a, b in zip(scored, s['xb'])) # the teacher saw exactly the generated batch
        old_ids, old_mask, old_y = s['before']
        keep = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        for i in range(len(ids)):
            first = next(j for j, t in enumerate(old_y[i].tolist()) if t != -100) # the item's prompt ends at its first label
            prompt = old_ids[i][:first]
            assert torch.equal(ids[i][:first], prompt)
            rest = ids[i][first:][mask[i][first:] == 1]
            assert 1 <= len(rest) <= 5 and all(t != EOS for t in rest[:-1].tolist()) # stops at the first eos, or after 5
            assert len(rest) == 5 or rest[-1] == EOS
            e_ids, e_mask, e_lab = expected(prompt, rest, ids.shape[1])
            assert ids[i].tolist() == e_ids and mask[i].tolist() == e_mask and s['y'][i].tolist() == e_lab
            keep[i] = torch.tensor(e_lab[1:]) != -100
        with torch.no_grad(): t_logits = teacher.model(ids, mask).logits
        ls, lt = F.log_softmax(s['logits'][:, :-1].float(), -1), F.log_softmax(t_logits[:, :-1].float(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)[keep].mean() # KL(teacher ‖ student) on the generated tokens only
        torch.testing.assert_close(s['last'][1], kl, rtol=1e-4, atol=1e-6)
        assert s['last'][0] == 0 and torch.isclose(s['loss'], kl, rtol=1e-4) # the learner's loss is left out on them


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_continuations_are_the_students_own(kind):
    "With lr = 0 and greedy decoding, each continuation is what the student's `generate` writes for that prompt alone"
    learn, op = learner(kind), OnPolicy(lmbda=1., max_new_tokens=4, pad_token_id=EOS, do_sample=False)
    kd = distiller(lm(kind, 2, 32, 0))
    spy, cbs = spied(op, kd)
    fit(learn, kd, op, *cbs, lr=0.)
    student = learn.model.eval()
    for s in spy.seen:
        (ids, mask), y = s['xb'], s['y']
        for i in range(len(ids)):
            P = int((y[i] == -100).long().cumprod(0).sum())
            with torch.no_grad(): alone = student.generate(input_ids=ids[i:i+1, :P], max_new_tokens=4, pad_token_id=EOS, do_sample=False)[0, P:]
            cut = next((j + 1 for j, t in enumerate(alone.tolist()) if t == EOS), len(alone))
            assert ids[i][P:P + cut].tolist() == alone[:cut].tolist() and int(mask[i].sum()) == P + cut


def test_eos_and_a_separate_pad_token():
    "A continuation ends at its first eos (kept, learned); what `generate` wrote after it becomes padding: pad id, mask 0, label -100"
    PAD = 23
    class Scripted(KeywordInputs):
        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            script = torch.tensor([[5, EOS, 7, 7], [6, 6, 6, 6]])[:, :max_new_tokens] # row 0 stops early; row 1 runs to the end
            return torch.cat([input_ids, script.repeat(len(input_ids) // 2 + 1, 1)[:len(input_ids)]], 1)
    data = Responses([torch.tensor([3, 4]), torch.tensor([9])], [torch.tensor([1]), torch.tensor([2, 2])], pad_token_id=PAD)
    learn = Learner(data.dls(bs=2, valid_pct=0., shuffle=False), Scripted(lm('gpt2', 1, 16, 1).model), loss_func=causal_lm_loss)
    op = OnPolicy(lmbda=1., max_new_tokens=4, pad_token_id=PAD)
    kd = distiller(lm('gpt2', 2, 32, 0))
    spy, cbs = spied(op, kd)
    fit(learn, kd, op, *cbs)
    (ids, mask), y = spy.seen[0]['xb'], spy.seen[0]['y']
    assert ids.tolist() == [[3, 4, 5, EOS, PAD], [9, 6, 6, 6, 6]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert y.tolist() == [[-100, -100, 5, EOS, -100], [-100, 6, 6, 6, 6]]


@pytest.mark.parametrize('kind', KINDS)
def test_lambda_zero_is_off_policy_training(kind):
    "λ = 0 changes nothing: identical weights after a fit with and without the callback"
    t = lm(kind, 2, 32, 0)
    off = fit(learner(kind), distiller(t, weight=0.5), n=2)
    op = OnPolicy(lmbda=0., max_new_tokens=4, pad_token_id=EOS)
    assert torch.equal(fit(learner(kind), distiller(t, weight=0.5), op, n=2), off)
    assert op.generated == 0 and op.batches == 6


def test_lambda_picks_batches_with_its_own_seeded_generator():
    "λ = 1: every batch; in between, the draws of `torch.Generator().manual_seed(seed)`, the same at every fit"
    learn, t = learner('gpt2'), lm('gpt2', 2, 32, 0)
    for lmbda, seed in [(1., 0), (0.5, 0), (0.5, 3)]:
        op, kd = OnPolicy(lmbda=lmbda, max_new_tokens=2, pad_token_id=EOS, seed=seed), distiller(t)
        spy, cbs = spied(op, kd)
        fit(learn, kd, op, *cbs, n=3)
        g = torch.Generator().manual_seed(seed)
        assert [s['on'] for s in spy.seen] == [bool(torch.rand(1, generator=g) < lmbda) for _ in range(9)]
        assert op.generated == sum(s['on'] for s in spy.seen) and op.batches == 9
    assert 0 < op.generated < 9


@pytest.mark.parametrize('kind', KINDS)
def test_modes_restored_also_when_generate_raises(kind):
    "Generation runs with every module in eval mode; each is back in its mode afterwards, also when `generate` raises"
    learn, kd = learner(kind), distiller(lm(kind, 2, 32, 0))
    inner = learn.model.model if isinstance(learn.model, KeywordInputs) else learn.model
    real, seen = inner.generate, []
    def watched(*a, **k):
        seen.append([m.training for m in learn.model.modules()])
        if len(seen) == 2: raise RuntimeError('out of memory')
        return real(*a, **k)
    inner.generate = watched
    op = OnPolicy(lmbda=1., max_new_tokens=2, pad_token_id=EOS)
    class Modes(Callback):
        order = KnowledgeDistillationCallback.order + 0.5
        def after_pred(self): self.after = [m.training for m in self.model.modules()]
    modes = Modes()
    with pytest.raises(RuntimeError, match='out of memory'): fit(learn, kd, op, modes)
    assert all(not any(s) for s in seen) # eval during generation
    assert all(modes.after) # the student trained in train mode on the generated batch
    assert all(m.training for m in learn.model.modules()) # as fastai had set it when generate raised
    assert all(p.requires_grad for p in learn.model.parameters())
    assert all(p.requires_grad for p in kd.teacher.model.parameters()) # the distillation callback restored its teacher
    inner.generate = real
    fit(learn, kd, OnPolicy(lmbda=1., max_new_tokens=2, pad_token_id=EOS)) # and the learner trains again


@pytest.mark.parametrize('kind', KINDS)
def test_token_accumulation_equals_one_batch(kind):
    "Micro-batches with different numbers of generated tokens, accumulated, take the step of one batch; fastai's mean of means does not"
    t = lm(kind, 2, 32, 0)
    def step(bs, *cbs): # greedy: the same continuations in any batch; plain SGD, one step over the 12 training items
        op = OnPolicy(lmbda=1., max_new_tokens=5, pad_token_id=EOS, eos_token_id=list(range(8)), do_sample=False) # lengths vary
        return fit(learner(kind, bs=bs, opt_func=SGD), distiller(t), op, *cbs, lr=0.5)
    one = step(12)
    torch.testing.assert_close(step(4, TokenAccumulation(n_acc=12)), one, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(step(4, GradientAccumulation(n_acc=12)), one, rtol=1e-4, atol=1e-6)


def test_token_accumulation_off_policy_with_the_task_loss():
    "The learner's loss and a distillation loss mixed (weight 0.5), response lengths 1 to 5: accumulated == one batch"
    t = lm('llama', 2, 32, 0)
    one = fit(learner('llama', bs=12, opt_func=SGD), distiller(t, weight=0.5), lr=0.5)
    acc = fit(learner('llama', bs=4, opt_func=SGD), distiller(t, weight=0.5), TokenAccumulation(n_acc=12), lr=0.5)
    torch.testing.assert_close(acc, one, rtol=1e-4, atol=1e-6)
    ta = TokenAccumulation(); ta.learn = learner('llama'); ta.learn.yb = (torch.zeros(4),) # class labels, not tokens
    with pytest.raises(TypeError, match='counts the labelled tokens of \\(B, L\\) integer labels'): ta.scored()
    with pytest.raises(ValueError, match='n_acc=0 must be a positive integer'): TokenAccumulation(n_acc=0)


@pytest.mark.parametrize('kind', KINDS)
def test_lr_find_runs_and_leaves_everything_as_it_was(kind):
    "lr_find with on-policy batches: no error, the model as before, and the next fit as if lr_find had not run"
    t = lm(kind, 2, 32, 0)
    cbs = lambda: [distiller(t), OnPolicy(lmbda=1., max_new_tokens=3, pad_token_id=EOS)]
    learn = learner(kind, cbs=cbs())
    before = torch.cat([p.detach().flatten().clone() for p in learn.model.parameters()])
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=5, show_plot=False)
    assert torch.equal(torch.cat([p.detach().flatten() for p in learn.model.parameters()]), before)
    after_lr_find = fit(learn)
    assert torch.equal(after_lr_find, fit(learner(kind, cbs=cbs())))


def test_prompt_by_count_and_by_function():
    "prompt=N: the first N real tokens; prompt=f(xb, yb): each sequence's count; bad counts are refused by name"
    data, t = responses(), lm('gpt2', 2, 32, 0)
    for prompt, n_of in [(3, lambda ids, real: [min(3, r) for r in real]),
                         (lambda xb, yb: (xb[1].sum(1) - 1).clamp(min=1), lambda ids, real: [max(r - 1, 1) for r in real])]:
        op, kd = OnPolicy(lmbda=1., max_new_tokens=2, pad_token_id=EOS, prompt=prompt), distiller(t)
        spy, cbs = spied(op, kd)
        fit(learner('gpt2', data), kd, op, *cbs)
        for s in spy.seen:
            old_ids, old_mask, _ = s['before']
            n = n_of(old_ids, old_mask.sum(1).tolist())
            for i, k in enumerate(n):
                assert s['xb'][0][i][:k].tolist() == old_ids[i][:k].tolist() and (s['y'][i][:k] == -100).all() and s['y'][i][k] != -100
    for prompt, msg in [(lambda xb, yb: torch.ones(2), 'prompt returned 2 lengths for a batch of 4'),
                        (lambda xb, yb: torch.full((4,), 99), 'but it has'), (lambda xb, yb: torch.zeros(4), 'has no prompt')]:
        with pytest.raises(ValueError, match=msg): fit(learner('gpt2', data), distiller(t), OnPolicy(lmbda=1., pad_token_id=EOS, prompt=prompt))


def test_bad_settings_are_refused_with_the_fix():
    t = lm('gpt2', 2, 32, 0)
    with pytest.raises(ValueError, match='needs a KnowledgeDistillationCallback'): fit(learner('gpt2'), OnPolicy(pad_token_id=EOS))
    with pytest.raises(ValueError, match='shift_labels=True'):
        fit(learner('gpt2'), KnowledgeDistillationCallback(t, SoftTarget()), OnPolicy(pad_token_id=EOS))
    with pytest.raises(ValueError, match='give the callback the teacher itself'):
        fit(learner('gpt2'), distiller(CachedTeacher(t)), OnPolicy(pad_token_id=EOS))
    with pytest.raises(ValueError, match='pass `pad_token_id=` to OnPolicy'): fit(learner('gpt2'), distiller(t), OnPolicy())
    learn = learner('gpt2'); learn.model = nn.Sequential(learn.model) # no `generate`
    with pytest.raises(TypeError, match='has no `generate` method'): fit(learn, distiller(t), OnPolicy(pad_token_id=EOS))
    for kw, msg in [(dict(lmbda=-0.1), 'lmbda=-0.1 must lie in'), (dict(lmbda=True), 'lmbda=True must lie in'),
                    (dict(max_new_tokens=0), 'max_new_tokens=0 must be a positive integer'), (dict(prompt=0), 'prompt=0 must be a positive'),
                    (dict(pad_token_id=-1), 'pad_token_id=-1 must be a token id'), (dict(eos_token_id=[0, 'x']), "eos_token_id=\\[0, 'x'\\]")]:
        with pytest.raises(ValueError, match=msg): OnPolicy(**kw)


def test_validate_leaves_the_fit_state_alone():
    "`validate` fires `before_fit`: it neither resets the counts nor restarts the draws, and never generates"
    learn, t = learner('gpt2'), lm('gpt2', 2, 32, 0)
    op = OnPolicy(lmbda=0.5, max_new_tokens=2, pad_token_id=EOS, seed=3)
    learn.add_cbs([distiller(t), op])
    fit(learn, n=2)
    counts = (op.generated, op.batches)
    with learn.no_bar(): learn.validate(); learn.validate()
    assert (op.generated, op.batches) == counts and counts[1] == 6
    state = op.rng.get_state()
    with learn.no_bar(): learn.validate()
    assert torch.equal(op.rng.get_state(), state)
