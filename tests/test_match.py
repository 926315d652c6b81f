"Layer matching and connectors: real architectures, error cases, and connectors trained inside a fit"
import io, pickle, warnings
from dataclasses import dataclass
import pytest, torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
import fastai.callback.progress # Learner.no_bar
from fastai.losses import CrossEntropyLossFlat
from kdcb.all import *
from kdcb.match import probe_model

STAGES = ['relu', 'layer1', 'layer2', 'layer3', 'layer4']
x64 = torch.randn(1, 3, 64, 64)

@pytest.fixture(scope='module')
def r18(): return resnet18()
@pytest.fixture(scope='module')
def r50(): return resnet50()

def test_resnet18_resnet34(r18):
    p = match_feature_layers(r18, resnet34(), x64)
    assert p == {'student': STAGES, 'teacher': STAGES}
    assert [r.student_shape for r in p.rows] == [(1, 64, 32, 32), (1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert [r.student_shape for r in p.rows] == [r.teacher_shape for r in p.rows]
    print(p)

def test_resnet18_resnet50_and_connectors(r18, r50):
    p = match_feature_layers(r18, r50, x64)
    assert p['student'] == STAGES and p['teacher'] == STAGES # not 'layer2.0.bn1', which is still at 16x16
    assert [r.teacher_shape[1] for r in p.rows] == [64, 256, 512, 1024, 2048]
    c = p.connectors()
    assert isinstance(c['relu'], nn.Identity)
    assert [(c[n].in_channels, c[n].out_channels, c[n].kernel_size) for n in STAGES[1:]] == \
           [(64, 256, (1, 1)), (128, 512, (1, 1)), (256, 1024, (1, 1)), (512, 2048, (1, 1))]
    p2 = match_feature_layers(r18, r50, x64, include_pooled=True)
    assert p2['student'] == STAGES + ['avgpool'] and p2['teacher'][-1] == 'avgpool'
    print(p)

def test_fastai_body_and_cnn_model(r18):
    from fastai.vision.learner import create_body, create_vision_model
    body = create_body(resnet34(), pretrained=False)
    p = match_feature_layers(r18, body, x64)
    assert p == {'student': STAGES, 'teacher': ['2', '4', '5', '6', '7']}
    model = create_vision_model(resnet34, 10, pretrained=False)
    p = match_feature_layers(r18, model, x64)
    assert p['teacher'] == ['0.2', '0.4', '0.5', '0.6', '0.7'] # never the whole body '0'
    assert '0' not in p['teacher'] and '1' not in p['teacher']
    p = match_feature_layers(model, r18, x64, include_pooled=True)
    assert p == {'student': ['0.2', '0.4', '0.5', '0.6', '0.7', '1.0'], 'teacher': STAGES + ['avgpool']}
    assert p.rows[-1].student_shape == (1, 1024, 1, 1) # fastai's concat pool, paired with avgpool's 512 channels
    print(p)

def cnn1d(c, n):
    layers, ch = [nn.Conv1d(1, c, 5, padding=2), nn.BatchNorm1d(c), nn.ReLU()], c
    for i in range(n):
        layers += [nn.Sequential(nn.Conv1d(ch, 2*ch, 3, stride=2, padding=1), nn.BatchNorm1d(2*ch), nn.ReLU())]; ch *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(ch, 10))

def test_cnn1d_pair():
    p = match_feature_layers(cnn1d(4, 2), cnn1d(32, 3), torch.randn(2, 1, 40))
    assert p == {'student': ['2', '3', '4'], 'teacher': ['2', '3', '4']}
    assert [r.resolution for r in p.rows] == [('map', 40), ('map', 20), ('map', 10)]
    c = p.connectors()
    assert isinstance(c['3'], nn.Conv1d) and c['3'].out_channels == 64
    # the same model read as tokens pairs by the middle dimension (channels), which differ: nothing shared at all
    with pytest.raises(ValueError, match='share no resolution'): match_feature_layers(cnn1d(4, 2), cnn1d(32, 3), torch.randn(2, 1, 40), kind='tokens')
    print(p)

class TinyViT(nn.Module):
    def __init__(self, d=16, depth=2, patch=4, n_cls=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 2*d, dropout=0., batch_first=True) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, n_cls)
    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        for b in self.blocks: x = b(x)
        return self.head(self.norm(x)[:, 0])

