"Shared fixtures: tiny deterministic data and models for the callback tests"
import pytest, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

torch.set_num_threads(1)  # tiny models: one thread is fastest and does not fight other processes


def toy_dls(n=256, d=8, c=3, bs=32, seed=0):
    "Random classification data: deterministic and tiny"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :c] * torch.arange(1, c + 1)).argmax(1)
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:n * 3 // 4], bs=bs, shuffle=True, drop_last=True), DataLoader(ds[n * 3 // 4:], bs=bs))


def mlp(d=8, h=16, c=3): return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def conv(w=4, d=8, c=3):
    "A 1-D CNN on the toy data's (B, d) vectors: '1' and '3' are convolutions with maps of length d and d/2"
    return nn.Sequential(nn.Unflatten(1, (1, d)), nn.Conv1d(1, w, 3, padding=1), nn.ReLU(), nn.Conv1d(w, w, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(w, c))


def digits_dls(bs=64, seed=0):
    "scikit-learn's bundled 8x8 digits as (B, 64) float features, a fixed 80/20 split"
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[idx], y[idx]
    n = int(len(x) * .8)
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:n], bs=bs, shuffle=True, drop_last=True), DataLoader(ds[n:], bs=256))


@pytest.fixture
def dls(): return toy_dls()


def quiet_fit(learn, n=1, lr=1e-2, cbs=None, one_cycle=False):
    "Fit without progress bars or logging"
    import fastai.callback.progress, fastai.callback.schedule  # Learner.no_bar, Learner.fit_one_cycle
    with learn.no_bar(), learn.no_logging():
        (learn.fit_one_cycle if one_cycle else learn.fit)(n, lr, cbs=cbs)


def tiny_gpt2(layers:int, d:int, seed:int, vocab:int=24):
    "A GPT-2 of `layers` blocks of width `d` built from its config (nothing downloaded), seeded"
    import transformers
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=2, vocab_size=vocab, n_positions=32,
                                                                bos_token_id=0, eos_token_id=0))
