"Sequence-level distillation data from a teacher's `generate`, and DistilBERT's triple loss, on tiny models built from configs"
import math, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
import fastai.callback.progress  # Learner.no_bar
from kdcb.callback import KnowledgeDistillationCallback, Outputs
from kdcb.losses import SoftTarget
from kdcb.lm import (Responses, generate_responses, causal_lm_loss, KeywordInputs, TokenSoftTarget, distilbert_recipe,
                            as_prompts)
from conftest import quiet_fit

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()
V, EOS = 24, 0


def gpt2(layers, d, seed):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=2, vocab_size=V, n_positions=64,
                                                                bos_token_id=EOS, eos_token_id=EOS))


def bert(layers, d, seed):
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * d, max_position_embeddings=32, hidden_dropout_prob=0., attention_probs_dropout_prob=0.))


def random_prompts(n, seed=0, lo=1, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (int(k),), generator=g) for k in torch.randint(lo, hi, (n,), generator=g)]


def cut_at_eos(row, eos=(EOS,)):
    hit = [i for i, t in enumerate(row.tolist()) if t in eos]
    return row[:hit[0] + 1] if hit else row


def check_labels(data):
    "-100 exactly on prompt and padding; response positions hold the response; the mask covers prompt + response"
    n = data.input_ids.shape[1]
    for i, (p, r) in enumerate(zip(data.prompts, data.responses)):
        pos = torch.arange(n)
        resp = (pos >= len(p)) & (pos < len(p) + len(r))
        assert torch.equal(data.labels[i] != -100, resp)
        assert torch.equal(data.labels[i][resp], r) and torch.equal(data.input_ids[i][:len(p)], p)
        assert torch.equal(data.attention_mask[i], (pos < len(p) + len(r)).long())
        ids, mask, labels = data[i]
        assert torch.equal(labels, data.labels[i]) and torch.equal(mask, data.attention_mask[i])


@pytest.mark.parametrize('pad', [EOS, 23]) # GPT-2's usual choice, pad = eos, and a separate pad id
def test_responses_are_what_generate_returns_for_each_prompt_alone(pad):
    "Left-padded batches of prompts of different lengths get the responses each prompt gets alone; labels only on them"
    teacher, prompts = gpt2(2, 32, 0), random_prompts(10)
    data = generate_responses(teacher, prompts, max_new_tokens=6, bs=4, pad_token_id=pad, progress=False)
    assert len(data) == 10 and all(torch.equal(a, b) for a, b in zip(data.prompts, prompts))
    for p, r in zip(prompts, data.responses):
        with torch.no_grad(): alone = teacher.generate(p[None], max_new_tokens=6, pad_token_id=pad)[0, len(p):]
        assert torch.equal(r, cut_at_eos(alone)) and 1 <= len(r) <= 6
    check_labels(data)
    assert (data.input_ids[data.attention_mask == 0] == pad).all()
    # the same through KeywordInputs, which forwards `generate` and the config (eos), and from a Learner holding the teacher
    wrapped = generate_responses(KeywordInputs(teacher), prompts, max_new_tokens=6, bs=4, pad_token_id=pad, progress=False)
    assert torch.equal(wrapped.input_ids, data.input_ids)
    learner = generate_responses(Learner(data.dls(), teacher, loss_func=causal_lm_loss), prompts, max_new_tokens=6, bs=4, pad_token_id=pad, progress=False)
    assert torch.equal(learner.labels, data.labels)


