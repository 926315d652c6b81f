"""The lifecycle matrix: every callback kdcb ships, through what a fastai user does around a fit.

The callbacks are found by themselves (every `Callback` that `kdcb.all`, `kdcb.lm` and `kdcb.fasterai` export): one that no case
below covers fails `test_every_callback_kdcb_ships_is_in_the_matrix`, naming it. A cell that does not apply to a case is in `NOT_APPLICABLE`
with the reason; `test_every_cell_runs_or_says_why_not` checks that the table names real cases and cells."""
import inspect, io, warnings
import pytest, torch
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
import fastai.callback.fp16, fastai.callback.schedule, fastai.callback.progress  # Learner.to_bf16, lr_find, no_bar
import kdcb.all, kdcb.lm, kdcb.fasterai
from kdcb.all import *
from conftest import toy_dls, conv, quiet_fit
from test_lifecycle import Boom, BoomAt, BoomBeforeFit, exportable, _fitnet_kd


# ---- the callbacks kdcb ships, found by themselves ----
def shipped_callbacks()->set:
    "Every fastai `Callback` subclass exported by `kdcb.all`, `kdcb.lm` and `kdcb.fasterai`"
    found = set()
    for mod in (kdcb.all, kdcb.lm, kdcb.fasterai):
        for name in mod.__all__:
            o = getattr(mod, name)
            if inspect.isclass(o) and issubclass(o, Callback): found.add(o)
    return found


# ---- the cases: tiny models on the toy data ----
def data(dtype=torch.float32, bs=32):
    "The toy data as fastai `Datasets` (which `export` can empty), in a fixed order: the same batches in every fit"
    if dtype == torch.float32: return exportable(toy_dls(128), shuffle=False, bs=bs)
    to = lambda t: t.to(dtype) if t.is_floating_point() else t # float64 inputs for float64 models
    return exportable(toy_dls(128), shuffle=False, bs=bs, after_batch=[to])


def teacher_model(seed=1):
    "A teacher in the state a user may leave it in: train mode, one parameter frozen; kdcb must give it back like this"
    torch.manual_seed(seed)
    t = conv(8).train()
    t[1].weight.requires_grad_(False)
    return t


class Case:
    "One way of using kdcb's callbacks: `models()` builds the user's other models, `cbs(student, models)` the callbacks"
    def __init__(self, name, cbs, models=lambda: dict(teacher=teacher_model()), lm=False):
        self.name, self._cbs, self.models, self.lm = name, cbs, models, lm
    def cbs(self, student, models): return list(self._cbs(student, models))
    def __repr__(self): return self.name


CASES = [
    Case('frozen', lambda s, m: [KnowledgeDistillationCallback(FrozenTeacher(m['teacher']))]),
    Case('ensemble', lambda s, m: [KnowledgeDistillationCallback(TeacherEnsemble([m['teacher'], m['teacher2']], weights=[2, 1]))],
         lambda: dict(teacher=teacher_model(1), teacher2=teacher_model(2))),
    Case('cached', lambda s, m: [KnowledgeDistillationCallback(CachedTeacher(m['teacher']), 'logits')]),
    Case('topk_cached', lambda s, m: [KnowledgeDistillationCallback(TopKCachedTeacher(m['teacher'], k=2, dtype=torch.float32))]),
    Case('function', lambda s, m: [KnowledgeDistillationCallback(FunctionTeacher(lambda x: m['teacher'](x)), 'soft_target')]),
    Case('ema', lambda s, m: [KnowledgeDistillationCallback(EMATeacher(s, decay=0.9))], lambda: {}),
    Case('connector', lambda s, m: [_fitnet_kd(m['teacher'])]),
    Case('balancer', lambda s, m: [KnowledgeDistillationCallback(m['teacher'], ['soft_target', 'logits'], weight=UncertaintyBalance(0.5)),
                                   WeightLog(), DistillationRecorder(), RunHistory()]),
    Case('fasterai', lambda s, m: [kdcb.fasterai.KnowledgeDistillationCallback(m['teacher'], kdcb.fasterai.SoftTarget)]),
    Case('mutual', lambda s, m: [MutualLearning(m['peer'])], lambda: dict(peer=conv())),
    Case('deep_supervision', lambda s, m: [DeepSupervision(['1'])], lambda: {}),
]
LM_CASES = [
    Case('on_policy', lambda s, m: [lm_distiller(m['teacher']), kdcb.lm.OnPolicy(lmbda=0.5, max_new_tokens=2, pad_token_id=0)],
         lambda: dict(teacher=lm_model(2, 0)), lm=True),
    Case('token_accumulation', lambda s, m: [lm_distiller(m['teacher']), kdcb.lm.TokenAccumulation(n_acc=8)],
         lambda: dict(teacher=lm_model(2, 0)), lm=True),
]
ALL = CASES + LM_CASES

