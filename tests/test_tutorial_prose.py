"""The pages agree with themselves: figures in the prose come from the page or from the named benchmark's section of
`benchmarks/README.md`, run times in the prose from the times the page prints, API spellings are today's, sentences end,
and visible code runs on its own"""
import ast, importlib, inspect, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
TUTORIALS = sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb'))
NOTEBOOKS = TUTORIALS + [ROOT / 'nbs' / '08_demo.ipynb'] # prose figures and visible imports
REFERENCE = sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))
MARKDOWN = [ROOT / 'README.md', ROOT / 'benchmarks' / 'README.md']
PAGES = TUTORIALS + REFERENCE + MARKDOWN # times, benchmark figures, API spellings, unfinished sentences
BENCH_README = ROOT / 'benchmarks' / 'README.md'
# Pages known not to comply yet, per check (expected to fail, not strictly), with the reason: empty it as pages comply.
# Keyed by notebook name, or by path for the two README.md; checks: figures, imports, benchmark, times, api, sentences.
PENDING = {
}

NUMBER = re.compile(r'(?<![\w.])[-−+]?\d+(?:,\d{3})*\.\d+(?!\w|\.\d)')  # a decimal number, thousands separators allowed
BENCHMARK = re.compile(r'benchmarks/\w+\.(?:py|md)')  # `python benchmarks/x.py ...` or a link to benchmarks/README.md
HIDDEN = re.compile(r'^\s*#\|\s*(?:hide|echo:\s*false)\s*$', re.M)


def params(check:str):
    "One parameter per notebook, named by its path; those `PENDING` for `check` expected to fail, not strictly"
    return pages(NOTEBOOKS, check)


def pages(paths:list, check:str):
    "One parameter per page, named by its path; those `PENDING` for `check` expected to fail, not strictly"
    key = lambda p: str(p.relative_to(ROOT)) if p.suffix == '.md' else p.name # two README.md
    reason = lambda p: PENDING.get(key(p), {}).get(check)
    return [pytest.param(p, id=str(p.relative_to(ROOT)), marks=[pytest.mark.xfail(strict=False, reason=reason(p))] if reason(p) else [])
            for p in paths]


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


FENCE = re.compile(r'^```.*?^```[^\n]*$', re.M | re.S)
UNIT_START = re.compile(r'^\s*(?:[-*+]\s|\d+\.\s|\||#|>)') # a list item, table row, heading or quote starts a new unit


def paragraphs(md:str)->list:
    "The prose units of markdown `md`, fenced code left out: paragraphs, and each list item, table row or heading on its own"
    out, cur = [], []
    for line in FENCE.sub('', md).split('\n'):
        if not line.strip() or UNIT_START.match(line):
            if cur: out.append('\n'.join(cur))
            cur = [line] if line.strip() else []
        else: cur.append(line)
    if cur: out.append('\n'.join(cur))
    return out


def prose(unit:str)->str: return re.sub(r'`[^`]*`', '', unit) # code spans are code, not claims


def unsupported_numbers(nb:dict)->list:
    "Decimal numbers of the markdown, outside code, that the page never prints and whose paragraph names no benchmark"
    page, bad = page_text(nb), []
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        for unit in paragraphs(src(c)):
            if BENCHMARK.search(unit): continue # `misattributed_figures` checks these against benchmarks/README.md
            for m in NUMBER.findall(prose(unit)):
                if not re.search(r'(?<![\d.])' + re.escape(norm(m)) + r'(?!\d)', page): bad.append(m)
    return bad


def test_checker_catches_a_number_off_the_page():
    nb = {'cells': [{'cell_type': 'code', 'source': ['print(1)'], 'outputs': [{'text': ['accuracy 96.2% (+1,234.5)']}]},
                    {'cell_type': 'markdown', 'source': ['We reach 96.2%, then −1,234.5 and `0.7`; later 97.3%.\n', '\n',
                                                         'The benchmark says 95.1 (`python benchmarks/accuracy.py`).\n', '\n',
                                                         'Not 96.25, nor 196.2.\n', '```python\nx = 0.25\n```\n']}]}
    assert unsupported_numbers(nb) == ['97.3', '96.25', '196.2']


@pytest.mark.parametrize('path', params('figures'))
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


@pytest.mark.parametrize('path', params('imports'))
def test_visible_code_imports_what_it_uses(path):
    bad = hidden_imports_used(json.loads(path.read_text()))
    assert not bad, f"{path.name}: visible cells use names imported only in hidden cells (cell index, name): {bad}"


