"Hugging Face transformers built from configs (nothing downloaded) distilled through the plain callback"
import math, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from kdcb.callback import KnowledgeDistillationCallback, Outputs
from kdcb.distill import Connected
from kdcb.losses import SoftTarget, HiddenStateCosine, FitNet
from kdcb.match import depth_pairs
from kdcb.teachers import FunctionTeacher, FrozenTeacher
from kdcb.lm import KeywordInputs
from conftest import quiet_fit, tiny_gpt2

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()
V = 24


def gpt2(layers, d, seed): return tiny_gpt2(layers, d, seed, V)


def bert(layers, d, seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * d, max_position_embeddings=32, hidden_dropout_prob=0., attention_probs_dropout_prob=0.)
    return transformers.BertForMaskedLM(cfg)


def causal_dls(n=64, L=12, bs=16):
    "labels = input_ids (Hugging Face's convention), with some positions not scored"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (n, L), generator=g)
    labels = ids.clone(); labels[:, :3] = -100 # e.g. a prompt whose tokens are not learned
    ds = list(zip(ids, labels))
    return DataLoaders(DataLoader(ds[:48], bs=bs, shuffle=True), DataLoader(ds[48:], bs=bs))


def hf_causal_loss(out, y): # the model's own loss, independently: logits 0..L-2 against labels 1..L-1
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)


class Last(Callback):
    "The mixed loss, the student's logits and the batch after the distillation callback"
    order = 6
    def after_loss(self):
        if self.training: self.batch = (self.learn.loss_grad.detach(), self.pred.logits.detach(), *self.xb, *self.yb)


def kl_tokens(zs, zt, keep, T):
    p = F.softmax(zt / T, -1)
    return ((p * (F.log_softmax(zt / T, -1) - F.log_softmax(zs / T, -1))).sum(-1)[keep].mean() * T ** 2)