def test_eos_ends_a_response_and_kwargs_pass_through():
    "A `generate`-like callable: left-padded prompts in, the first eos kept, what follows it is padding, labelled -100"
    seen = {}
    class Out: # `return_dict_in_generate=True` returns an object with `sequences`
        def __init__(self, s): self.sequences = s
    def fake_generate(input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kw):
        seen.update(ids=input_ids, mask=attention_mask, max_new_tokens=max_new_tokens, eos=eos_token_id, kw=kw)
        new = torch.tensor([[5, 7, 9, 9], [6, 6, 6, 6], [8, 4, 9, 9]]) # eos 7 or 8; 9 is padding after eos
        return Out(torch.cat([input_ids, new], 1))
    data = generate_responses(fake_generate, [[1, 2], [3], [2, 2]], max_new_tokens=4, pad_token_id=9, eos_token_id=[7, 8],
                              progress=False, do_sample=False, temperature=0.5)
    assert torch.equal(seen['ids'], torch.tensor([[1, 2], [9, 3], [2, 2]])) # padded on the left
    assert torch.equal(seen['mask'], torch.tensor([[1, 1], [0, 1], [1, 1]]))
    assert seen['max_new_tokens'] == 4 and seen['eos'] == [7, 8] and seen['kw'] == dict(do_sample=False, temperature=0.5)
    assert [r.tolist() for r in data.responses] == [[5, 7], [6, 6, 6, 6], [8]]
    assert data.labels.tolist() == [[-100, -100, 5, 7, -100], [-100, 6, 6, 6, 6], [-100, -100, 8, -100, -100]]
    assert data.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    check_labels(data)


def test_greedy_is_deterministic_sampling_is_seeded():
    teacher, prompts = gpt2(2, 32, 0), random_prompts(6, seed=1)
    a, b = (generate_responses(teacher, prompts, max_new_tokens=8, pad_token_id=EOS, progress=False) for _ in range(2))
    assert torch.equal(a.input_ids, b.input_ids)
    def sample(seed):
        torch.manual_seed(seed)
        return generate_responses(teacher, prompts, max_new_tokens=8, pad_token_id=EOS, progress=False, do_sample=True, top_k=0)
    s0, s0b, s1 = sample(0), sample(0), sample(1)
    assert torch.equal(s0.input_ids, s0b.input_ids) and not torch.equal(s0.input_ids, s1.input_ids)
    k2 = generate_responses(teacher, prompts, max_new_tokens=4, pad_token_id=EOS, progress=False, do_sample=True, num_return_sequences=2)
    assert len(k2) == 12 and all(torch.equal(k2.prompts[2 * i], p) and torch.equal(k2.prompts[2 * i + 1], p) for i, p in enumerate(prompts))
    check_labels(k2)


