"The pieces of benchmarks/detection.py: canvases, the grid encoding, the AP metric, the task loss, and one distilled fit"
import importlib.util, sys
from pathlib import Path
import numpy as np
import pytest, torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from kdcb.all import *
from kdcb.detection import DetectionHeadKD
from kdcb.data import UNLABELLED
from conftest import quiet_fit

_spec = importlib.util.spec_from_file_location('detection', Path(__file__).parents[1] / 'benchmarks' / 'detection.py')
det = importlib.util.module_from_spec(_spec); sys.modules['detection'] = det; _spec.loader.exec_module(det)
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def canvases():
    d = load_digits()
    return det.make_canvases(d.images[:200] / 16., d.target[:200], 40, seed=3)


def perfect(boxes):
    "The head output that the grid target of `boxes` asks for: its box values, and ±20 class logits"
    y = det.encode(boxes)
    out = torch.full((4 + det.K, det.GRID, det.GRID), -20.)
    out[:4] = y[1:]
    for c, gy, gx in [(int(y[0, i, j]), i, j) for i, j in (y[0] != det.BG).nonzero().tolist()]: out[4 + c, gy, gx] = 20.
    return out


def test_canvases(canvases):
    x, boxes = canvases
    assert x.shape == (40, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert all(1 <= len(b) <= 2 for b in boxes) and any(len(b) == 2 for b in boxes)
    for bs in boxes:
        for c, x0, y0, x1, y1 in bs: assert 0 <= c < 10 and 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and x1 - x0 in det.SIZES
        if len(bs) == 2: assert det.box_iou(bs[0][1:], bs[1][1:]) == 0
    y = torch.stack([det.encode(b) for b in boxes])
    assert y.shape == (40, 5, det.GRID, det.GRID)
    assert ((y[:, 0] != det.BG).sum((1, 2)) == torch.tensor([len(b) for b in boxes])).all() # one positive cell per digit


def test_encode_decode_round_trip(canvases):
    _, boxes = canvases
    for bs in boxes:
        got = det.decode(perfect(bs))
        assert len(got) == len(bs) and all(s > 0.99 for s, *_ in got)
        for g, b in zip(sorted(o[1:] for o in got), sorted(bs)):
            assert g[0] == b[0] and np.allclose(g[1:], b[1:], atol=1e-4)


def test_average_precision(canvases):
    _, boxes = canvases
    dets = [det.decode(perfect(b)) for b in boxes]
    assert det.average_precision(dets, boxes) == pytest.approx(1.)
    wrong = [[(s, (c + 1) % 10, *b) for s, c, *b in ds] for ds in dets] # every class shifted: no hit
    assert det.average_precision(wrong, boxes) == 0.
    half = [ds if i % 2 else [(s, (c + 1) % 10, *b) for s, c, *b in ds] for i, ds in enumerate(dets)]
    assert 0. < det.average_precision(half, boxes) < 1.
    moved = [[(s, c, x0 + 8, y0, x1 + 8, y1) for s, c, x0, y0, x1, y1 in ds] for ds in dets] # IoU at most 1/3
    assert det.average_precision(moved, boxes) == 0.
    # a second detection of the same box counts once: ranked above the true ones it lowers precision, below them it costs nothing
    dup_top = [[(2., *ds[0][1:])] + ds if i == 0 else ds for i, ds in enumerate(dets)]
    dup_low = [ds + [(0.01, *ds[0][1:])] if i == 0 else ds for i, ds in enumerate(dets)]
    assert det.average_precision(dup_top, boxes) < 1. and det.average_precision(dup_low, boxes) == pytest.approx(1.)
    # by hand: hits at ranks 1 and 3 of 3 detections, 2 boxes: recall 0.5 at precision 1, recall 1 at precision 2/3
    gts = [[(1, 0, 0, 8, 8), (2, 16, 16, 24, 24)]]
    ds = [[(.9, 1, 0, 0, 8, 8), (.8, 3, 16, 16, 24, 24), (.7, 2, 16, 16, 24, 24)]]
    assert det.average_precision(ds, gts) == pytest.approx(.5 * 1 + .5 * 2 / 3)


def test_detection_loss():
    torch.manual_seed(0)
    pred = torch.randn(3, 4 + det.K, det.GRID, det.GRID, requires_grad=True)
    y = torch.stack([det.encode([(3, 0, 0, 8, 8)]), det.encode([(7, 12, 4, 24, 16), (1, 20, 20, 28, 28)]), det.encode([(0, 4, 4, 20, 20)])])
    loss = det.DetectionLoss()(pred, y)
    # independently: torchvision's focal loss, summed, / number of objects; L1 on the boxes of the 4 positive cells
    tv = pytest.importorskip('torchvision.ops')
    onehot = torch.zeros(3, det.K, det.GRID, det.GRID)
    pos = [(0, 3, 1, 1), (1, 7, 2, 4), (1, 1, 6, 6), (2, 0, 3, 3)] # (image, class, gy, gx) of each digit's centre cell
    for b, c, gy, gx in pos: onehot[b, c, gy, gx] = 1
    l1 = sum((pred[b, :4, gy, gx] - y[b, 1:, gy, gx]).abs().sum() for b, _, gy, gx in pos)
    torch.testing.assert_close(loss, (tv.sigmoid_focal_loss(pred[:, 4:], onehot, reduction='sum') + l1) / 4)
    # canvases without labels are left out; a batch of only those gives 0 that still backpropagates
    yu = y.clone(); yu[1, 0] = UNLABELLED
    torch.testing.assert_close(det.DetectionLoss()(pred, yu), det.DetectionLoss()(pred[[0, 2]], y[[0, 2]]))
    yu[:, 0] = UNLABELLED
    zero = det.DetectionLoss()(pred, yu); zero.backward()
    assert zero.item() == 0 and pred.grad is not None


@pytest.mark.parametrize('feat', [False, True])
def test_distilled_fit(canvases, feat):
    "Both distilled rows of the benchmark train end to end: the head loss on 'head', the feature losses on every backbone pair"
    x, boxes = canvases
    y = torch.stack([det.encode(b) for b in boxes])
    torch.manual_seed(0)
    teacher, student = det.detector((16, 32, 64), extra=1), det.detector()
    pairs = det.backbone_pairs(student, teacher, x[:2])
    assert pairs['student'] == ['stem', 's1', 's2'] # the backbone's three scales, not the head
    kd = det.kd_callback(teacher, pairs if feat else None, lambda: DetectionHeadKD(det.K, fg_threshold=0.), 0.5)
    before = [p.detach().clone() for p in kd.kd_loss.parameters()] # the connectors, with `feat`
    assert len(before) == (6 if feat else 0)
    learn = det.Learner(det.tensor_dls(x, y, x, y, 8), student, loss_func=det.DetectionLoss())
    quiet_fit(learn, 1, 1e-3, kd)
    task, kd_value = kd.averages()
    assert np.isfinite(task) and kd_value > 0
    # the connectors to the teacher's widths were trained with the student
    assert all(not torch.equal(b, p) for b, p in zip(before, kd.kd_loss.parameters()))
