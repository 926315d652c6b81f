"Inputs checked where they are given, user objects left as they were, no result silently wrong: one test per case found"
import copy, pytest, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from kdcb.data import add_unlabelled
from kdcb.online import MutualLearning, DeepSupervision, born_again, teacher_chain
from conftest import toy_dls, mlp, conv, quiet_fit


def learner(dls, model, cbs=None): return Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=cbs)


# ---- add_unlabelled

def test_add_unlabelled_refuses_inputs_and_labels_of_different_lengths():
    x, y, xu = torch.randn(6, 4), torch.arange(5), torch.randn(3, 4)
    with pytest.raises(ValueError, match='6 labelled inputs `x` but 5 labels `y`'): add_unlabelled(x, y, xu)


def test_add_unlabelled_checks_types_and_dtypes():
    x, y = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(TypeError, match='`y` must be a tensor, got list'): add_unlabelled(x, [0, 1, 2, 3], torch.randn(2, 3))
    with pytest.raises(TypeError, match=r'x_unlabelled.to\(torch.float32\)'): add_unlabelled(x, y, torch.randn(2, 3).double())
    xi = torch.randint(0, 255, (4, 3), dtype=torch.uint8) # images as bytes: float inputs would be truncated to bytes
    with pytest.raises(TypeError, match='x_unlabelled` is torch.float32 but `x` is torch.uint8'): add_unlabelled(xi, y, torch.rand(2, 3))
    with pytest.raises(TypeError, match='`label` must be an int'): add_unlabelled(x, y, torch.randn(2, 3), label=-1.5)


# ---- born_again and teacher_chain

def test_born_again_refuses_a_model_instance(dls):
    "A model instance would be trained in place by every generation: generation 2 distilled from itself"
    with pytest.raises(TypeError, match=r'lambda: copy.deepcopy\(model\)'): born_again(mlp(), dls, generations=2, epochs=1)


def test_born_again_refuses_a_factory_that_returns_the_same_model(dls):
    m = mlp()
    with pytest.raises(ValueError, match='generation 2 is a model that this run already trains'):
        born_again(lambda: m, dls, generations=2, epochs=1)


def test_born_again_from_a_deep_copying_factory_trains_separate_generations(dls):
    m = mlp(); w0 = m[0].weight.detach().clone()
    g = born_again(lambda: copy.deepcopy(m), dls, generations=2, epochs=1)
    a, b = (l.model for l in g.learners)
    assert a is not b and a is not m and torch.equal(m[0].weight, w0) # the user's model is untouched
    assert not torch.equal(a[0].weight, b[0].weight)


def test_teacher_chain_refuses_the_same_model_twice(dls):
    t, s = mlp(), mlp()
    with pytest.raises(ValueError, match=r'students\[1\] is a model that this run already trains'): teacher_chain(t, [s, s], dls, epochs=1)
    with pytest.raises(ValueError, match=r'students\[0\] is a model'): teacher_chain(t, [t], dls, epochs=1)


# ---- DeepSupervision export

def export_dls():
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    items = list(toy_dls().train.dataset)
    return Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(150)), list(range(150, 192))]).dataloaders(bs=32)


def wide(c=200):
    "A student with many classes: a head on layer '1' is as large as its own last layer, an exported file with it about twice as big"
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, c))


def test_deep_supervision_export_leaves_the_heads_out(tmp_path):
    dls = export_dls()
    ds = DeepSupervision(['1'])
    learn = learner(dls, wide(), cbs=ds)
    quiet_fit(learn, 1)
    assert sum(p.numel() for p in ds.heads.parameters()) > 10_000 # heads that would show in the file
    learn.export(tmp_path/'ds.pkl'); size = (tmp_path/'ds.pkl').stat().st_size
    plain = learner(dls, wide()); plain.export(tmp_path/'plain.pkl')
    assert size < 1.05 * (tmp_path/'plain.pkl').stat().st_size
    quiet_fit(learn, 1) # the learner that exported keeps its heads
    assert ds.heads is not None


# ---- float64 models

