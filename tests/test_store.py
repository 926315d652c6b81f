"Teacher outputs on disk: a student trained from a store gets the live teacher's losses (T = 1), under shuffling, several epochs, DataLoader workers and 2-process DDP; a half-written store resumes; a store that does not fit the data is refused"
import json, os, random, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch
from torch import nn
from torch.utils.data import TensorDataset
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.progress
from kdcb.callback import KnowledgeDistillationCallback
from kdcb.data import TensorDL
from kdcb.losses import SoftTarget
from kdcb.teachers import TopKCachedTeacher
from kdcb.store import IndexedDataset, StoredTeacher, TeacherStore, write_teacher_store

torch.set_num_threads(1)
V, SEQ = 50, 12 # a tiny "language model": V tokens, sequences of SEQ positions


def lm_data(n=96, n_valid=32, seed=0):
    "Token sequences whose next token depends on the current one: (x, y) items with y the next tokens"
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (n + n_valid, 1), generator=g)
    for _ in range(SEQ): t = torch.cat([t, (t[:, -1:] * 7 + torch.randint(0, 3, (len(t), 1), generator=g)) % V], 1)
    items = list(zip(t[:, :-1], t[:, 1:]))
    return items[:n], items[n:]


def lm(h): return nn.Sequential(nn.Embedding(V, h), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, V)) # (B, L) -> (B, L, V)


class Stopped(Exception): "A writing job stopped part-way (e.g. its time ran out)"


class BatchLosses(Callback):
    order = 100
    def before_fit(self): self.history = []
    def after_loss(self):
        if self.training: self.history.append(self.loss.item())


def distil(source, ds, valid, epochs=2, workers=0, bs=16, student=None):
    "Per-batch training losses of a student distilled from `source` at T = 1: same batches and initial weights whatever the source"
    random.seed(0); torch.manual_seed(0)
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=True, drop_last=True, num_workers=workers), DataLoader(valid, bs=32))
    learn, rec = Learner(dls, student or lm(8), loss_func=CrossEntropyLossFlat()), BatchLosses()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-2, cbs=[KnowledgeDistillationCallback(source, SoftTarget(T=1.), weight=.5), rec])
    return np.array(rec.history), learn


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    train, valid = lm_data()
    torch.manual_seed(0); teacher = lm(32)
    tmp = tmp_path_factory.mktemp('stores')
    full = write_teacher_store(tmp/'full', teacher, DataLoader(train, bs=16), k=None, dtype=torch.float32, tokenizer='toy-v1')
    top = write_teacher_store(tmp/'top4', teacher, DataLoader(IndexedDataset(train), bs=16), k=4)
    return dict(train=train, valid=valid, teacher=teacher, full=full, top=top, tmp=tmp)