def test_teacher_runs_in_eval_mode_without_grad_and_its_modes_come_back():
    teacher = gpt2(2, 32, 0).train()
    teacher.transformer.h[1].eval() # a mixed state must come back as it was
    before = [m.training for m in teacher.modules()]
    during = []
    h = teacher.register_forward_pre_hook(lambda m, i: during.append((m.training, torch.is_grad_enabled())))
    generate_responses(teacher, random_prompts(3), max_new_tokens=3, pad_token_id=EOS, progress=False)
    h.remove()
    assert during and all(d == (False, False) for d in during)
    assert [m.training for m in teacher.modules()] == before
    class Failing(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(2, 2)
        def generate(self, **kw): assert not self.training; raise RuntimeError('out of memory')
    f = Failing().train()
    with pytest.raises(RuntimeError, match='out of memory'): generate_responses(f, [[1]], pad_token_id=0, progress=False)
    assert f.training and f.lin.training


def test_bad_input_is_refused_with_the_fix():
    teacher = gpt2(1, 16, 0)
    with pytest.raises(TypeError, match='has no `generate` method'): generate_responses(nn.Linear(2, 2), [[1]], pad_token_id=0)
    with pytest.raises(ValueError, match='pass `pad_token_id=`'): generate_responses(teacher, [[1, 2]])
    with pytest.raises(TypeError, match='holds torch.float32'): generate_responses(teacher, torch.rand(2, 3), pad_token_id=0)
    with pytest.raises(ValueError, match=r'must be \(n_prompts, length\)'): generate_responses(teacher, torch.ones(3, dtype=torch.long), pad_token_id=0)
    with pytest.raises(ValueError, match='Prompt 1 has shape'): generate_responses(teacher, [[1], [[1, 2]]], pad_token_id=0)
    with pytest.raises(TypeError, match='are text'): generate_responses(teacher, ['a prompt'], pad_token_id=0)
    with pytest.raises(ValueError, match='max_new_tokens=0'): generate_responses(teacher, [[1]], max_new_tokens=0, pad_token_id=0)
    def decoder_only_not(input_ids, **kw): return torch.ones(len(input_ids), 2, dtype=torch.long)
    with pytest.raises(ValueError, match='encoder-decoder'): generate_responses(decoder_only_not, [[1, 2]], pad_token_id=0, progress=False)
    # a tokenizer's output, padded on the right: the padding is dropped from the prompts
    assert [p.tolist() for p in as_prompts({'input_ids': torch.tensor([[4, 5, 0], [6, 0, 0]]), 'attention_mask': torch.tensor([[1, 1, 0], [1, 0, 0]])})] == [[4, 5], [6]]


@pytest.mark.parametrize('kw, msg', [(dict(bs=0), 'bs=0 must be a positive integer'), (dict(bs=2.0), 'bs=2.0 must be a positive integer'),
                                     (dict(bs=True), 'bs=True must be a positive integer'),
                                     (dict(max_new_tokens=-1), 'max_new_tokens=-1 must be a positive integer'),
                                     (dict(pad_token_id=-1), 'pad_token_id=-1 must be a token id'),
                                     (dict(pad_token_id=[0, 1]), r'pad_token_id=\[0, 1\] must be one token id'),
                                     (dict(eos_token_id=1.5), 'eos_token_id=1.5 must be a token id'),
                                     (dict(progress='no'), "progress='no' must be True or False")])
def test_every_argument_is_checked_by_name(kw, msg):
    "A bad value fails before any generation, with an error naming the argument (`bs=0` used to fail inside `range`)"
    called = []
    def gen(**k): called.append(k); raise AssertionError('generate must not run')
    with pytest.raises((ValueError, TypeError), match=msg): generate_responses(gen, [[1, 2]], **{'pad_token_id': 0, **kw})
    assert not called


class Spy(Callback):
    order = 6 # after the distillation callback
    def after_loss(self):
        if self.training: self.seen = (self.learn.loss_grad.detach(), self.pred.logits.detach(), *self.xb, *self.yb)


def test_student_learns_the_responses_and_word_level_kd_on_them():
    teacher = gpt2(2, 32, 0)
    data = generate_responses(teacher, random_prompts(64, seed=2), max_new_tokens=8, pad_token_id=EOS, progress=False)
    dls = data.dls(bs=16, valid_pct=0.25)
    assert len(dls.train_ds) == 48 and len(dls.valid_ds) == 16
    x, m, y = dls.one_batch()
    student = KeywordInputs(gpt2(1, 16, 1)).eval() # no dropout for this comparison
    with torch.no_grad(): # causal_lm_loss is the model's own loss from `labels=`
        assert torch.allclose(causal_lm_loss(student(x, m), y), student.model(input_ids=x, attention_mask=m, labels=y).loss, atol=1e-6)
    learn = Learner(dls, student, loss_func=causal_lm_loss)
    with learn.no_bar(), learn.no_logging(): before = learn.validate()[0]
    quiet_fit(learn, 1, 1e-2)
    after = learn.recorder.values[-1][1]
    assert math.isfinite(after) and after < before, (before, after)
    # word-level KD on the same items: the mixed loss is 0.5·CE + 0.5·T²·KL over the labelled (response) positions
    learn = Learner(dls, KeywordInputs(gpt2(1, 16, 1)), loss_func=causal_lm_loss,
                    cbs=[KnowledgeDistillationCallback(KeywordInputs(teacher), SoftTarget(T=2), outputs=Outputs(shift_labels=True, attention_mask=1)),
                         spy := Spy()])
    quiet_fit(learn, 1, 1e-2)
    mixed, zs, x, m, y = spy.seen
    with torch.no_grad(): zt = teacher.eval()(input_ids=x, attention_mask=m).logits
    keep = y[:, 1:] != -100
    p = F.softmax(zt[:, :-1] / 2, -1)
    kl = (p * (F.log_softmax(zt[:, :-1] / 2, -1) - F.log_softmax(zs[:, :-1] / 2, -1))).sum(-1)[keep].mean() * 4
    assert torch.allclose(mixed, 0.5 * causal_lm_loss(zs, y) + 0.5 * kl, atol=1e-5)


def mlm_dls(n=32, L=10, bs=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (n, L), generator=g)
    mask = torch.ones_like(ids); mask[::2, 6:] = 0; ids[mask == 0] = 0
    labels = torch.full_like(ids, -100); labels[:, 1::3] = ids[:, 1::3]; labels[mask == 0] = -100
    items = list(zip(ids, mask, labels))
    return DataLoaders(DataLoader(items, bs=bs, shuffle=True), DataLoader(items, bs=bs))


def mlm_loss(out, y): return F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)


