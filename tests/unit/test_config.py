"""formation.toml loading: defaults, overrides, and errors that name the file and the key."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from formation.node.config import (
    DEFAULTS,
    Config,
    ConfigError,
    load_config,
    with_tcp_port,
)
from formation.node.settings import SETTINGS, render_toml

REPO_TOML = Path(__file__).resolve().parents[2] / "formation.toml"
PEER = "16Uiu2HAmBZpDp8E4NJ1xAs6SxTXVVH6rtHsmtGpDsyfRWJ9BFuAm"


def write(tmp_path, text, name="formation.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        load_config(str(path), {})
    message = str(exc_info.value)
    assert str(path) in message  # every file error names the file
    return message


# ---- defaults ---------------------------------------------------------------------------------


def test_defaults():
    c = load_config(None, {})
    assert c.node.data_dir == str(Path("~/.local/share/formation").expanduser())
    assert c.node.log_json is False
    assert c.node.password_file is None
    assert (c.api.host, c.api.port) == ("127.0.0.1", 3004)
    assert c.p2p.listen == "/ip4/0.0.0.0/tcp/53333"
    assert c.p2p.bootstrap == ()
    assert (c.p2p.sync_sessions_per_peer, c.p2p.sync_sessions, c.p2p.sync_budget_mb, c.p2p.sync_budget_seconds) == (
        1, 8, 64, 60)
    assert (c.mesh.wireguard_port, c.mesh.overlay_cidr) == (51820, "10.42.0.0/16")
    assert c.dns.port == 5453
    assert c.store.synchronous == "FULL"
    assert c.store.pending_ops_per_source == 25_000
    assert c.store.pending_bytes_per_source == 32 * 1024 * 1024
    assert c.keystore_path == Path(c.node.data_dir) / "operator.key"
    assert c.state_path == Path(c.node.data_dir) / "state.db"


def test_repository_formation_toml_is_exactly_the_defaults():
    assert load_config(str(REPO_TOML), {}) == load_config(None, {})


def test_repository_formation_toml_spells_out_every_setting():
    with REPO_TOML.open("rb") as f:
        doc = tomllib.load(f)
    optional = {("node", "password_file")}  # TOML has no null: documented as a comment instead
    expected = {(s, k) for s in DEFAULTS for k in DEFAULTS[s]} - optional
    assert {(s, k) for s in doc for k in doc[s]} == expected
    assert "password_file" in REPO_TOML.read_text()


def test_repository_formation_toml_is_what_the_declarations_render():
    """One declaration per setting: the shipped file (comments included) follows from it.
    After changing formation/node/settings.py: python -m formation.node.settings > formation.toml"""
    assert REPO_TOML.read_text() == render_toml()


def test_every_declared_setting_is_checked_and_typed():
    c = load_config(None, {})
    for s in SETTINGS:
        assert getattr(getattr(c, s.section), s.key) == (tuple(s.default) if isinstance(s.default, list)
                                                          else s.default) or s.key in ("data_dir",)
        with pytest.raises(ConfigError, match=s.key):
            load_config(None, {s.dotted: {"not": "a valid value"}})


def test_config_is_frozen():
    c = load_config(None, {})
    assert isinstance(c, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.api.port = 1


def test_loading_does_not_change_defaults(tmp_path):
    path = write(tmp_path, f'p2p.bootstrap = ["/ip4/10.0.0.1/tcp/1/p2p/{PEER}"]')
    assert load_config(str(path), {}).p2p.bootstrap == (f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}",)
    assert DEFAULTS["p2p"]["bootstrap"] == []


# ---- files and overrides ----------------------------------------------------------------------


def test_file_overrides_defaults(tmp_path):
    path = write(tmp_path, f"""