# which case covers each shipped callback; the ones no case runs on its own say why
COVERED = {KnowledgeDistillationCallback: 'frozen ensemble cached topk_cached function ema connector balancer',
           kdcb.fasterai.KnowledgeDistillationCallback: 'fasterai',
           MutualLearning: 'mutual', DeepSupervision: 'deep_supervision', WeightLog: 'balancer',
           DistillationRecorder: 'balancer', RunHistory: 'balancer',
           kdcb.lm.OnPolicy: 'on_policy', kdcb.lm.TokenAccumulation: 'token_accumulation'}
NOT_RUN_ALONE = {FitCallback: 'the base class of the callbacks above: every case runs it',
                 LossColumns: "the progress columns each FitCallback attaches with itself: every case runs it"}

# cells that do not apply to a case, and why (never skipped silently)
NOT_APPLICABLE = {
    ('two_fits_equal_fresh', 'ema'): "the average carries over from fit to fit (that is the method): a fresh EMATeacher starts from the student",
    ('two_fits_equal_fresh', 'connector'): "the connector keeps training across fits (a fresh one starts untrained)",
    ('two_fits_equal_fresh', 'balancer'): "the balancer's log-variances keep training across fits",
    ('two_fits_equal_fresh', 'mutual'): "the peers keep training across fits",
    ('two_fits_equal_fresh', 'deep_supervision'): "the heads keep training across fits",
    ('gradient_accumulation', 'on_policy'): "OnPolicy draws which batches the student writes per batch: another batch size draws others",
    ('gradient_accumulation', 'token_accumulation'): "TokenAccumulation is a GradientAccumulation itself",
    ('float64', 'on_policy'): "Hugging Face models keep float32 attention masks and embeddings: float64 is not a transformers setup",
    ('float64', 'token_accumulation'): "Hugging Face models keep float32 attention masks and embeddings: float64 is not a transformers setup",
}
CELLS = ['lr_find', 'export', 'raises', 'two_fits_equal_fresh', 'two_fits', 'resume', 'cbs_where', 'float64', 'bf16_cpu',
         'bf16_autocast_cpu', 'gradient_accumulation']


def applies(cell, case):
    if (cell, case.name) in NOT_APPLICABLE: pytest.skip(f'{cell} does not apply to {case.name}: {NOT_APPLICABLE[cell, case.name]}')


# ---- a tiny GPT-2 for the language-model callbacks ----
V = 24
def lm_model(layers=1, seed=1, d=16):
    transformers = pytest.importorskip('transformers')
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return kdcb.lm.KeywordInputs(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=layers, n_embd=d, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False,
        resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.)))

def lm_distiller(teacher): return KnowledgeDistillationCallback(teacher, SoftTarget(T=1), outputs=Outputs(shift_labels=True, attention_mask=1))

def lm_data(bs=4):
    "Prompts and responses as fastai `Datasets` of (input_ids, attention_mask) -> labels, which `export` can empty"
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    g = torch.Generator().manual_seed(0)
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    r = kdcb.lm.Responses([torch.randint(1, V, (n(2, 5),), generator=g) for _ in range(16)],
                          [torch.randint(1, V, (n(1, 4),), generator=g) for _ in range(16)], pad_token_id=0)
    items = [r[i] for i in range(len(r))]
    return Datasets(items, [[ItemGetter(0)], [ItemGetter(1)], [ItemGetter(2)]], n_inp=2,
                    splits=[list(range(4, 16)), list(range(4))]).dataloaders(bs=bs, shuffle=False)


# ---- building, fitting and reading a learner ----
def learner(case, models=None, dtype=torch.float32, bs=None, in_learner=True, **kw):
    "A learner with the case's callbacks (attached for good, or returned for `fit(cbs=)`)"
    set_seed(0)
    if case.lm: student, dls, lf = lm_model(), lm_data(bs or 4), kdcb.lm.causal_lm_loss
    else: student, dls, lf = conv().to(dtype), data(dtype, bs or 32), CrossEntropyLossFlat()
    models = case.models() if models is None else models
    for m in models.values(): m.to(dtype)
    cbs = case.cbs(student, models)
    learn = Learner(dls, student, loss_func=lf, cbs=cbs if in_learner else None, **kw)
    return learn, cbs, models


