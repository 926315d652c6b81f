"The demo command end to end at tiny settings: its rows, its one table, its output to a file, and its option errors"
import contextlib, io, re, statistics, subprocess, sys
import pytest, torch
from kdcb.demo import run_demo, main, get_parser

torch.set_num_threads(1)
# teacher on 512 signals, students with labels for 64; 2 student epochs (4 for the longer scratch), 1 teacher epoch
TINY = ['--n-train', '512', '--labelled', '64', '--epochs', '2', '--long', '2', '--teacher-epochs', '1', '--seeds', '2']
COLUMNS = '| model | labelled signals | optimizer steps | accuracy (%) | vs scratch (points) | parameters |'


def test_rows_table_and_picture(tmp_path, capsys):
    rows = run_demo(TINY + ['--losses', 'soft_target,decoupled_kd', '--out', str(tmp_path)])
    assert [r['name'] for r in rows] == ['teacher', 'student, scratch', 'student, scratch, 2x steps',
                                         'student, soft_target + unlabelled', 'student, decoupled_kd + unlabelled']
    assert [r['data'] for r in rows] == ['512', '64', '64', '64 + 448 unlabelled', '64 + 448 unlabelled']
    # every student epoch is 512 items, 4 batches of 128: the distilled students make the steps of the shorter scratch
    assert [r['steps'] for r in rows] == [4, 8, 16, 8, 8]
    assert rows[0]['params'] > 10 * rows[1]['params'] and len({r['params'] for r in rows[1:]}) == 1
    scratch = rows[1]['values']
    for r in rows[2:]:  # the change against scratch is paired by seed
        d = [a - s for a, s in zip(r['values'], scratch)]
        assert r['change'] == pytest.approx(statistics.mean(d)) and r['change_std'] == pytest.approx(statistics.stdev(d))
    assert rows[0]['change'] is None and rows[1]['change'] is None and len(rows[0]['values']) == 1
    out = capsys.readouterr().out
    table = out[out.index(COLUMNS):].split('\n\n')[0].splitlines()
    assert len(table) == 2 + len(rows) and out.count(COLUMNS) == 1  # one table
    assert table[2].startswith('| teacher | 512 | 4 | ') and table[2].endswith('|  | 35,010 |')
    assert re.fullmatch(r'\| student, soft_target \+ unlabelled \| 64 \+ 448 unlabelled \| 8 \| \d+\.\d ± \d+\.\d \| [+-]\d+\.\d ± \d+\.\d \| 2,936 \|', table[5])
    assert (tmp_path / 'results.md').read_text().splitlines() == table
    assert (tmp_path / 'demo.png').read_bytes()[:4] == b'\x89PNG'


def test_one_line_per_run_to_a_file(tmp_path):
    "To a file, `kdcb-demo` writes one line per run (row and seed), then the table: no progress-bar redraws"
    log = tmp_path / 'log'
    with open(log, 'w') as f, contextlib.redirect_stdout(f): main(TINY + ['--out', str(tmp_path)])
    text = log.read_text()
    assert '\r' not in text and '\x1b' not in text
    lines = text.splitlines()
    epochs = [l for l in lines if re.match(r'.*, seed \d: accuracy \d\.\d{4} after \d+ steps \(\d+\.\d s\)$', l)]
    assert len(epochs) == 1 + 3 * 2  # the teacher, then scratch, longer scratch and distilled on each of two seeds
    assert epochs[0].startswith('teacher, seed 0: accuracy') and epochs[-1].startswith('student, soft_target + unlabelled, seed 1: accuracy')
    assert ' after 16 steps ' in epochs[3]  # the longer scratch
    assert lines[3:3 + len(epochs)] == epochs  # after three lines of settings
    assert lines[3 + len(epochs):] == ['', *(tmp_path / 'results.md').read_text().splitlines(), '', lines[-1]]
    assert lines[-1].startswith(f"picture: {tmp_path / 'demo.png'}; table: ") and 'process CPU time' in lines[-1]


class FakeTerminal(io.StringIO):
    def isatty(self): return True


def test_bars_on_a_terminal(tmp_path):
    "On a terminal one progress bar runs over each grid, writing a line per run under it; --no-bar prints only the lines"
    out = FakeTerminal()
    with contextlib.redirect_stdout(out): run_demo(TINY + ['--seeds', '1', '--long', '1', '--out', str(tmp_path)])
    text = out.getvalue()
    assert '\r' in text or '\x1b' in text or '█' in text or '|' in text  # a bar drawn
    assert [l.split(':')[0] for l in re.findall(r'[\w ,+]+, seed 0: accuracy', text)] == ['teacher, seed 0', 'student, scratch, seed 0', 'student, soft_target + unlabelled, seed 0']
    out = FakeTerminal()
    with contextlib.redirect_stdout(out): run_demo(TINY + ['--seeds', '1', '--long', '1', '--out', str(tmp_path), '--no-bar'])
    assert '\r' not in out.getvalue() and out.getvalue().count(', seed 0: accuracy') == 1 + 2


def test_same_data(tmp_path):
    "--same-data: the students get the teacher's labelled signals, the losses default to the three output and feature losses"
    rows = run_demo(['--same-data', '--n-train', '512', '--epochs', '1', '--teacher-epochs', '1', '--seeds', '1', '--long', '1',
                     '--out', str(tmp_path)])
    assert [r['name'] for r in rows] == ['teacher', 'student, scratch', 'student, soft_target', 'student, decoupled_kd',
                                         'student, attention+soft_target']
    assert {r['data'] for r in rows} == {'512'} and {r['steps'] for r in rows[1:]} == {4}


def test_seeds_change_students(tmp_path):
    rows = run_demo(TINY + ['--epochs', '1', '--long', '1', '--out', str(tmp_path)])
    assert [len(r['values']) for r in rows] == [1, 2, 2]
    a0, a1 = rows[1]['values']
    assert a0 != a1  # two seeds, two different students


def test_help():
    h = get_parser().format_help()
    for opt in ('--same-data', '--labelled', '--long', '--teacher-epochs', '--no-bar', '--out'): assert opt in h


@pytest.mark.parametrize('args, msg', [
    (['--losses', 'soft_target,sotf_target'], "Unknown loss 'sotf_target'"),
    (['--losses', 'attention+nope'], 'Registered losses: activation_boundaries, attention'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--teacher-epochs', '0'], '--teacher-epochs must be at least 1'),
    (['--long', '0'], '--long must be at least 1'),
    (['--seeds', '0'], '--seeds must be at least 1'),
    (['--threads', '0'], '--threads must be at least 1'),
    (['--n-train', '10'], '--n-train must be at least 256'),
    (['--n-train', '300'], '--labelled must be at least 1 and below --n-train (300), got 300 (the default: give a smaller one).'),
    (['--labelled', '0'], '--labelled must be at least 1 and below --n-train (8000), got 0.'),
    (['--n-train', '512', '--labelled', '600'], '--labelled must be at least 1 and below --n-train (512), got 600.'),
    (['--same-data', '--labelled', '100'], '--same-data gives the students the labels of all --n-train signals; drop it or --labelled 100.'),
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
    r = subprocess.run([sys.executable, '-m', 'kdcb.demo', *TINY, '--seeds', '1', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '| student, soft_target + unlabelled |' in r.stdout and "'logs'" not in r.stdout
    assert (tmp_path / 'demo.png').exists()
