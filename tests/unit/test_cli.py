"""The `form` command: node identity, key management, and errors without tracebacks."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from formation import cli
from formation.cli import node as node_command
from formation.cli import output
from formation.crdt.keys import PrivateKey, format_address, to_checksum
from formation.keystore import load_keystore
from formation.node.setup import NodeIdentity

SECRET_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
SECRET_ADDRESS = to_checksum(PrivateKey(bytes.fromhex(SECRET_HEX)).address)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("FORMATION_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default data dir must not be touched


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv("FORMATION_PASSWORD", "s3cret")
    return "s3cret"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


# ---- form node --------------------------------------------------------------------------------


def test_first_run_creates_key_and_state(capsys, tmp_path, password):
    data = tmp_path / "data"
    code, out, err = run(capsys, "node", "--once", "--data-dir", str(data))
    assert code == 0, err
    assert (data / "operator.key").is_file()
    assert (data / "state.db").is_file()
    key = load_keystore(data / "operator.key", password)
    rows = table(out)
    assert rows["address"] == to_checksum(key.address)
    assert rows["data dir"] == str(data)
    assert rows["ops"] == "0"
    assert rows["heads"] == "0"
    assert len(rows["state hash"]) == 16
    assert "created a new operator key" in err


def test_second_run_has_the_same_identity(capsys, tmp_path, password):
    data = str(tmp_path / "data")
    _, first, _ = run(capsys, "node", "--once", "--data-dir", data)
    code, second, err = run(capsys, "node", "--once", "--data-dir", data)
    assert code == 0
    assert table(second)["address"] == table(first)["address"]
    assert "created" not in err


def test_json_output(capsys, tmp_path, password):
    data = tmp_path / "data"
    code, out, _ = run(capsys, "node", "--once", "--data-dir", str(data), "--json")
    assert code == 0
    doc = json.loads(out)
    key = load_keystore(data / "operator.key", password)
    assert doc["address"] == to_checksum(key.address)
    assert doc["data_dir"] == str(data)
    assert (doc["ops"], doc["heads"]) == (0, 0)
    assert len(bytes.fromhex(doc["state_hash"])) == 32
    assert doc["created_key"] is True


def test_ops_and_state_hash_reflect_the_store(capsys, tmp_path, password):
    from formation.crdt.store import Store

    data = tmp_path / "data"
    run(capsys, "node", "--once", "--data-dir", str(data))
    node = PrivateKey(b"\x07" * 32)
    address = format_address(node.address)
    store = Store(str(data / "state.db"))
    try:  # a heartbeat: a fact a node may write about itself
        store.write(node, "node", address, {"address": address, "heartbeat": 1}, now_ms=1)
        expected_hash = store.state_hash().hex()
    finally:
        store.close()
    code, out, _ = run(capsys, "node", "--once", "--data-dir", str(data), "--json")
    doc = json.loads(out)
    assert doc["ops"] == 1
    assert doc["heads"] == 1
    assert doc["state_hash"] == expected_hash


def test_wrong_password(capsys, tmp_path, monkeypatch, password):
    data = str(tmp_path / "data")
    run(capsys, "node", "--once", "--data-dir", data)
    monkeypatch.setenv("FORMATION_PASSWORD", "not it")
    code, out, err = run(capsys, "node", "--once", "--data-dir", data)
    assert code == 1
    assert out == ""
    assert err.strip() == f"form: error: wrong password for keystore {Path(data) / 'operator.key'}"


def test_no_password_source_explains_what_to_do(capsys, tmp_path):
    code, _, err = run(capsys, "node", "--once", "--data-dir", str(tmp_path / "data"))
    assert code == 1
    assert err.startswith("form: error: ")
    assert "FORMATION_PASSWORD" in err and "password_file" in err
    assert not (tmp_path / "data" / "operator.key").exists()


def test_password_file_from_config(capsys, tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    conf = tmp_path / "formation.toml"
    conf.write_text('[node]\ndata_dir = "data"\npassword_file = "pw"\n')
    code, out, err = run(capsys, "node", "--once", "--config", str(conf))
    assert code == 0, err
    key = load_keystore(tmp_path / "data" / "operator.key", "from-file")
    assert table(out)["address"] == to_checksum(key.address)


def test_corrupt_keystore(capsys, tmp_path, password):
    data = tmp_path / "data"
    data.mkdir()
    (data / "operator.key").write_text("{not json")
    code, _, err = run(capsys, "node", "--once", "--data-dir", str(data))
    assert code == 1
    assert "operator.key is corrupt" in err


def test_corrupt_state_store(capsys, tmp_path, password):
    data = tmp_path / "data"
    run(capsys, "node", "--once", "--data-dir", str(data))
    (data / "state.db").write_bytes(b"this is not a database" * 100)
    code, _, err = run(capsys, "node", "--once", "--data-dir", str(data))
    assert code == 1
    assert "cannot open state store" in err and "state.db" in err


def test_data_dir_that_is_a_file(capsys, tmp_path, password):
    path = tmp_path / "file"
    path.write_text("")
    code, _, err = run(capsys, "node", "--once", "--data-dir", str(path))
    assert code == 1
    assert "not a directory" in err


def test_bad_config_is_a_usage_error(capsys, tmp_path, password):
    conf = tmp_path / "formation.toml"
    conf.write_text("[api]\nport = 99999\n")
    code, _, err = run(capsys, "node", "--once", "--config", str(conf), "--data-dir", str(tmp_path / "d"))
    assert code == 2
    assert err.startswith("form: error: ") and "api.port" in err and str(conf) in err
    assert not (tmp_path / "d").exists()  # nothing is created before the config is valid


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "node", "--once", "--config", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "nope.toml" in err and "does not exist" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["node", "--api-port", "70000"], "--api-port"),
        (["node", "--api-port", "http"], "--api-port"),
        (["node", "--p2p-port", "0"], "--p2p-port"),
        (["node", "--bootstrap", "localhost:53333"], "--bootstrap"),
        (["node", "--frobnicate"], "--frobnicate"),
        (["launch"], "launch"),
        (["key", "import"], "--data-dir"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, tmp_path, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "form: error: " in err and fragment in err


def test_flags_override_config(capsys, tmp_path, password, monkeypatch):
    seen = {}

    def fake_run_node(config, **_):
        seen["config"] = config
        return NodeIdentity("0x0", str(config.data_dir), 0, 0, "00" * 32, False)

    monkeypatch.setattr(node_command, "run_node", fake_run_node)
    peer = "/ip4/192.0.2.1/tcp/53333/p2p/16Uiu2HAmBZpDp8E4NJ1xAs6SxTXVVH6rtHsmtGpDsyfRWJ9BFuAm"
    code, _, err = run(capsys, "node", "--once", "--data-dir", str(tmp_path), "--api-port", "4000",
                       "--p2p-port", "4001", "--bootstrap", peer)
    assert code == 0, err
    config = seen["config"]
    assert config.api.port == 4000
    assert config.p2p.listen == "/ip4/0.0.0.0/tcp/4001"
    assert config.p2p.bootstrap == (peer,)


def test_help_everywhere(capsys):
    for argv in ([], ["node"], ["key"], ["key", "show"], ["key", "import"]):
        code, out, _ = run(capsys, *argv, "--help")
        assert code == 0
        assert out.startswith("usage: form")


def test_no_command_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "node" in err and "key" in err


# ---- form key ---------------------------------------------------------------------------------


def test_key_show(capsys, tmp_path, password):
    data = str(tmp_path / "data")
    _, out, _ = run(capsys, "node", "--once", "--data-dir", data)
    code, shown, _ = run(capsys, "key", "show", "--data-dir", data)
    assert code == 0
    assert shown.strip() == table(out)["address"]
    code, shown, _ = run(capsys, "key", "show", "--data-dir", data, "--json")
    assert json.loads(shown)["address"] == table(out)["address"]


def test_key_show_without_keystore(capsys, tmp_path, password):
    code, _, err = run(capsys, "key", "show", "--data-dir", str(tmp_path))
    assert code == 1
    assert "no keystore" in err


def test_key_import(capsys, tmp_path, monkeypatch, password):
    data = tmp_path / "data"
    monkeypatch.setattr(sys, "stdin", io.StringIO("0x" + SECRET_HEX + "\n"))
    code, out, err = run(capsys, "key", "import", "--data-dir", str(data))
    assert code == 0, err
    assert out.strip() == SECRET_ADDRESS
    assert load_keystore(data / "operator.key", password).secret.hex() == SECRET_HEX
    # the node then runs with the imported identity
    _, out, _ = run(capsys, "node", "--once", "--data-dir", str(data))
    assert table(out)["address"] == SECRET_ADDRESS


def test_key_import_refuses_to_overwrite(capsys, tmp_path, monkeypatch, password):
    data = str(tmp_path / "data")
    run(capsys, "node", "--once", "--data-dir", data)
    before = (Path(data) / "operator.key").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET_HEX))
    code, _, err = run(capsys, "key", "import", "--data-dir", data)
    assert code == 1
    assert "already exists" in err
    assert (Path(data) / "operator.key").read_bytes() == before


@pytest.mark.parametrize("text", ["", "zz" * 32, SECRET_HEX[:-2], "00" * 32])
def test_key_import_rejects_bad_input_without_echoing_it(capsys, tmp_path, monkeypatch, password,
                                                         text):
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, _, err = run(capsys, "key", "import", "--data-dir", str(tmp_path / "data"))
    assert code == 1
    assert err.startswith("form: error: ")
    if text:
        assert text not in err
    assert not (tmp_path / "data" / "operator.key").exists()


# ---- output: tables piped and in a terminal ------------------------------------------------------

ADDRESS = "0x" + "ab" * 20
COLUMNS = [("ADDRESS", lambda r: r["address"]), ("STATE", lambda r: r["state"]),
           ("IP", lambda r: r["ip"])]
ROWS = [{"address": ADDRESS, "state": "running", "ip": "10.0.0.2"},
        {"address": "0x12", "state": "failed", "ip": None}]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_piped_tables_are_plain_text_even_when_colour_is_forced(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "30")  # a terminal's width does not apply to a pipe
    output.table(ROWS, COLUMNS, "no rows")
    output.fields([("address", ADDRESS), ("data dir", "/d")])
    output.table([], COLUMNS, "no rows")
    with output.progress("working") as bar:  # nothing at all when stderr is not a terminal
        bar.update("still working", completed=1, total=2)
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "ADDRESS" + " " * 37 + "STATE    IP",
        f"{ADDRESS}  running  10.0.0.2",
        "0x12" + " " * 40 + "failed   -",
        f"address   {ADDRESS}",
        "data dir  /d",
        "no rows",
    ]


def test_terminal_tables_fold_long_values_and_keep_short_ones_whole(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("COLUMNS", "40")
    output.table(ROWS, COLUMNS, "no rows")
    text = terminal.getvalue()
    assert "\x1b[1mADDRESS" in text  # bold headers
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    assert max(map(len, lines)) <= 40
    assert lines[0].split() == ["ADDRESS", "STATE", "IP"] and set(lines[1]) == {"─"}
    gap = next(i for i in range(2, len(lines)) if not lines[i].strip())
    first_row = lines[2:gap]  # rows are a blank line apart when they wrap
    assert "".join(line.split()[0] for line in first_row) == ADDRESS  # folded, never cut
    assert first_row[0].split()[1:] == ["running", "10.0.0.2"]
    assert lines[-1].split() == ["0x12", "failed", "-"]


# ---- the installed console script -------------------------------------------------------------


def test_console_script_in_a_real_process(tmp_path):
    script = Path(sys.executable).with_name("form")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "formation.cli"]
    env = {**os.environ, "FORMATION_PASSWORD": "s3cret", "HOME": str(tmp_path)}
    data = tmp_path / "data"
    done = subprocess.run([*command, "node", "--once", "--data-dir", str(data), "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["address"] == to_checksum(load_keystore(data / "operator.key", "s3cret").address)

    env["FORMATION_PASSWORD"] = "wrong"
    done = subprocess.run([*command, "node", "--once", "--data-dir", str(data)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("form: error: wrong password")
    assert "Traceback" not in done.stderr
