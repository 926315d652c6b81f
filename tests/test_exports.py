"""Every export a page shows works: the learner it shows is exported, then loaded and used to predict in a process where
`import kdcb` fails, and predicts there what it predicts here"""
import json, re, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule, fastai.callback.progress  # Learner.fit_one_cycle, Learner.no_bar
from kdcb.all import *
from kdcb.data import _Tensors
from kdcb.online import EMATeacher, MutualLearning, DeepSupervision, born_again
from kdcb.demo import cnn1d

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'nbs').glob('*.ipynb')), *sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb'))]
EXPORT = re.compile(r'(?<!def )\bexport\(')  # a call to `export`, not the definition that patches fastai's

# Each page that shows an export, and the tests below that run the setups it shows
COVERED = {'README.md': ['test_readme_quick_start'], 'nbs/index.ipynb': ['test_readme_quick_start'],
           'nbs/06_data.ipynb': ['test_data_tensor_dls', 'test_data_labelled_only'],
           'nbs/09_online.ipynb': ['test_online_ema_teacher', 'test_online_mutual_learning', 'test_online_deep_supervision',
                                   'test_online_born_again'],
           'nbs/tutorials/01_quickstart.ipynb': ['test_tutorial_quickstart'],
           'nbs/tutorials/05_vision.ipynb': ['test_tutorial_vision'],
           'nbs/tutorials/07_no_teacher.ipynb': ['test_online_mutual_learning'],
           'nbs/12_lm.ipynb': ['tests/test_responses.py::test_lm_learner_exports_and_loads_without_kdcb']} # `file::name`: a test elsewhere


def page_text(p:Path)->str:
    if p.suffix == '.md': return p.read_text()
    return '\n'.join(''.join(c['source']) for c in json.loads(p.read_text())['cells'])


def test_every_page_that_shows_an_export_is_covered():
    shown = {p.relative_to(ROOT).as_posix() for p in PAGES if EXPORT.search(page_text(p))}
    assert shown == set(COVERED), (f"pages showing `export(` without a test here: {sorted(shown - set(COVERED))}; "
                                   f"covered pages that show none: {sorted(set(COVERED) - shown)}")
    for name in (n for names in COVERED.values() for n in names):
        if '::' not in name: assert name in globals(), name
        else: f, test = name.split('::'); assert f'def {test}(' in (ROOT / f).read_text(), name


LOADER = '''
import json, sys, warnings
sys.modules['kdcb'] = None  # from here on any `import kdcb...` raises ModuleNotFoundError
warnings.simplefilter('ignore')
import torch
from fastai.learner import load_learner
import fastai.callback.progress  # Learner.no_bar
try: learn = load_learner(sys.argv[1])
except Exception:  # fastai's load_learner swallows an ImportError and fails later: show the ImportError
    torch.load(sys.argv[1], map_location='cpu', weights_only=False)
    raise
item = torch.load(sys.argv[2]) if sys.argv[2].endswith('.pt') else sys.argv[2]
with learn.no_bar(): dec, _, probs = learn.predict(item)
print(json.dumps({'probs': probs.tolist(), 'decoded': str(dec), 'loss': type(learn.loss_func).__module__}))
'''


