"Contrastive losses: InfoNCE and CRD against written-out formulas, gradients, tokens, and CRD's bank in the callback's state"
import math, pytest, torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from kdcb.all import *
from kdcb.contrastive import InfoNCE, CRD, embeddings
from conftest import toy_dls, quiet_fit

torch.set_num_threads(1)


def _nce_loop(zs, zt, T, neg=None):
    "−log softmax of the positive, one row at a time, in plain Python sums"
    cand = zt if neg is None else torch.cat([zt, neg])
    total = 0.
    for i in range(len(zs)):
        sims = [float(zs[i] @ c) / T for c in cand]
        total += -(sims[i] - math.log(sum(math.exp(v) for v in sims)))
    return total / len(zs)


def test_registered():
    assert {'info_nce', 'crd'} <= set(available_losses())
    with pytest.raises(TypeError): get_loss('crd') # projection heads need the channel counts


def test_info_nce_formula():
    torch.manual_seed(0)
    fs, ft = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    zs, zt = F.normalize(fs, dim=1), F.normalize(ft, dim=1)
    s2t, t2s = _nce_loop(zs, zt, .2), _nce_loop(zt, zs, .2)
    assert InfoNCE(T=.2, symmetric=False)(fs, ft).item() == pytest.approx(s2t, rel=1e-9)
    assert InfoNCE(T=.2)(fs, ft).item() == pytest.approx((s2t + t2s) / 2, rel=1e-9)


def test_info_nce_tokens_and_maps():
    torch.manual_seed(1)
    xs, xt = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    pooled = InfoNCE(tokens=True, symmetric=False)(xs, xt).item()
    assert pooled == pytest.approx(_nce_loop(F.normalize(xs.mean(1), dim=1), F.normalize(xt.mean(1), dim=1), .07), rel=1e-5)
    per = InfoNCE(tokens=True, pool='none', symmetric=False)(xs, xt).item()
    assert per == pytest.approx(_nce_loop(F.normalize(xs.reshape(8, 6), dim=1), F.normalize(xt.reshape(8, 6), dim=1), .07), rel=1e-5)
    m = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(embeddings(m), m.mean((2, 3)))
    torch.testing.assert_close(embeddings(m, pool='none')[:4], m[0].flatten(1).T)


def test_info_nce_gradients_reach_student_and_teacher_head_not_teacher():
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    loss = InfoNCE(4, 8, dim=3)
    loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    assert loss.head_s.weight.grad is not None and loss.head_t.weight.grad is not None


def test_crd_bank_formula_and_gradcheck():
    torch.manual_seed(2)
    crd = CRD(3, 5, dim=4, n_negatives=9, T=.3).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)) for _ in range(4)]
    seen_s, seen_t = [], []
    for fs, ft in batches:
        zs, zt = crd.project(fs, ft)
        ns = torch.cat(seen_s)[-9:] if seen_s else None # the 9 most recent rows, in any order
        nt = torch.cat(seen_t)[-9:] if seen_t else None
        ref = _nce_loop(zs.detach(), zt.detach(), .3, nt) + _nce_loop(zt.detach(), zs.detach(), .3, ns)
        assert crd(fs, ft).item() == pytest.approx(ref, rel=1e-9)
        seen_s.append(zs.detach()); seen_t.append(zt.detach())
    assert int(crd.bank_size) == 9 and int(crd.bank_ptr) == 16 % 9
    x = batches[0][0].clone().requires_grad_()
    crd.enqueue = lambda *a: None # the bank stays as it is while gradcheck evaluates
    assert gradcheck(lambda z: crd(z, batches[0][1]), (x,))


def _conv(w):
    return nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(w, 3))


def test_crd_bank_in_callback_state_and_device():
    "The bank fills during training only, is saved and restored with the callback's state, and is not exported"
    torch.manual_seed(3)
    dls = toy_dls()
    teacher = _conv(8)
    kd = KnowledgeDistillationCallback(teacher, CRD(4, 8, dim=6, n_negatives=50), ['2'], ['2'], weight=.3)
    learn = Learner(dls, _conv(4), loss_func=CrossEntropyLossFlat(), cbs=kd)
    heads = [p.detach().clone() for p in kd.kd_loss.parameters()]
    quiet_fit(learn, 1)
    crd = kd.kd_loss.terms[0].loss
    n_train = len(dls.train) * dls.train.bs
    assert int(crd.bank_size) == min(50, n_train) and int(crd.bank_ptr) == n_train % 50 # validation did not add rows
    assert any(not torch.equal(a, b) for a, b in zip(heads, kd.kd_loss.parameters())) # the heads trained with the student
    state = kd.state_dict()
    assert {'terms.0.loss.bank_s', 'terms.0.loss.bank_t', 'terms.0.loss.bank_ptr', 'terms.0.loss.bank_size'} <= set(state['losses'])
    kd2 = KnowledgeDistillationCallback(teacher, CRD(4, 8, dim=6, n_negatives=50), ['2'], ['2'], weight=.3)
    kd2.load_state_dict(state)
    c2 = kd2.kd_loss.terms[0].loss
    torch.testing.assert_close(c2.bank_t, crd.bank_t)
    assert int(c2.bank_ptr) == int(crd.bank_ptr)
    assert c2.bank_s.device == next(learn.model.parameters()).device


def test_crd_learner_export_leaves_bank_out(tmp_path):
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    items = list(toy_dls().train.dataset)
    dls = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(150)), list(range(150, 192))]).dataloaders(bs=32)
    kd = KnowledgeDistillationCallback(_conv(8), CRD(4, 8, dim=6, n_negatives=5000), ['2'], ['2'])
    learn = Learner(dls, _conv(4), loss_func=CrossEntropyLossFlat(), cbs=kd, path=tmp_path)
    quiet_fit(learn, 1)
    assert int(kd.kd_loss.terms[0].loss.bank_size) > 0
    learn.export('s.pkl')
    learn.remove_cb(kd)
    learn.export('p.pkl')
    # the 2 x 5000 x 6 float32 banks alone are 240 kB
    assert (tmp_path/'s.pkl').stat().st_size < (tmp_path/'p.pkl').stat().st_size + 24_000


@pytest.mark.slow
def test_crd_under_ddp_each_rank_keeps_its_own_bank(tmp_path):
    "Two gloo processes: the heads (trainable loss parameters) stay identical, each rank's bank holds its own shard's rows"
    pytest.importorskip('accelerate')
    import os, socket, subprocess, sys
    from pathlib import Path
    worker = Path(__file__).parent / 'ddp_crd_worker.py'
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'ACCELERATE_USE_CPU': 'true'}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / f'rank{r}.pt')], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    for k in ('terms.0.loss.head_s.weight', 'terms.0.loss.head_t.weight'):
        torch.testing.assert_close(r0['state'][k], r1['state'][k], rtol=0, atol=0) # gradients averaged: the heads agree
    for k in r0['student']: torch.testing.assert_close(r0['student'][k], r1['student'][k], rtol=0, atol=0)
    n = int(r0['state']['terms.0.loss.bank_size'])
    assert n == int(r1['state']['terms.0.loss.bank_size']) == 32 # 64 items, half on each rank
    assert not torch.equal(r0['state']['terms.0.loss.bank_t'][:n], r1['state']['terms.0.loss.bank_t'][:n]) # not gathered
