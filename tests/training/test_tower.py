"""The tower's pretraining (``training.tower``) on a tiny model and a few synthetic screens."""

import math

import torch

from model.config import LongLLaVAConfig
from model.longllava import LongLLaVA
from training import synthetic
from training.pipeline import TINY_ARCH
from training.tower import pretrain_tower


def test_the_same_seed_trains_the_same_tower_whatever_the_callers_rng(tmp_path):
    """A build repeats bit for bit: the slot head's start comes from the seed, not from
    the global RNG (two builds once differed from their first loss on)."""
    config = LongLLaVAConfig.model_validate(TINY_ARCH)
    records = synthetic.screens(synthetic.Writer(tmp_path), 8, seed=1, weights={"ClickTarget": 1.0},
                                side=math.isqrt(config.image_tokens))
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(0)
        model = LongLLaVA(config)
        torch.manual_seed(caller_seed)  # whatever the caller did to the global RNG since
        losses = pretrain_tower(model, records, steps=3, batch_size=4, seed=5, progress=False)
        runs.append((losses, model.vision.state_dict()))
    (first, tower), (again, other) = runs
    assert first == again and first[-1] < first[0]
    assert all(torch.equal(tower[k], other[k]) for k in tower)
    torch.manual_seed(0)
    another_seed = pretrain_tower(LongLLaVA(config), records, steps=1, batch_size=4, seed=6, progress=False)
    assert another_seed[0] != first[0]


def test_each_screen_is_decoded_once_and_trains_as_if_read_every_time(tmp_path, monkeypatch):
    """Screens are drawn many times; the tower keeps each one decoded (``CACHE_BYTES``)
    and trains bit for bit as when every draw decodes its file."""
    from training import tower

    config = LongLLaVAConfig.model_validate(TINY_ARCH)
    records = synthetic.screens(synthetic.Writer(tmp_path), 4, seed=1, weights={"ClickTarget": 1.0},
                                side=math.isqrt(config.image_tokens))
    opened = []
    monkeypatch.setattr(tower.Image, "open", lambda path, _open=tower.Image.open: opened.append(path) or _open(path))
    runs = []
    for cache in (tower.CACHE_BYTES, 0):  # 0: nothing kept, every draw decodes its file
        monkeypatch.setattr(tower, "CACHE_BYTES", cache)
        opened.clear()
        torch.manual_seed(0)
        model = LongLLaVA(config)
        runs.append((pretrain_tower(model, records, steps=3, batch_size=4, seed=5, progress=False),
                     model.vision.state_dict(), len(opened), len(set(opened))))
    (kept, tower_kept, opens_kept, files), (decoded, tower_decoded, opens_decoded, _) = runs
    assert opens_kept == files <= 4 and opens_decoded == 3 * 4  # three steps of four draws
    assert kept == decoded and all(torch.equal(tower_kept[k], tower_decoded[k]) for k in tower_kept)
