"`compare_distillation` on three kinds of learner, its paired table against a hand computation, and `DistillationInterpretation` on images, tensors and token sequences"
import math, statistics
import matplotlib; matplotlib.use('Agg')
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from kdcb.all import *
from kdcb.data import tensor_dls
from kdcb.lm import causal_lm_loss

torch.set_num_threads(1)


def mlp(width, n_in=8): return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, 3))


@pytest.fixture(scope='module')
def tabular():
    torch.manual_seed(0)
    x = torch.randn(160, 8); y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    dls = tensor_dls(x[:128], y[:128], x[128:], y[128:], bs=32)
    teacher = Learner(dls, mlp(64), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with teacher.no_bar(), teacher.no_logging(): teacher.fit_one_cycle(5, 1e-2)
    return dls, teacher


def test_tabular_table_is_paired_by_seed(tabular):
    dls, teacher = tabular
    c = compare_distillation(lambda: Learner(dls, mlp(4), loss_func=CrossEntropyLossFlat(), metrics=accuracy),
                             {'scratch': None, 'kd': lambda: KnowledgeDistillationCallback(teacher, SoftTarget(T=2.))},
                             seeds=[0, 1, 2], epochs=2, bar=False, lr_max=1e-2)
    # by hand, from each run's own record
    a = [h.values['accuracy'][-1] for h in c.histories['kd']]
    b = [h.values['accuracy'][-1] for h in c.histories['scratch']]
    d = [x - y for x, y in zip(a, b)]
    row = c.summary()[1]
    assert row['change'] == pytest.approx(statistics.mean(d)) and row['change_std'] == pytest.approx(statistics.stdev(d))
    assert row['wins'] == sum(v > 0 for v in d) and row['mean'] == pytest.approx(statistics.mean(a))
    lv = [h.values['valid_loss'][-1] - g.values['valid_loss'][-1] for h, g in zip(c.histories['kd'], c.histories['scratch'])]
    line = c.markdown().splitlines()[3]
    assert line.startswith('| kd | 8 | ') and f"{statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} ({row['wins']}/3)" in line
    assert f"{statistics.mean(lv):+.4f} ± {statistics.stdev(lv):.4f} ({sum(v < 0 for v in lv)}/3)" in line  # lower loss wins
    # pairing: a seed gives the same run again
    again = compare_distillation(lambda: Learner(dls, mlp(4), loss_func=CrossEntropyLossFlat(), metrics=accuracy), {'scratch': None},
                                 seeds=[2], epochs=2, bar=False, lr_max=1e-2)
    assert again.values('scratch') == c.values('scratch')[2:]


def test_vision_learner_and_interpretation_images(tmp_path):
    from PIL import Image
    from fastai.vision.data import ImageDataLoaders
    torch.manual_seed(0)
    for i in range(24):
        v = 40 + 8 * i if i % 2 else 255 - 8 * i  # dark or bright
        Image.new('RGB', (8, 8), (v, v, v)).save(tmp_path / f"{'bright' if i % 2 == 0 else 'dark'}_{i}.png")
    dls = ImageDataLoaders.from_name_func(tmp_path, sorted(tmp_path.glob('*.png')), lambda f: f.split('_')[0], bs=4,
                                          num_workers=0, seed=0, valid_pct=0.25)
    def convnet(w): return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 2))
    teacher = convnet(8)
    make = lambda: Learner(dls, convnet(2), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    c = compare_distillation(make, {'scratch': None, 'kd': lambda: KnowledgeDistillationCallback(teacher)}, seeds=[0, 1], epochs=1,
                             fit='fine_tune', bar=False, out=tmp_path / 'out', base_lr=1e-2, freeze_epochs=1)
    assert c.summary()[0]['steps'] == 2 * len(dls.train)  # fine_tune: a frozen epoch, then one more
    assert (tmp_path / 'out' / 'comparison.md').read_text().strip() == c.markdown()
    assert (tmp_path / 'out' / 'comparison.png').read_bytes()[:4] == b'\x89PNG'
    interp = DistillationInterpretation.from_learners(c.learners['kd'], teacher, scratch=c.learners['scratch'])
    assert list(interp.per_class().index) == list(dls.vocab) and interp.vocab == dls.vocab
    fig = interp.plot_top_disagreements(4)
    assert len(fig.axes) >= 4 and all(t in dls.vocab for t in fig.axes[0].get_title().split(',')[0].split(' / '))
    interp.plot_calibration()


def test_interpretation_known_answer_and_tensor_table():
    "Agreement, KL and ECE against independent computations on fixed logits"
    T = torch.tensor([[2., 0.], [0., 1.], [3., 0.], [0., 2.], [1., 0.]])
    S = torch.tensor([[1., 0.], [1., 0.], [0., 3.], [0., 1.], [2., 0.]])  # agrees on items 0, 3, 4
    y = torch.tensor([0, 1, 0, 1, 1])

    class Lookup(nn.Module):
        def __init__(self, t): super().__init__(); self.t = nn.Parameter(t)
        def forward(self, x): return self.t[x]
    dls = tensor_dls(torch.arange(5), y, torch.arange(5), y, bs=2)
    interp = DistillationInterpretation.from_learners(Learner(dls, Lookup(S), loss_func=CrossEntropyLossFlat()), Lookup(T))
    assert interp.agreement == pytest.approx(3 / 5)
    p, q = T.softmax(-1), S.softmax(-1)
    kl = [sum(float(p[i, c]) * math.log(float(p[i, c] / q[i, c])) for c in range(2)) for i in range(5)]
    assert interp.kl == pytest.approx(sum(kl) / 5, rel=1e-5)
    conf = q.max(-1).values.tolist(); right = [bool(a == b) for a, b in zip(q.argmax(-1).tolist(), y.tolist())]
    bins = {}
    for c_, r in zip(conf, right): bins.setdefault(math.ceil(c_ * 10) - 1, []).append((c_, r))
    ece = sum(len(v) / 5 * abs(sum(r for _, r in v) / len(v) - sum(c_ for c_, _ in v) / len(v)) for v in bins.values())
    assert interp.ece(n_bins=10) == pytest.approx(ece)
    top = interp.plot_top_disagreements(2)  # plain tensors: a table with the inputs
    assert top['item'].tolist() == torch.tensor(kl).topk(2).indices.tolist() and top['input'].tolist() == top['item'].tolist()
    assert interp.most_disagreed() == [('0', '1', 1), ('1', '0', 1)]
    interp.plot_calibration()


def test_language_model_comparison_and_tokens():
    from transformers import GPT2Config, GPT2LMHeadModel
    import transformers; transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = lambda n: GPT2Config(n_layer=1, n_embd=n, n_head=2, vocab_size=24, n_positions=12)
    ids = torch.randint(0, 24, (48, 12)); ids[:, 1::2] = (ids[:, ::2] + 1) % 24  # every other token follows from the one before
    lab = ids.clone(); lab[:, :4] = -100  # a prompt left out
    dls = tensor_dls(ids[:32], lab[:32], ids[32:], lab[32:], bs=8)
    teacher = GPT2LMHeadModel(cfg(32))
    out = Outputs(shift_labels=True)
    make = lambda: Learner(dls, GPT2LMHeadModel(cfg(16)), loss_func=causal_lm_loss)
    c = compare_distillation(make, {'scratch': None, 'kd': lambda: KnowledgeDistillationCallback(teacher, SoftTarget(T=1.), outputs=out)},
                             seeds=[0, 1], epochs=1, bar=False, lr_max=1e-3)
    assert c.metrics == ['valid_loss'] and len(c.changes('kd')) == 2
    interp = DistillationInterpretation.from_learners(c.learners['kd'], teacher, outputs=out)
    assert len(interp.stats['target']) == 16 * (12 - 4)  # the shifted labels left the first 3 predictions out, and the last
    assert set(interp.stats['pos'].tolist()) == set(range(3, 11))
    top = interp.plot_top_disagreements(3, decode=lambda t: ' '.join(map(str, t.tolist())))
    assert 'position' in top and len(top['input'][0].split()) == 12


def test_recorder_reads_a_balancer_and_plots(tabular):
    "With a balancer, the recorder keeps the weights it applied (its `w_*` columns), one value per training batch"
    dls, teacher = tabular
    rec = DistillationRecorder()
    learn = Learner(dls, mlp(4), loss_func=CrossEntropyLossFlat(), cbs=[KnowledgeDistillationCallback(teacher, weight=RatioBalance(0.5)), rec])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    v = rec.values
    assert list(v) == ['task_loss', 'soft_target', 'w_task', 'w_soft_target'] and all(len(x) == 2 * len(dls.train) for x in v.values())
    assert v['task_loss'][-1] == pytest.approx(learn.knowledge_distillation.columns.last[0].item())
    fig = rec.plot()
    assert [a.get_title() for a in fig.axes] == ['Losses', 'Weights'] and len(fig.axes[1].lines) == 2
    with pytest.raises(ValueError, match='recorded nothing'): DistillationRecorder().plot()
