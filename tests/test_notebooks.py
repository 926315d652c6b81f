"The library notebooks are written as fastai writes them: one public definition per export cell, short export cells (a callback class whole, with its events in its body), `show_doc` for the API"
import ast, importlib, inspect, json, re
from pathlib import Path
import pytest
from torch import nn
from fastai.callback.core import event

NBS = Path(__file__).parent.parent/'nbs'
MAX_LINES = 60 # the longest export cell, except one that holds one whole `Callback` class (its events in its body, as fastai's)
EVENTS = {e for e in dir(event) if not e.startswith('_')} # fastai calls these; the callback's prose documents them
# Rules for what needs a `show_doc` cell:
# - every class in the module's `__all__`, and every public function there gets its own export cell;
# - every method defined on such a class (not inherited) whose name does not start with `_`, properties included,
#   except fastai's callback events (`before_fit`, `after_batch`...) and `forward`/`extra_repr` of an `nn.Module`: the
#   class's `show_doc` and the prose after it say what calling the module does.

def library_notebooks(path:Path=NBS)->list: return sorted(p for p in path.glob('[0-9][0-9]*_*.ipynb'))

def _cells(nb:dict)->list: return [''.join(c['source']) if isinstance(c['source'], list) else c['source'] for c in nb['cells'] if c['cell_type'] == 'code']

def _directives(src:str)->set: return {l[2:].strip().split()[0] for l in src.splitlines() if l.startswith('#|') and l[2:].strip()}

def default_exp(nb:dict)->str|None:
    for src in _cells(nb):
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', src, re.M)
        if m: return m.group(1)

def export_cells(nb:dict)->list: return [s for s in _cells(nb) if _directives(s) & {'export', 'exports', 'exporti'}]

def defined_names(src:str)->set:
    "Top-level names a cell defines (classes, functions, assignments)"
    names = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)): names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names

def documented(nb:dict)->set:
    "What the notebook's `show_doc` calls name: `Cls` or `Cls.method`"
    return {m.group(1) for s in _cells(nb) for m in re.finditer(r'show_doc\(\s*([\w.]+)', s)}

def public_methods(cls:type)->list:
    "Methods (and properties) `cls` itself defines that need a `show_doc`"
    res = []
    for k, v in vars(cls).items():
        if k.startswith('_') or k in EVENTS or (k in ('forward', 'extra_repr') and issubclass(cls, nn.Module)): continue
        f = v.fget if isinstance(v, property) else getattr(v, '__func__', v)
        if inspect.isfunction(f) and f.__module__.startswith('kdcb'): res.append(k)
    return res

def own_public(mod)->dict:
    "The names of `mod.__all__` defined in `mod` itself (not re-exported)"
    return {n: getattr(mod, n) for n in getattr(mod, '__all__', []) if getattr(getattr(mod, n), '__module__', None) == mod.__name__}

def whole_callback(src:str, mod)->bool:
    "Whether the cell holds one class and nothing else, a fastai `Callback` subclass: such a cell may be long"
    from fastai.callback.core import Callback
    body = [n for n in ast.parse(src).body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.ClassDef): return False
    o = getattr(mod, body[0].name, None)
    return inspect.isclass(o) and issubclass(o, Callback)

def patched_events(src:str)->list:
    "Events defined outside a class body: `@patch def before_fit(self:Cls)` or `Cls.before_fit = ...`"
    res = []
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in EVENTS and any(
            (d.id if isinstance(d, ast.Name) else getattr(d, 'attr', getattr(getattr(d, 'func', None), 'id', ''))) in ('patch', 'patch_to')
            for d in node.decorator_list): res.append(node.name)
        elif isinstance(node, ast.Assign): res += [t.attr for t in node.targets if isinstance(t, ast.Attribute) and t.attr in EVENTS]
    return res

