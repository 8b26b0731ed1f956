"""The scenario schema: exact error paths, suggestions for typos, one MiB -> pages, the JSON Schema."""
from __future__ import annotations

import inspect
import json
import tomllib
from pathlib import Path

import jsonschema
import msgspec
import pytest

from balloonlab.guestd.config import guest_config_from_mapping
from balloonlab.guestd.workload.generators import WORKLOADS
from balloonlab.hostd.memconfig import host_memory_config
from balloonlab.proto import schema
from balloonlab.proto.errors import ConfigError
from balloonlab.scenario import SCENARIO_DIR, Overrides, load_scenario
from balloonlab.validators import VALIDATORS

BASE = """\
[scenario]
ticks = 3
guests = 2
[guest]
ram_mib = 8
regions = [{ name = "db", kind = "file", mib = 2 }, { name = "heap", kind = "anon", mib = 2 }]
workload = [{ kind = "anon-hot", region = "heap" }, { kind = "db", region = "db", weight = 3 }]
"""


def load(tmp_path: Path, text: str, name: str = "s.toml", **over: object):
    path = tmp_path / name
    path.write_text(text)
    return load_scenario(path, Overrides(**over), VALIDATORS)


def error(tmp_path: Path, text: str, **over: object) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, **over)
    return str(e.value)