def test_full_store_trains_like_the_live_teacher(setup):
    s = setup
    live, _ = distil(s['teacher'], s['train'], s['valid'])
    stored, learn = distil(StoredTeacher(s['full'].path, tokenizer='toy-v1'), IndexedDataset(s['train']), s['valid'])
    assert len(stored) == 2 * (96 // 16) # two shuffled epochs
    np.testing.assert_allclose(stored, live, rtol=1e-5, atol=1e-6)
    assert not any(type(c).__name__ == '_TakeIndex' for c in learn.cbs) # nothing left on the learner
    learn.validate() # the validation loader carries no index: batches as before


def test_topk_store_is_topk_cache_and_its_documented_approximation(setup):
    s = setup
    stored, _ = distil(StoredTeacher(s['top'].path), IndexedDataset(s['train']), s['valid'])
    cached, _ = distil(TopKCachedTeacher(s['teacher'], k=4), s['train'], s['valid'])
    live, _ = distil(s['teacher'], s['train'], s['valid'])
    np.testing.assert_allclose(stored, cached, rtol=1e-5, atol=1e-6) # the same packing, on disk
    assert np.abs(stored - live).max() > 1e-6 # the tail is approximated...
    # ...as documented: the top-k probabilities and the tail's mass exact (to float16), the tail spread evenly
    idx = [5, 0, 77]
    with torch.no_grad(): p = s['teacher'](torch.stack([s['train'][i][0] for i in idx])).softmax(-1)
    top = p.topk(4, -1)
    tail = (1 - top.values.sum(-1, keepdim=True)) / (V - 4)
    want = tail.expand_as(p).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(s['top'].read(idx).softmax(-1), want, atol=2e-3, rtol=0)


def test_two_dataloader_workers(setup):
    s = setup
    one, _ = distil(StoredTeacher(s['full'].path), IndexedDataset(s['train']), s['valid'], epochs=1)
    two, _ = distil(StoredTeacher(s['full'].path), IndexedDataset(s['train']), s['valid'], epochs=1, workers=2)
    np.testing.assert_array_equal(two, one)


def test_tensordl_and_bfloat16(setup, tmp_path):
    s = setup
    x, y = torch.stack([i[0] for i in s['train']]), torch.stack([i[1] for i in s['train']])
    dl = TensorDL(IndexedDataset(TensorDataset(x, y)), bs=16)
    st = write_teacher_store(tmp_path/'bf16', s['teacher'], dl, k=8, dtype=torch.bfloat16)
    assert st.meta['dtype'] == 'bfloat16' and np.load(st.path/'values.npy', mmap_mode='r').dtype == np.int16
    with torch.no_grad(): z = s['teacher'](x[[3, 1]])
    r = st.read([3, 1])
    torch.testing.assert_close(r.gather(-1, z.topk(8, -1).indices), z.topk(8, -1).values, rtol=1e-2, atol=1e-2) # bfloat16 rounding
    assert st.nbytes - sum(np.load(st.path/f, mmap_mode='r').nbytes for f in ('values.npy', 'indices.npy', 'fill.npy')) < 1000
    assert st.nbytes > TopKCachedTeacher.nbytes(96, SEQ, V, k=8, dtype=torch.bfloat16) # + the headers
    random.seed(0)
    learn = Learner(DataLoaders(TensorDL(IndexedDataset(TensorDataset(x, y)), bs=16, shuffle=True), DataLoader(s['valid'], bs=32)), lm(8),
                    loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=KnowledgeDistillationCallback(StoredTeacher(st), SoftTarget(T=1.)))


def test_resume_of_a_half_written_store(setup, tmp_path):
    s, calls, fail = setup, [], {'at': 3}
    def flaky(x):
        calls.append(len(x))
        if len(calls) == fail['at']: fail['at'] = None; raise Stopped # the job was stopped during its third chunk, once
        return s['teacher'](x)
    dl = DataLoader(s['train'], bs=16)
    with pytest.raises(Stopped): write_teacher_store(tmp_path/'r', flaky, dl, k=4)
    half = TeacherStore(tmp_path/'r')
    assert half.done == 32 and json.loads((tmp_path/'r'/'progress.json').read_text()) == {'done': 32}
    with pytest.raises(ValueError, match='32 of 96'): distil(StoredTeacher(half), IndexedDataset(s['train']), s['valid'], epochs=1)
    calls.clear()
    done = write_teacher_store(tmp_path/'r', flaky, dl, k=4)
    assert calls == [16, 16, 16, 16, 16] # the first chunk again (to check the teacher), then items 32…95 only
    assert done.done == 96
    for a, b in zip(done.arrays(), s['top'].arrays()): np.testing.assert_array_equal(a, b)
    assert write_teacher_store(tmp_path/'r', s['teacher'], dl, k=4).done == 96 # complete: nothing to do


def test_resume_refuses_other_work(setup, tmp_path):
    s = setup
    dl = DataLoader(s['train'], bs=16)
    calls = []
    def stop(x):
        calls.append(1)
        if len(calls) == 2: raise Stopped
        return s['teacher'](x)
    with pytest.raises(Stopped): write_teacher_store(tmp_path/'r', stop, dl, k=4, tokenizer='a')
    with pytest.raises(ValueError, match="k=4, this call asks for k=5"): write_teacher_store(tmp_path/'r', s['teacher'], dl, k=5, tokenizer='a')
    with pytest.raises(ValueError, match="tokenizer='a', this call asks for tokenizer='b'"): write_teacher_store(tmp_path/'r', s['teacher'], dl, k=4, tokenizer='b')
    with pytest.raises(ValueError, match='the data differs'): write_teacher_store(tmp_path/'r', s['teacher'], DataLoader(s['train'][::-1], bs=16), k=4, tokenizer='a')
    with pytest.raises(ValueError, match='n_items=96, this call asks for n_items=95'): write_teacher_store(tmp_path/'r', s['teacher'], DataLoader(s['train'][:95], bs=16), k=4, tokenizer='a')
    torch.manual_seed(5)
    with pytest.raises(ValueError, match='not the teacher that began'): write_teacher_store(tmp_path/'r', lm(32), dl, k=4, tokenizer='a')
    (tmp_path/'other').mkdir(); (tmp_path/'other'/'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='notes.txt'): write_teacher_store(tmp_path/'other', s['teacher'], dl, k=4)


def test_mismatches_are_refused_with_both_values(setup):
    s, path = setup, setup['full'].path
    run = lambda src, ds=None, **kw: distil(src, ds or IndexedDataset(s['train']), s['valid'], epochs=1, **kw)
    with pytest.raises(ValueError, match='holds 96 items, the training dataset 80'): run(StoredTeacher(path), IndexedDataset(s['train'][:80]))
    with pytest.raises(ValueError, match=r"tokenizer 'toy-v1', the student's data with 'toy-v2'"): run(StoredTeacher(path, tokenizer='toy-v2'))
    with pytest.raises(ValueError, match=r'outputs of shape \(12, 50\) per item \(50 classes\), the student\'s are \(12, 60\)'):
        run(StoredTeacher(path), student=nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, 60)))
    with pytest.raises(ValueError, match='written for other data'): run(StoredTeacher(path), IndexedDataset(s['train'][::-1]))
    with pytest.raises(ValueError, match=r'IndexedDataset\(train_ds\)'): run(StoredTeacher(path), s['train'])
    with pytest.raises(FileNotFoundError, match='no meta.json'): StoredTeacher(s['tmp']/'nothing')
    with pytest.raises(IndexError, match='outside'): s['full'].read([96])


def free_port():
    with socket.socket() as sk: sk.bind(('127.0.0.1', 0)); return sk.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_processes_read_their_own_items(setup, tmp_path):
    pytest.importorskip('accelerate')
    worker, port = Path(__file__).parent/'store_ddp_worker.py', free_port()
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(port), 'ACCELERATE_USE_CPU': 'true'}
    procs = [subprocess.Popen([sys.executable, str(worker), str(setup['full'].path), str(tmp_path/f'rank{r}.pt')],
                              env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (torch.load(tmp_path/f'rank{r}.pt', weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert len(r['store']['losses']) == 2 * 96 // 16
        torch.testing.assert_close(r['store']['losses'], r['live']['losses'], rtol=1e-5, atol=1e-6) # from the store as from the teacher
    for k in r0['store']['weights']: torch.testing.assert_close(r0['store']['weights'][k], r1['store']['weights'][k], rtol=0, atol=0)
    for epoch in range(2): # each process read its own half of the items, and together they read every item once
        a, b = ({i for batch in r['store']['read'][epoch * 6:(epoch + 1) * 6] for i in batch} for r in (r0, r1))
        assert len(a) == len(b) == 48 and not a & b and a | b == set(range(96))