@pytest.mark.parametrize('s_width,restrict', [(32, False), (16, False), (32, True)])
def test_distilbert_loss_is_the_hand_computed_mix(s_width, restrict):
    "0.625·T²·KL + 0.25·CE + 0.125·(1 − cos) on one batch, from the models' own hidden states (and the connector)"
    s, t, dls = bert(2, s_width, 0), bert(4, 32, 1), mlm_dls()
    x0, m0, _ = dls.one_batch()
    recipe = distilbert_recipe(s, t, (x0[:2], m0[:2]), restrict_ce_to_mask=restrict)
    assert recipe['weight'] == [0.625, 0.125] and recipe['outputs'].attention_mask == 1
    assert (list(recipe['student_layers']), list(recipe['teacher_layers'])) == (['bert.encoder.layer.1'], ['bert.encoder.layer.3'])
    kd = KnowledgeDistillationCallback(t, **recipe)
    learn = Learner(dls, s, loss_func=mlm_loss, cbs=[kd, spy := Spy()])
    quiet_fit(learn, 1, 0.) # learning rate 0: the models (and connector) do not change
    mixed, zs, x, m, y = spy.seen
    with torch.no_grad():
        so, to = s(x, m, output_hidden_states=True), t.eval()(x, m, output_hidden_states=True)
        hs = so.hidden_states[-1]
        if s_width != 32: hs = kd.kd_loss.terms[1].loss.connectors['bert.encoder.layer.1'](hs)
        keep = (y != -100) if restrict else (m == 1)
        p = F.softmax(to.logits / 2, -1)
        kl = (p * (F.log_softmax(to.logits / 2, -1) - F.log_softmax(so.logits / 2, -1))).sum(-1)[keep].mean()
        cos = F.cosine_similarity(hs, to.hidden_states[-1], dim=-1)[m == 1].mean()
    ref = 0.625 * 4 * kl + 0.25 * mlm_loss(so, y) + 0.125 * (1 - cos)
    assert torch.allclose(mixed, ref, atol=1e-5), (mixed, ref)
    assert kd.column_names == ['task_loss', 'soft_target' if restrict else 'token_soft_target',
                               'hidden_state_cosine' if s_width == 32 else 'connected_hidden_state_cosine']


def test_distilbert_connector_trains_and_alphas_are_checked():
    s, t, dls = bert(2, 16, 0), bert(4, 32, 1), mlm_dls()
    x0, m0, _ = dls.one_batch()
    kd = KnowledgeDistillationCallback(t, **distilbert_recipe(s, t, (x0[:2], m0[:2])))
    w0 = [p.detach().clone() for p in kd.kd_loss.parameters()]
    learn = Learner(dls, s, loss_func=mlm_loss, cbs=kd)
    quiet_fit(learn, 2, 1e-3)
    assert len(w0) == 2 and any(not torch.equal(a, b) for a, b in zip(w0, kd.kd_loss.parameters()))
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
    assert distilbert_recipe(s, t, (x0[:2], m0[:2]), alpha_mlm=0.)['weight'] == [5 / 6, 1 / 6] # no task loss: still valid
    with pytest.raises(ValueError, match='non-negative'): distilbert_recipe(s, t, (x0[:2], m0[:2]), alpha_cos=-1.)