def fit(learn, n=1, cbs=None):
    set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning) # e.g. autocast('cuda') on a machine without CUDA
        quiet_fit(learn, n, cbs=cbs)


def parts(cbs)->list:
    "Everything the callbacks train or keep from fit to fit: trained parts' values and optimizer state, an EMA average"
    out = []
    for c in cbs:
        if (p := getattr(c, 'parts', None)) is not None:
            out += [t for m in p.modules for t in m.state_dict().values()]
            out += [v for s in p.opt_state(None) for v in s.values() if isinstance(v, torch.Tensor)]
        t = getattr(c, 'teacher', None)
        if isinstance(t, EMATeacher): out += list(t.model.state_dict().values())
    return [t.detach().clone() for t in out]


def state(learn, cbs)->list:
    "The model's values, the optimizer's state, and the callbacks' trained parts"
    opt = [v for s in learn.opt.state_dict()['state'] for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in [*learn.model.state_dict().values(), *opt]] + parts(cbs)


def assert_same(a, b, exact=True):
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        if exact: assert x.dtype == y.dtype and torch.equal(x, y), f'tensor {i} differs'
        else: torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def user_models(case, models)->list[nn.Module]:
    "The models the user handed in and kdcb must give back unchanged (peers are trained: their hooks only are checked)"
    return [m for k, m in models.items() if k.startswith('teacher')]


def fingerprint(m:nn.Module):
    "Values, dtype, device, mode and requires_grad of a model, to compare bit for bit"
    return ([(k, v.detach().clone(), v.dtype, v.device) for k, v in m.state_dict().items()],
            [x.training for x in m.modules()], [p.requires_grad for p in m.parameters()])


def same_model(a, b):
    (va, ma, ra), (vb, mb, rb) = a, b
    assert ma == mb and ra == rb
    for (k, x, dx, vx), (_, y, dy, vy) in zip(va, vb): assert dx == dy and vx == vy and torch.equal(x, y), k


def assert_unchanged(before, case, models):
    "The user's models as `before` (their fingerprints), and no hook left on any model"
    for b, m in zip(before, user_models(case, models)): same_model(b, fingerprint(m))
    assert all_hooks(*models.values()) == 0


def assert_finite(learn): assert all(torch.isfinite(torch.as_tensor(l)) for l in learn.recorder.losses)


def all_hooks(*models)->int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for model in models for m in model.modules())


# ---- the matrix ----
def test_every_callback_kdcb_ships_is_in_the_matrix():
    missing = [c.__module__ + '.' + c.__qualname__ for c in shipped_callbacks() if c not in COVERED and c not in NOT_RUN_ALONE]
    assert not missing, f"callbacks without a case in the lifecycle matrix: {missing}; add a Case to tests/test_lifecycle_matrix.py"
    names = {c.name for c in ALL}
    assert all(set(v.split()) <= names for v in COVERED.values())


def test_every_cell_runs_or_says_why_not():
    names = {c.name for c in ALL}
    assert all(cell in CELLS and name in names and reason for (cell, name), reason in NOT_APPLICABLE.items())


@pytest.mark.parametrize('case', ALL, ids=str)
def test_lr_find_then_fit_equals_fit_alone(case):
    def run(find):
        learn, cbs, _ = learner(case)
        fit(learn) # the trained parts have optimizer state now
        if find:
            with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
                warnings.simplefilter('ignore')
                learn.lr_find(num_it=3, show_plot=False, suggest_funcs=None) # 3 steps, at rates up to 10
        fit(learn)
        return state(learn, cbs)
    assert_same(run(False), run(True))


