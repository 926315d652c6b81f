"""What a loss receives, written down once: the table of sources in `04_distill` against `_ARGS`; `pct_train` through
`ScheduledLoss` only; a callable `weight` in place of the removed `schedule=`"""
import inspect, json, re
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from kdcb.core import ScheduledLoss
from kdcb.distill import _ARGS, SOURCES, LossTerm, DistillationLoss, RatioBalance
from kdcb.callback import KnowledgeDistillationCallback
from conftest import mlp

NB = Path(__file__).parents[1]/'nbs'/'04_distill.ipynb'


def source_table()->list[tuple[list[str], str, bool]]:
    "The rows of 04_distill's table of sources: (the parameter names, the source, whether per pair)"
    cells = [''.join(c['source']) for c in json.loads(NB.read_text())['cells'] if c['cell_type'] == 'markdown']
    tables = [s for s in cells if re.search(r'^\| name \| source \| what it is \| shape \|$', s, re.M)]
    assert len(tables) == 1, f"{len(tables)} tables of sources in {NB.name}: write the vocabulary down once"
    rows = [l for l in tables[0].splitlines() if l.startswith('| `')]
    out = []
    for l in rows:
        cols = [c.strip() for c in l.strip('|').split('|')]
        assert len(cols) == 4 and all(cols), f"a row of the table of sources has {len(cols)} columns, some empty: {l}"
        src = re.findall(r'`(\w+)`', cols[1])
        assert len(src) == 1, l
        out.append((re.findall(r'`(\w+)`', cols[0]), src[0], 'one pair' in cols[1]))
    return out


def test_the_table_of_sources_is_what_the_code_accepts():
    rows = source_table()
    names = [n for ns, _, _ in rows for n in ns]
    assert len(names) == len(set(names)), f"a name appears twice in the table: {names}"
    assert set(names) == set(_ARGS), f"only in the table: {set(names) - set(_ARGS)}; only in `_ARGS`: {set(_ARGS) - set(names)}"
    for ns, src, pair in rows:
        for n in ns: assert _ARGS[n] == src, f"the table gives {n!r} the source {src!r}, `_ARGS` {_ARGS[n]!r}"
        assert pair == (set(ns) <= {'out_s', 'out_t'}), f"{ns}: only `out_s`/`out_t` ask for one layer pair"
    assert {src for _, src, _ in rows} == set(SOURCES) == set(_ARGS.values())


def test_every_name_of_the_table_binds():
    "Each name of the table, asked for by a loss, gets its source (`out_s`/`out_t` one map of each pair)"
    seen = {}
    def rec(name):
        def f(**kw): seen[name] = kw[name]; return torch.zeros(())
        f.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY)])
        return f
    src = dict(pred=torch.ones(2, 3), teacher_pred=2*torch.ones(2, 3), target=torch.tensor([0, 1]), fm_s={'a': torch.ones(2, 4)},
               fm_t={'b': 3*torch.ones(2, 4)}, attention_mask=torch.ones(2, 5), student_output=('s',), teacher_output=('t',))
    for name in _ARGS:
        if name in ('out_s', 'out_t'): continue
        LossTerm(rec(name))(**src)
        assert seen[name] is src[_ARGS[name]], name
    def pair(out_s, out_t): seen['pair'] = (out_s, out_t); return torch.zeros(())
    LossTerm(pair)(**src)
    assert seen['pair'][0] is src['fm_s']['a'] and seen['pair'][1] is src['fm_t']['b']


def test_pct_train_is_not_a_source_and_scheduled_losses_still_get_it():
    def late(pred, teacher_pred, pct_train=0.): return (pred - teacher_pred).pow(2).mean() * pct_train
    with pytest.raises(TypeError, match='subclasses `ScheduledLoss`'): LossTerm(late)
    class Late(ScheduledLoss):
        def forward(self, pred, teacher_pred): return (pred - teacher_pred).pow(2).mean() * self.now(lambda p: p)
    kd = DistillationLoss(Late(), weight=0.5)
    s, t, task = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor(2.)
    kd.set_progress(0.25)
    mixed, cols = kd(task, pred=s, teacher_pred=t)
    torch.testing.assert_close(cols, torch.tensor([0.25])) # 1 · 0.25, the loss at the progress set
    torch.testing.assert_close(mixed, torch.tensor(0.5 * 2. + 0.5 * 0.25))


def test_schedule_is_refused_with_how_to_write_it_as_a_weight():
    for make in (lambda: KnowledgeDistillationCallback(mlp(h=32), 'soft_target', weight=0.5, schedule=lambda p: p),
                 lambda: DistillationLoss('soft_target', weight=0.5, schedule=lambda p: p)):
        with pytest.raises(TypeError) as e: make()
        msg = str(e.value)
        assert "no longer takes 'schedule'" in msg and 'weight=lambda pct_train: w * schedule(pct_train)' in msg
    assert len(inspect.signature(KnowledgeDistillationCallback.__init__).parameters) == 1 + 7 # self and seven
    # the old sixth positional argument, a schedule, is not taken silently as `distill_valid`, nor by `DistillationLoss` as `balance`
    with pytest.raises(TypeError, match='callable `weight`'): KnowledgeDistillationCallback(mlp(h=32), 'soft_target', None, None, 0.5, lambda p: p)
    with pytest.raises(TypeError, match='callable `weight`'): DistillationLoss('soft_target', 0.5, lambda p: p)


def test_a_callable_weight_is_the_old_weight_times_schedule():
    "weight=0.6 with schedule=lambda p: 1 − p (split over two losses) as `weight=lambda p: 0.6 · (1 − p)`: weights and mixed loss by hand"
    kd = DistillationLoss(['soft_target', 'logits'], weight=lambda p: 0.6 * (1 - p))
    per_loss = DistillationLoss(['soft_target', 'logits'], weight=[lambda p: 0.2 * (1 - p), lambda p: 0.4 * (1 - p)])
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    task = F.cross_entropy(s, y)
    st = F.kl_div(F.log_softmax(s/2, 1), F.softmax(t/2, 1), reduction='batchmean') * 4 # SoftTarget's default T = 2 on (B, C)
    lg = F.mse_loss(s, t)
    for p in (0., 0.25, 0.7, 1.):
        kd.set_progress(p); per_loss.set_progress(p)
        w = 0.6 * (1 - p) # the old weight × schedule
        assert kd.current == pytest.approx([w / 2, w / 2]) and per_loss.current == pytest.approx([0.2 * (1 - p), 0.4 * (1 - p)])
        mixed, cols = kd(task, pred=s, teacher_pred=t, target=y)
        torch.testing.assert_close(cols, torch.stack([st, lg]))
        torch.testing.assert_close(mixed, (1 - w) * task + w / 2 * st + w / 2 * lg)
        mixed, _ = per_loss(task, pred=s, teacher_pred=t, target=y)
        torch.testing.assert_close(mixed, (1 - 0.6 * (1 - p)) * task + 0.2 * (1 - p) * st + 0.4 * (1 - p) * lg)


def test_a_fasterai_schedule_given_as_the_weight_points_to_kdcb_fasterai():
    class Cos: # the shape of fasterai's `Schedule`: `.progress`, not callable
        def progress(self, p): return 1 - p
    with pytest.raises(TypeError, match='kdcb.fasterai'): DistillationLoss('soft_target', weight=Cos())
    with pytest.raises(TypeError, match='kdcb.fasterai'): DistillationLoss(['soft_target', 'logits'], weight=[0.2, Cos()])
    with pytest.raises(TypeError, match='not a `Balancer`'): DistillationLoss('soft_target', balance=Cos())
