"benchmarks/language_model.py at its smallest: every method that can run today runs, the rest are skipped with a message"
import importlib.util, math, sys
from pathlib import Path
import pytest, torch

pytest.importorskip('transformers')
_path = Path(__file__).parents[1] / 'benchmarks'
sys.path.insert(0, str(_path)) # it imports `overhead` from there
_spec = importlib.util.spec_from_file_location('language_model', _path / 'language_model.py')
lmb = importlib.util.module_from_spec(_spec); sys.modules['language_model'] = lmb; _spec.loader.exec_module(lmb)
torch.set_num_threads(1)

TINY = ['--quick', '--seeds', '0,1', '--train-seqs', '64', '--student-seqs', '32', '--valid-seqs', '16', '--eval-prompts', '4',
        '--teacher', '1x32', '--teacher-epochs', '1', '--student', '1x16', '--prompt', '48']


@pytest.mark.slow
def test_smallest_setting_runs_every_available_method(capsys, monkeypatch):
    monkeypatch.setattr(lmb, 'METHODS', lmb.METHODS + [lmb.Method('not_yet', 'no_such_loss')])
    names = ['scratch', 'forward_kl', 'reverse_kl', 'onpolicy_forward_kl', 'sequence_level', 'not_yet']
    res = lmb.methods(lmb.arguments(TINY + ['--methods', ','.join(names)]))
    out = capsys.readouterr().out
    ran = ['scratch', 'forward_kl', 'onpolicy_forward_kl', 'sequence_level'] + (['reverse_kl'] if 'reverse_kl' in lmb.available_losses() else [])
    assert sorted(res) == sorted(ran)
    for rows in res.values():
        assert len(rows) == 2 # paired seeds
        for r in rows: assert 1 < r['ppl'] < 1e4 and 0 < r['nll'] < 10 and r['cpu'] > 0 and math.isfinite(r['mem'])
    assert "skipped not_yet: no loss 'no_such_loss' is registered" in out
    assert '| method | perplexity per seed | median | vs scratch | teacher NLL of own samples |' in out
    assert res['scratch'][0]['ppl'] != res['forward_kl'][0]['ppl'] # the distillation changed something


def test_quick_settings_and_explicit_options():
    a = lmb.arguments(['--quick', '--seeds', '5'])
    assert (a.teacher, a.student, a.seeds) == (lmb.QUICK['teacher'], lmb.QUICK['student'], '5')
    assert lmb.arguments([]).seeds == '0,1,2'
    with pytest.raises(SystemExit, match='unknown methods'): lmb.methods(lmb.arguments(TINY + ['--methods', 'scratch,nope']))