def test_tiny_vit_pair():
    s, t = TinyViT(16, 2), TinyViT(48, 4)
    p = match_feature_layers(s, t, torch.randn(2, 3, 16, 16))
    assert p == {'student': ['patch', 'norm'], 'teacher': ['patch', 'norm']}
    assert [r.resolution for r in p.rows] == [('map', 4, 4), ('tokens', 17)]
    c = p.connectors()
    assert isinstance(c['norm'], nn.Linear) and (c['norm'].in_features, c['norm'].out_features) == (16, 48)
    out = c({'norm': torch.randn(2, 17, 16)})['norm']
    assert out.shape == (2, 17, 48)
    # a different patch size gives a different grid and token count: an error that lists both sides
    with pytest.raises(ValueError, match=r"Student: 4×4 \(patch\), N=17 tokens \(norm\)\. Teacher: 2×2 \(patch\), N=5 tokens \(norm\)"):
        match_feature_layers(s, TinyViT(16, 2, patch=8), torch.randn(2, 3, 16, 16))
    print(p)

def test_state_restored_and_batchnorm_untouched(r18, r50):
    t = r50; t.train(); t.layer2.eval()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    flags = [m.training for m in t.modules()]
    match_feature_layers(r18, t, x64)
    assert [m.training for m in t.modules()] == flags
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) # running stats and num_batches_tracked unchanged
    assert all(p.grad is None for p in t.parameters())
    assert sum(len(m._forward_hooks) for m in t.modules()) == 0
    t.train()

def test_hooks_and_modes_restored_on_error():
    class Bad(nn.Module):
        def __init__(self): super().__init__(); self.c = nn.Conv2d(3, 4, 3); self.bn = nn.BatchNorm2d(4)
        def forward(self, x): self.bn(self.c(x)); raise RuntimeError('boom')
    m = Bad()
    with pytest.raises(RuntimeError, match='boom'): probe_model(m, torch.randn(1, 3, 8, 8))
    assert m.training and m.bn.training and sum(len(k._forward_hooks) for k in m.modules()) == 0

def test_model_dtype_and_input_forms():
    s, t = cnn1d(4, 2).double(), cnn1d(8, 2)
    p = match_feature_layers(s, t, torch.randn(2, 1, 40)) # float32 input is cast to the student's float64
    assert p.rows[0].student_shape == (2, 4, 40)
    class KW(nn.Module):
        def __init__(self): super().__init__(); self.net = cnn1d(4, 2)
        def forward(self, x, mask=None): return self.net(x)
    assert match_feature_layers(KW(), KW(), {'x': torch.randn(2, 1, 40)})['student'] == ['net.2', 'net.3', 'net.4']
    assert match_feature_layers(s, t, (torch.randn(2, 1, 40),))['student'] == ['2', '3', '4']

@dataclass
class Out:
    logits: torch.Tensor
    feats: list

class Structured(nn.Module):
    "Returns a dataclass; has a module returning a tuple, and one returning integer indices"
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2, return_indices=True) # a tuple: not paired
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(c, 3)
    def forward(self, x):
        a = self.stem(x); b, idx = self.pool(a); b = self.body(b)
        return Out(self.head(b.mean((2, 3))), [a, b])

def test_structured_outputs():
    p = match_feature_layers(Structured(4), Structured(16), torch.randn(2, 3, 8, 8))
    assert p == {'student': ['stem', 'body'], 'teacher': ['stem', 'body']}
    d = match_feature_layers(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), Structured(), torch.randn(2, 3, 8, 8))
    assert d['teacher'] == ['stem']

