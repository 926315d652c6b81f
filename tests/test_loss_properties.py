"""Every registered loss survives hostile numbers: random shapes; float16, bfloat16, float32 and float64 inputs; targets
with -100 including all-masked rows and an all-masked batch; a batch of one; logits of ±1e4; temperatures from schedules.
Every value and gradient is finite, or the loss raises a clear error (ValueError or TypeError with a message) instead.

The losses come from the registry (`available_losses()`): an output loss (one that takes `teacher_pred` and builds from its
defaults) is covered by itself; any other kind needs a row in `FEATURE_INPUTS`, and `test_every_registered_loss_is_covered`
fails naming a loss that has none."""
import inspect, pytest, torch
from hypothesis import given, settings, HealthCheck, strategies as st
from kdcb.all import *
from kdcb.core import _LOSSES

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MULTI_LABEL = {'sigmoid_kd'} # output losses of independent labels: targets are multi-hot, one entry per logit
PROPS = settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def temperature_schedule(p:float)->float: return 8. * (1 - p) + .5 # 8.5 at the start, 0.5 at the end


def _build(name:str, **kw):
    "The registered loss `name`, its temperature (T or temperature) given as a schedule when it has one"
    cls = _LOSSES[name]
    params = inspect.signature(cls).parameters
    for t in ('T', 'temperature'):
        if t in params and t not in kw: kw[t] = temperature_schedule
    return cls(**kw)


def output_losses()->list[str]:
    out = []
    for n in available_losses():
        try: term = LossTerm(n)
        except TypeError: continue
        if 'teacher_pred' in term.sources and term.sources <= {'pred', 'teacher_pred', 'target'}: out.append(n)
    return out


# feature and other losses: name -> (build the loss, make (student inputs, teacher inputs, extra kwargs) from (B, dtype, scale, g))
def _maps(b, dt, scale, g, c=4, hw=3):
    return (scale * torch.randn(b, c, hw, hw, generator=g)).to(dt), (scale * torch.randn(b, c, hw, hw, generator=g)).to(dt)
def _tokens(b, dt, scale, g, l=5, d=6):
    return (scale * torch.randn(b, l, d, generator=g)).to(dt), (scale * torch.randn(b, l, d, generator=g)).to(dt)
def _token_mask(b, g, l=5):
    m = (torch.rand(b, l, generator=g) > .3).long(); m[0] = 0 # a row of padding only
    return m
def _attentions(b, dt, scale, g, l=5):
    def att(): return tuple((scale * torch.randn(b, 2, l, l, generator=g)).softmax(-1).to(dt) for _ in range(2))
    return att(), att()

FEATURE_INPUTS = {
    'activation_boundaries': (lambda: _build('activation_boundaries'), _maps),
    'attention': (lambda: _build('attention'), _maps),
    'fit_net': (lambda: _build('fit_net'), _maps),
    'similarity': (lambda: _build('similarity'), _maps),
    'pkt': (lambda: _build('pkt'), _maps),
    'rkd': (lambda: _build('rkd'), _maps),
    'importance_feature_kd': (lambda: _build('importance_feature_kd'), _maps),
    'mgd_loss': (lambda: _build('mgd_loss', num_student_channels=4, num_teacher_channels=4), _maps),
    'info_nce': (lambda: _build('info_nce'), _maps),
    'crd': (lambda: _build('crd', num_student_channels=4, num_teacher_channels=4, dim=8, n_negatives=8), _maps),
    'detection_head_kd': (lambda: _build('detection_head_kd', num_classes=2), lambda b, dt, s, g: _maps(b, dt, s, g, c=6)),
    'hidden_state_cosine': (lambda: _build('hidden_state_cosine'), _tokens),
    'value_relation': (lambda: _build('value_relation', heads=2), _tokens),
    'attention_kl': (lambda: _build('attention_kl'), _attentions),
}
MASKED = {'hidden_state_cosine', 'value_relation', 'attention_kl'} # take a (B, L) attention_mask
SEQUENCES = {'uld'} # output losses over (B, L, V) sequences only (ULD: teacher and student of other vocabularies)


def test_every_registered_loss_is_covered():
    missing = [n for n in available_losses() if n not in output_losses() and n not in FEATURE_INPUTS and n not in SEQUENCES]
    assert not missing, f"registered loss(es) {missing} have no row in FEATURE_INPUTS: say how to build their inputs"
    assert {'soft_target', 'logits', 'decoupled_kd', 'mft_loss', 'sigmoid_kd'} <= set(output_losses())


def clear_error(e:Exception)->bool: return isinstance(e, (ValueError, TypeError)) and len(str(e)) > 30


