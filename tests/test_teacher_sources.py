"""Every output loss × every teacher source kdcb ships: on deterministic inputs the losses get the same teacher output in
epoch 1 as in epoch 2, and the same as the live teacher (top-k: within its documented approximation). The sources and the
output losses are discovered, from `kdcb.all` and the loss registry: a new one fails `test_every_source_is_covered` (or
is covered by itself) until it is added here."""
import copy, tempfile, pytest, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
import kdcb.all
from kdcb.all import *
from conftest import mlp, quiet_fit

N_CLASSES, BS = 5, 16


MULTI_LABEL = {'sigmoid_kd'} # output losses of independent labels: multi-hot targets and a binary task loss


def data(multi_label=False, seed=0, indexed=False):
    "Deterministic batches: no shuffle, no augmentation, every item in every epoch (`indexed`: each carries its index, for stores)"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, N_CLASSES, (64,), generator=g)
    if multi_label: y = (torch.rand(64, N_CLASSES, generator=g) > .5).float()
    ds = list(zip(x, y))
    train = IndexedDataset(ds[:48]) if indexed else ds[:48]
    return DataLoaders(DataLoader(train, bs=BS, shuffle=False), DataLoader(ds[48:], bs=BS)), x[:48]


def teacher(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def output_losses()->list[str]:
    "The registered losses that take the teacher's output (`teacher_pred`), from the registry"
    names = []
    for n in available_losses():
        try: term = LossTerm(n)
        except TypeError: continue # needs constructor arguments: feature losses (CRD, MGD); an output loss must build from defaults
        if 'teacher_pred' in term.sources and n not in SEQUENCES: names.append(n)
    return names

# output losses over (B, L, V) sequences only, which these classifier teachers do not produce; where each source is checked instead
SEQUENCES = {'uld': "ULD compares two vocabularies' sequences: tests/test_divergences.py trains it through FrozenTeacher"}


# each source: built from (teachers, student) -> (source, the live reference for inputs x, how exact it is)
def _frozen(ts, s): return FrozenTeacher(ts[0]), lambda x: ts[0](x), 'exact'
def _ensemble(ts, s): return TeacherEnsemble(ts[:2]), lambda x: (ts[0](x) + ts[1](x)) / 2, 'exact'
def _cached(ts, s): return CachedTeacher(FrozenTeacher(ts[0])), lambda x: ts[0](x), 'exact'
def _topk(ts, s): return TopKCachedTeacher(FrozenTeacher(ts[0]), k=2), lambda x: ts[0](x), 'topk'
def _function(ts, s):
    m = ts[0]
    return FunctionTeacher(lambda x: m(x) * 2), lambda x: m(x) * 2, 'exact'
def _ema(ts, s): return EMATeacher(s, decay=.9), None, 'ema' # its reference: the student's copy, taken below
def _stored(ts, s, dls): # every logit, float32: exact
    return StoredTeacher(write_teacher_store(tempfile.mkdtemp(), ts[0], dls.train, k=None, dtype=torch.float32)), lambda x: ts[0](x), 'exact'

SOURCES = {FrozenTeacher: _frozen, TeacherEnsemble: _ensemble, CachedTeacher: _cached, TopKCachedTeacher: _topk,
           FunctionTeacher: _function, EMATeacher: _ema, StoredTeacher: _stored}
STORES = {StoredTeacher} # sources that read by item index: built from the loaders, which carry it


def shipped_sources()->list[type]:
    return [v for v in vars(kdcb.all).values() if isinstance(v, type) and issubclass(v, TeacherSource) and v is not TeacherSource]


def test_every_source_is_covered():
    missing = [c.__name__ for c in shipped_sources() if c not in SOURCES]
    assert not missing, f"teacher source(s) {missing} are not in this matrix: add how to build them to SOURCES"
    assert set(output_losses()) >= {'soft_target', 'logits', 'decoupled_kd', 'dist', 'normalized_kd'}


class Spy:
    "Records the teacher output that the loss receives, per training batch"
    def __init__(self, loss:nn.Module): self.got, self.h = [], loss.register_forward_pre_hook(self.hook, with_kwargs=True)
    def hook(self, m, args, kwargs):
        self.got.append(kwargs.get('teacher_pred', kwargs.get('logits_t')).detach().clone())


def run(source_cls, loss_name, lr=0.):
    dls, x = data(loss_name in MULTI_LABEL, indexed=source_cls in STORES)
    ts, s = [teacher(1), teacher(2)], mlp(8, 16, N_CLASSES)
    src, ref, how = SOURCES[source_cls](ts, s, *([dls] if source_cls in STORES else []))
    if how == 'ema': s0 = copy.deepcopy(s); ref = lambda x: s0(x)
    kd = KnowledgeDistillationCallback(src, loss_name, weight=.5)
    spy = Spy(kd.kd_loss.terms[0].loss)
    learn = Learner(dls, s, loss_func=BCEWithLogitsLossFlat() if loss_name in MULTI_LABEL else CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 2, lr)
    spy.h.remove()
    n = len(dls.train)
    assert len(spy.got) == 2 * n # one call per training batch: validation does not distil
    with torch.no_grad(): live = [ref(x[i*BS:(i+1)*BS]) for i in range(n)]
    return spy.got[:n], spy.got[n:], live, how


@pytest.mark.parametrize('loss_name', output_losses())
@pytest.mark.parametrize('source_cls', list(SOURCES), ids=lambda c: c.__name__)
def test_losses_get_the_same_teacher_output_in_every_epoch(source_cls, loss_name):
    e1, e2, live, how = run(source_cls, loss_name)
    for a, b, z in zip(e1, e2, live):
        assert a.shape == b.shape == z.shape and a.dtype == b.dtype == z.dtype # the teacher's format: logits of its shape and dtype
        assert torch.equal(a, b), f"{source_cls.__name__} gives {loss_name} other teacher outputs in epoch 2 than in epoch 1"
        if how == 'topk': # documented: the kept logits (float16-rounded) and, at T = 1, the kept probabilities are the teacher's
            kept = z.topk(2, -1).indices
            assert torch.allclose(a.gather(-1, kept), z.gather(-1, kept), rtol=1e-3, atol=1e-3)
            assert torch.allclose(a.softmax(-1).gather(-1, kept), z.softmax(-1).gather(-1, kept), atol=1e-3)
            assert torch.allclose(a.softmax(-1).sum(-1), torch.ones(len(a)), atol=1e-3)
        else: assert torch.allclose(a, z, atol=1e-6), f"{source_cls.__name__} does not give {loss_name} the live teacher's output"


def test_ema_output_moves_with_the_student_but_keeps_its_format():
    "The mean teacher changes by definition when the student trains: its outputs keep the student's format and scale"
    e1, e2, live, _ = run(EMATeacher, 'soft_target', lr=1e-2)
    for a, b, z in zip(e1, e2, live):
        assert a.shape == b.shape == z.shape and a.dtype == b.dtype == z.dtype and torch.isfinite(b).all()
        assert (b - z).abs().max() < 10 * (z.abs().max() + 1) # logits, not probabilities nor log-probabilities of another scale
    assert any(not torch.equal(a, b) for a, b in zip(e1, e2))


class _Learn: model = nn.Linear(8, 3) # enough of a learner for `enter`: the student's device


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16, torch.float32])
def test_ensemble_mean_has_the_teachers_dtype(dtype):
    "Before: the mean of float64 or bfloat16 teachers came back as float32"
    torch.manual_seed(0)
    a, b, x = mlp().to(dtype), mlp().to(dtype), torch.randn(6, 8).to(dtype)
    ens = TeacherEnsemble([a, b], weights=[1, 3]); ens.enter(_Learn())
    out = ens((x,))
    ens.exit()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad(): ref = (0.25 * a(x).to(acc) + 0.75 * b(x).to(acc)).to(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)


def test_ensemble_of_mixed_dtypes_promotes_and_refuses_integer_outputs():
    x = torch.randn(6, 8)
    for dts, want in [((torch.float32, torch.float64), torch.float64), ((torch.bfloat16, torch.float16), torch.float32),
                      ((torch.bfloat16, torch.float32), torch.float32)]:
        ens = TeacherEnsemble([mlp().to(dts[0]), mlp().to(dts[1])]); ens.enter(_Learn())
        assert ens((x,)).dtype == want
    ens = TeacherEnsemble([mlp(), FunctionTeacher(lambda x: x[:, :3].long())]); ens.enter(_Learn())
    with pytest.raises(TypeError, match=r"teacher\(s\) \['1: torch.int64'\] returned integers"): ens((x,))
