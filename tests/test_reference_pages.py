"""The reference pages read as fastai's do: every public name of `kdcb.all`, `kdcb.lm` and `kdcb.fasterai` has a `show_doc`
in the notebook of its module, followed by a visible example whose output the page keeps; no hidden cell defines a name
that a visible cell uses; every rendered source link carries the line of its definition"""
import ast, importlib, inspect, json, re
from pathlib import Path
import pytest
from test_tutorial_prose import bound # names a cell binds: imports, assignments, definitions

ROOT = Path(__file__).parents[1]
NBS = ROOT/'nbs'
API = ['kdcb.all', 'kdcb.lm', 'kdcb.fasterai']
HIDDEN = re.compile(r'^\s*#\|\s*(?:hide|echo:\s*false|include:\s*false)\s*$', re.M)
EXPORT = re.compile(r'^\s*#\|\s*export[si]?\s*$', re.M)
LINK = re.compile(r'\[source\]\(https://[^)\s]*?/blob/[^/)]+/(kdcb/[\w/]+\.py)#L(\w+)\)')
# Notebooks known not to comply yet, skipped with the reason: empty it as each notebook complies.
PENDING = {
}


def reference_notebooks()->list: return sorted(NBS.glob('[0-9][0-9]_*.ipynb'))

def src(cell)->str: return cell['source'] if isinstance(cell['source'], str) else ''.join(cell['source'])

def code_lines(s:str)->str: return '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in s.split('\n')) # magics

def is_hidden(cell)->bool: return bool(HIDDEN.search(src(cell)))

def is_export(cell)->bool: return bool(EXPORT.search(src(cell)))