def test_token_soft_target_masks_padding_only():
    zs, zt = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kl = (F.softmax(zt / 2, -1) * (F.log_softmax(zt / 2, -1) - F.log_softmax(zs / 2, -1))).sum(-1)
    labels = torch.full((2, 5), -100); labels[:, 1] = 3
    assert torch.allclose(TokenSoftTarget(T=2)(zs, zt, labels, attention_mask=mask), 4 * kl[mask == 1].mean())
    assert torch.allclose(TokenSoftTarget(T=2)(zs, zt, labels), 4 * kl[:, 1].mean()) # without a mask: the labels', as SoftTarget
    assert torch.allclose(TokenSoftTarget(T=2)(zs, zt), 4 * kl.mean())
    with pytest.raises(ValueError, match='for masked LMs'): TokenSoftTarget()(zs[:, :-1], zt[:, :-1], attention_mask=mask)


NO_KDCB = r'''
import sys; sys.modules['kdcb'] = None # `import kdcb` fails in this process
import torch, transformers
from fastai.learner import load_learner
learn = load_learner(sys.argv[1])
x, m, y = torch.load(sys.argv[2])
with torch.no_grad(): out = learn.model(x, m)
assert type(out).__module__.startswith('transformers') and list(out.keys()) == ['logits'], out.keys() # no key/value cache
dl = learn.dls.test_dl(list(zip(x, m, y)), with_labels=True)
print(float(learn.loss_func(out, y)), learn.validate(dl=dl)[0], out.logits.sum().item())
'''


def test_lm_learner_exports_and_loads_without_kdcb(tmp_path):
    "A learner built as documented (`Responses.dls`, `KeywordInputs`, `causal_lm_loss`, the callback) exports; the file loads where kdcb cannot be imported"
    import subprocess, sys
    teacher = gpt2(2, 32, 0)
    data = generate_responses(teacher, random_prompts(32, seed=3), max_new_tokens=6, pad_token_id=EOS, progress=False)
    kd = KnowledgeDistillationCallback(KeywordInputs(teacher), SoftTarget(T=2), outputs=Outputs(shift_labels=True, attention_mask=1))
    learn = Learner(data.dls(bs=8, valid_pct=0.25), KeywordInputs(gpt2(1, 16, 1)), loss_func=causal_lm_loss, cbs=kd)
    quiet_fit(learn, 1, 1e-2)
    learn.export(tmp_path / 'lm.pkl')
    x, m, y = data.input_ids[:4], data.attention_mask[:4], data.labels[:4]
    torch.save((x, m, y), tmp_path / 'batch.pt')
    learn.model.eval()
    with torch.no_grad(): out = learn.model(x, m)
    r = subprocess.run([sys.executable, '-c', NO_KDCB, str(tmp_path / 'lm.pkl'), str(tmp_path / 'batch.pt')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loss, valid, total = map(float, r.stdout.split()[-3:])
    assert loss == pytest.approx(float(causal_lm_loss(out, y)), rel=1e-5) and valid == pytest.approx(loss, rel=1e-5)
    assert total == pytest.approx(out.logits.sum().item(), rel=1e-5) # the same student, the same outputs


def test_responses_dls_are_fastai_datasets_in_the_same_split():
    data = Responses([torch.tensor([i + 1, 2]) for i in range(10)], [torch.tensor([3, EOS])] * 10, EOS)
    dls = data.dls(bs=4, valid_pct=0.3, seed=1)
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert [int(x[0]) for x, m, y in dls.valid_ds] == [idx[i] + 1 for i in range(3)]
    assert sorted(int(x[0]) for x, m, y in dls.train_ds) == sorted(i + 1 for i in idx[3:])
    assert dls.n_inp == 2 and [len(b[0]) for b in dls.train] == [4, 3] # no batch dropped
    empty = dls.new_empty() # what `export` keeps
    assert len(empty.train_ds) == 0 and len(empty.valid_ds) == 0