def problems(nb:dict, mod)->list:
    "Everything in `nb` (the source of `mod`) that breaks the rules above"
    res, public = [], own_public(mod)
    cells = export_cells(nb)
    for src in cells:
        n = len(src.splitlines())
        if n > MAX_LINES and not whole_callback(src, mod):
            res.append(f"an export cell of {n} lines (at most {MAX_LINES}, unless it holds one whole Callback class): {src.splitlines()[1][:60]!r}...")
        if ev := patched_events(src): res.append(f"events {ev} are defined outside their callback's class body: define them in the class")
        here = sorted(defined_names(src) & set(public))
        if len(here) > 1: res.append(f"one export cell defines {len(here)} public names, give each its own: {here}")
    for name in public:
        if not any(name in defined_names(s) for s in cells): res.append(f"{name} is not defined in an export cell of its own")
    docs = documented(nb)
    for name, o in public.items():
        if not inspect.isclass(o): continue
        need = [name] + [f"{name}.{m}" for m in public_methods(o)]
        res += [f"no show_doc({n})" for n in need if n not in docs]
    return res

PENDING = set() # every library notebook follows the rules

@pytest.mark.parametrize('path', [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="not split yet")) if p.stem in PENDING else p
                                  for p in library_notebooks()], ids=lambda p: p.stem)
def test_notebook_style(path):
    nb = json.loads(path.read_text())
    exp = default_exp(nb)
    if exp is None: pytest.skip("not a library notebook")
    mod = importlib.import_module(f"kdcb.{exp}")
    assert not (p := problems(nb, mod)), f"{path.name}:\n  " + "\n  ".join(p)

# Self-test: the checks fail on a notebook that adds a public name without its own cell, or without `show_doc`
def _nb(*srcs): return {'cells': [{'cell_type': 'code', 'source': s} for s in srcs]}

def _mod(src:str, all_:list):
    import types
    m = types.ModuleType('kdcb._synthetic')
    exec(src, m.__dict__)
    m.__all__ = all_
    return m

A = "class A:\n    'An A'\n    def run(self): 'Run it'\n    def before_fit(self): pass\n    def _private(self): pass\n"
B = "def b(): 'A b'\n"

def test_self_check_passes_on_good_notebook():
    nb = _nb("#| default_exp _synthetic", "#| export\n" + A, "show_doc(A)", "show_doc(A.run)", "#| export\n" + B)
    res = problems(nb, _mod(A + B, ['A', 'b']))
    assert res == [], res

def test_self_check_fails_on_two_public_names_in_one_cell():
    nb = _nb("#| export\n" + A + B, "show_doc(A)", "show_doc(A.run)")
    assert any('give each its own' in p for p in problems(nb, _mod(A + B, ['A', 'b'])))

def test_self_check_fails_on_a_missing_show_doc():
    nb = _nb("#| export\n" + A, "show_doc(A)", "#| export\n" + B)
    assert problems(nb, _mod(A + B, ['A', 'b'])) == ['no show_doc(A.run)']
    nb = _nb("#| export\n" + A, "show_doc(A.run)", "#| export\n" + B)
    assert problems(nb, _mod(A + B, ['A', 'b'])) == ['no show_doc(A)']

def test_self_check_fails_on_a_long_cell():
    long = "#| export\n" + B + "x = 1\n" * MAX_LINES
    assert any('export cell of' in p for p in problems(_nb(long), _mod(B, ['b'])))

def test_self_check_fails_on_a_name_not_exported():
    assert problems(_nb("show_doc(A)", "show_doc(A.run)"), _mod(A, ['A'])) == ['A is not defined in an export cell of its own']

IMP = "from fastai.callback.core import Callback\n"
CB = "class C(Callback):\n    'A C'\n" + "    x = 1\n" * MAX_LINES + "    def before_fit(self): pass\n"

def test_self_check_lets_a_whole_callback_class_be_long():
    assert problems(_nb("#| export\n" + IMP, "#| export\n" + CB, "show_doc(C)"), _mod(IMP + CB, ['C'])) == []

def test_self_check_fails_on_a_long_cell_that_is_not_one_callback_class():
    src = CB + "def f(): pass\n"
    assert any('export cell of' in p for p in problems(_nb("#| export\n" + IMP, "#| export\n" + src, "show_doc(C)"), _mod(IMP + src, ['C'])))

def test_self_check_fails_on_a_patched_event():
    src = "from fastai.callback.core import Callback\nfrom fastcore.basics import patch\nclass D(Callback):\n    'A D'\n"
    nb = _nb("#| export\n" + src, "show_doc(D)", "#| export\n@patch\ndef after_loss(self:D): pass\n")
    assert any("['after_loss'] are defined outside" in p for p in problems(nb, _mod(src, ['D'])))
