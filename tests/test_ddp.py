"Distributed data parallel on the CPU: two gloo processes stay identical, and match one process on the same global batch"
import os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

pytest.importorskip('accelerate')
WORKER = Path(__file__).parent / 'ddp_worker.py'


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def run(out, rank=None, world=1, port=None):
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])}
    if world > 1: env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                             MASTER_PORT=str(port), ACCELERATE_USE_CPU='true')
    return subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_stay_identical_and_match_one_process(tmp_path):
    port = free_port()
    procs = [run(tmp_path / f'rank{r}.pt', r, 2, port) for r in range(2)]
    single = run(tmp_path / 'single.pt')
    for p in procs + [single]:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    r0, r1, one = (torch.load(tmp_path / f, weights_only=True) for f in ('rank0.pt', 'rank1.pt', 'single.pt'))
    for part in ('student', 'connector'):
        for k in r0[part]:
            torch.testing.assert_close(r0[part][k], r1[part][k], rtol=0, atol=0)         # the ranks agree exactly
            torch.testing.assert_close(r0[part][k], one[part][k], rtol=1e-4, atol=1e-5)  # and equal one process
    assert not torch.equal(r0['connector']['lin.weight'], r0['connector0']['lin.weight'])  # the connector was trained