def load_without_kdcb(fname:Path, item)->dict:
    "Load `fname` and predict `item` (a tensor or a file path) in a new process that cannot import kdcb"
    if isinstance(item, torch.Tensor): torch.save(item, fname.parent / 'item.pt'); item = fname.parent / 'item.pt'
    r = subprocess.run([sys.executable, '-c', LOADER, str(fname), str(item)], capture_output=True, text=True,
                       cwd=fname.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_export(learn:Learner, item, tmp:Path, fname='export.pkl')->dict:
    "Export `learn` (unless `fname` exists already), then predict `item` without kdcb: the same probabilities as `learn`"
    learn.path = tmp
    if not (tmp / fname).exists(): learn.export(fname)
    out = load_without_kdcb(tmp / fname, item)
    with learn.no_bar(): expected = learn.predict(item)
    assert torch.allclose(torch.tensor(out['probs']), expected[2].float(), atol=1e-5), (out['probs'], expected[2])
    assert out['decoded'] == str(expected[0])
    return out


def test_the_loader_refuses_a_file_that_needs_kdcb(tmp_path):
    "The check can fail: a learner holding any kdcb object does not load in that process"
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    learn = Learner(tensor_dls(x, y, x, y, bs=16), nn.Linear(8, 3), loss_func=CrossEntropyLossFlat())
    learn.extra = _Tensors(torch.zeros(2))  # pickled by reference to kdcb.data
    learn.path = tmp_path; learn.export()
    r = subprocess.run([sys.executable, '-c', LOADER, str(tmp_path / 'export.pkl'), 'unused'], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'kdcb" in r.stderr, r.stderr[-2000:]


def readme_blocks()->list:
    readme = (ROOT / 'README.md').read_text()
    return re.findall(r'```python\n(.*?)```', readme[readme.index('## Quick start'):readme.index('## When distillation pays')], re.S)


def test_readme_quick_start(tmp_path, monkeypatch):
    "The quick start as written: it exports `student.pkl` to the working directory"
    monkeypatch.chdir(tmp_path)
    env = {}
    for b in readme_blocks(): exec(compile(b, 'README.md', 'exec'), env)
    assert 'export(' in ''.join(readme_blocks())
    out = check_export(env['student'], env['x'][1500], tmp_path, 'student.pkl')
    assert out['loss'].startswith('fastai')  # LabelledOnly is written as the cross entropy it wraps


def digits(n_train=400):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    return x[:n_train], y[:n_train], x[1400:1500], y[1400:1500]


def mlp(width): return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def quiet(learn, epochs=1, lr=1e-2, cbs=None):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return learn


def test_data_tensor_dls(tmp_path):
    "06_data: a learner on `tensor_dls`"
    x, y, xv, yv = digits()
    learn = quiet(Learner(tensor_dls(x, y, xv, yv, bs=64), nn.Linear(64, 10), loss_func=CrossEntropyLossFlat()))
    check_export(learn, xv[0], tmp_path)


def test_data_labelled_only(tmp_path):
    "06_data: unlabelled items, `LabelledOnly`, the callback attached to the learner"
    set_seed(0)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    xa, ya = add_unlabelled(x[:16], y[:16], x[16:])
    kd = KnowledgeDistillationCallback(cnn1d(8), SoftTarget(T=2), weight=0.5)
    learn = Learner(tensor_dls(xa, ya, x[:32], y[:32], bs=32), cnn1d(4), loss_func=LabelledOnly(), cbs=kd)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    assert check_export(learn, x[0], tmp_path)['loss'].startswith('fastai')
    assert isinstance(learn.loss_func, LabelledOnly) and kd in learn.cbs  # export changed nothing on the learner


def test_tutorial_quickstart(tmp_path):
    "Tutorial 1: the README's loaders, `LabelledOnly`, the callback attached with `add_cb` while exporting"
    x, y, xv, yv = digits(1400)
    def dls_from(xt, yt): return tensor_dls(xt, yt, xv, yv, bs=64, drop_last=False)
    teacher = quiet(Learner(dls_from(x, y), mlp(64), loss_func=CrossEntropyLossFlat(), metrics=accuracy))
    xs, ys = add_unlabelled(x[:200], y[:200], x[200:])
    student = Learner(dls_from(xs, ys), mlp(16), loss_func=LabelledOnly(), metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher, SoftTarget(T=4), weight=0.9)
    quiet(student, cbs=kd)
    student.add_cb(kd)
    check_export(student, xv[0], tmp_path)


def toy(n=96):
    set_seed(0)
    x = torch.randn(n, 40); y = x[:, :10].argmax(1)
    return tensor_dls(x[:64], y[:64], x[64:], y[64:], bs=16), x[64]


def test_online_ema_teacher(tmp_path):
    dls, item = toy()
    learn = Learner(dls, cnn1d(4), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.add_cb(KnowledgeDistillationCallback(EMATeacher(learn.model, decay=0.9), SoftTarget(T=1.), weight=0.5))
    quiet(learn)
    check_export(learn, item, tmp_path)


def test_online_mutual_learning(tmp_path):
    "09_online and tutorial 7: the learner with `MutualLearning` attached, and `peer_learner(1)`"
    dls, item = toy()
    ml = MutualLearning(cnn1d(4), T=1., weight=0.5)
    learn = quiet(Learner(dls, cnn1d(4), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=ml))
    check_export(learn, item, tmp_path)
    check_export(ml.peer_learner(1), item, tmp_path, 'peer.pkl')


def test_online_deep_supervision(tmp_path):
    dls, item = toy()
    learn = quiet(Learner(dls, cnn1d(4), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=DeepSupervision(['1', '2'])))
    check_export(learn, item, tmp_path)


def test_online_born_again(tmp_path):
    dls, item = toy()
    gens = born_again(lambda: cnn1d(4), dls, generations=2, epochs=1, seed=0)
    check_export(gens.learners[-1], item, tmp_path)


def write_digit_images(path:Path, per_class:int=8, valid_per_class:int=2)->Path:
    "A few of scikit-learn's digits as 16×16 PNG files in `train/<label>/` and `valid/<label>/`"
    from PIL import Image
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    for c in range(10):
        for k, i in enumerate(np.flatnonzero(y == c)[:per_class + valid_per_class]):
            folder = path / ('valid' if k < valid_per_class else 'train') / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)).resize((16, 16)).save(folder / f'{i}.png')
    return path


def test_tutorial_vision(tmp_path):
    "Tutorial 5 at tiny size: files on disk, `vision_learner` (torchvision and timm), 'auto' pairs, `fine_tune`, predict a path"
    from fastai.vision.all import ImageDataLoaders, Resize, Normalize, aug_transforms, imagenet_stats, vision_learner, resnet34, get_image_files
    path = write_digit_images(tmp_path / 'digits')
    set_seed(0)
    dls = ImageDataLoaders.from_folder(path, train='train', valid='valid', item_tfms=Resize(16), bs=32, num_workers=0,
                                      batch_tfms=[*aug_transforms(size=16, do_flip=False, max_rotate=10., max_warp=0.),
                                                  Normalize.from_stats(*imagenet_stats)])
    teacher = vision_learner(dls, resnet34, pretrained=False, metrics=accuracy)
    quiet(teacher, lr=3e-3)
    student = vision_learner(dls, 'resnet10t', pretrained=False, metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher, [SoftTarget(), Attention(beta=100.)], 'auto', weight=[0.5, 0.2])
    with student.no_bar(), student.no_logging(): student.fine_tune(1, 3e-3, cbs=kd)
    assert len(kd.pairs['student']) >= 2 and all(s.startswith('0.model.') for s in kd.pairs['student'])
    out = check_export(student, get_image_files(path / 'valid')[0], tmp_path)
    assert out['decoded'] in dls.vocab