def dls64():
    d = toy_dls()
    tr, va = ([(x.double(), y) for x, y in dl.dataset] for dl in (d.train, d.valid))
    return DataLoaders(DataLoader(tr, bs=32, drop_last=True), DataLoader(va, bs=32))


@pytest.mark.parametrize('make_cb', [lambda: DeepSupervision(['1', '3']), lambda: MutualLearning(conv().double())], ids=['deep_supervision', 'mutual'])
def test_float64_model_trains(make_cb):
    learn = learner(dls64(), conv().double(), cbs=make_cb())
    quiet_fit(learn, 1)
    assert torch.isfinite(torch.stack([torch.as_tensor(l) for l in learn.recorder.losses])).all()
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()
    assert all(p.dtype == torch.float64 for p in learn.model.parameters())


# ---- MutualLearning peers

def test_mutual_peer_with_another_number_of_outputs_is_named(dls):
    learn = learner(dls, mlp(c=3), cbs=MutualLearning([mlp(c=3), mlp(c=4)]))
    with pytest.raises(ValueError, match=r'peer 2 returns outputs of shape \(32, 4\), the learner\'s model \(32, 3\)'): quiet_fit(learn, 1)


# ---- match_feature_layers on language models

def gpt2(n_layer, d):
    from transformers import GPT2Config, GPT2LMHeadModel, logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=d, n_layer=n_layer, n_head=2, bos_token_id=0, eos_token_id=0))


def test_match_feature_layers_pairs_gpt2_blocks_by_depth_never_the_logits():
    from kdcb.match import match_feature_layers, depth_pairs
    s, t, ids = gpt2(2, 16), gpt2(4, 32), torch.randint(0, 50, (2, 7))
    p = match_feature_layers(s, t, ids)
    assert 'lm_head' not in p['student'] + p['teacher']
    assert p == depth_pairs(s, t, ids) == {'student': ['transformer.h.0', 'transformer.h.1'], 'teacher': ['transformer.h.1', 'transformer.h.3']}
    assert [r.teacher_shape for r in p.rows] == [(2, 7, 32)] * 2
    with pytest.raises(ValueError, match=r'more blocks \(4\) than the teacher \(2\).*depth_pairs\(student, teacher'): match_feature_layers(t, s, ids)


def test_match_feature_layers_never_pairs_logits_returned_in_a_dict():
    "A token model without a stack of blocks that returns {'logits': ...}: its last layer's output is the logits, not a feature"
    from kdcb.match import match_feature_layers
    class LM(nn.Module):
        def __init__(self, d):
            super().__init__(); self.emb, self.mix, self.head = nn.Embedding(50, d), nn.Linear(d, d), nn.Linear(d, 50)
        def forward(self, ids): return {'logits': self.head(self.mix(self.emb(ids)))}
    p = match_feature_layers(LM(8), LM(16), torch.randint(0, 50, (2, 7)))
    assert p == {'student': ['mix'], 'teacher': ['mix']}


# ---- cached teacher sources

def test_cached_sources_take_a_model_and_refuse_what_they_cannot_cache(dls):
    from kdcb.teachers import CachedTeacher, TopKCachedTeacher, FrozenTeacher
    from kdcb.online import EMATeacher
    from kdcb.callback import KnowledgeDistillationCallback
    t = mlp()
    src = TopKCachedTeacher(t, k=2) # a model is cached through its FrozenTeacher
    assert isinstance(src.source, FrozenTeacher) and src.source.model is t
    quiet_fit(learner(toy_dls(), mlp()), 1, cbs=KnowledgeDistillationCallback(src))
    with pytest.raises(TypeError, match=r'TopKCachedTeacher\(FrozenTeacher\(model\)\)'): TopKCachedTeacher('gpt2')
    with pytest.raises(ValueError, match='k=2.5 must be a positive'): TopKCachedTeacher(FrozenTeacher(t), k=2.5)
    with pytest.raises(TypeError, match='floating-point torch dtype'): TopKCachedTeacher(FrozenTeacher(t), dtype=torch.int8)
    with pytest.raises(ValueError, match='outputs change during training'): CachedTeacher(EMATeacher(mlp()))


