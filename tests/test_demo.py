"The demo command end to end at tiny settings, and its option errors"
import subprocess, sys
import pytest, torch
from kdcb.demo import run_demo

torch.set_num_threads(1)
TINY = ['--epochs', '2', '--seeds', '2', '--n-train', '512', '--no-bar']


@pytest.mark.slow
def test_main_rows_table_and_plot(tmp_path, capsys):
    rows = run_demo(TINY + ['--losses', 'soft_target,attention+soft_target', '--out', str(tmp_path)])
    assert [r['name'] for r in rows] == ['teacher', 'student, scratch', 'student, soft_target', 'student, attention+soft_target']
    assert rows[0]['params'] > 40 * rows[1]['params']  # a big teacher, a small student
    assert len({r['params'] for r in rows[1:]}) == 1  # the same student in every row
    for r in rows:
        assert 0 <= r['acc'] <= 100 and r['std'] >= 0 and r['s_per_epoch'] > 0
        assert len(r['logs']) == (1 if r['name'] == 'teacher' else 2) and all(len(l.accs) == 2 for l in r['logs'])
    assert rows[0]['acc'] > 15  # seeded; ten classes: chance is 10%
    out = capsys.readouterr().out
    assert '| model | accuracy (%) | parameters | s / epoch |' in out
    assert '| student, attention+soft_target |' in out and f"{rows[1]['params']:,}" in out
    png = tmp_path / 'demo.png'
    assert png.exists() and png.read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'results.md').read_text().count('\n') == 6


def test_seeds_change_students(tmp_path):
    rows = run_demo(['--epochs', '1', '--seeds', '2', '--n-train', '512', '--no-bar', '--losses', 'decoupled_kd', '--out', str(tmp_path)])
    l0, l1 = rows[1]['logs']
    assert l0.accs != l1.accs  # two seeds, two different students


@pytest.mark.parametrize('args, msg', [
    (['--losses', 'soft_target,sotf_target'], "Unknown loss 'sotf_target'"),
    (['--losses', 'attention+nope'], 'Registered losses: activation_boundaries, attention'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--seeds', '0'], '--seeds must be at least 1'),
    (['--threads', '0'], '--threads must be at least 1'),
    (['--n-train', '10'], '--n-train must be at least 256'),
    (['--weight', '1.5'], '--weight is a share'),
    (['--losses', ','], '--losses is empty'),
])
def test_bad_options(args, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e: run_demo(args + ['--out', str(tmp_path / 'o')])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()  # refused before anything ran


@pytest.mark.slow
def test_python_m(tmp_path):
    "`python -m kdcb.demo` runs the console script's `main`: exit status 0, the table printed, nothing else returned"
    r = subprocess.run([sys.executable, '-m', 'kdcb.demo', '--epochs', '1', '--seeds', '1', '--n-train', '256', '--losses', 'soft_target',
                        '--out', str(tmp_path), '--no-bar'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '| student, soft_target |' in r.stdout and "'logs'" not in r.stdout
    assert (tmp_path / 'demo.png').exists()


def test_labelled_mode(tmp_path):
    "--labelled: the teacher sees every signal, students labels for some; distilled students get the rest unlabelled"
    rows = run_demo(['--epochs', '2', '--seeds', '1', '--n-train', '512', '--labelled', '128', '--losses', 'soft_target,decoupled_kd',
                     '--out', str(tmp_path), '--no-bar'])
    assert [r['name'] for r in rows] == ['teacher', 'student, scratch', 'student, scratch, 4x steps',
                                         'student, soft_target + unlabelled', 'student, decoupled_kd + unlabelled']
    assert len(rows[2]['logs'][0].accs) == 8 and len(rows[3]['logs'][0].accs) == 2 # 2·4·128/512 epochs: 4x the steps of scratch
    assert all(r['logs'][0].agree for r in rows[1:]) # agreement with the teacher, every student
    with pytest.raises(SystemExit): run_demo(['--n-train', '512', '--labelled', '600'])
