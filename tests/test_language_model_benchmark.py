"benchmarks/language_model.py at its smallest: every method that can run today runs, the rest are skipped with a message"
import importlib.util, json, math, sys
from pathlib import Path
import pytest, torch

pytest.importorskip('transformers')
_path = Path(__file__).parents[1] / 'benchmarks'
sys.path.insert(0, str(_path)) # it imports `overhead` from there
_spec = importlib.util.spec_from_file_location('language_model', _path / 'language_model.py')
lmb = importlib.util.module_from_spec(_spec); sys.modules['language_model'] = lmb; _spec.loader.exec_module(lmb)
torch.set_num_threads(1)

TINY = ['--quick', '--seeds', '0,1', '--student-chars', '3000', '--valid-chars', '3000', '--ratio', '2', '--valid-seqs', '16',
        '--eval-prompts', '4', '--teacher', '1x32', '--teacher-epochs', '1', '--student', '1x16', '--prompt', '48']
TINY_SAME = ['--same-data', '--quick', '--seeds', '0', '--train-seqs', '64', '--student-seqs', '32', '--valid-seqs', '16',
             '--eval-prompts', '4', '--teacher', '1x32', '--teacher-epochs', '1', '--student', '1x16', '--prompt', '48', '--out', '']


def test_split_is_by_file_with_the_teacher_reading_ratio_times_more():
    parts = lmb.split_files(3000, 4, 3000)
    names = {k: {p for p, _ in v} for k, v in parts.items()}
    chars = {k: sum(len(t) for _, t in v) for k, v in parts.items()}
    assert not names['valid'] & names['teacher'] and names['student'] <= names['teacher'] # held-out files; the slice is the teacher's too
    assert chars['student'] >= 3000 and chars['valid'] >= 3000 and chars['teacher'] >= 4 * chars['student']
    assert chars['teacher'] - max(len(t) for _, t in parts['teacher']) < 4 * chars['student'] # no file more than needed
    assert parts == lmb.split_files(3000, 4, 3000) # fixed
    ids = lmb.encode('ab\né\t', 2)
    assert ids.tolist() == [[lmb.CHARS.index('a'), lmb.CHARS.index('b')], [lmb.CHARS.index('\n'), lmb.UNK]]


@pytest.mark.slow
def test_smallest_setting_runs_every_available_method(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(lmb, 'METHODS', lmb.METHODS + [lmb.Method('not_yet', 'no_such_loss')])
    names = ['scratch', 'forward_kl', 'reverse_kl', 'onpolicy_jsd', 'sequence_level', 'not_yet']
    res = lmb.methods(lmb.arguments(TINY + ['--methods', ','.join(names), '--out', str(tmp_path / 'lm')]))
    out = capsys.readouterr().out
    ran = ['scratch', 'forward_kl', 'onpolicy_jsd', 'sequence_level'] + (['reverse_kl'] if 'reverse_kl' in lmb.available_losses() else [])
    assert sorted(res) == sorted(ran)
    for rows in res.values():
        assert [r['seed'] for r in rows] == [0, 1] # paired seeds
        for r in rows: assert 1 < r['ppl'] < 1e4 and 0 < r['nll'] < 10 and r['cpu'] > 0 and math.isfinite(r['mem'])
    gen = res['onpolicy_jsd'][0]
    assert gen['gen_cpu'] > 0 and gen['gen_tokens'] > 0 and gen['gen_tokens'] % 16 == 0 # 64 - 48 characters per continuation
    assert "skipped not_yet: no loss 'no_such_loss' is registered" in out
    assert '| method | perplexity | per seed | vs scratch (paired) | teacher NLL of own samples |' in out
    assert 'losses at T=1,' in out and 'split by file' in out
    assert res['scratch'][0]['ppl'] != res['forward_kl'][0]['ppl'] # the distillation changed something
    md, js = (tmp_path / 'lm.md').read_text(), json.loads((tmp_path / 'lm.json').read_text())
    assert '| forward_kl |' in md and md.splitlines()[0].startswith('command: python benchmarks/language_model.py --quick')
    assert js['results']['scratch'][1]['ppl'] == res['scratch'][1]['ppl'] and js['complete']
    assert '\n'.join(lmb.table(js['results'], js)) in md # the table a results file gives is the one printed
    js['results']['forward_kl'].pop(); js['complete'] = False # as a stopped run leaves it
    part = '\n'.join(lmb.table(js['results'], js))
    assert 'not run (the run was stopped): forward_kl seed 1' in part and '(1 seeds)' in part


@pytest.mark.slow
def test_same_data_regime_stays_reachable(capsys):
    res = lmb.methods(lmb.arguments(TINY_SAME + ['--methods', 'scratch,forward_kl']))
    assert sorted(res) == ['forward_kl', 'scratch'] and 'same data:' in capsys.readouterr().out


def test_quick_settings_and_explicit_options():
    a = lmb.arguments(['--quick', '--seeds', '5'])
    assert (a.teacher, a.student, a.seeds, a.T) == (lmb.QUICK['teacher'], lmb.QUICK['student'], '5', 1.)
    d = lmb.arguments([])
    assert (d.seeds, d.teacher, d.student, d.ratio, d.same_data) == ('0,1,2', '4x128', '2x64', 16., False)
    s = lmb.arguments(['--same-data'])
    assert (s.same_data, s.student, s.out) == (True, '2x32', 'benchmarks/results/language_model_same_data')
    assert lmb.arguments(['--same-data', '--quick']).train_seqs == lmb.QUICK_SAME['train_seqs']
    with pytest.raises(SystemExit, match='unknown methods'): lmb.methods(lmb.arguments(TINY + ['--methods', 'scratch,nope']))
