"""No USER password in clear in any op, end to end: the README's way (a signed curl with a clear
password) is refused with what to do; the CLI's way (`form pack build/ship`, `form agent
register --formfile`) hashes before sending, so a real node's SQLite file (and its WAL) never
holds the password. And a Formfile's `MODEL required:<id>` naming no model is refused by the
node the create reaches (422), before anything is built by `form pack ship`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formation.client import AsyncClient
from formation.crdt.passwords import clear_passwords, is_crypt_hash
from formation.pack.formfile import parse
from tests.api.conftest import vm_node
from tests.api.test_seed import curl, key
from tests.unit.test_pack_cli import cfg, form  # noqa: F401 (fixtures: a wallet and the `form` runner)

SECRET_PW = "Sup3r-Secret-PW"
FORMFILE = (f"NAME web\nVCPU 1\nUSER username:alice passwd:{SECRET_PW} \\\n    sudo:yes\n"
            "COPY app.txt /srv/app.txt\nRUN echo hello\n")


@pytest.fixture
def app_dir(tmp_path):
    d = tmp_path / "app"
    d.mkdir()
    (d / "Formfile").write_text(FORMFILE)
    (d / "app.txt").write_text("hello\n")
    return d


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# ---- the README's way -------------------------------------------------------------------------

@pytest.mark.parametrize("path, field", [("/instance/create", "formfile"), ("/agents", "formfile"),
                                         ("/agents", "formfile_template"), ("/models", "formfile_template")])
async def test_a_signed_request_with_a_clear_password_is_refused(vnode, path, field):
    for user_line in (f"USER username:a passwd={SECRET_PW}", f"USER username:a 'passwd:{SECRET_PW}'",
                      f"USER username:a \\\n  passwd:{SECRET_PW}", "USER username:a 'passwd:unclosed"):
        body = json.dumps({"name": "web", field: f"NAME web\n{user_line}\n"}).encode()
        r = await curl(vnode, key(1), "POST", path, body)
        assert r.status_code == 400 and r.json()["error"] == "bad_field", r.text
        assert f"field '{field}': line 2:" in r.json()["detail"]
        assert "form pack build/ship` does it for you" in r.json()["detail"] and SECRET_PW not in r.text
    assert await vnode.astore.list("instance", limit=5) == [] and await vnode.astore.list("agent", limit=5) == []


# ---- the CLI's way ------------------------------------------------------------------------------

async def test_the_cli_hashes_before_sending_and_the_node_keeps_no_password(form, cfg, tmp_path, app_dir):  # noqa: F811
    root = tmp_path / "vm"
    async with vm_node(root) as rt:
        await form("kit", "init", "--node", rt.base_url)
        doc = await form.json("pack", "build", str(app_dir), "--quiet")
        assert doc["state"] == "done"
        again = await form.json("pack", "build", str(app_dir), "--quiet")  # the same text: a cache hit
        assert again["build_id"] == doc["build_id"]
        shipped = await form.json("pack", "ship", str(app_dir), "--no-wait", "--quiet")
        assert shipped["build_id"] == doc["build_id"]
        inst = await rt.astore.get("instance", shipped["instance_id"])
        sent = inst["formfile"]
        assert SECRET_PW not in sent and clear_passwords(sent) == []
        alice = parse(sent).users[0]
        assert alice.sudo and is_crypt_hash(alice.passwd) and alice.passwd.startswith("$y$")
        assert sent.count("\n") == FORMFILE.count("\n")  # line for line: build errors name the same lines
        assert (app_dir / "Formfile").read_text() == FORMFILE  # the file on disk is not changed

        # a catalog record's Formfiles too: --formfile, and formfile_template in the record file
        (tmp_path / "agent.toml").write_text(
            f'name = "a"\nformfile_template = "USER username:bob passwd={SECRET_PW}"\n')
        res = await form.json("agent", "register", str(tmp_path / "agent.toml"),
                              "--formfile", str(app_dir / "Formfile"))
        agent = await rt.astore.get("agent", res["id"])
        assert clear_passwords(agent["formfile"]) == [] and clear_passwords(agent["formfile_template"]) == []
        # a password the CLI cannot hash is not sent at all
        (tmp_path / "bad.toml").write_text('name = "b"\nformfile = "USER username:bob \'passwd:x"\n')
        _, _, err = await form("agent", "register", str(tmp_path / "bad.toml"), code=2)
        assert "line 1: a USER line that cannot be split" in err and "nothing was sent" in err

        # the node's files: its op log (SQLite and its WAL), the builds, the images
        db = root / "node" / "state.db"
        assert db.exists()
        wal = db.with_name("state.db-wal")
        logged = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
        assert b"username:alice" in logged and b"$y$" in logged  # the Formfile is there, hashed
        assert SECRET_PW.encode() not in logged
        assert files_holding(root, SECRET_PW.encode()) == []
        assert files_holding(root, b"Sup3r") == []


# ---- MODEL required ----------------------------------------------------------------------------

async def test_a_required_model_must_exist_on_the_node(vnode):
    owner, other = AsyncClient(vnode.base_url, key(1)), AsyncClient(vnode.base_url, key(2))

    async def create(path, formfile, who=1):
        return await curl(vnode, key(who), "POST", path, json.dumps({"name": "web", "formfile": formfile}).encode())

    for path in ("/instance/create", "/agents"):
        r = await create(path, "NAME web\nMODEL required:ghost\n")
        assert r.status_code == 422 and r.json()["error"] == "unknown_model", r.text
        detail = r.json()["detail"]
        assert "line 2: MODEL required:ghost" in detail and "form model list" in detail and "GET /models" in detail
        assert (await create(path, "NAME web\nMODEL preferred:ghost\n")).status_code in (201, 202)
    mid = (await owner.post("/v1/models", {"name": "llama"}))["id"]
    r = await create("/agents", f"NAME web\nMODEL required:{mid}\n")
    assert r.status_code == 201, r.text
    aid = r.json()["id"]
    shown = await other.get(f"/v1/agents/{aid}")
    assert (shown["model_id"], shown["model_required"]) == (mid, True)
    r = await create("/instance/create", f"NAME web\nMODEL required:{mid}\n")
    iid = r.json()["id"]
    assert r.status_code == 202 and (await owner.get(f"/v1/instance/{iid}/get"))["model_id"] == mid
    # a private model the signer may not see is not there for them
    pid = (await owner.post("/v1/models", {"name": "secret", "is_private": True}))["id"]
    r = await create("/agents", f"NAME web\nMODEL required:{pid}\n", who=2)
    assert r.status_code == 422 and r.json()["error"] == "unknown_model"
    # an update that keeps the binding is not checked again (the model may be gone since)
    await owner.delete(f"/v1/models/{mid}")
    rec = await owner.get(f"/v1/agents/{aid}")
    body = json.dumps({"description": "d", "formfile": f"NAME web\nMODEL required:{mid}\n"}).encode()
    r = await curl(vnode, key(1), "PUT", f"/agents/{aid}?base={rec['record_version']}", body)
    assert r.status_code == 200, r.text
    body = json.dumps({"formfile": "NAME web\nMODEL required:other\n"}).encode()
    rec = await owner.get(f"/v1/agents/{aid}")
    r = await curl(vnode, key(1), "PUT", f"/agents/{aid}?base={rec['record_version']}", body)
    assert r.status_code == 422 and "MODEL required:other" in r.json()["detail"]


async def test_ship_says_a_required_model_is_missing_before_building(form, cfg, tmp_path, app_dir):  # noqa: F811
    async with vm_node(tmp_path / "vm") as rt:
        await form("kit", "init", "--node", rt.base_url)
        (app_dir / "Formfile").write_text("NAME web\nMODEL required:ghost\nCOPY app.txt /srv/app.txt\n")
        _, out, err = await form("pack", "ship", str(app_dir), "--no-wait", code=2)
        assert "MODEL required:ghost names no model" in err and "form model list" in err and "nothing was built" in err
        _, out, err = await form("pack", "status")
        assert "no builds of yours" in out + err  # nothing was sent to build
        (tmp_path / "model.toml").write_text('name = "llama"\n')
        mid = (await form.json("model", "register", str(tmp_path / "model.toml")))["id"]
        (app_dir / "Formfile").write_text(f"NAME web\nMODEL required:{mid}\nCOPY app.txt /srv/app.txt\n")
        doc = await form.json("pack", "ship", str(app_dir), "--no-wait", "--quiet")
        inst = await rt.astore.get("instance", doc["instance_id"])
        assert (inst["model_id"], inst["model_required"]) == (mid, True)
        # an agent registered with the Formfile names it too: in GET /agents/:id and `form agent list`
        (tmp_path / "agent.toml").write_text('name = "helper"\n')
        aid = (await form.json("agent", "register", str(tmp_path / "agent.toml"), "--formfile",
                               str(app_dir / "Formfile")))["id"]
        shown = await form.json("agent", "get", aid)
        assert (shown["model_id"], shown["model_required"]) == (mid, True)
        _, out, _ = await form("agent", "list")
        assert out.split()[:5] == ["ID", "NAME", "TYPE", "MODEL", "FRAMEWORK"]
        assert f"{mid} (required)" in out