def test_gpt2_end_to_end_shifted_labels():
    teacher, student = gpt2(2, 32, 0), gpt2(1, 16, 1)
    kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=2), weight=0.5, outputs=Outputs(shift_labels=True))
    learn = Learner(causal_dls(), student, loss_func=hf_causal_loss, cbs=[kd, spy := Last()])
    w0 = [p.detach().clone() for p in teacher.parameters()]
    quiet_fit(learn, 1, 1e-3)
    mixed, zs, x, y = spy.batch
    teacher.eval()
    with torch.no_grad():
        zt = teacher(x).logits
    keep = y[:, 1:] != -100
    # the task term is the model's own loss with `labels=input_ids`; the KD term uses the same alignment and mask
    with torch.no_grad(): ref_task = F.cross_entropy(zs[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
    test_ref = 0.5 * ref_task + 0.5 * kl_tokens(zs[:, :-1], zt[:, :-1], keep, 2.)
    assert torch.allclose(mixed, test_ref, atol=1e-5), (mixed, test_ref)
    # unshifted masking would keep a different set of positions: the shift matters here
    assert not torch.allclose(kl_tokens(zs[:, :-1], zt[:, :-1], keep, 2.), kl_tokens(zs, zt, y != -100, 2.))
    assert all(torch.equal(a, b) for a, b in zip(w0, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    assert learn.recorder.metric_names[-3:] == ['task_loss', 'soft_target', 'time']


def test_hf_labels_match_the_models_own_loss():
    "The shifted task loss the tests use is what GPT-2 computes itself from labels = input_ids"
    m, (x, y) = gpt2(1, 16, 0).eval(), causal_dls().one_batch()
    with torch.no_grad(): assert torch.allclose(m(x, labels=y).loss, hf_causal_loss(m(x), y), atol=1e-6)


def test_function_teacher_and_output_fn():
    teacher, student = gpt2(2, 32, 0).eval(), gpt2(1, 16, 1)
    fn = lambda ids: teacher(input_ids=ids) # a plain callable, e.g. one passing keyword arguments
    kd = KnowledgeDistillationCallback(fn, SoftTarget(T=1), weight=0.5, outputs=Outputs(shift_labels=True, output_fn=lambda o: o.logits / 2))
    assert isinstance(kd.teacher, FunctionTeacher)
    learn = Learner(causal_dls(), student, loss_func=hf_causal_loss, cbs=[kd, spy := Last()])
    quiet_fit(learn, 1, 1e-3)
    mixed, zs, x, y = spy.batch
    with torch.no_grad(): zt = teacher(x).logits
    keep = y[:, 1:] != -100
    ref = 0.5 * hf_causal_loss(type('O', (), {'logits': zs})(), y) + 0.5 * kl_tokens(zs[:, :-1] / 2, zt[:, :-1] / 2, keep, 1.)
    assert torch.allclose(mixed, ref, atol=1e-5)


def test_shift_labels_refuses_class_outputs(dls):
    from conftest import mlp
    from fastai.losses import CrossEntropyLossFlat
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=KnowledgeDistillationCallback(mlp(), outputs=Outputs(shift_labels=True)))
    with pytest.raises(ValueError, match='causal language models only'): quiet_fit(learn)


def test_gpt2_depth_pairs_skip_the_logits():
    s, t = gpt2(2, 16, 0), gpt2(4, 32, 1)
    pairs = depth_pairs(s, t, torch.randint(0, V, (2, 8)))
    assert pairs == {'student': ['transformer.h.0', 'transformer.h.1'], 'teacher': ['transformer.h.1', 'transformer.h.3']}
    assert [r.teacher_shape for r in pairs.rows] == [(2, 8, 32)] * 2
    assert [type(c).__name__ for c in pairs.connectors().maps.values()] == ['Linear', 'Linear']


def padded_mlm_dls(pad_tokens, n=32, L=10, bs=8):
    "Masked-LM batches (input_ids, attention_mask) -> labels; the second half of every other sequence is padding"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (n, L), generator=g)
    mask = torch.ones_like(ids); mask[::2, L // 2:] = 0
    ids = torch.where(mask == 1, ids, pad_tokens[:n, :L])
    labels = torch.full_like(ids, -100); labels[:, 1::3] = ids[:, 1::3]; labels[mask == 0] = -100
    ds = list(zip(ids, mask, labels))
    return DataLoaders(DataLoader(ds, bs=bs, shuffle=True), DataLoader(ds, bs=bs))


def mlm_loss(out, y): return F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)


@pytest.mark.parametrize('use_mask', [True, False])
def test_bert_hidden_states_with_attention_mask(use_mask):
    "BERT student/teacher, blocks paired by depth, DistilBERT's cosine behind connectors: padding is left out with the mask"
    s, t = bert(2, 16, 0), bert(4, 32, 1)
    pairs = depth_pairs(s, t, (torch.randint(0, V, (2, 10)), torch.ones(2, 10, dtype=torch.long)))
    assert pairs['teacher'] == ['bert.encoder.layer.1', 'bert.encoder.layer.3']
    torch.manual_seed(0)
    def cosine(out_s, out_t, attention_mask=None): return HiddenStateCosine()(out_s, out_t, attention_mask=attention_mask) # no labels
    kd = KnowledgeDistillationCallback(t, ['soft_target', Connected(cosine, pairs.connectors())],
                                       pairs['student'], pairs['teacher'], weight=[0.25, 0.25], distill_valid=True,
                                       outputs=Outputs(attention_mask=1 if use_mask else None))
    learn = Learner(padded_mlm_dls(torch.zeros(32, 10, dtype=torch.long)), s, loss_func=mlm_loss, cbs=kd)
    c0 = [p.detach().clone() for p in kd.kd_loss.parameters()]
    quiet_fit(learn, 1, 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(c0, kd.kd_loss.parameters())) # the connectors trained
    # the same batches with other tokens under the padding: with the mask the (distilled) validation loss cannot change
    losses = []
    for pad in (torch.zeros(32, 10, dtype=torch.long), torch.randint(1, V, (32, 10), generator=torch.Generator().manual_seed(1))):
        learn.dls = padded_mlm_dls(pad)
        with learn.no_bar(), learn.no_logging(): losses.append(learn.validate()[0])
    assert (abs(losses[0] - losses[1]) < 1e-5) == use_mask, losses


@pytest.mark.parametrize('how', ['regressor', 'connected', 'no mask'])
def test_gpt2_fitnet_hidden_states_leave_padding_out(how):
    "FitNet on GPT-2 blocks of widths 32 and 128 paired by depth: other tokens under the padding (so other hidden states"
    " there) leave the distilled loss unchanged when the callback has the mask, and change it when it has not"
    s, t = KeywordInputs(gpt2(2, 32, 0)), KeywordInputs(gpt2(4, 128, 1)) # GPT-2's second positional argument is its cache, not the mask
    pairs = depth_pairs(s, t, (torch.randint(0, V, (2, 10)), torch.ones(2, 10, dtype=torch.long)))
    assert pairs['teacher'] == ['model.transformer.h.1', 'model.transformer.h.3']
    loss = Connected(FitNet(tokens=True), pairs.connectors()) if how == 'connected' else FitNet(32, 128, tokens=True)
    kd = KnowledgeDistillationCallback(t, ['soft_target', loss], pairs['student'], pairs['teacher'], weight=[0.25, 0.25],
                                       distill_valid=True, outputs=Outputs(shift_labels=True, attention_mask=None if how == 'no mask' else 1))
    learn = Learner(padded_mlm_dls(torch.zeros(32, 10, dtype=torch.long)), s, loss_func=hf_causal_loss, cbs=kd)
    quiet_fit(learn, 1, 1e-3)
    seen = [] # the teacher's last paired block, at every batch
    block = dict(t.named_modules())[pairs['teacher'][-1]]
    hook = block.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    firsts, losses = [], []
    for pad in (torch.zeros(32, 10, dtype=torch.long), torch.randint(1, V, (32, 10), generator=torch.Generator().manual_seed(1))):
        learn.dls, n = padded_mlm_dls(pad), len(seen)
        with learn.no_bar(), learn.no_logging(): losses.append(learn.validate()[0])
        firsts.append(seen[n]) # the first validation batch; its sequence 0 is padded from position 5
    hook.remove()
    assert not torch.allclose(firsts[0][0, 5:], firsts[1][0, 5:]) and torch.equal(firsts[0][0, :5], firsts[1][0, :5])
    assert (abs(losses[0] - losses[1]) < 1e-5) == (how != 'no mask'), losses


def test_teacher_on_its_own_device_returns_a_plain_dict():
    "With a teacher device the ModelOutput comes back through fastai's `to_device` as a plain dict: still its logits"
    teacher, student = gpt2(2, 32, 0), gpt2(1, 16, 1)
    kd = KnowledgeDistillationCallback(FrozenTeacher(teacher, device='cpu'), 'soft_target', outputs=Outputs(shift_labels=True))
    learn = Learner(causal_dls(), student, loss_func=hf_causal_loss, cbs=kd)
    quiet_fit(learn, 1, 1e-3)
    assert learn.recorder.values[-1][-1] > 0 # the soft_target column


def test_topk_cache_through_the_callback():
    "GPT-2 logits cached as top-k float16 logits: the teacher runs in the first epoch only, the cache is small"
    from kdcb.teachers import FrozenTeacher, TopKCachedTeacher
    teacher, student = gpt2(2, 32, 0), gpt2(1, 16, 1)
    calls = []
    h = teacher.register_forward_pre_hook(lambda m, i: calls.append(1))
    src = TopKCachedTeacher(FrozenTeacher(teacher), k=5)
    kd = KnowledgeDistillationCallback(src, SoftTarget(T=2), outputs=Outputs(shift_labels=True))
    learn = Learner(causal_dls(), student, loss_func=hf_causal_loss, cbs=kd)
    quiet_fit(learn, 3, 1e-3)
    h.remove()
    assert len(calls) == 3 # three training batches in the first epoch; validation does not distil
    vals, idx, fill = src.cache['out']
    assert vals.shape == idx.shape == (48, 12, 5) and fill.shape == (48, 12, 1)
    assert (vals.dtype, idx.dtype, fill.dtype) == (torch.float16, torch.int32, torch.float32)
    assert TopKCachedTeacher.nbytes(48, 12, V, 5) == vals.nbytes + idx.nbytes + fill.nbytes
    x = causal_dls().train_ds[0][0][None]
    with torch.no_grad(): z = teacher.eval()(x).logits
    from kdcb.teachers import _fingerprint
    row = src.cache['rows'][_fingerprint((x,)).tolist()[0]] # the cache knows an item by its inputs
    assert torch.allclose(vals[row].float(), z[0].topk(5, -1).values, atol=1e-2) # the teacher's logits, not log-probabilities


def test_attention_transfer_gpt2_and_bert():
    "TinyBERT/MiniLM attention KL from the models' own attentions (eager attention), through the callback"
    from kdcb.losses import AttentionKL
    def eager_gpt2(layers, d, heads, seed):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=V,
            n_positions=32, bos_token_id=0, eos_token_id=0, output_attentions=True, attn_implementation='eager'))
    teacher, student = eager_gpt2(4, 32, 4, 0), eager_gpt2(2, 16, 2, 1)
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', AttentionKL()], weight=[0.3, 0.2], outputs=Outputs(shift_labels=True))
    learn = Learner(causal_dls(), student, loss_func=hf_causal_loss, cbs=kd)
    quiet_fit(learn, 2, 3e-3)
    first, last = learn.recorder.values[0][-1], learn.recorder.values[-1][-1]
    assert 0 < last < first, (first, last) # the student's attention moves towards the teacher's
    # a model without attention probabilities is refused with the fix
    kd = KnowledgeDistillationCallback(gpt2(2, 32, 0), AttentionKL(), outputs=Outputs(shift_labels=True))
    learn = Learner(causal_dls(), gpt2(1, 16, 1), loss_func=hf_causal_loss, cbs=kd)
    with pytest.raises(ValueError, match="attn_implementation='eager'"): quiet_fit(learn)
    # BERT with padding: queries on padding are left out
    t = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, output_attentions=True, attn_implementation='eager')).eval()
    x, m, _ = padded_mlm_dls(torch.zeros(32, 10, dtype=torch.long)).one_batch()
    with torch.no_grad(): o, o2 = t(x, m), t(x.masked_fill(m == 0, 5), m) # other tokens under the padding
    assert AttentionKL()(o, o2, m).abs() < 1e-9 # only the padded queries differ
    assert AttentionKL()(o, o2) > 1e-6 # ... and without the mask they count