class Shared(nn.Module):
    "Runs `block` twice: its output at 8x8 is ambiguous"
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.block = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 3)
    def forward(self, x):
        x = self.down(self.stem(x))
        return self.head(self.block(self.block(x)).mean((2, 3)))

def test_shared_module_is_not_paired_silently(r18, r50):
    with pytest.warns(UserWarning, match=r"teacher module 'block' runs 2 times per forward pass .* using 'down' instead"):
        p = match_feature_layers(Structured(4), Shared(), torch.randn(2, 3, 16, 16))
    assert p['teacher'] == ['stem', 'down'] and 'block' not in p['teacher']
    # shared activations inside torchvision blocks (one `relu` called several times) are never stage outputs: no warning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        match_feature_layers(r18, r50, x64)

def test_bad_arguments():
    with pytest.raises(ValueError, match="kind='token' is not one of"):
        match_feature_layers(cnn1d(4, 1), cnn1d(4, 1), torch.randn(2, 1, 40), kind='token')
    with pytest.raises(ValueError, match=r"Student: L=40 \(2\), L=20 \(3\)\. Teacher: 8×1 \(2\)\. Check that"):
        match_feature_layers(cnn1d(4, 1), nn.Sequential(nn.Flatten(), nn.Unflatten(1, (5, 8, 1)), nn.Conv2d(5, 2, 1)), torch.randn(2, 1, 40))

def test_pairs_print_pickle_and_markdown(r18):
    p = match_feature_layers(r18, resnet34(), x64)
    text = repr(p).splitlines()
    assert text[0].split() == ['resolution', 'student', 'student', 'output', 'teacher', 'teacher', 'output']
    assert text[2].split()[:2] == ['16×16', 'layer1'] and len(text) == 6
    md = p._repr_markdown_()
    assert md.count('\n') == 6 and '| `16×16` | `layer1` | `(1, 64, 16, 16)` | `layer1` |' in md
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.rows == p.rows and isinstance(q, dict)
    assert p.seconds > 0

def conv_net(c, n):
    layers, ch = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU()], c
    for i in range(n): layers.append(nn.Sequential(nn.Conv2d(ch, 2*ch, 3, stride=2, padding=1), nn.BatchNorm2d(2*ch), nn.ReLU())); ch *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 3))

def image_dls(n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g); y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0].mean((1, 2)) > 0).long()
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:48], bs=bs, shuffle=True, drop_last=True), DataLoader(ds[48:], bs=bs))

def fitnet(out_s, out_t): return F.mse_loss(out_s, out_t)

@pytest.mark.parametrize('inner', [Attention, lambda: fitnet])
def test_connectors_train_in_a_fit_and_stay_out_of_the_student(inner, tmp_path):
    torch.manual_seed(0)
    student, teacher = conv_net(4, 2), conv_net(16, 2)
    learn = Learner(image_dls(), student, loss_func=CrossEntropyLossFlat())
    pairs = auto_pairs(student, teacher, learn.dls.one_batch()[:1])
    assert pairs == {'student': ['1', '2', '3'], 'teacher': ['1', '2', '3']}
    conn = pairs.connectors()
    w0 = {k: v.clone() for k, v in conn.state_dict().items()}
    assert len(w0) == 6 # three 1x1 convs, weight and bias
    grads = []
    class GradSpy(Callback):
        def after_backward(self): grads.append(conn['2'].weight.grad.abs().sum().item())
    kd = KnowledgeDistillationCallback(teacher, Connected(inner(), conn), pairs['student'], pairs['teacher'])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=[kd, GradSpy()])
    assert kd.column_names == ['task_loss', 'connected_attention' if inner is Attention else 'connected_fitnet']
    assert grads and all(g > 0 for g in grads)
    assert all(not torch.equal(w0[k], v) for k, v in conn.state_dict().items()) # the optimizer stepped them
    ids = {id(p) for p in conn.parameters()}
    assert not ids & {id(p) for p in learn.model.parameters()}
    assert not ids & {id(p) for pl in learn.opt.param_lists for p in pl} # removed from the optimizer after the fit
    assert set(learn.model.state_dict()) == set(conv_net(4, 2).state_dict()) # the student is exported without them
    torch.save(conn.state_dict(), tmp_path/'conn.pth')
    fresh = pairs.connectors(); fresh.load_state_dict(torch.load(tmp_path/'conn.pth'))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), conn.state_dict().values()))
    assert sorted(fresh.state_dict()) == ['maps.1.bias', 'maps.1.weight', 'maps.2.bias', 'maps.2.weight', 'maps.3.bias', 'maps.3.weight']

