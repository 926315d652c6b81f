"'auto' layer pairs of models of different widths: the element-wise feature losses get connectors, trained with the student"
import math, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from kdcb.callback import KnowledgeDistillationCallback, Outputs
from kdcb.distill import Connected
from kdcb.match import Connectors
from conftest import digits_dls, quiet_fit, tiny_gpt2

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()
from kdcb.lm import Responses, KeywordInputs, causal_lm_loss
V = 24


def gpt2(layers, d, seed): return KeywordInputs(tiny_gpt2(layers, d, seed, V))


def counting_dls(n=64, bs=16):
    "Prompts of 2 to 5 tokens continued by counting on by a step (mod V): a pattern a small LM learns in a few epochs"
    g = torch.Generator().manual_seed(0)
    start, step, k = torch.randint(1, V, (n,), generator=g), torch.randint(1, 4, (n,), generator=g), torch.randint(2, 6, (n,), generator=g)
    seqs = [(s + d * torch.arange(10)) % (V - 1) + 1 for s, d in zip(start, step)]
    return Responses([q[:m] for q, m in zip(seqs, k)], [q[m:] for q, m in zip(seqs, k)], 0).dls(bs=bs, valid_pct=0.25)


def columns(learn, names):
    "Each epoch's training averages of the named progress columns"
    i = [learn.recorder.metric_names.index(n) - 1 for n in names] # `values` rows have no 'epoch'
    return [[row[j] for j in i] for row in learn.recorder.values]


def test_gpt2_auto_pairs_of_different_widths_train():
    "The call of issue 26, finding 5: a 32-wide student and a 64-wide teacher, paired automatically"
    teacher, student = gpt2(4, 64, 0), gpt2(2, 32, 1)
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'hidden_state_cosine'], 'auto', outputs=Outputs(shift_labels=True))
    learn = Learner(counting_dls(), student, loss_func=causal_lm_loss, cbs=kd)
    quiet_fit(learn, 1, 3e-3)
    term = kd.kd_loss.terms[1]
    assert isinstance(term.loss, Connected) and kd.column_names == ['task_loss', 'soft_target', 'hidden_state_cosine']
    assert term.loss.connectors.widths() == {'model.transformer.h.0': (32, 64), 'model.transformer.h.1': (32, 64)}
    w0 = [p.detach().clone() for p in term.loss.connectors.parameters()]
    quiet_fit(learn, 5, 3e-3)
    assert all(not torch.equal(a, b) for a, b in zip(w0, term.loss.connectors.parameters())) # trained with the student
    rows = columns(learn, ['task_loss', 'hidden_state_cosine'])
    assert all(math.isfinite(v) for r in rows for v in r)
    assert rows[-1][0] < rows[0][0] and rows[-1][1] < rows[0][1], rows # the task loss and the connected cosine fall
    assert learn.recorder.values[-1][0] < learn.recorder.values[0][0] # and the mixed training loss
    assert all(p.grad is None for p in teacher.parameters())


def test_state_dict_restores_the_connectors_into_a_fresh_callback(tmp_path):
    teacher, student, dls = gpt2(4, 64, 0), gpt2(2, 32, 1), counting_dls()
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'hidden_state_cosine'], 'auto', outputs=Outputs(shift_labels=True))
    learn = Learner(dls, student, loss_func=causal_lm_loss, cbs=kd)
    quiet_fit(learn, 2, 3e-3)
    state = kd.state_dict()
    assert any('connectors' in k for k in state['losses']) and len(state['optimizer']) == 4 # two Linear layers, Adam's state
    fresh = KnowledgeDistillationCallback(teacher, ['soft_target', 'hidden_state_cosine'], 'auto', outputs=Outputs(shift_labels=True))
    fresh.load_state_dict(state)
    conn = fresh.kd_loss.terms[1].loss.connectors
    assert isinstance(conn, Connectors) and conn.widths() == kd.kd_loss.terms[1].loss.connectors.widths()
    for a, b in zip(conn.parameters(), kd.kd_loss.terms[1].loss.connectors.parameters()): assert torch.equal(a, b)
    learn2 = Learner(dls, student, loss_func=causal_lm_loss, cbs=fresh)
    quiet_fit(learn2, 1, 0.) # the probe pairs the same layers: the loaded connectors are kept, not rebuilt
    assert fresh.kd_loss.terms[1].loss.connectors is conn
    # a state saved with other widths does not fit the probed pairs: refused at before_fit with the reason
    narrow = KnowledgeDistillationCallback(teacher, ['soft_target', 'hidden_state_cosine'], 'auto', outputs=Outputs(shift_labels=True))
    narrow.load_state_dict(state)
    with pytest.raises(ValueError, match='the probed pairs need'): quiet_fit(Learner(dls, gpt2(2, 16, 2), loss_func=causal_lm_loss, cbs=narrow), 1)
    # the connectors serve training only: the exported student holds none
    learn.export(tmp_path / 'lm.pkl')
    import zipfile
    with zipfile.ZipFile(tmp_path / 'lm.pkl') as z: data = b''.join(z.read(n) for n in z.namelist() if n.endswith('.pkl'))
    assert b'Connectors' not in data and b'kdcb.match' not in data and b'kdcb.callback' not in data


def cnn(w):
    "A 2-D CNN on the digits' 8x8 images, `w` channels wide: stages at 8x8 ('1') and 4x4 ('3')"
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10))


@pytest.mark.parametrize('loss', ['fit_net', 'activation_boundaries'])
def test_cnn_auto_pairs_of_different_channel_widths(loss):
    dls = digits_dls()
    torch.manual_seed(0); teacher = cnn(16)
    quiet_fit(Learner(dls, teacher, loss_func=CrossEntropyLossFlat()), 2, 1e-2)
    torch.manual_seed(1)
    kd = KnowledgeDistillationCallback(teacher, [loss, 'attention'], 'auto', weight=[0.3, 0.2])
    learn = Learner(dls, cnn(4), loss_func=CrossEntropyLossFlat(), cbs=kd)
    quiet_fit(learn, 4, 1e-2)
    assert list(kd.student_layers) == list(kd.teacher_layers) == ['2', '4']
    assert kd.kd_loss.terms[0].loss.connectors.widths() == {n: (4, 16) for n in kd.student_layers}
    assert not isinstance(kd.kd_loss.terms[1].loss, Connected) # attention maps compare any widths: no connector
    rows = columns(learn, [loss])
    assert all(math.isfinite(r[0]) for r in rows) and rows[-1][0] < rows[0][0], rows


def test_equal_widths_get_no_connector():
    teacher, student = gpt2(4, 32, 0), gpt2(2, 32, 1)
    kd = KnowledgeDistillationCallback(teacher, ['soft_target', 'hidden_state_cosine'], 'auto', outputs=Outputs(shift_labels=True))
    quiet_fit(Learner(counting_dls(), student, loss_func=causal_lm_loss, cbs=kd), 1, 3e-3)
    assert not isinstance(kd.kd_loss.terms[1].loss, Connected) and not list(kd.kd_loss.parameters())