@pytest.mark.parametrize("edit, expected", [
    # the issue's own example: a typo inside the second workload of [guest]
    (("weight = 3", "wieght = 3"),
     "s.toml: guest.workload[1].wieght: unknown key; did you mean 'weight'? known: "
     "['overwrite_frac', 'region', 'theta', 'weight', 'write_frac']"),
    (("[scenario]", "[scenario]\nguets = 3"), "s.toml: scenario.guets: unknown key; did you mean 'guests'?"),
    (("[guest]", "[hots]\nram_mib = 1\n[guest]"), "s.toml: hots: unknown table; did you mean 'host'"),
    (("[guest]", "[host]\novercomit = 1.5\n[guest]"), "s.toml: host.overcomit: unknown key; did you mean 'overcommit'?"),
    (("[guest]", "[host]\ninvariant = \"ful\"\n[guest]"),
     "s.toml: host.invariant: must be one of ['sample', 'full'], got 'ful'; did you mean 'full'?"),
    (("[guest]", "[locks]\nprotocol = \"ordred\"\n[guest]"),
     "s.toml: locks.protocol: must be one of ['naive', 'ordered', 'no-callback-under-lock'], got 'ordred'; "
     "did you mean 'ordered'?"),
    (("kind = \"db\"", "kind = \"bd\""), "s.toml: guest.workload[1].kind: must be one of ['db', 'zipf', "),
    (("[guest]", "[disk.vdisk]\nprofile = \"sdd\"\n[guest]"),
     "s.toml: disk.vdisk.profile: unknown disk profile 'sdd'; did you mean 'ssd'"),
    (("[guest]", "[host]\nrequest_order = \"arival\"\n[guest]"),
     "s.toml: host.request_order: unknown request order 'arival'; did you mean 'arrival'?"),
    (("[guest]", "[host]\nvictim = \"clok\"\n[guest]"),
     "s.toml: host.victim: unknown victim policy 'clok'; did you mean 'clock'? known: ['clock', 'random']"),
    (("[guest]", "[balloon]\npolicy = \"proportinal\"\n[guest]"),
     "s.toml: balloon.policy: balloon policy 'proportinal' is unknown; did you mean 'proportional'?"),
    (("[guest]", "[balloon]\npolicy = \"mom\"\nparams = { presure_rate = 1.0 }\n[guest]"),
     "s.toml: balloon.params: balloon policy 'mom': unknown parameter(s) ['presure_rate']; "
     "did you mean 'pressure_rate'"),
    (("[guest]", "[monitors.swap_strom]\n[guest]"), "s.toml: monitors.swap_strom: unknown monitor; did you mean 'swap_storm'?"),
])
def test_a_typo_gets_a_suggestion_at_its_exact_path(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    text = BASE.replace(*edit)
    assert text != BASE
    assert expected in error(tmp_path, text)


@pytest.mark.parametrize("edit, expected", [
    (("weight = 3", "weight = -1"), "s.toml: guest.workload[1].weight: must be > 0, got -1"),
    (("weight = 3", "weight = \"3\""), "s.toml: guest.workload[1].weight: expected a number, got a string '3'"),
    (("ram_mib = 8", "ram_mib = true"), "s.toml: guest.ram_mib: expected a number, got a boolean True"),
    (("guests = 2", "guests = 2.5"), "s.toml: scenario.guests: expected an integer, got a number 2.5"),
    (("mib = 2 }, { name = \"heap\"", "mib = 2, pages = 3 }, { name = \"heap\""),
     "s.toml: guest.regions[0]: give mib or pages, not both"),
    (("region = \"heap\" }", "region = \"hepa\" }"),
     "guest 0: guest.workload[0].region: unknown region 'hepa'; did you mean 'heap'? known: ['db', 'heap']"),
    (("ticks = 3", "ticks = 3\nduration_s = 1.0"), "s.toml: scenario: give duration_s or ticks, not both"),
    (("[guest]", "[[guests]]\nids = [1]\nram_mib = -4\n[guest]"), "s.toml: guests[0].ram_mib: must be > 0, got -4"),
    (("[guest]", "[[guests]]\npolicy = \"lru\"\n[guest]"), "s.toml: guests[0]: needs `id = N` or `ids = [..]`"),
    (("[guest]", "[variants.a]\nballoon = { max_percent = 120 }\n[guest]"),
     "s.toml: variants.a.balloon.max_percent: must be <= 100, got 120"),
    (("[guest]", "[variants.a]\nhots = { ram_mib = 1 }\n[guest]"), "s.toml: variants.a.hots: unknown key; did you mean 'host'"),
    (("[guest]", "[host]\ncluster_kib = 6\n[guest]"), "s.toml: host.cluster_kib: must be a multiple of 4, got 6"),
])
def test_an_error_names_the_exact_key_and_the_value(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    text = BASE.replace(*edit)
    assert text != BASE
    assert expected in error(tmp_path, text)


def test_an_empty_workload_is_refused_where_it_is(tmp_path: Path) -> None:
    text = BASE.replace("workload = [{ kind = \"anon-hot\", region = \"heap\" }, { kind = \"db\", region = \"db\", "
                        "weight = 3 }]", "workload = []")
    assert "s.toml: guest.workload: must not be empty" in error(tmp_path, text)


def test_the_base_scenario_loads_and_every_shipped_scenario_is_valid(tmp_path: Path) -> None:
    s = load(tmp_path, BASE)
    assert [w["kind"] for w in s.run_config("default", "r")["guests"][0]["workload"]] == ["anon-hot", "db"]
    shipped = sorted(SCENARIO_DIR.glob("*.toml"))
    assert len(shipped) >= 10
    for path in shipped:
        loaded = load_scenario(path, Overrides(), VALIDATORS)
        for variant in loaded.variants:
            assert loaded.run_config(variant, "r")["ticks"] >= 1


def test_mib_become_pages_once_the_same_on_the_host_and_in_a_guest() -> None:
    # 0.3 MiB is 76.8 pages: the nearest page is 77 on both sides (the host used to truncate to 76).
    assert schema.mib_to_pages(0.3) == 77 and schema.mib_to_pages(16) == 4096 and schema.mib_to_pages(0.25) == 64
    host = host_memory_config({"ram_mib": 0.3, "swap_mib": 0.3, "cache_max_mib": 0.3})
    assert host.ram_pages == host.swap_pages == host.cache_max_pages == 77
    guest = guest_config_from_mapping({"ram_mib": 0.3, "kernel_mib": 0.01,
                                       "regions": [{"name": "h", "kind": "anon", "mib": 0.1}]})
    assert guest.ram_pages == 77 and guest.kernel.kernel_pages == 3     # 2.56 -> 3
    assert guest.kernel.layout.regions[0].pages == 26                  # 25.6 -> 26
    for mib in (0.1, 0.3, 1.7, 2.999, 64, 100.01):
        h = host_memory_config({"ram_mib": mib}).ram_pages
        g = guest_config_from_mapping({"ram_mib": mib, "kernel_mib": 0,
                                       "regions": [{"name": "h", "kind": "anon", "mib": 0.05}]}).ram_pages
        assert h == g == round(mib * 256), mib


def test_the_run_config_sizes_a_guest_as_the_guest_does(tmp_path: Path) -> None:
    s = load(tmp_path, BASE.replace("ram_mib = 8", "ram_mib = 7.3"))
    g = s.run_config("default", "r")["guests"][0]
    assert g["ram_pages"] == guest_config_from_mapping(g).ram_pages == 1869     # 1868.8


def test_guests_of_one_table_share_one_config_build_and_a_bad_one_is_still_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import balloonlab.guestd.config as guest_config
    import balloonlab.validators as validators
    builds = []

    def counted(raw, where="guest"):
        builds.append(where)
        return guest_config_from_mapping(raw, where=where)
    monkeypatch.setattr(guest_config, "guest_config_from_mapping", counted)
    monkeypatch.setattr(validators, "_CONFIGS", {})
    s = load(tmp_path, BASE.replace("guests = 2", "guests = 5"))
    guests = s.run_config("default", "r")["guests"]
    sizes = {validators.guest_sizes(g) for g in guests} | {validators.guest_sizes(dict(g, id=99, seed=7))
                                                         for g in guests}
    areas = {validators.guest_swap_area(g) for g in guests}
    assert len(builds) == 1 and len(sizes) == 1 and len(areas) == 1   # checked, sized and placed: one build
    other = dict(guests[0], ram_mib=16)
    assert validators.guest_sizes(other)[0] == 4096 and len(builds) == 2
    bad = dict(guests[0], ram_mib=-1)
    for where in ("guest 3", "guest 4"):   # never kept: each is refused in its own words
        with pytest.raises(ConfigError, match=where):
            VALIDATORS["guest"](bad, where)
    assert len(builds) == 4
    validators.reset_guest_configs()        # a new launch: built afresh (a plugin file may have changed)
    validators.guest_sizes(guests[0])
    assert len(builds) == 5


def test_the_json_schema_validates_the_shipped_scenarios_and_refuses_typos() -> None:
    doc = schema.json_schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    validator = jsonschema.Draft202012Validator(doc)
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        errors = list(validator.iter_errors(tomllib.loads(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])
    bad = tomllib.loads(BASE.replace("weight = 3", "wieght = 3"))
    assert any("wieght" in e.message for e in validator.iter_errors(bad))
    bad = tomllib.loads(BASE.replace("kind = \"db\"", "kind = \"bd\""))
    assert list(validator.iter_errors(bad))


def test_schema_defaults_are_the_generators_defaults() -> None:
    # The generators keep their own defaults (a library caller builds them directly): they must agree.
    for kind, struct in schema.WORKLOAD_KINDS.items():
        sig = inspect.signature(WORKLOADS[kind]).parameters
        for f in msgspec.structs.fields(struct):
            if f.name in ("region", "weight", "overwrite_frac") or f.name in ("path", "program"):
                continue        # every kind's keys (overwrite_frac: guestd.workload.FullWrites, around it)
            assert f.name in sig, (kind, f.name)
            assert sig[f.name].default == f.default, (kind, f.name, sig[f.name].default, f.default)


def test_the_hosts_choices_are_the_schemas() -> None:
    import typing

    from balloonlab.hostd.balloon.decision import LOG_DECISIONS
    from balloonlab.hostd.invariant import INVARIANT_MODES
    from balloonlab.proto.locks import HOLD_VMEM_CHOICES

    def literal(struct: type, name: str) -> tuple[str, ...]:
        tp = next(f.type for f in msgspec.structs.fields(struct) if f.name == name)
        while typing.get_origin(tp) is typing.Annotated or type(tp).__name__ == "UnionType" \
                or typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return typing.get_args(tp)

    from balloonlab.hostd.memstate import MEMORY_STATES_MODES, VICTIM_SCOPES
    from balloonlab.hostd.vdisk import CACHE_MODES
    assert literal(schema.HostTable, "invariant") == INVARIANT_MODES
    assert literal(schema.HostTable, "memory_states") == MEMORY_STATES_MODES     # the first is the default
    assert literal(schema.HostTable, "victim_scope") == VICTIM_SCOPES
    assert set(literal(schema.HostTable, "vdisk_cache")) == set(CACHE_MODES)
    assert literal(schema.BalloonTable, "log_decisions") == LOG_DECISIONS
    assert literal(schema.LocksTable, "hold_vmem") == HOLD_VMEM_CHOICES


def test_the_hosts_defaults_are_the_schemas() -> None:
    # hostd keeps named constants for a library caller that builds its parts directly: they must agree.
    from balloonlab.hostd import hostcache
    from balloonlab.hostd.memstate import MEMORY_STATES_MODES, VICTIM_SCOPES
    cfg = host_memory_config({})
    assert cfg.vdisk_cache == hostcache.CACHE_MODE_DEFAULT == "writethrough"
    assert (cfg.dirty_expire_ms, cfg.dirty_writeback_ms, cfg.dirty_background_pct, cfg.dirty_pct) == (
        hostcache.DIRTY_EXPIRE_MS_DEFAULT, hostcache.DIRTY_WRITEBACK_MS_DEFAULT,
        hostcache.DIRTY_BACKGROUND_PCT_DEFAULT, hostcache.DIRTY_PCT_DEFAULT)
    assert (cfg.memory_states, cfg.victim_scope) == (MEMORY_STATES_MODES[0], VICTIM_SCOPES[0])
    assert cfg.low_watermark_pct is None and cfg.min_free_pct is None


@pytest.mark.parametrize("table, expected", [
    ({"vdisk_cache": "writeback"}, None),
    ({"vdisk_cache": "write-back"}, "host.vdisk_cache: must be one of ['writethrough', 'writeback', 'none'], "
                                    "got 'write-back'; did you mean 'writeback'?"),
    ({"dirty_pct": 5}, "host.dirty_background_pct: 10.0 must be below dirty_pct = 5"),
    ({"dirty_background_pct": 101}, "host.dirty_background_pct: must be <= 100, got 101"),
    ({"dirty_writeback_ms": 0}, "host.dirty_writeback_ms: must be > 0, got 0"),
    ({"memory_states": "none", "min_free_pct": 2}, "host.min_free_pct: has no effect with memory_states = \"none\""),
    ({"victim_scop": "vm"}, "host.victim_scop: unknown key; did you mean 'victim_scope' or 'victim'?"),
    ({"request_order": "virtual-time"}, None),
    ({"request_order": "determinstic"}, "host.request_order: unknown request order 'determinstic'; "
                                        "did you mean 'deterministic'?"),
])
def test_the_hosts_new_keys_are_checked_by_the_schema(table: dict, expected: str | None) -> None:
    if expected is None:
        host_memory_config(table)
        return
    with pytest.raises(ConfigError) as e:
        host_memory_config(table)
    assert str(e.value).startswith(expected), str(e.value)


def test_the_deprecated_request_order_resolves() -> None:
    assert host_memory_config({"request_order": "virtual-time"}).resolved_request_order(False) == "deterministic"
    assert host_memory_config({}).resolved_request_order(False) == "deterministic"
    assert host_memory_config({}).resolved_request_order(True) == "arrival"
    with pytest.raises(ConfigError, match=r"host.request_order: \"virtual-time\" cannot go with a \[locks\]"):
        host_memory_config({"request_order": "virtual-time"}).resolved_request_order(True)


def test_the_disk_keys_are_the_device_models() -> None:
    import dataclasses

    from balloonlab.hostd.devices import DeviceProfile
    keys = {f.name for f in msgspec.structs.fields(schema.DiskDevice)}
    assert keys == {f.name for f in dataclasses.fields(DeviceProfile)} | {"profile", "latency_us", "bandwidth_bps"}
    assert {f.name for f in msgspec.structs.fields(schema.DiskTable)} == {"shared", "vdisk", "swap"}


def test_a_guests_dirty_background_ratio_is_a_schema_key(tmp_path: Path) -> None:
    assert guest_config_from_mapping({"dirty_background_ratio": 10}).dirty_background_ratio == 10.0
    assert guest_config_from_mapping({}).dirty_background_ratio == 0.0
    msg = error(tmp_path, BASE.replace("ram_mib = 8", "ram_mib = 8\ndirty_background_ration = 10"))
    assert "guest.dirty_background_ration: unknown key; did you mean 'dirty_background_ratio'?" in msg
    msg = error(tmp_path, BASE.replace("ram_mib = 8", "ram_mib = 8\ndirty_background_ratio = 150"))
    assert "guest.dirty_background_ratio: must be <= 100, got 150" in msg


def test_the_scenario_refuses_swap_too_small_for_the_guests_files(tmp_path: Path) -> None:
    msg = error(tmp_path, BASE + "[host]\nswap_mib = 15\n")
    assert "s.toml: host.swap_mib: swap_mib = 15 cannot hold the guests' swap files" in msg
    load(tmp_path, BASE + "[host]\nswap_mib = 16\n")                      # two guests of 8 MiB


def test_a_new_cost_field_is_a_key() -> None:
    # [costs] is built from CostModel's fields: every field is a key with its default.
    from balloonlab.proto.costs import CostModel
    import dataclasses
    names = {f.name for f in dataclasses.fields(CostModel)}
    assert {f.name for f in msgspec.structs.fields(schema.CostsTable)} == names
    assert CostModel.from_mapping({"mem_ref_us": 2}).mem_ref_us == 2.0
    with pytest.raises(ConfigError, match=r"costs.mem_ref_uss: unknown key; did you mean 'mem_ref_us'\?"):
        CostModel.from_mapping({"mem_ref_uss": 2})


def test_schema_is_printed_by_the_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    from balloonlab.launch import main
    assert main(["--schema"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["title"] == "balloonlab scenario"
    tables = doc["$defs"]["EditorScenario"]["properties"]
    assert {"scenario", "host", "guest", "guests", "balloon", "variants", "sweep"} <= set(tables)
    victim = doc["$defs"]["HostTable"]["properties"]["victim"]
    assert victim["enum"] == ["clock", "random"]                     # from the host's registry
    programs = next(a for a in doc["$defs"]["TraceWorkload"]["properties"]["program"]["anyOf"] if "enum" in a)
    assert {"sort", "python-json"} <= set(programs["enum"])
    validator = jsonschema.Draft202012Validator(doc)
    bad = tomllib.loads(BASE.replace("[guest]", "[host]\nvictim = \"clok\"\n[guest]"))
    assert any("clok" in e.message for e in validator.iter_errors(bad))
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        assert not list(validator.iter_errors(tomllib.loads(path.read_text()))), path.name
    host = doc["$defs"]["HostTable"]["properties"]
    assert {"vdisk_cache", "dirty_expire_ms", "dirty_writeback_ms", "dirty_background_pct", "dirty_pct",
            "memory_states", "min_free_pct", "victim_scope", "low_watermark_pct"} <= set(host)
    assert doc["$defs"]["DiskTable"]["properties"]["shared"]["type"] == "boolean"
    assert doc["$defs"]["DiskDevice"]["properties"]["profile"]["enum"] == ["hdd", "nvme", "ssd"]
    # the tables the host's registries own: each monitor's keys, each built-in policy's params
    monitors = doc["$defs"]["EditorScenario"]["properties"]["monitors"]["properties"]
    assert {"pff_high", "pff_low", "mode"} <= set(monitors["pinning"]["properties"])
    assert {"min_guests", "stall_share", "io_fraction"} <= set(monitors["swap_storm"]["properties"])
    params = {c["if"]["properties"]["policy"]["const"]: c["then"]["properties"]["params"]["properties"]
              for c in doc["$defs"]["BalloonTable"]["allOf"]}
    assert params["squeezed"]["host_free_target_mib"]["default"] == 9.0
    assert params["squeezed"]["host_free_target_mib"]["minimum"] == 0
    assert {"buffer_percent", "weights"} <= set(params["hyperv"]) and "pressure_us" in params["senpai"]
    assert (params["hyperv"]["buffer_percent"]["minimum"], params["hyperv"]["buffer_percent"]["maximum"]) == (5, 2000)
    assert params["proportional"]["tax_rate"]["exclusiveMaximum"] == 1
    # every built-in policy's every parameter says what it means
    undocumented = [f"{pol}.{name}" for pol, props in params.items() for name, p in props.items()
                    if not p.get("description")]
    assert not undocumented, undocumented
    for edit in ("[monitors.pinning]\npff_hihg = 3\n", "[balloon]\npolicy = \"squeezed\"\nparams = { period = 1 }\n",
                 "[balloon]\npolicy = \"proportional\"\nparams = { tax_rate = 1.0 }\n",
                 "[balloon]\npolicy = \"hyperv\"\nparams = { buffer_percent = 3 }\n",
                 "[disk]\nshared = \"yes\"\n", "[host]\nvdisk_cache = \"fast\"\n"):
        assert list(validator.iter_errors(tomllib.loads(BASE + edit))), edit