def test_connected_with_dotted_student_names(r50):
    from fastai.vision.learner import create_vision_model
    s = create_vision_model(resnet18, 3, pretrained=False)
    p = match_feature_layers(s, r50, x64)
    assert p['student'] == ['0.2', '0.4', '0.5', '0.6', '0.7']
    c = p.connectors()
    fm = {n: torch.randn(r.student_shape) for n, r in zip(p['student'], p.rows)}
    assert [v.shape[1] for v in c(fm).values()] == [64, 256, 512, 1024, 2048]
    assert any(k.startswith('maps.0-4.') for k in c.state_dict())

def test_connected_rejects_output_losses():
    c = Connectors({})
    with pytest.raises(TypeError, match='Connected wraps feature losses'): Connected('soft_target', c)
    with pytest.raises(TypeError, match='Connected wraps feature losses'): Connected(lambda pred, fm_s, fm_t: 0, c)

def test_auto_pairs_wired_in_before_fit():
    "What `student_layers='auto'` in the callback amounts to: pairs found in `before_fit`, before the hooks go on"
    class AutoLayers(Callback):
        order = 4 # after TrainEvalCallback moved the model, before the distillation callback's `before_fit`
        def __init__(self, kd): self.kd = kd
        def before_fit(self):
            p = auto_pairs(self.model, self.kd.teacher.model, self.dls.train.one_batch()[:1])
            self.kd.student_layers, self.kd.teacher_layers = p['student'], p['teacher']
    seen = []
    def spy(fm_s, fm_t):
        seen.append((list(fm_s), list(fm_t), [f.shape[1] for f in fm_t.values()]))
        return sum(Attention()(s, t) for s, t in zip(fm_s.values(), fm_t.values()))
    torch.manual_seed(0)
    student, teacher = conv_net(4, 2), conv_net(16, 2)
    learn = Learner(image_dls(), student, loss_func=CrossEntropyLossFlat())
    kd = KnowledgeDistillationCallback(teacher, spy, ['0'], ['0']) # placeholders, replaced in before_fit
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=[kd, AutoLayers(kd)])
    assert seen[0] == (['1', '2', '3'], ['1', '2', '3'], [16, 32, 64])
    assert sum(len(m._forward_hooks) for m in [*student.modules(), *teacher.modules()]) == 0

def test_timm_models():
    "timm models built without pretrained weights: CNN stages pair across families, ViT tokens by count; connectors map widths"
    import timm # a dev requirement
    s = timm.create_model('resnet18', pretrained=False, num_classes=10)
    t = timm.create_model('resnet50', pretrained=False, num_classes=10)
    p = match_feature_layers(s, t, x64)
    assert p['student'] == p['teacher'] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    c = timm.create_model('convnext_atto', pretrained=False, num_classes=10) # other stage names and widths
    q = match_feature_layers(c, t, x64)
    assert q['student'][:3] == ['stages.0', 'stages.1', 'stages.2'] and q['teacher'] == ['layer1', 'layer2', 'layer3', 'layer4']
    vs = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=64, depth=2, num_classes=10)
    vt = timm.create_model('vit_small_patch16_224', pretrained=False, img_size=64, depth=3, num_classes=10)
    v = match_feature_layers(vs, vt, x64)
    last = v.rows[-1]
    assert last.resolution[0] == 'tokens' and last.student_shape == (1, 17, 192) and last.teacher_shape == (1, 17, 384)
    out = v.connectors()({last.student: torch.randn(last.student_shape)})
    assert out[last.student].shape == (1, 17, 384)
