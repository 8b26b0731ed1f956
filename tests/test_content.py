"""The content model: which pages hold equal bytes, which are zero, how well they compress."""
import numpy as np
import pytest

from balloonlab.proto.content import (PAGE_BYTES, ZERO_KEY, ContentMap, ContentRange, compressed_bytes,
                                      content_keys, image_id, ranges_from_regions)
from balloonlab.proto.tokens import make_tokens


def _map() -> ContentMap:
    return ContentMap([ContentRange(0, 100, image="debian-12", compress=(0.25, 0.45)),
                       ContentRange(100, 50, zero_writes=True),
                       ContentRange(150, 50, compress=(1.0, 1.0))])


def test_image_pages_are_shared_across_guests_until_written() -> None:
    cm = _map()
    pages = np.arange(0, 100)
    v0 = make_tokens(pages, np.zeros(100, np.int64))
    a, b = content_keys(cm, 1, v0), content_keys(cm, 2, v0)
    assert np.array_equal(a, b)
    assert np.unique(a).size == 100 and not np.any(a == ZERO_KEY)
    written = make_tokens(pages, np.ones(100, np.int64))
    wa, wb = content_keys(cm, 1, written), content_keys(cm, 2, written)
    assert not np.any(wa == wb), "written pages are private to their guest"
    assert not np.any(np.isin(wa, a))


def test_image_offset_lines_up_two_layouts() -> None:
    left = ContentMap([ContentRange(0, 10, image="img")])
    right = ContentMap([ContentRange(40, 10, image="img")])
    tl = make_tokens(np.arange(10), np.zeros(10, np.int64))
    tr = make_tokens(np.arange(40, 50), np.zeros(10, np.int64))
    assert np.array_equal(content_keys(left, 0, tl), content_keys(right, 5, tr))
    other = ContentMap([ContentRange(40, 10, image="img", image_offset=1)])
    assert not np.array_equal(content_keys(left, 0, tl), content_keys(other, 5, tr))


def test_zero_pages_and_zero_writes() -> None:
    cm = _map()
    tok = np.array([0, int(make_tokens(np.array([120]), np.array([7]))[0]),
                    int(make_tokens(np.array([160]), np.array([7]))[0])], np.uint64)
    keys = content_keys(cm, 3, tok)
    assert keys[0] == ZERO_KEY and keys[1] == ZERO_KEY and keys[2] != ZERO_KEY


def test_private_pages_differ_between_guests_and_versions() -> None:
    cm = ContentMap()
    tok = make_tokens(np.arange(1000), np.full(1000, 3))
    k1, k2 = content_keys(cm, 1, tok), content_keys(cm, 2, tok)
    assert np.unique(k1).size == 1000 and not np.any(k1 == k2)
    assert not np.any(k1 == content_keys(cm, 1, make_tokens(np.arange(1000), np.full(1000, 4))))


def test_compressed_sizes_follow_the_region_and_are_deterministic() -> None:
    cm = _map()
    text = make_tokens(np.arange(100), np.ones(100, np.int64))
    rnd = make_tokens(np.arange(150, 200), np.ones(50, np.int64))
    s = compressed_bytes(cm, 1, text)
    assert np.all((s >= 0.25 * PAGE_BYTES - 1) & (s <= 0.45 * PAGE_BYTES + 1))
    assert s.std() > 50, "sizes spread over the range"
    assert np.array_equal(s, compressed_bytes(cm, 1, text))
    assert np.all(compressed_bytes(cm, 1, rnd) == PAGE_BYTES)
    assert compressed_bytes(cm, 1, np.array([0], np.uint64))[0] == 0


def test_wire_round_trip_and_errors() -> None:
    cm = _map()
    back = ContentMap.from_wire(cm.to_wire())
    assert back.ranges == cm.ranges
    with pytest.raises(ValueError, match="entry 0"):
        ContentMap.from_wire([[0, "x", "", 0, False, [0.5, 0.5]]])
    with pytest.raises(ValueError, match="overlap"):
        ContentMap([ContentRange(0, 10), ContentRange(5, 10)])
    with pytest.raises(ValueError, match="unknown preset 'txet'"):
        ranges_from_regions([{"start": 0, "pages": 1, "compress": "txet"}])
    assert image_id("a") != image_id("b") and image_id("a") == image_id("a")