def check_finite(loss_fn, inputs:list[torch.Tensor], what:str):
    "The loss and the gradients of `inputs` are finite, or a clear error was raised"
    for x in inputs: x.requires_grad_(True)
    try: v = loss_fn()
    except Exception as e:
        assert clear_error(e), f"{what}: unclear error {type(e).__name__}: {e}"
        return
    assert v.ndim == 0 and torch.isfinite(v).all(), f"{what}: loss {v}"
    v.backward()
    for x in inputs: assert x.grad is None or torch.isfinite(x.grad).all(), f"{what}: gradient not finite"


MASKS = ['none', 'random', 'row', 'all', 'no_target'] # -100 nowhere, at random, on every position of item 0, everywhere; no target


def check_output(name, shape, dtype, scale, mask, pct, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    s = (scale * torch.randn(shape, generator=g)).to(dtype)
    t = (scale * torch.randn(shape, generator=g)).to(dtype)
    if name in MULTI_LABEL: y = (torch.rand(shape, generator=g) > .5).long()
    else: y = torch.randint(0, c, shape[:-1], generator=g)
    if mask == 'random': y = torch.where(torch.rand(y.shape, generator=g) > .5, y, -100)
    if mask == 'row': y[0] = -100 # an item with every position masked
    if mask == 'all': y = torch.full_like(y, -100) # a batch with nothing to learn from
    loss = _build(name); loss.pct_train = pct
    kw = {} if mask == 'no_target' else {'target': y}
    check_finite(lambda: LossTerm(loss)(pred=s, teacher_pred=t, **kw), [s], f"{name} {dtype} {tuple(shape)} ×{scale} mask={mask} pct={pct}")


def check_feature(name, b, dtype, scale, pct, masked, seed):
    g = torch.Generator().manual_seed(seed)
    build, inputs = FEATURE_INPUTS[name]
    loss = build(); loss.pct_train = pct
    s, t = inputs(b, dtype, scale, g)
    kw = {'attention_mask': _token_mask(b, g)} if masked and name in MASKED else {}
    what = f"{name} {dtype} b={b} ×{scale} pct={pct} {kw and 'masked'}"
    if name == 'attention_kl':
        check_finite(lambda: loss(student_output={'attentions': s}, teacher_output={'attentions': t}, **kw), list(s), what)
    else: check_finite(lambda: LossTerm(loss)(fm_s={'x': s}, fm_t={'x': t}, **kw), [s], what)


@pytest.mark.parametrize('name', sorted(SEQUENCES))
def test_sequence_loss_every_hostile_case(name):
    "Losses over sequences only: every dtype × mask × scale × schedule end, on a sequence of one and batches of sequences"
    for dtype in DTYPES:
        for mask in MASKS:
            for scale in (1., 1e4):
                for shape in ((1, 1, 4), (2, 3, 4), (3, 5, 6)):
                    for pct in (0., 1.): check_output(name, shape, dtype, scale, mask, pct, 0)


@pytest.mark.parametrize('name', output_losses())
def test_output_loss_every_hostile_case(name):
    "The whole grid: every dtype × mask × scale (±1e4 logits) × shape (a batch of one, sequences) × schedule end"
    for dtype in DTYPES:
        for mask in MASKS:
            for scale in (1., 1e4):
                for shape in ((1, 4), (3, 5), (2, 3, 4)):
                    for pct in (0., 1.): check_output(name, shape, dtype, scale, mask, pct, 0)


@pytest.mark.parametrize('name', output_losses())
@PROPS
@given(b=st.integers(1, 4), c=st.integers(2, 6), seq=st.sampled_from([None, 1, 3]), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1., 30., 1e4]), mask=st.sampled_from(MASKS), pct=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_output_loss_random_shapes(name, b, c, seq, dtype, scale, mask, pct, seed):
    check_output(name, (b, c) if seq is None else (b, seq, c), dtype, scale, mask, pct, seed)


# feature maps up to ±1e3: an MSE's gradient for ±1e4 features is itself near float16's largest number
@pytest.mark.parametrize('name', list(FEATURE_INPUTS))
def test_feature_loss_every_hostile_case(name):
    for dtype in DTYPES:
        for scale in (1., 1e3):
            for b in (1, 3):
                for masked in (False, True): check_feature(name, b, dtype, scale, 1., masked, 0)


@pytest.mark.parametrize('name', list(FEATURE_INPUTS))
@PROPS
@given(b=st.integers(1, 4), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1., 30., 1e3]),
       pct=st.floats(0, 1), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_feature_loss_random(name, b, dtype, scale, pct, masked, seed):
    check_feature(name, b, dtype, scale, pct, masked, seed)