# --- every page: notebooks (tutorials and reference) and the two READMEs
def load_page(path:Path)->dict:
    "A notebook as it is; a markdown file as one markdown cell"
    if path.suffix == '.ipynb': return json.loads(path.read_text())
    return {'cells': [{'cell_type': 'markdown', 'source': path.read_text()}]}


def readme_sections(text:str)->dict:
    "benchmarks/README.md's `## name` sections by name"
    parts = re.split(r'^## +(\S+)[^\n]*$', text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


SCRIPT = re.compile(r'benchmarks/(\w+\.py)')


def misattributed_figures(nb:dict, readme:str|None=None, root:Path=ROOT)->list:
    """Decimal figures of a paragraph that names `benchmarks/<script>.py` (or `benchmarks/README.md`) which neither the
    page prints, nor that script's section of benchmarks/README.md holds, nor the script's source sets"""
    readme = BENCH_README.read_text() if readme is None else readme
    sections, page, bad = readme_sections(readme), page_text(nb), []
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        for unit in paragraphs(src(c)):
            scripts = sorted(set(SCRIPT.findall(unit)))
            if not scripts and 'benchmarks/README.md' not in unit: continue
            support = page + norm('\n'.join([sections.get(s, '') for s in scripts] if scripts else [readme]))
            support += '\n'.join(norm((root / 'benchmarks' / s).read_text()) for s in scripts if (root / 'benchmarks' / s).exists())
            bad += [f"{m} ({', '.join(scripts) or 'benchmarks/README.md'})" for m in NUMBER.findall(prose(unit))
                    if not re.search(r'(?<![\d.])' + re.escape(norm(m)) + r'(?!\d)', support)]
    return bad


@pytest.mark.parametrize('path', pages([p for p in PAGES if p != BENCH_README], 'benchmark'))
def test_benchmark_figures_are_in_its_section(path):
    bad = misattributed_figures(load_page(path))
    assert not bad, (f"{path.name}: figures attributed to a benchmark that neither this page, nor the benchmark's section of "
                     f"benchmarks/README.md, nor its script holds: {bad}")


def test_misattributed_figure_is_caught(tmp_path):
    (tmp_path / 'benchmarks').mkdir(); (tmp_path / 'benchmarks' / 'a.py').write_text('weight = 0.9')
    readme = '# B\n\n## a.py\n\n| scratch | 92.7 |\n\n## b.py\n\n| x | 76.8 |\n'
    nb = {'cells': [{'cell_type': 'code', 'source': 'print(1)', 'outputs': [{'text': ['88.0\n']}]},
                    {'cell_type': 'markdown', 'source': 'In `python benchmarks/a.py`, from 92.7 to 96.1 at weight 0.9,\n'
                                                        'and 76.8; here 88.0.\n\nElsewhere 3.3 (benchmarks/README.md), 76.8 too.'}]}
    assert misattributed_figures(nb, readme, tmp_path) == ['96.1 (a.py)', '76.8 (a.py)', '3.3 (benchmarks/README.md)']


# --- run times in the prose against the times the page prints
WORDS = {'a': 1, 'an': 1, 'one': 1, 'two': 2, 'three': 3, 'four': 4, 'five': 5, 'six': 6, 'seven': 7, 'eight': 8, 'nine': 9,
         'ten': 10, 'fifteen': 15, 'twenty': 20, 'thirty': 30, 'forty': 40, 'fifty': 50, 'sixty': 60}
UNITS = {'ms': .001, 's': 1, 'sec': 1, 'second': 1, 'seconds': 1, 'min': 60, 'minute': 60, 'minutes': 60, 'h': 3600,
         'hour': 3600, 'hours': 3600}
_N = r'(?:\d+(?:\.\d+)?|' + '|'.join(WORDS) + r')'
CLAIM = re.compile(r'(?P<q>\b(?:well under|under|less than|within|about|around|roughly|nearly|almost)\s+)?'
                   r'(?:(?P<vague>a few|several|a couple of)\s+(?P<vu>seconds|minutes|hours)\b'
                   r'|(?P<quarter>a quarter of an hour|half an hour)\b'
                   r'|(?P<m>\d+)\s*min\s+(?P<s>\d+)\s*s\b'
                   r'|(?<![\w.-])(?P<n>' + _N + r')(?:\s*(?:to|-|–)\s*(?P<n2>' + _N + r'))?(?P<gap>\s*)'
                   r'(?P<u>ms|s|sec|seconds|second|min|minutes|minute|hours|hour|h)\b)', re.I)
PRINTED = re.compile(r'(?P<m>\d+)\s*min\s*(?P<s>\d+(?:\.\d+)?)\s*s\b|(?P<n>\d+(?:\.\d+)?)\s*(?P<u>ms|s|sec|min)\b')
FASTAI_TIME = re.compile(r'\b(\d{2}):(\d{2})\b')


def _num(w:str)->float: return float(WORDS.get(w.lower(), w) if not w[0].isdigit() else w)


def claims(text:str)->list:
    "(phrase, low, high, exact) for each run time the prose states; `exact` for a bare number of seconds or minutes"
    out = []
    for m in CLAIM.finditer(text):
        q = (m.group('q') or '').strip().lower()
        if m.group('vague'):
            u = UNITS[m.group('vu').lower()]
            lo, hi = {'a few': (1, 10), 'a couple of': (1.5, 3), 'several': (2, 15)}[m.group('vague').lower()]
            out.append((m.group(0), lo * u, hi * u, False)); continue
        if m.group('quarter'): t = 900 if 'quarter' in m.group('quarter') else 1800; exact = False
        elif m.group('m'): t = 60 * int(m.group('m')) + int(m.group('s')); exact = not q
        else:
            n, u = m.group('n'), m.group('u')
            if u.lower() == 'second' and n.lower() in ('a', 'the'): continue # "a second signal"
            if u == 'h' or (u == 's' and (not n[0].isdigit() or not m.group('gap'))): continue # "GPT-2s", "its 1s"
            t, exact = _num(n) * UNITS[u.lower()], not q and n[0].isdigit() and not m.group('n2')
            if m.group('n2'): out.append((m.group(0), t, _num(m.group('n2')) * UNITS[u.lower()], False)); continue
        lo, hi = {'well under': (0, .75 * t), 'under': (0, t), 'less than': (0, t), 'within': (0, t)}.get(q, (t / 1.5, t * 1.5))
        out.append((m.group(0), lo, hi, exact))
    return out


def printed_times(cells:list)->list:
    "Seconds each output of `cells` prints: a fastai progress table's `time` column (summed per table), `N s`, `N ms`, `N min N s`"
    out = []
    for c in cells:
        for o in c.get('outputs', []):
            texts = [''.join(o.get('text', ''))] + [''.join(v) for k, v in o.get('data', {}).items() if k in ('text/plain', 'text/html')]
            t = max(texts, key=len)
            if 'train_loss' in t and 'time' in t: # a progress table: one time per epoch
                out.append(sum(60 * int(a) + int(b) for a, b in FASTAI_TIME.findall(t))); continue
            if 'Wall time' in t: t = t[t.index('Wall time'):]
            for m in PRINTED.finditer(t):
                out.append(60 * int(m.group('m')) + float(m.group('s')) if m.group('m') else float(m.group('n')) * UNITS[m.group('u')])
    return out


def heading_level(line:str)->int|None:
    m = re.match(r'^(#{1,6})\s', line)
    return len(m.group(1)) if m else None


def time_claims_contradicted(nb:dict)->list:
    """Run times the prose states that the printed times of their section (the whole page for the introduction) contradict:
    a bare number must match a printed time; a vague one ("about a minute", "a few seconds", "ten to twenty seconds")
    must hold the section's printed times added up. A time in a sentence that names a benchmark is that benchmark's."""
    cells, bad = nb['cells'], []
    heads = [(i, heading_level(l)) for i, c in enumerate(cells) if c['cell_type'] == 'markdown'
             for l in src(c).split('\n') if heading_level(l)]
    for i, c in enumerate(cells):
        if c['cell_type'] != 'markdown': continue
        before = [(j, lv) for j, lv in heads if j <= i]
        start, level = before[-1] if before else (0, 1)
        end = next((j for j, lv in heads if j > i and lv <= level), len(cells))
        scope = printed_times(cells[start:end])
        for unit in paragraphs(src(c)):
            if heading_level(unit): continue
            for sentence in re.split(r'(?<=[.;!?])\s+', unit):
                if BENCHMARK.search(sentence): continue
                for phrase, lo, hi, exact in claims(prose(sentence)):
                    if not scope: bad.append(f"{phrase!r}: no time printed in its section"); continue
                    if exact: ok = any(abs(t - lo * 1.5) <= max(.5, .1 * t) for t in scope)
                    else: ok = lo / 1.1 <= sum(scope) <= hi * 1.1
                    if not ok: bad.append(f"{phrase!r}: the section prints {', '.join(f'{t:g} s' for t in scope)}")
    return bad


@pytest.mark.parametrize('path', pages(TUTORIALS + REFERENCE, 'times'))
def test_times_in_prose_match_printed_times(path):
    bad = time_claims_contradicted(load_page(path))
    assert not bad, f"{path.name}: run times in the prose that the page's printed times contradict: {bad}"


def _table(*times): return '\n'.join(['epoch  train_loss  valid_loss  time'] + [f'{i}  0.1  0.2  00:{t:02d}' for i, t in enumerate(times)])


def test_time_claims_are_checked():
    out = lambda t: {'cell_type': 'code', 'source': '', 'outputs': [{'output_type': 'stream', 'text': [t]}]}
    md = lambda t: {'cell_type': 'markdown', 'source': t}
    nb = {'cells': [md('# T\n\nEverything runs in well under a minute.'), out(_table(10, 12, 11)), out('teacher (40 s)'),
                    md('## A\n\nThis trains in ten to twenty seconds.'), out('small teacher (60 s)'),
                    md('## B\n\nIt takes about a minute of CPU time: 3 s for one fit, 6 s for the other, and a second pass.'),
                    out('3 s CPU\n6 s CPU\n41 s of CPU time'),
                    md('## C\n\nIn a few seconds. `python benchmarks/x.py` says 16 minutes. KDCB_FULL=1 takes several minutes.')]}
    assert time_claims_contradicted(nb) == ["'well under a minute': the section prints 33 s, 40 s, 60 s, 3 s, 6 s, 41 s",
                                            "'ten to twenty seconds': the section prints 60 s",
                                            "'a few seconds': no time printed in its section",
                                            "'several minutes': no time printed in its section"]
    assert claims('at 0.5 s per step, for 2 min 3 s, within 4 hours, the second row, two GPT-2s, its params') == [
        ('0.5 s', 0.5 / 1.5, 0.75, True), ('2 min 3 s', 82.0, 184.5, True), ('within 4 hours', 0, 14400, False)]


# --- API spellings of today
OLD_KEYWORDS = {'teacher_dtype', 'teacher_device', 'cache_teacher', 'teacher_weights', 'feature_teacher', 'activations_student',
                'activations_teacher', 'output_fn', 'shift_labels', 'attention_mask', 'schedule'} # the callback's keywords before `Outputs`
MOVED = {'shift_labels', 'output_fn', 'attention_mask'} # now `Outputs(...)`'s


def api()->dict:
    "Public name -> the parameter names each object of that name accepts (None: any), over kdcb.all, kdcb.lm, kdcb.fasterai"
    out = {}
    for m in ('kdcb.all', 'kdcb.lm', 'kdcb.fasterai'):
        mod = importlib.import_module(m)
        for n in mod.__all__:
            o = getattr(mod, n)
            if not callable(o): continue
            try: ps = inspect.signature(o).parameters.values()
            except (TypeError, ValueError): continue
            names = None if any(p.kind == p.VAR_KEYWORD for p in ps) else {p.name for p in ps}
            out[n] = None if names is None or out.get(n, set()) is None else out.get(n, set()) | names
    return out


def removed_keywords(api_:dict)->set:
    "The callback's old keywords that no public callable takes any more"
    return OLD_KEYWORDS - set().union(*[v for v in api_.values() if v])


def refusals(n:ast.AST)->list:
    "The nodes of `n` that a page runs to show an error: a `try` body with handlers, `test_fail(...)`, `with pytest.raises(...)`"
    if isinstance(n, ast.Try) and n.handlers: body = n.body
    elif isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'test_fail': body = n.args + [k.value for k in n.keywords]
    elif isinstance(n, ast.With) and any('raises' in ast.unparse(i.context_expr) for i in n.items): body = n.body
    else: return []
    return [m for b in body for m in ast.walk(b)]


def stale_spellings(nb:dict, api_:dict|None=None)->list:
    """Keywords that no longer exist, `shift_labels=`/`output_fn=`/`attention_mask=` written alone in the prose (as the
    callback's keywords were) instead of inside `Outputs(...)`, and calls (in code cells, fenced blocks and code spans) of a public name with a keyword it does not take"""
    api_ = api() if api_ is None else api_
    gone, bad = removed_keywords(api_), []
    def calls(code:str):
        try: tree = ast.parse(code_lines(code))
        except SyntaxError: return
        refused = {id(m) for n in ast.walk(tree) for m in refusals(n)} # calls shown failing on purpose
        for n in ast.walk(tree):
            if id(n) in refused: continue
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and api_.get(n.func.id, 1) not in (None, 1):
                bad.extend(f"{n.func.id}({k.arg}=...)" for k in n.keywords if k.arg and k.arg not in api_[n.func.id])
    for c in nb['cells']:
        text = src(c)
        if c['cell_type'] == 'code': calls(text); continue
        for block in re.findall(r'^```\w*\n(.*?)^```', text, re.M | re.S): calls(block)
        for span in re.findall(r'`([^`\n]+)`', FENCE.sub('', text)):
            calls(span)
            bad += [f"`{span}`: {k}= no longer exists" for k in sorted(gone) if re.search(rf'\b{k}\s*=', span)]
            bad += [f"`{span}`: {k}= belongs in Outputs(...)" for k in sorted(MOVED - gone) if re.match(rf'\s*{k}\s*=', span)]
    return bad


@pytest.mark.parametrize('path', pages(PAGES, 'api'))
def test_api_spellings_are_current(path):
    bad = stale_spellings(load_page(path))
    assert not bad, f"{path.name}: stale API spellings: {bad}"


def test_stale_spellings_are_caught():
    api_ = {'KnowledgeDistillationCallback': {'teacher', 'loss', 'weight', 'outputs'}, 'Outputs': {'shift_labels', 'attention_mask'},
            'SoftTarget': {'T'}, 'Anything': None}
    nb = {'cells': [{'cell_type': 'markdown', 'source': 'the callback with `shift_labels=True`, or `Outputs(shift_labels=True)`; '
                     '`teacher_dtype=torch.bfloat16`; `KnowledgeDistillationCallback(t, SoftTarget(T=4), weight=0.5)`.\n'
                     '```python\nkd = KnowledgeDistillationCallback(t, cache_teacher=True)\n```\n'},
                    {'cell_type': 'markdown', 'source': 'a `fn(input_ids=, attention_mask=)` signature'},
                    {'cell_type': 'code', 'source': 'kd = KnowledgeDistillationCallback(t, shift_labels=True)\nAnything(x=1)\nm(x, attention_mask=a)'},
                    {'cell_type': 'code', 'source': 'try: KnowledgeDistillationCallback(t, shift_labels=True)\nexcept TypeError as e: print(e)\n'
                     'test_fail(lambda: KnowledgeDistillationCallback(t, teacher_dtype=1))'}]} # shown failing on purpose: not stale
    assert stale_spellings(nb, api_) == [
        'KnowledgeDistillationCallback(cache_teacher=...)', '`shift_labels=True`: shift_labels= belongs in Outputs(...)',
        '`teacher_dtype=torch.bfloat16`: teacher_dtype= no longer exists', 'KnowledgeDistillationCallback(shift_labels=...)']
    assert 'teacher_dtype' in removed_keywords(api()) and 'shift_labels' not in removed_keywords(api())


# --- sentences that end
def unfinished(md:str)->list:
    "Prose paragraphs that do not end as a sentence (., :, ?, !, or a closing bracket, quote or emphasis after one)"
    bad = []
    for unit in paragraphs(md):
        u = unit.strip()
        if not u or UNIT_START.match(u) and not re.match(r'^\s*([-*+]|\d+\.)\s', u) or u.startswith(('![', '<', '$$')): continue
        if not re.search(r'[.:?!;,]["\')*_`\]]*$|\)$', u): bad.append(u[-60:])
    return bad


@pytest.mark.parametrize('path', pages(MARKDOWN, 'sentences'))
def test_readme_sentences_end(path):
    bad = unfinished(path.read_text())
    assert not bad, f"{path.name}: paragraphs that stop mid-sentence: {bad}"


def test_unfinished_sentence_is_caught():
    md = ('# Title\n\nA full sentence.\n\n| a | b |\n|---|---|\n\n- an item;\n- the last item.\n\n```\ncode\n```\n\n'
          'Ends with a list:\n\n- one\n\n(teacher 89.2 %). With labelled data only, use `weight=0.5`, and see\n')
    assert unfinished(md) == ['- one', ' 89.2 %). With labelled data only, use `weight=0.5`, and see']


def test_pending_names_real_pages_and_checks():
    keys = {p.name for p in TUTORIALS + REFERENCE} | {str(p.relative_to(ROOT)) for p in MARKDOWN}
    assert set(PENDING) <= keys, set(PENDING) - keys
    assert {c for v in PENDING.values() for c in v} <= {'figures', 'imports', 'benchmark', 'times', 'api', 'sentences'}