@pytest.mark.parametrize('use_mask', [True, False])
def test_value_relation_bert_through_the_callback(use_mask):
    "MiniLM's value relation on hooked `attention.self.value` layers (widths 16 vs 32, 2 relation heads): trains, and padding is left out with the mask"
    from kdcb.losses import ValueRelation
    s, t = bert(2, 16, 0), bert(4, 32, 1)
    kd = KnowledgeDistillationCallback(t, ValueRelation(heads=2), ['bert.encoder.layer.1.attention.self.value'],
                                       ['bert.encoder.layer.3.attention.self.value'], weight=0.9, distill_valid=True,
                                       outputs=Outputs(attention_mask=1 if use_mask else None))
    learn = Learner(padded_mlm_dls(torch.zeros(32, 10, dtype=torch.long)), s, loss_func=mlm_loss, cbs=kd)
    quiet_fit(learn, 1, 1e-3)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()
    losses = []
    for pad in (torch.zeros(32, 10, dtype=torch.long), torch.randint(1, V, (32, 10), generator=torch.Generator().manual_seed(1))):
        learn.dls = padded_mlm_dls(pad)
        with learn.no_bar(), learn.no_logging(): losses.append(learn.validate()[0])
    assert (abs(losses[0] - losses[1]) < 1e-6) == use_mask, losses