[api]
port = 8080
[p2p]
bootstrap = ["/ip4/192.0.2.1/tcp/53333/p2p/{PEER}", "/dns4/fog.example.org/tcp/1/p2p/{PEER}"]
[store]
synchronous = "normal"
""")
    c = load_config(str(path), {})
    assert c.api.port == 8080
    assert c.api.host == "127.0.0.1"  # untouched keys keep their default
    assert c.p2p.bootstrap == (
        f"/ip4/192.0.2.1/tcp/53333/p2p/{PEER}",
        f"/dns4/fog.example.org/tcp/1/p2p/{PEER}",
    )
    assert c.store.synchronous == "NORMAL"


def test_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "[api]\nport = 8080\n")
    assert load_config(str(path), {"api.port": 9090}).api.port == 9090
    assert load_config(str(path), {"api": {"port": 9191}}).api.port == 9191


def test_relative_paths(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, '[node]\ndata_dir = "data"\npassword_file = "secret/pw"\n')
    monkeypatch.chdir(tmp_path)
    c = load_config(str(path), {})
    # relative to the file, not to wherever the node was started
    assert c.node.data_dir == str(conf_dir / "data")
    assert c.node.password_file == str(conf_dir / "secret/pw")
    # an override (a flag) is relative to the current directory
    assert load_config(str(path), {"node.data_dir": "here"}).node.data_dir == str(tmp_path / "here")


def test_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    c = load_config(None, {"node.password_file": "~/pw"})
    assert c.node.password_file == str(tmp_path / "pw")


def test_with_tcp_port():
    assert with_tcp_port("/ip4/0.0.0.0/tcp/53333", 4001) == "/ip4/0.0.0.0/tcp/4001"
    assert with_tcp_port("/ip6/::/tcp/1", 2) == "/ip6/::/tcp/2"


# ---- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as exc_info:
        load_config(str(tmp_path / "nope.toml"), {})
    assert "nope.toml" in str(exc_info.value)


def test_invalid_toml_names_the_file_and_line(tmp_path):
    message = config_error(tmp_path, "[api]\nport = = 3\n")
    assert "not valid TOML" in message and "line 2" in message


def test_unknown_section(tmp_path):
    message = config_error(tmp_path, "[apii]\nport = 1\n")
    assert "unknown section [apii]" in message and "'api'" in message


def test_unknown_key(tmp_path):
    message = config_error(tmp_path, "[api]\nhots = '0.0.0.0'\n")
    assert "api.hots" in message and "did you mean 'host'" in message


def test_top_level_key_is_not_a_section(tmp_path):
    message = config_error(tmp_path, "port = 3\n")
    assert "unknown section [port]" in message


def test_section_must_be_a_table(tmp_path):
    message = config_error(tmp_path, "api = 3\n")
    assert "api" in message and "expected a table" in message


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ('[api]\nport = "3004"\n', "api.port", "expected an integer"),
        ("[api]\nport = true\n", "api.port", "expected an integer"),
        ("[api]\nport = 3004.0\n", "api.port", "expected an integer"),
        ("[api]\nport = 0\n", "api.port", "1 to 65535"),
        ("[api]\nport = 70000\n", "api.port", "1 to 65535"),
        ("[dns]\nport = -1\n", "dns.port", "1 to 65535"),
        ("[mesh]\nwireguard_port = 65536\n", "mesh.wireguard_port", "1 to 65535"),
        ('[api]\nhost = ""\n', "api.host", "non-empty string"),
        ('[api]\nhost = "not a host"\n', "api.host", "IP address or host name"),
        ('[node]\nlog_json = "yes"\n', "node.log_json", "true or false"),
        ("[node]\ndata_dir = 5\n", "node.data_dir", "non-empty string"),
        ('[node]\npassword_file = ""\n', "node.password_file", "non-empty string"),
        ('[p2p]\nlisten = "0.0.0.0:53333"\n', "p2p.listen", "multiaddr"),
        ('[p2p]\nlisten = "/ip4/0.0.0.0/udp/53333"\n', "p2p.listen", "multiaddr"),
        ('[p2p]\nlisten = "/ip4/300.0.0.1/tcp/53333"\n', "p2p.listen", "IPv4"),
        ('[p2p]\nlisten = "/ip4/0.0.0.0/tcp/99999"\n', "p2p.listen", "TCP port"),
        ('[p2p]\nbootstrap = "/ip4/1.2.3.4/tcp/1"\n', "p2p.bootstrap", "array"),
        ("[p2p]\nbootstrap = [1]\n", "p2p.bootstrap", "item 0"),
        ('[p2p]\nbootstrap = ["/ip4/1.2.3.4/tcp/1"]\n', "p2p.bootstrap", "PEER_ID"),
        ('[p2p]\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/0OIl"]\n', "p2p.bootstrap", "peer id"),
        ('[mesh]\noverlay_cidr = "10.42.0.1/16"\n', "mesh.overlay_cidr", "10.42.0.0/16"),
        ('[mesh]\noverlay_cidr = "banana"\n', "mesh.overlay_cidr", "network"),
        ('[store]\nsynchronous = "FAST"\n', "store.synchronous", "OFF, NORMAL, FULL, EXTRA"),
        ("[store]\npending_ops_per_source = 0\n", "store.pending_ops_per_source", "positive"),
        ('[store]\npending_bytes_per_source = "64M"\n', "store.pending_bytes_per_source",
         "integer"),
    ],
)
def test_bad_values_name_the_key_and_what_is_expected(tmp_path, text, key, expected):
    message = config_error(tmp_path, text)
    assert key in message
    assert expected in message


def test_bad_override_names_the_flag():
    with pytest.raises(ConfigError) as exc_info:
        load_config(None, {"p2p.bootstrap": ["nope"]},
                    override_names={"p2p.bootstrap": "--bootstrap"})
    message = str(exc_info.value)
    assert "--bootstrap" in message and "p2p.bootstrap" in message


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="api.prot"):
        load_config(None, {"api.prot": 1})


def test_host_names_are_checked_by_the_one_definition():
    assert load_config(None, {"api.host": "node.example.org."}).api.host == "node.example.org."
    for bad in ("node.example.org\n", "-node.example.org", "a" * 64 + ".org"):
        with pytest.raises(ConfigError, match="api.host"):
            load_config(None, {"api.host": bad})
