"Inputs checked where they are given, user objects left as they were, no result silently wrong: one test per case found"
import copy, pytest, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from kdcb.unlabelled import add_unlabelled
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
