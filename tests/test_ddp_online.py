"Distributed data parallel on the CPU for the online methods: peers, auxiliary heads and the weight average agree across two gloo processes"
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

pytest.importorskip('accelerate')
WORKER = Path(__file__).parent / 'ddp_worker.py'


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def run(out, method, rank=None, world=1, port=None):
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])}
    if world > 1: env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                             MASTER_PORT=str(port), ACCELERATE_USE_CPU='true')
    return subprocess.Popen([sys.executable, str(WORKER), str(out), '--method', method], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


METHODS = {'mutual': ('student', 'peer'), 'deep': ('student', 'heads'), 'ema': ('student', 'ema')}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Two ranks (each starting from its own random weights) and one process on the global batch (rank 0's weights), every method in the same processes"
    tmp, port, methods = tmp_path_factory.mktemp('ddp_online'), free_port(), ','.join(METHODS)
    procs = [run(tmp / f'rank{r}.pt', methods, r, 2, port) for r in range(2)] + [run(tmp / 'single.pt', methods)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    return [torch.load(tmp / f, weights_only=True) for f in ('rank0.pt', 'rank1.pt', 'single.pt')]


@pytest.mark.slow
@pytest.mark.parametrize('method', list(METHODS))
def test_online_methods_agree_across_ranks_and_with_one_process(runs, method):
    r0, r1, one = (r[method] for r in runs)
    for part in METHODS[method]:
        assert r0[part].keys() == r1[part].keys() == one[part].keys() and len(r0[part])
        for k in r0[part]:
            torch.testing.assert_close(r0[part][k], r1[part][k], rtol=0, atol=0, msg=f'{method}: {part}.{k} differs between the ranks')
            torch.testing.assert_close(r0[part][k], one[part][k], rtol=1e-4, atol=1e-5, msg=f'{method}: {part}.{k} differs from one process')
    if method == 'mutual': assert not torch.equal(r0['peer']['0.weight'], r0['peer0']['0.weight'])  # the peer was trained
    if method == 'ema':
        assert int(r0['n_updates']) == int(r1['n_updates']) == 2  # one update per optimizer step: 2 epochs of 1 batch
        assert not torch.equal(r0['ema']['0.weight'], r0['student']['0.weight'])  # an average, not a copy of the student
