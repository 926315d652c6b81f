"The package's facts live in one place each; these files must agree, and `pip install .` must produce them"
import configparser, re, subprocess, sys, tomllib, zipfile
from pathlib import Path
import kdcb

ROOT = Path(__file__).parents[1]


def settings(): 
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini')
    return cfg['DEFAULT']


def pyproject(): return tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_files_agree():
    s, p = settings(), pyproject()
    assert p['project']['name'] == s['lib_name'] == kdcb.__name__
    assert (ROOT / s['lib_name'] / '__init__.py').exists()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', (ROOT / 'kdcb' / '__init__.py').read_text(), re.M)
    assert 'version' in p['project']['dynamic'] and 'version' not in p['project']
    nb = p['tool']['nbdev']
    assert nb['update_pyproject'] is False
    assert nb.get('lib_path', 'kdcb') == 'kdcb' and nb.get('nbs_path', 'nbs') == 'nbs'
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    assert cfg.lib_name == 'kdcb' and cfg.lib_path == ROOT / 'kdcb' and cfg.nbs_path == ROOT / 'nbs'
    assert cfg.version == kdcb.__version__
    for f in ('version', 'min_python', 'requires_python', 'lib_path', 'nbs_path'): assert f not in s, f'{f} belongs elsewhere'


def test_wheel_metadata(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    whl = next(tmp_path.glob('kdcb-*.whl'))
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith('METADATA'))).decode()
        eps = z.read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
    s = settings()
    assert f'Name: kdcb\n' in meta and f'Version: {kdcb.__version__}\n' in meta
    assert 'Requires-Python: >=3.11' in meta
    for r in s['requirements'].split(): assert f'Requires-Dist: {r}\n' in meta, r
    for r in s['dev_requirements'].split() + s['demo_requirements'].split(): assert f'Requires-Dist: {r}; extra == "dev"' in meta, r
    for r in s['demo_requirements'].split(): assert f'Requires-Dist: {r}; extra == "demo"' in meta, r
    for r in s['hf_requirements'].split(): assert f'Requires-Dist: {r}; extra == "hf"' in meta, r
    assert 'kdcb-demo = kdcb.demo:main' in eps
    from trove_classifiers import classifiers as official  # PyPI refuses an upload with any other classifier
    ours = [l.removeprefix('Classifier: ') for l in meta.splitlines() if l.startswith('Classifier: ')]
    assert ours and not set(ours) - official, set(ours) - official
    assert 'kdcb/callback.py' in names and 'kdcb/all.py' in names


def render_index():
    "index.ipynb as markdown: markdown cells as they are, code cells as python blocks"
    import json
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    return '\n\n'.join(''.join(c['source']) if c['cell_type'] == 'markdown' else '```python\n' + ''.join(c['source']) + '\n```'
                        for c in nb['cells']) + '\n'


def test_index_notebook_matches_readme():
    assert render_index() == (ROOT / 'README.md').read_text(), \
        'nbs/index.ipynb (the landing page) and README.md differ: make the same change in both'


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(['awk', '/<!-- .ci\\/run runs the command below -->/{f=1; next} f && /^```/{if (s) exit; s=1; next} f && s',
                          str(ROOT / 'README.md')], capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith('pip install') and 'pytest' in out and 'nbdev-test' in out
    assert 'README.md' in (ROOT / '.ci' / 'run').read_text()
