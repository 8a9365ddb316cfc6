"""Aspect-ratio buckets and the resize-then-crop placement."""

import random

import pytest
from PIL import Image

from krea2_train.data.buckets import apply, make_buckets, nearest_bucket, place


@pytest.mark.parametrize("res", [256, 512, 1024])
def test_buckets_grid_area_and_aspect(res):
    buckets = make_buckets(res, 0.5, 2.0)
    assert (res, res) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.93 * res * res <= w * h <= res * res
        assert 0.5 <= w / h <= 2.0
    assert set(buckets) == {(h, w) for w, h in buckets}  # portrait mirrors landscape
    assert len({w for w, _ in buckets}) == len(buckets)  # one bucket per width


def test_aspect_range_is_configurable():
    narrow = make_buckets(512, 0.8, 1.25)
    assert all(0.8 <= w / h <= 1.25 for w, h in narrow)
    assert len(narrow) < len(make_buckets(512, 0.5, 2.0))
    with pytest.raises(ValueError):
        make_buckets(512, 1.2, 2.0)


def test_nearest_bucket():
    assert nearest_bucket(1920, 1080, make_buckets(1024)) == (1360, 768)
    assert nearest_bucket(1080, 1920, make_buckets(1024)) == (768, 1360)
    assert nearest_bucket(500, 500, make_buckets(256)) == (256, 256)
    # Beyond the aspect range: the most extreme bucket.
    assert nearest_bucket(4000, 500, make_buckets(512)) == (704, 368)


def test_place_centre_and_random_crop_recorded():
    p = place(1000, 500, (704, 368), "center")
    assert p.resized == (736, 368) and (p.left, p.top) == (16, 0)
    rs = [place(1000, 500, (704, 368), "random", random.Random(s)) for s in range(20)]
    assert {r.left for r in rs} <= set(range(0, 33)) and len({r.left for r in rs}) > 3
    assert place(1000, 500, (704, 368), "random", random.Random(3)) == rs[3]  # reproducible from the seed
    img = Image.new("RGB", (1000, 500))
    assert apply(img, p).size == (704, 368)