def test_value_relation_gpt2_qkv_takes_the_values():
    "GPT-2's c_attn returns queries, keys and values side by side: qkv=True equals the loss on the values alone"
    from kdcb.losses import ValueRelation
    s, t = gpt2(1, 16, 0).eval(), gpt2(2, 32, 1).eval()
    x = torch.randint(1, V, (3, 8))
    out = {}
    hooks = [m.transformer.h[-1].attn.c_attn.register_forward_hook(lambda mod, i, o, k=k: out.__setitem__(k, o)) for k, m in (('s', s), ('t', t))]
    with torch.no_grad(): s(x), t(x)
    for h in hooks: h.remove()
    vs, vt = out['s'][..., 32:], out['t'][..., 64:] # the values: the last third of c_attn's output
    assert torch.allclose(ValueRelation(2, qkv=True)(out['s'], out['t']), ValueRelation(2)(vs, vt))
    assert not torch.allclose(ValueRelation(2)(out['s'], out['t']), ValueRelation(2)(vs, vt)) # without qkv the queries and keys count


def test_value_relation_gradcheck():
    from kdcb.losses import ValueRelation
    torch.manual_seed(0)
    vs = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    vt, m = torch.randn(2, 5, 6, dtype=torch.float64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: ValueRelation(2)(v, vt, m), (vs,))
    ValueRelation(2)(vs, vt, m).backward()
    assert vs.grad[0, 3:].abs().max() == 0 # padded values get no gradient