@pytest.mark.parametrize('case', ALL, ids=str)
def test_export_load_predict(case, tmp_path):
    applies('export', case)
    learn, cbs, _ = learner(case, path=tmp_path)
    fit(learn)
    learn.export('kd.pkl')
    assert all(c in learn.cbs for c in cbs) # back on the learner after export
    plain = Learner(learn.dls, lm_model() if case.lm else conv(), loss_func=learn.loss_func, path=tmp_path)
    plain.export('plain.pkl')
    size, ref = (tmp_path/'kd.pkl').stat().st_size, (tmp_path/'plain.pkl').stat().st_size
    assert size <= ref * 1.05, f'the exported file is {size} bytes, a plain student {ref}'
    loaded = load_learner(tmp_path/'kd.pkl')
    assert not any(isinstance(c, FitCallback) for c in loaded.cbs)
    if case.lm: # the loaded student scores a batch of token ids
        xb = learn.dls.valid.one_batch()[:2]
        with torch.no_grad(): assert loaded.model(*xb).logits.shape == (*xb[0].shape, V)
    else:
        with loaded.no_bar(): pred = loaded.predict(torch.randn(8))
        assert pred[2].shape == (3,)


FAILURES = ['loss', 'model', 'KeyboardInterrupt', 'callback_before_fit', 'callback_mid_epoch']


class Failing:
    "Makes a fit raise: in the task loss, in the model's forward, by Ctrl-C, or in another callback"
    def __init__(self, how, learn):
        self.how, self.learn, self.cbs, self.handle, calls = how, learn, [], None, []
        def third(*a): # the third training batch
            calls.append(1)
            if len(calls) == 3: raise Boom('failed')
        if how == 'loss':
            lf = learn.loss_func
            learn.loss_func = lambda *a: (third(), lf(*a))[1]
        elif how == 'model': self.handle = learn.model.register_forward_pre_hook(lambda m, i: third())
        elif how == 'KeyboardInterrupt': self.cbs = [BoomAt(2, KeyboardInterrupt)]
        elif how == 'callback_before_fit': self.cbs = [BoomBeforeFit()]
        else: self.cbs = [BoomAt(2)]
    def done(self):
        if self.handle is not None: self.handle.remove()


# the callbacks attached to the learner for good, or given to this fit only (fastai removes them when it ends, also by an exception)
ATTACHED = {'loss': True, 'model': False, 'KeyboardInterrupt': False, 'callback_before_fit': True, 'callback_mid_epoch': False}


@pytest.mark.parametrize('how', FAILURES)
@pytest.mark.parametrize('case', ALL, ids=str)
def test_a_fit_that_raises_leaves_nothing_behind(case, how):
    "No hook on any model, no foreign parameter in the optimizer, the user's models bit-identical; then the learner trains again"
    applies('raises', case)
    attached = ATTACHED[how]
    learn, cbs, models = learner(case, in_learner=attached)
    learn.create_opt()
    own = {id(p) for p in learn.model.parameters()}
    before = [fingerprint(m) for m in user_models(case, models)]
    f = Failing(how, learn)
    with pytest.raises((Boom, KeyboardInterrupt)): fit(learn, 1, cbs=f.cbs + ([] if attached else cbs))
    f.done()
    assert all_hooks(learn.model, *models.values()) == 0
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == own, 'parameters of kdcb left in the optimizer'
    assert all((c in learn.cbs) == attached for c in cbs) # the callbacks, and the progress columns they attach, stay or go together
    assert [c for c in learn.cbs if isinstance(c, LossColumns)] == ([c.columns for c in cbs if c.columns is not None] if attached else [])
    assert_unchanged(before, case, models)
    fit(learn, cbs=None if attached else cbs) # and the learner trains again, with the same callbacks
    assert all_hooks(learn.model, *models.values()) == 0
    assert_unchanged(before, case, models)


@pytest.mark.parametrize('case', ALL, ids=str)
def test_two_fits_in_a_row(case):
    "Two fits with the same callbacks: nothing left over after each, and the user's models as they were"
    learn, cbs, models = learner(case)
    before = [fingerprint(m) for m in user_models(case, models)]
    for _ in range(2):
        fit(learn)
        assert all_hooks(learn.model, *models.values()) == 0
        assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in learn.model.parameters()}
        assert_finite(learn)
    assert_unchanged(before, case, models)


@pytest.mark.parametrize('case', ALL, ids=str)
def test_the_second_fit_equals_a_fresh_callbacks(case):
    "Callbacks that keep nothing from fit to fit: the second fit with them equals one with new callbacks"
    applies('two_fits_equal_fresh', case)
    learn, cbs, models = learner(case)
    fit(learn); fit(learn)
    learn2, cbs2, _ = learner(case, models, in_learner=False)
    fit(learn2, cbs=cbs2)
    fresh = case.cbs(learn2.model, models)
    fit(learn2, cbs=fresh)
    assert_same(state(learn, []), state(learn2, []))


