"""The content map from a workload's regions to the host: region keys, the wire, the host's copy."""
import numpy as np
import pytest

from balloonlab.guestd.errors import GuestConfigError
from balloonlab.guestd.workload.layout import Layout
from balloonlab.hostd.errors import BadBatch, ContentMapTaken
from balloonlab.hostd.memory import HostMemory
from balloonlab.proto.content import COMPRESS_PRESETS, ZERO_KEY, ContentMap, content_keys
from balloonlab.proto.messages import ContentReport
from balloonlab.proto.tokens import make_tokens


def _layout() -> Layout:
    return Layout.from_mapping([
        {"name": "os", "kind": "file", "pages": 100, "image": "debian-12", "compress": "text"},
        {"name": "heap", "kind": "anon", "pages": 50, "compress": [0.5, 0.75]},
        {"name": "bss", "kind": "anon", "pages": 20, "zero_writes": True},
        {"name": "libs", "kind": "file", "pages": 30, "image": "debian-12", "image_offset": 100},
    ])


def test_regions_become_the_content_map() -> None:
    cm = _layout().content_map()
    assert [(r.start, r.pages, r.image, r.image_offset, r.zero_writes) for r in cm.ranges] == [
        (0, 100, "debian-12", 0, False), (100, 50, None, 0, False), (150, 20, None, 0, True),
        (170, 30, "debian-12", 100, False)]
    assert cm.ranges[0].compress == COMPRESS_PRESETS["text"]
    assert cm.ranges[1].compress == (0.5, 0.75)
    # two guests with different layouts of the same image share its pages page for page
    other = Layout.from_mapping([{"name": "scratch", "kind": "anon", "pages": 7},
                                 {"name": "all", "kind": "file", "pages": 130, "image": "debian-12"}]).content_map()
    mine = content_keys(cm, 1, make_tokens(np.arange(170, 200), np.zeros(30, np.int64)))
    theirs = content_keys(other, 2, make_tokens(np.arange(107, 137), np.zeros(30, np.int64)))
    assert np.array_equal(mine, theirs)
    assert np.all(content_keys(cm, 1, make_tokens(np.arange(150, 170), np.full(20, 3))) == ZERO_KEY)


def test_round_trip_through_the_message() -> None:
    cm = _layout().content_map()
    msg = ContentReport.from_body(ContentReport(cm.to_wire()).to_body())
    assert ContentMap.from_wire(msg.ranges).ranges == cm.ranges


@pytest.mark.parametrize("region, match", [
    ({"image": "os"}, "image 'os' needs kind = 'file'"),
    ({"kind": "file", "image": ""}, "image must be a non-empty string"),
    ({"kind": "file", "image": "os", "image_offset": -1}, "image_offset must be an integer >= 0, got -1"),
    ({"image_offset": 3}, "image_offset 3 without an image"),
    ({"zero_writes": "yes"}, "zero_writes must be true or false, got 'yes'"),
    ({"compress": "zip"}, "unknown preset 'zip'"),
    ({"compress": [0.9, 0.1]}, r"0 < lo <= hi <= 1, got \(0.9, 0.1\)"),
    ({"compress": [0.0, 0.5]}, "0 < lo <= hi <= 1"),
    ({"shared": True}, "unknown key"),
])
def test_bad_region_keys_are_refused_by_name(region: dict, match: str) -> None:
    raw = {"name": "r", "kind": "anon", "pages": 4, **region}
    with pytest.raises(GuestConfigError, match=match):
        Layout.from_mapping([raw])


def test_host_keeps_the_map_and_refuses_a_malformed_one() -> None:
    mem = HostMemory(64, 64, "random", np.random.default_rng(0))
    mem.add_guest(3, 32)
    assert mem.content(3).ranges == ()                     # never reported: everything private
    cm = _layout().content_map()
    with pytest.raises(BadBatch, match=r"guest 3: malformed content map: content map entry 0"):
        mem.set_content(3, [[0, "x", "", 0, False, [0.5, 0.5]]])
    with pytest.raises(BadBatch, match=r"guest 3: malformed content map: .*overlap"):
        mem.set_content(3, [[0, 10, "", 0, False, [0.5, 0.5]], [5, 10, "", 0, False, [0.5, 0.5]]])
    assert mem.content(3).ranges == ()                     # a refused map changes nothing
    mem.set_content(3, cm.to_wire())
    assert mem.content(3).ranges == cm.ranges
    with pytest.raises(ContentMapTaken, match="guest 3: the content map was taken already"):
        mem.set_content(3, ContentMap().to_wire())
    assert mem.content(3).ranges == cm.ranges


@pytest.mark.parametrize("region, match", [
    ({"kind": "anon", "image": "os"}, r"regions\[0\]\.image: 'os' needs kind = \"file\""),
    ({"kind": "file", "image_offset": 2}, "image_offset: 2 without an image"),
    ({"kind": "file", "compress": "zip"}, "compress"),
    ({"kind": "file", "compress": [0.5, 0.2]}, r"lo <= hi"),
    ({"kind": "file", "zero_writes": 1}, "zero_writes"),
])
def test_the_scenario_schema_refuses_bad_content_keys(region: dict, match: str) -> None:
    from balloonlab.proto.schema import Region, SchemaError, decode
    with pytest.raises(SchemaError, match=match):
        decode(Region, {"name": "r", "pages": 4, **region}, path="guest.regions[0]")
    ok = decode(Region, {"name": "r", "pages": 4, "kind": "file", "image": "os", "image_offset": 3,
                         "compress": [0.3, 0.6]}, path="guest.regions[0]")
    assert (ok.image, ok.image_offset, ok.compress, ok.zero_writes) == ("os", 3, [0.3, 0.6], False)


def test_host_sharing_keys_in_the_schema() -> None:
    from balloonlab.hostd.memconfig import host_memory_config
    from balloonlab.proto.schema import SchemaError
    cfg = host_memory_config({"page_sharing": True, "share_scan_pages_per_s": 20000})
    assert cfg.page_sharing and cfg.share_scan_pages_per_s == 20000
    assert not host_memory_config({}).page_sharing
    with pytest.raises(SchemaError, match="share_scan_pages_per_s: has no effect without page_sharing"):
        host_memory_config({"share_scan_pages_per_s": 20000})
    with pytest.raises(SchemaError, match="share_scan_pages_per_s"):
        host_memory_config({"page_sharing": True, "share_scan_pages_per_s": 0})