def llama(layers, d, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def masked_causal_dls(n=48, L=12, bs=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (n, L), generator=g)
    mask = torch.ones_like(ids); mask[::3, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100); labels[:, :3] = -100
    ds = list(zip(ids, mask, labels))
    return DataLoaders(DataLoader(ds[:32], bs=bs, shuffle=True), DataLoader(ds[32:], bs=bs))


class LastOf(Last):
    "`Last` for a prediction that fastai's `to_float` turned into a plain dict"
    def after_loss(self):
        if self.training: self.batch = (self.learn.loss_grad.detach(), self.pred['logits'].detach(), *self.xb, *self.yb)


@pytest.mark.parametrize('make', [gpt2, llama])
@pytest.mark.parametrize('precision', ['to_bf16', 'to_fp16'])
def test_mixed_precision_learner_distils(make, precision):
    "fastai's `MixedPrecision` turns the output into floats with `to_float`, which fails on a model output holding a `DynamicCache`"
    from fastai.callback.fp16 import MixedPrecision
    from kdcb.lm import causal_lm_loss
    teacher, student = KeywordInputs(make(2, 32, 0)), KeywordInputs(make(1, 16, 1))
    kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=2), outputs=Outputs(shift_labels=True, attention_mask=1))
    learn = getattr(Learner(masked_causal_dls(), student, loss_func=causal_lm_loss, cbs=[kd, spy := LastOf()]), precision)()
    assert any(isinstance(c, MixedPrecision) for c in learn.cbs)
    w0 = [p.detach().clone() for p in student.parameters()]
    quiet_fit(learn, 2, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
    assert any(not torch.equal(a, b) for a, b in zip(w0, student.parameters()))
    # the mixed loss of the last batch, recomputed: the task loss and the soft target over the kept (shifted, masked) positions
    mixed, zs, x, m, y = spy.batch
    with torch.no_grad(): zt = teacher.eval()(x, m).logits
    keep = (y[:, 1:] != -100) & (m[:, 1:] == 1)
    ref = 0.5 * causal_lm_loss(zs, y) + 0.5 * kl_tokens(zs[:, :-1], zt[:, :-1], keep, 2.)
    assert torch.allclose(mixed, ref, atol=1e-5), (mixed, ref)


def test_keyword_inputs_leave_the_cache_out():
    m = gpt2(1, 16, 0).eval()
    x = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        assert m(x).past_key_values is not None # what a Hugging Face causal LM returns by default
        out = KeywordInputs(m)(x, torch.ones_like(x))
        assert list(out.keys()) == ['logits'] and torch.equal(out.logits, m(x).logits)
    bm = bert(1, 16, 0).eval() # BERT's forward takes no `use_cache`: called as before
    assert not KeywordInputs(bm).no_cache
    with torch.no_grad(): assert torch.equal(KeywordInputs(bm)(x).logits, bm(input_ids=x).logits)


def test_unwrapped_model_with_mixed_precision_needs_use_cache_off():
    "Llama takes the mask second and needs no `KeywordInputs`; under `to_bf16` its cache must be off, as the LM page says"
    from kdcb.lm import causal_lm_loss
    student = llama(1, 16, 1)
    kd = KnowledgeDistillationCallback(llama(2, 32, 0), SoftTarget(T=2), outputs=Outputs(shift_labels=True, attention_mask=1))
    learn = Learner(masked_causal_dls(), student, loss_func=causal_lm_loss, cbs=kd).to_bf16()
    student.config.use_cache = False # else fastai's `to_float` fails on the `DynamicCache` in its output
    quiet_fit(learn, 1, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
