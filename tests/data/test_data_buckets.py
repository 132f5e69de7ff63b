"""Bucket assignment and the bucket batch sampler: sizes, determinism per (seed, epoch), resume skipping, ranks."""

from collections import Counter

import pytest

from fluxlora.data.buckets import BucketBatchSampler, BucketSettings
from fluxlora.errors import FluxLoraError


def test_no_upscale_keeps_small_images_small_and_rounds_down_to_step():
    b = BucketSettings(resolution=(512, 512), min_size=256, max_size=1024, step=64, upscale=False)
    assert b.bucket_for(300, 200) == (256, 192)            # never enlarged
    assert b.is_small((256, 192))
    assert b.bucket_for(512, 512) == (512, 512)
    w, h = b.bucket_for(4000, 3000)                         # shrunk to about the target area, aspect kept
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and abs(w / h - 4 / 3) < 0.15
    assert b.bucket_for(3000, 4000) == (h, w)
    assert max(b.bucket_for(5000, 400)) <= 1024             # max side respected


def test_upscale_uses_the_predefined_set_with_the_closest_aspect():
    b = BucketSettings(resolution=(512, 512), min_size=256, max_size=1024, step=64, upscale=True)
    sizes = b.predefined()
    assert (512, 512) in sizes and all(w * h <= 512 * 512 and 256 <= min(w, h) for w, h in sizes)
    assert b.bucket_for(100, 100) == (512, 512)             # enlarged: asked for
    w, h = b.bucket_for(1600, 900)
    assert (w, h) in sizes and abs(w / h - 16 / 9) < 0.25


def test_fixed_crop_when_buckets_are_off():
    b = BucketSettings(enabled=False, resolution=(512, 512))
    assert b.bucket_for(1000, 300) == b.bucket_for(64, 64) == (512, 512)
    assert "fixed 512x512" in b.describe()


@pytest.mark.parametrize("kw,text", [({"step": 40}, "multiple of 16"), ({"min_size": 2048}, "min_size"),
                                     ({"enabled": False, "resolution": (500, 500)}, "multiples of 16")])
def test_bad_bucket_settings_are_one_line_errors(kw, text):
    with pytest.raises(FluxLoraError, match=text):
        BucketSettings(**kw)


def test_image_smaller_than_one_step_is_an_error():
    with pytest.raises(FluxLoraError, match="smaller than one bucket step"):
        BucketSettings(step=64).bucket_for(40, 300)


def _sampler(**kw):
    buckets = [(64, 64)] * 5 + [(64, 128)] * 3 + [(128, 64)] * 2
    args = dict(batch_size=2, seed=7, repeats=[1] * 10)
    args.update(kw)
    return BucketBatchSampler(buckets, **args)


def test_batches_never_mix_buckets_and_cover_every_repeat():
    s = _sampler(repeats=[2] * 5 + [1] * 5)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == len(s) == 5 + 2 + 1             # ceil(10/2) + ceil(3/2) + ceil(2/2)
    for batch in batches:
        assert len({s.buckets[k.record] for k in batch}) == 1
    assert Counter(k.record for b in batches for k in b) == Counter({**{i: 2 for i in range(5)},
                                                                     **{i: 1 for i in range(5, 10)}})


def test_order_depends_only_on_seed_and_epoch():
    a, b = _sampler(), _sampler()
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(_sampler(seed=8)) != first


def test_resume_skips_exactly_the_batches_done_then_runs_full_epochs():
    s = _sampler()
    s.set_epoch(2)
    full = list(s)
    s.resume_at(2, 3)
    assert list(s) == full[3:]
    assert list(s) == full                                  # the skip applies once
    assert len(s) == len(full)                              # Lightning counts the skipped batches as done
    s.resume_at(2, 3)
    s.set_epoch(3)                                          # a different epoch: no skip
    assert len(list(s)) == len(full)


def test_ranks_split_batches_evenly_and_cover_everything():
    whole = _sampler()
    ranks = [_sampler(rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1               # same count on every rank: no collective waits forever
    seen = [tuple(b) for r in ranks for b in r]
    assert set(seen) == {tuple(b) for b in whole}


def test_caption_variants_and_dropout_are_drawn_deterministically():
    s = _sampler(variants=[4] * 10, dropout=[0.5] * 10)
    keys = [k for b in s for k in b]
    assert {k.variant for k in keys} <= {0, 1, 2, 3} and len({k.variant for k in keys}) > 1
    assert any(k.drop_caption for k in keys) and not all(k.drop_caption for k in keys)
    assert keys == [k for b in _sampler(variants=[4] * 10, dropout=[0.5] * 10) for k in b]


def test_lightning_reaches_set_epoch_through_batch_sampler_sampler():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    s = _sampler()
    _set_sampler_epoch(DataLoader(range(10), batch_sampler=s), 4)
    assert s.epoch == 4


@pytest.mark.parametrize("repeats, batch_size", [([1] * 10, 2), ([2] * 5 + [1] * 5, 2), ([1] * 10, 4), ([3] * 10, 1)])
def test_step_shapes_are_the_shapes_of_the_batches_drawn(repeats, batch_size):
    """What `speed.dynamic_shapes: auto` counts: (samples, image tokens) of every batch, a bucket's smaller last
    batch included; 64x128 and 128x64 are one shape (32 tokens each)."""
    s = _sampler(repeats=repeats, batch_size=batch_size)
    drawn = {(len(b), (s.buckets[b[0].record][0] // 16) * (s.buckets[b[0].record][1] // 16))
             for epoch in range(3) for b in s.epoch_batches(epoch)}
    assert s.step_shapes() == drawn
    assert _sampler(repeats=repeats, batch_size=batch_size, rank=1, world_size=2).step_shapes() == drawn


def test_step_shapes_count_a_control_images_tokens_too():
    """FLUX.1 Kontext's batches key on (target, control) buckets: the step sees both images' tokens."""
    s = BucketBatchSampler([(64, 64, 32, 32)] * 2 + [(64, 64, 64, 64)] * 2, batch_size=2, seed=0)
    assert s.step_shapes() == {(2, 16 + 4), (2, 16 + 16)}
    assert BucketBatchSampler([(512, 512)], batch_size=4, seed=0).step_shapes() == {(1, 1024)}