def test_topk_cache_refuses_logits_float16_cannot_hold():
    from kdcb.teachers import topk_pack
    with pytest.raises(ValueError, match=r'as large as 1e\+05 do not fit in torch.float16'): topk_pack(torch.tensor([[1e5, 0., 1.]]), 1)
    v, i, fill = topk_pack(torch.tensor([[1e5, 0., 1.]]), 1, torch.float32)
    assert v.item() == 1e5 and i.item() == 0


# ---- losses on the non-target classes

@pytest.mark.parametrize('which', ['decoupled_kd', 'normalized_kd'])
def test_non_target_distribution_leaves_the_target_out_at_any_logit_scale(which):
    "A target logit of 5e4: the 'non-target' distribution must still give the target class no mass (a fixed -1e4 push did)"
    from kdcb.losses import DecoupledKD, NormalizedKD
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    s, t, y = 10 * torch.randn(4, 6, generator=g), 10 * torch.randn(4, 6, generator=g), torch.tensor([0, 1, 2, 3])
    s[range(4), y] = t[range(4), y] = 5e4
    keep = ~F.one_hot(y, 6).bool()
    ls, lt = (z[keep].view(4, 5) for z in (s, t)) # the non-target logits alone
    if which == 'decoupled_kd':
        got = DecoupledKD(T=1., alpha=0., beta=1.)(s, t, y)
        want = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction='none').sum(-1).mean()
    else:
        got = NormalizedKD(T=1., gamma=1.)(s, t, y)
        want = (-(F.softmax(lt, -1) * F.log_softmax(ls, -1)).sum(-1)).mean() # the target term is 0: p_s(y) = p_t(y) = 1
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- hyper-parameters that would silently give a constant or wrong loss

@pytest.mark.parametrize('make, msg', [
    (lambda: __import__('kdcb.losses', fromlist=['x']).Attention(p=0), 'p=0 must be > 0'),
    (lambda: __import__('kdcb.losses', fromlist=['x']).PKT(eps=0), 'eps=0 must be > 0'),
    (lambda: __import__('kdcb.losses', fromlist=['x']).RKD(w_dist=-1), 'w_dist=-1 must be >= 0'),
    (lambda: __import__('kdcb.losses', fromlist=['x']).ActivationBoundaries(margin=-1.), 'margin=-1.0 must be >= 0'),
    (lambda: __import__('kdcb.losses', fromlist=['x']).MGDLoss(4, 4, lambda_mgd=1.), 'lambda_mgd=1.0 must lie in [0, 1)'),
    (lambda: __import__('kdcb.losses', fromlist=['x']).MGDLoss(4.5, 4), 'num_student_channels=4.5 must be a positive'),
    (lambda: __import__('kdcb.contrastive', fromlist=['x']).InfoNCE(4, 4, dim=0), 'dim=0 must be a positive'),
    (lambda: __import__('kdcb.contrastive', fromlist=['x']).CRD(4, 4, dim=0), 'dim=0 must be a positive'),
    (lambda: __import__('kdcb.detection', fromlist=['x']).DetectionHeadKD(2, fg_threshold=2.), 'fg_threshold=2.0 must lie in [0, 1]'),
    (lambda: __import__('kdcb.detection', fromlist=['x']).DetectionHeadKD(2, beta=-1.), 'beta=-1.0 must be >= 0'),
    (lambda: __import__('kdcb.online', fromlist=['x']).Progressive(0., 1., stages=2.5), 'whole number of at least 2 stages'),
    (lambda: __import__('kdcb.online', fromlist=['x']).EMATeacher(mlp(), warmup='no'), "warmup='no' must be True or False"),
    (lambda: __import__('kdcb.data', fromlist=['x']).LabelledOnly(label=1.5), 'label=1.5 must be an int'),
], ids=['attention_p', 'pkt_eps', 'rkd_weight', 'ab_margin', 'mgd_lambda', 'mgd_channels', 'info_nce_dim', 'crd_dim',
        'detection_fg', 'detection_beta', 'progressive_stages', 'ema_warmup', 'labelled_only_label'])
def test_hyper_parameters_are_checked_at_construction(make, msg):
    with pytest.raises((ValueError, TypeError)) as e: make()
    assert msg in str(e.value)