def show_doc_targets(cell)->list:
    "The names a `show_doc`-only cell documents (`Cls`, `Cls.method`); [] for any other cell"
    try: tree = ast.parse(code_lines(src(cell)))
    except SyntaxError: return []
    calls = [s.value for s in tree.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    if not tree.body or len(calls) != len(tree.body) or not all(getattr(c.func, 'id', '') == 'show_doc' for c in calls): return []
    return [ast.unparse(c.args[0]) for c in calls if c.args]

def has_output(cell)->bool:
    "The cell kept an output that is not an error"
    return any(o.get('output_type') != 'error' and (o.get('text') or o.get('data')) for o in cell.get('outputs', []))


# --- public names and where they are defined
def module_notebooks()->dict:
    "kdcb module name -> the notebook its file is generated from"
    out = {}
    for py in (ROOT/'kdcb').glob('*.py'):
        m = re.search(r'File to edit: \.\./nbs/(\S+\.ipynb)', py.read_text()[:2000])
        if m: out[f'kdcb.{py.stem}'] = m.group(1)
    return out

def module_source(m:str)->str: return (ROOT/'kdcb'/f"{m.split('.')[-1]}.py").read_text()

def public_names()->dict:
    "name -> the kdcb module that defines it, for every name in the `__all__` of `API`'s modules"
    out = {}
    for m in API:
        mod = importlib.import_module(m)
        for n in mod.__all__:
            o = getattr(mod, n)
            home = getattr(o, '__module__', None) if inspect.isclass(o) or inspect.isfunction(o) else None
            if home is None: # a constant: the module whose source assigns it
                home = next(m for m in sorted(module_notebooks()) if re.search(rf'^{n}\s*[:=]', module_source(m), re.M))
            out.setdefault(n, set()).add(home)
    return out


# --- the checks, on a notebook's json
def undocumented(nb:dict, names:list, constants:set=frozenset())->list:
    """Of `names` (the functions and classes of the notebook's module), those without `show_doc` and a printing example;
    of its `constants`, those that no markdown cell names and no visible cell with output uses"""
    cells, bad = nb['cells'], []
    for name in names:
        if name in constants:
            said = any(c['cell_type'] == 'markdown' and f'`{name}`' in src(c) for c in cells)
            shown = any(c['cell_type'] == 'code' and not is_hidden(c) and has_output(c) and re.search(rf'\b{name}\b', src(c)) for c in cells)
            if not (said and shown): bad.append(f"{name}: a constant that the prose must name and a visible cell with output use")
            continue
        at = [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and name in show_doc_targets(c)]
        if not at: bad.append(f"{name}: no show_doc({name})"); continue
        i = at[0]
        if not has_output(cells[i]): bad.append(f"{name}: show_doc({name}) has no rendered output"); continue
        nxt = next((c for c in cells[i+1:] if c['cell_type'] == 'code' and not show_doc_targets(c) and not is_hidden(c)), None)
        if nxt is None or is_export(nxt): bad.append(f"{name}: no example after show_doc({name}) before the next definition")
        elif not has_output(nxt): bad.append(f"{name}: the example after show_doc({name}) prints nothing")
    return bad

def hidden_definitions_used(nb:dict)->list:
    "(cell index, name) for each name a visible cell uses that only a hidden cell before it bound (imported, assigned, defined)"
    hidden, visible, bad = set(), set(), []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        try: tree = ast.parse(code_lines(src(c)))
        except SyntaxError: continue
        if is_hidden(c): hidden |= bound(tree) - visible; continue
        if show_doc_targets(c): continue # nbdev renders the documentation and hides the call
        visible |= bound(tree)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        bad += [(i, n) for n in sorted(used & hidden - visible)]
    return bad

def bad_source_links(nb:dict, root:Path=ROOT)->list:
    "Rendered `show_doc` source links without a line number, or whose line is not the definition of the documented name"
    bad = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            md = ''.join(o.get('data', {}).get('text/markdown', ''))
            for m in LINK.finditer(md):
                title = re.search(r'^#+\s+(\S+)', md[m.end():], re.M)
                name = title.group(1).split('.')[-1] if title else '?'
                if not m.group(2).isdigit(): bad.append(f"{name}: {m.group(1)}#L{m.group(2)}"); continue
                lines = (root/m.group(1)).read_text().splitlines() if (root/m.group(1)).exists() else []
                n = int(m.group(2))
                if not (0 < n <= len(lines) and re.match(rf'\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b', lines[n-1])):
                    bad.append(f"{name}: {m.group(1)}#L{n} is not its definition")
    return bad


def silent_values(nb:dict)->list:
    "Indices of visible cells that end in a value (a name, attribute, tuple...: not a call) but kept no output"
    bad = []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code' or is_hidden(c) or is_export(c) or has_output(c): continue
        try: body = ast.parse(code_lines(src(c))).body
        except SyntaxError: continue
        if body and isinstance(body[-1], ast.Expr) and not isinstance(body[-1].value, (ast.Call, ast.Constant, ast.Await)): bad.append(i)
    return bad


# --- the tests
def test_every_public_name_has_a_reference_notebook():
    homes, nbs = public_names(), module_notebooks()
    bad = {n: h for n, h in homes.items() if any(m not in nbs or not (NBS/nbs[m]).exists() for m in h)}
    assert not bad, f"public names whose module has no notebook: {bad}"

def _names_by_notebook()->dict:
    out, nbs = {}, module_notebooks()
    for name, homes in public_names().items():
        for m in homes: out.setdefault(nbs.get(m), []).append(name)
    return out

def params(): return [pytest.param(p, id=p.name, marks=[pytest.mark.skip(reason=f"pending: {PENDING[p.name]}")] if p.name in PENDING else [])
                      for p in reference_notebooks()]

def constants()->set: return {n for m in API for n in importlib.import_module(m).__all__
                              if not callable(getattr(importlib.import_module(m), n))}

@pytest.mark.parametrize('path', params())
def test_public_names_documented_with_an_example(path):
    bad = undocumented(json.loads(path.read_text()), sorted(_names_by_notebook().get(path.name, [])), constants())
    assert not bad, f"{path.name}:\n  " + "\n  ".join(bad)

@pytest.mark.parametrize('path', params())
def test_no_hidden_cell_defines_what_the_reader_needs(path):
    bad = hidden_definitions_used(json.loads(path.read_text()))
    assert not bad, f"{path.name}: visible cells use names that only hidden cells bind (cell index, name): {bad}"

@pytest.mark.parametrize('path', params())
def test_cells_ending_in_a_value_show_it(path):
    bad = silent_values(json.loads(path.read_text()))
    assert not bad, f"{path.name}: cells that end in a value but kept no output (cell indices): {bad}"

@pytest.mark.parametrize('path', params())
def test_source_links_point_to_the_definition(path):
    bad = bad_source_links(json.loads(path.read_text()))
    assert not bad, (f"{path.name}: source links without a line or pointing elsewhere: {bad}. Re-execute the notebook with "
                     "execnb (`CaptureShell().run_all`), so that `show_doc` sees the names its export cells define.")

def test_pending_names_real_notebooks():
    assert set(PENDING) <= {p.name for p in reference_notebooks()}, set(PENDING) - {p.name for p in reference_notebooks()}


# --- self-tests on synthetic notebooks
def _code(s, outputs=(), hidden=False): return {'cell_type': 'code', 'source': ('#| hide\n' if hidden else '') + s, 'outputs': list(outputs)}
def _md(s): return {'cell_type': 'markdown', 'source': s}
OUT = {'output_type': 'stream', 'name': 'stdout', 'text': ['1\n']}
DOC = {'output_type': 'execute_result', 'data': {'text/markdown': ['### f']}}

def test_undocumented_finds_each_gap():
    nb = {'cells': [_code('#| export\ndef f(): pass\ndef g(): pass'), _code('show_doc(f)', [DOC]), _code('show_doc(g)', [DOC]),
                    _md('prose'), _code('x = 1', hidden=True), _code('print(f())', [OUT]),
                    _code('#| export\ndef h(): pass'), _code('show_doc(h)', [DOC]), _code('h()'),
                    _code('#| export\ndef k(): pass'), _code('show_doc(k)'), _code('print(k())', [OUT]),
                    _code('#| export\ndef m(): pass'), _code('show_doc(m)', [DOC]), _code('#| export\ndef n(): pass')]}
    nb['cells'] += [_md('`C` is the constant'), _code('print(C)', [OUT]), _code('D', hidden=True)]
    assert undocumented(nb, ['f', 'g', 'h', 'k', 'm', 'n', 'C', 'D'], {'C', 'D'}) == [
        'h: the example after show_doc(h) prints nothing', 'k: show_doc(k) has no rendered output',
        'm: no example after show_doc(m) before the next definition', 'n: no show_doc(n)',
        'D: a constant that the prose must name and a visible cell with output use']

def test_hidden_definitions_are_found():
    nb = {'cells': [_code('import torch\nfrom math import pi\ndef toy_dls(): pass\nclass Spy: pass\nk = 3', hidden=True),
                    _code('dls = toy_dls()\ns = Spy()'), _code('pi = 3.14\nprint(pi, torch.ones(1))'),
                    _code('show_doc(Spy)'), _code('y = k + 1', hidden=True), _code('for k in range(2): print(k)')]}
    assert hidden_definitions_used(nb) == [(1, 'Spy'), (1, 'toy_dls'), (2, 'torch')]

def test_silent_values_are_found():
    nb = {'cells': [_code('pairs = 1\npairs', [OUT]), _code('x = 2\nx'), _code('x.shape, x'), _code('test_eq(x, 2)'), _code('x', hidden=True),
                    _code('#| export\nX = 1\nX'), _code('print(x)')]}
    assert silent_values(nb) == [1, 2]

def test_source_links_are_checked(tmp_path):
    (tmp_path/'kdcb').mkdir(); (tmp_path/'kdcb'/'m.py').write_text('import x\n\nclass A:\n    def run(self): pass\n')
    link = lambda n, t: {'output_type': 'execute_result', 'data': {'text/markdown': [
        f'---\n\n[source](https://github.com/o/r/blob/main/kdcb/m.py#L{n}){{target="_blank"}}\n\n### {t}\n']}}
    nb = {'cells': [_code('show_doc(A)', [link(3, 'A')]), _code('show_doc(A.run)', [link(4, 'A.run')]),
                    _code('show_doc(A)', [link('None', 'A')]), _code('show_doc(A.run)', [link(3, 'A.run')])]}
    assert bad_source_links(nb, tmp_path) == ['A: kdcb/m.py#LNone', 'run: kdcb/m.py#L3 is not its definition']
