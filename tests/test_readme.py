"The README's quick start runs as written"
import re
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]


def test_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick start exports to the working directory; tests/test_exports.py loads that file
    readme = (ROOT / 'README.md').read_text()
    quick = readme[readme.index('## Quick start'):readme.index('## Tutorials')]
    blocks = re.findall(r'```python\n(.*?)```', quick, re.S)
    assert len(blocks) == 2
    env = {}
    for b in blocks: exec(compile(b, 'README.md', 'exec'), env)
    student, kd = env['student'], env['kd']
    assert list(student.recorder.metric_names)[-3:] == ['task_loss', 'soft_target', 'time']
    assert student.recorder.values[-1][2] > 0.5  # learned something (chance is 0.1); the benchmark measures how much
    assert (tmp_path / 'student.pkl').stat().st_size > 0


def test_front_door_is_short():
    n = len((ROOT / 'README.md').read_text())
    assert n <= 10_000, f'README.md has {n:,} characters: reference material belongs in the notebooks, figures in benchmarks/README.md'


def test_demo_table_is_the_saved_run():
    "The README shows the demo's table as the run that drew the picture wrote it, and links that picture"
    readme = (ROOT / 'README.md').read_text()
    assert (ROOT / 'nbs' / 'images' / 'demo' / 'results.md').read_text().strip() in readme
    assert '](nbs/images/demo/demo.png)' in readme and (ROOT / 'nbs' / 'images' / 'demo' / 'demo.png').exists()


def test_benchmarks_readme_shows_the_same_demo_run():
    table = (ROOT / 'nbs' / 'images' / 'demo' / 'results.md').read_text().strip()
    assert table in (ROOT / 'benchmarks' / 'README.md').read_text()
