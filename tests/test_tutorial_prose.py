"The tutorials agree with themselves: figures in the prose come from the page or a named benchmark, visible code runs on its own"
import ast, importlib, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb')) + [ROOT / 'nbs' / '08_demo.ipynb']
PENDING = []

NUMBER = re.compile(r'(?<![\w.])[-−+]?\d+(?:,\d{3})*\.\d+(?!\w|\.\d)')  # a decimal number, thousands separators allowed
BENCHMARK = re.compile(r'benchmarks/\w+\.(?:py|md)')  # `python benchmarks/x.py ...` or a link to benchmarks/README.md
HIDDEN = re.compile(r'^\s*#\|\s*(?:hide|echo:\s*false)\s*$', re.M)


def params(xfail_pending=True):
    "One parameter per notebook, named by its path; those in `PENDING` expected to fail, not strictly"
    mark = [pytest.mark.xfail(strict=False, reason='not yet rewritten')] if xfail_pending else []
    return [pytest.param(p, id=str(p.relative_to(ROOT / 'nbs')), marks=mark if p.name in PENDING else []) for p in NOTEBOOKS]


def src(cell)->str: return ''.join(cell['source'])


def norm(s:str)->str: return s.replace('−', '-').replace(',', '').lstrip('+-')


def page_text(nb:dict)->str:
    "The code of every code cell and every text it printed or displayed"
    out = []
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        out.append(src(c))
        for o in c.get('outputs', []):
            if 'text' in o: out.append(''.join(o['text']))
            out += [''.join(v) for k, v in o.get('data', {}).items() if k.startswith('text/')]
    return norm('\n'.join(out))


def unsupported_numbers(nb:dict)->list:
    "Decimal numbers of the markdown, outside code spans, that the page never prints and no benchmark on their line claims"
    page, bad = page_text(nb), []
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        for line in src(c).split('\n'):
            if BENCHMARK.search(line): continue
            for m in NUMBER.findall(re.sub(r'`[^`]*`', '', line)):
                if not re.search(r'(?<![\d.])' + re.escape(norm(m)) + r'(?!\d)', page): bad.append(m)
    return bad


def test_checker_catches_a_number_off_the_page():
    nb = {'cells': [{'cell_type': 'code', 'source': ['print(1)'], 'outputs': [{'text': ['accuracy 96.2% (+1,234.5)']}]},
                    {'cell_type': 'markdown', 'source': ['We reach 96.2%, then −1,234.5 and `0.7`; later 97.3%.\n',
                                                         'The benchmark says 95.1 (`python benchmarks/accuracy.py`).\n',
                                                         'Not 96.25, nor 196.2.']}]}
    assert unsupported_numbers(nb) == ['97.3', '96.25', '196.2']


@pytest.mark.parametrize('path', params())
def test_prose_figures_are_on_the_page(path):
    bad = unsupported_numbers(json.loads(path.read_text()))
    assert not bad, f"{path.name}: figures in the prose that no output, code or benchmark command on their line gives: {bad}"


def code_lines(s:str)->str: return '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in s.split('\n'))  # magics


def star(module:str)->set:
    "The names `from module import *` binds"
    m = importlib.import_module(module)
    return set(getattr(m, '__all__', [k for k in vars(m) if not k.startswith('_')]))


def imported(tree)->set:
    "Names bound by the import statements of `tree`"
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import): out |= {a.asname or a.name.split('.')[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            for a in n.names: out |= star(n.module) if a.name == '*' else {a.asname or a.name}
    return out


def bound(tree)->set:
    "Names a cell binds: imports, assignments, definitions"
    out = imported(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)): out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(n.name)
        elif isinstance(n, ast.arg): out.add(n.arg)
    return out


def hidden_imports_used(nb:dict)->list:
    "(cell index, name) for each name a visible cell uses that only a hidden cell imported before it"
    hidden, visible, bad = set(), set(), []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        tree = ast.parse(code_lines(src(c)))
        if HIDDEN.search(src(c)): hidden |= imported(tree); continue
        if all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and getattr(s.value.func, 'id', '') == 'show_doc'
               for s in tree.body): continue  # nbdev renders documentation for these and hides their code
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        visible |= bound(tree)
        bad += [(i, n) for n in sorted(used & hidden - visible)]
    return bad


def test_hidden_import_check_catches_a_dependency():
    cell = lambda s: {'cell_type': 'code', 'source': [s], 'outputs': []}
    nb = {'cells': [cell('#| hide\nimport torch\nfrom math import pi\nfrom fastcore.test import *'), cell('import numpy as np\nx = torch.ones(2)'),
                    cell('from math import pi\ny = np.pi + pi'), cell('test_eq(1, 1)')]}
    assert hidden_imports_used(nb) == [(1, 'torch'), (3, 'test_eq')]


@pytest.mark.parametrize('path', params())
def test_visible_code_imports_what_it_uses(path):
    bad = hidden_imports_used(json.loads(path.read_text()))
    assert not bad, f"{path.name}: visible cells use names imported only in hidden cells (cell index, name): {bad}"