def save_state(cbs): return [c.state_dict() if hasattr(type(c), 'state_dict') else None for c in cbs]


@pytest.mark.parametrize('case', ALL, ids=str)
def test_save_and_resume_equals_an_uninterrupted_run(case, tmp_path):
    "`save(with_opt=True)` and each callback's `state_dict()`, loaded into a fresh learner: the next epoch is the uninterrupted run's"
    applies('resume', case)
    learn, cbs, models = learner(case, path=tmp_path)
    fit(learn)
    learn.save('ckpt', with_opt=True)
    buf = io.BytesIO(); torch.save(save_state(cbs), buf)
    fit(learn)
    learn2, _, _ = learner(case, models, path=tmp_path, in_learner=False)
    learn2.create_opt(); learn2.load('ckpt', with_opt=True)
    cbs2 = case.cbs(learn2.model, models)
    buf.seek(0)
    for c, s in zip(cbs2, torch.load(buf, weights_only=False)):
        if isinstance(c, DeepSupervision): c.build_heads(learn2) # its heads exist once built for the learner's model
        if s is not None: c.load_state_dict(s)
    for c in cbs2: learn2.add_cb(c)
    fit(learn2)
    assert_same(state(learn, cbs), state(learn2, cbs2))


@pytest.mark.parametrize('case', ALL, ids=str)
def test_fit_cbs_and_learner_cbs_train_identically(case):
    applies('cbs_where', case)
    learn, cbs, _ = learner(case)
    fit(learn)
    learn2, cbs2, _ = learner(case, in_learner=False)
    fit(learn2, cbs=cbs2)
    assert_same(state(learn, cbs), state(learn2, cbs2))


@pytest.mark.parametrize('case', ALL, ids=str)
def test_to_bf16_on_the_cpu_trains_in_float32(case):
    "fastai's `to_bf16` autocasts on CUDA only: on the CPU torch warns that autocast is off, and the fit equals a float32 one"
    applies('bf16_cpu', case)
    if torch.cuda.is_available(): pytest.skip('a CUDA device is present: to_bf16 autocasts there')
    learn, cbs, _ = learner(case)
    learn.to_bf16()
    set_seed(0)
    with pytest.warns(UserWarning, match='CUDA is not available'): quiet_fit(learn, 1)
    learn2, cbs2, _ = learner(case)
    fit(learn2)
    assert_same(state(learn, cbs), state(learn2, cbs2))


class CPUAutocast(Callback):
    "bfloat16 autocast on the CPU, where fastai's MixedPrecision puts it: from `before_batch` to `after_loss`"
    order = 10
    def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
    def after_loss(self): self.ac.__exit__(None, None, None)
    def after_cancel_batch(self): self.ac.__exit__(None, None, None)


@pytest.mark.parametrize('precision', ['float64', 'bf16_autocast_cpu'])
@pytest.mark.parametrize('case', ALL, ids=str)
def test_float64_models_and_bf16_autocast_on_the_cpu(case, precision):
    "A float64 model (its loss parts follow), or bfloat16 autocast on the CPU (everything kept stays float32)"
    applies(precision, case)
    dtype = torch.float64 if precision == 'float64' else torch.float32
    learn, cbs, models = learner(case, dtype=dtype)
    before = [fingerprint(m) for m in user_models(case, models)]
    fit(learn, cbs=None if precision == 'float64' else CPUAutocast())
    assert all(p.dtype == dtype for p in learn.model.parameters())
    assert all(t.dtype == dtype for t in parts(cbs) if t.is_floating_point())
    assert_finite(learn)
    assert_unchanged(before, case, models)


@pytest.mark.parametrize('case', ALL, ids=str)
def test_gradient_accumulation_equals_the_larger_batch(case):
    "fastai's GradientAccumulation over two batches of 16 trains as batches of 32 (losses are batch means)"
    applies('gradient_accumulation', case)
    bs = 2 if case.lm else 16
    learn, cbs, _ = learner(case, bs=bs)
    fit(learn, cbs=GradientAccumulation(2 * bs))
    learn2, cbs2, _ = learner(case, bs=2 * bs)
    fit(learn2)
    assert_same(state(learn, cbs), state(learn2, cbs2), exact=False)
