"""USER in the image and the guest: the entrypoint runs as the Formfile's last USER, an SSH server
(dropbear) when a USER has keys with the USER's ssh_pwauth, disable_root and chpasswd_expire
applied, the secrets disk as the entrypoint's environment and /run/secrets, and
`form manage ssh`.

The fast tests read what the builder stages and what `secrets_tar` makes; the slow one builds one
real image, boots it once on a bridge in a throwaway network namespace, and logs in over SSH.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import threading
import time

import pytest
import trio

from formation import guest
from formation.client import Client
from formation.guest import secrets_tar
from formation.keystore import load_keystore
from formation.pack.builder import SSH_SERVER, _authorized_key, _packages, _stage
from formation.pack.formfile import parse
from formation.vm import network
from formation.vm.driver import QemuDriver
from formation.vm.spec import VmSpec
from tests.api.conftest import running_node
from tests.pack.test_builder import builder
from tests.unit.test_client_cli import PASSWORD, Runner
from tests.unit.test_client_cli import cfg as cfg  # noqa: F401 (a fixture)
from tests.vm_support import (
    boot_kit,
    build_machine,
    http_get,
    in_netns,
    needs_qemu,
    needs_root,
    netns,
)

# `openssl passwd -6 -salt abcdefgh bobpw` / `... alicepw`: USER passwd takes crypt hashes
BOB_HASH = "$6$abcdefgh$Wsx4D1WDjiSw5I.cfQmbLDzYoLU26pn.y2LOKerlD5ag41o2fqd9dFTqY43SVI6v7CBwha/MOSs0oD2A1kDLx1"
ALICE_HASH = "$6$abcdefgh$Is3kZSztnMPZAznDT2TCAPxT9phlTw5Pdn18vOhvb7Xdi.wDEuVZcrX3YdfoOhgdEOLvVEE/l8Vev0nuc3Obx0"


def stage(tmp_path, text: str):
    ff = parse(text)
    (tmp_path / "ctx").mkdir(parents=True)
    root = tmp_path / "root"
    root.mkdir()
    return ff, _stage(ff, tmp_path / "ctx", root), root


# ---- what the builder stages --------------------------------------------------------------------


def test_the_entrypoint_user_ssh_settings_and_packages_are_staged(tmp_path):
    ff, planned, root = stage(tmp_path, f"""NAME t
USER username:bob passwd:{BOB_HASH} ssh_pwauth:true
USER username:carol passwd:{BOB_HASH} lock_passwd:true ssh_authorized_keys:"ssh-ed25519 AAAAC3Nz carol@laptop"
USER username:alice passwd:{ALICE_HASH} sudo:true ssh_pwauth:false ssh_authorized_keys:"ssh-ed25519 AAAAC3Nz,ssh-rsa AAAAB3 my key (work)"
ENTRYPOINT ["id"]
""")
    assert (root / "etc/formation/user").read_text() == "alice\n"  # the last USER
    assert _packages(ff) == ["sudo", SSH_SERVER] and SSH_SERVER == "dropbear-bin"
    install, *users, clean = planned
    assert install.script == f"apt-get install -y --no-download --no-install-recommends sudo {SSH_SERVER}"
    assert [p.title for p in users] == ["user bob", "user carol", "user alice"]
    bob, carol, alice = (p.script for p in users)
    # a usable password with chpasswd_expire (the default) is expired; a locked one is not
    assert "chpasswd -e" in bob and "chage -d 0 bob" in bob
    assert "passwd -l carol" in carol and "chage" not in carol
    # keys get a name dropbear hands on (SSH_PUBKEYINFO): none, or one it drops, gets one
    assert "ssh-ed25519 AAAAC3Nz carol@laptop'" in carol
    assert "ssh-ed25519 AAAAC3Nz formation-key" in alice and "ssh-rsa AAAAB3 my key (work)" in alice
    # only bob allows SSH password logins (alice said no, carol's password is locked)
    config = (root / guest.SSH_CONFIG.lstrip("/")).read_text()
    assert "root_login=no\n" in config and "password_users=bob\n" in config


@pytest.mark.parametrize("line, staged", [
    ("ssh-ed25519 AAAA", "ssh-ed25519 AAAA formation-key"),
    ("ssh-ed25519 AAAA me@host", "ssh-ed25519 AAAA me@host"),
    ("ssh-rsa AAAA (work laptop)", "ssh-rsa AAAA formation-key (work laptop)"),
    ('no-pty,command="uptime" ssh-ed25519 AAAA', 'no-pty,command="uptime" ssh-ed25519 AAAA formation-key'),
    ("not a key", "not a key"),
])
def test_every_key_gets_a_name_dropbear_hands_on(line, staged):
    assert _authorized_key(line) == staged


def test_no_ssh_server_without_keys_and_root_login_when_every_user_allows_it(tmp_path):
    ff, planned, root = stage(tmp_path / "a", f"NAME t\nUSER username:bob passwd:{BOB_HASH} chpasswd_expire:false\n")
    assert _packages(ff) == [] and not (root / "etc/formation/ssh").exists()
    assert "chage" not in planned[0].script and planned[0].title == "user bob"
    assert (root / "etc/formation/user").read_text() == "bob\n"
    _, _, root = stage(tmp_path / "b", "NAME t\nUSER username:ann disable_root:false ssh_authorized_keys:k1\n"
                                       "USER username:ben disable_root:false ssh_pwauth:true\n")
    assert (root / "etc/formation/ssh").read_text().endswith("root_login=yes\npassword_users=''\n")
    _, _, root = stage(tmp_path / "c", "NAME t\nENTRYPOINT [\"id\"]\n")
    assert not (root / "etc/formation/user").exists()  # no USER: the entrypoint runs as root


def test_the_guest_runs_dropbear_and_the_entrypoint_as_the_builder_says():
    """The flags guest-init gives dropbear for the builder's settings, and the entrypoint's user."""
    text = (guest.DIR / "guest-init").read_text()
    for needle in ("/etc/formation/user", ". /etc/formation/ssh", '-F -E -R -p 22', 'flags="$flags -w"',
                   'flags="$flags -s"', "-c /run/formation/ssh-login -j -k", "setpriv --reuid=$uid --regid=$gid --init-groups",
                   "/etc/formation/env.user.$user", "/run/formation/secrets/env", "ip_unprivileged_port_start"):
        assert needle in text, needle


# ---- secrets_tar ---------------------------------------------------------------------------------


def test_secrets_tar_holds_env_and_files_and_refuses_bad_names_and_sizes():
    data = secrets_tar({"API_KEY": b"it's $HOME\nx", "_b2": b"\0raw", "EMPTY": b""})
    assert data == secrets_tar({"EMPTY": b"", "_b2": b"\0raw", "API_KEY": b"it's $HOME\nx"})  # deterministic
    assert data[257:263] == b"ustar\0"  # POSIX ustar, which the guest's busybox and GNU tar read
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["env", "files", "files/API_KEY", "files/EMPTY", "files/_b2"]
        assert all(m.uid == 0 and m.mtime == 0 for m in tar.getmembers())
        assert tar.extractfile("files/_b2").read() == b"\0raw"
        env = tar.extractfile("env").read()
    assert b"_b2" not in env  # a NUL cannot be in an environment: files/ only
    shown = subprocess.run(["sh", "-c", '. /dev/stdin; printf "%s|%s" "$API_KEY" "$EMPTY"'], input=env,
                           capture_output=True, check=True).stdout
    assert shown == b"it's $HOME\nx|"
    assert len(secrets_tar({"A" * 64: b"x" * 65536})) > 65536
    for bad in ("", "1A", "A-B", "A" * 65, "ÄB", "a b", "../x"):
        with pytest.raises(ValueError, match="bad secret name"):
            secrets_tar({bad: b"x"})
    with pytest.raises(ValueError, match="65537 bytes"):
        secrets_tar({"BIG": b"x" * 65537})
    with pytest.raises(ValueError, match="bytes"):
        secrets_tar({"S": "text"})


# ---- form manage ssh -----------------------------------------------------------------------------


async def test_form_manage_ssh_prints_the_command(cfg, capsys, tmp_path, monkeypatch):  # noqa: F811
    def no_exec(*_a):
        raise AssertionError("form manage ssh --print must not run ssh")

    monkeypatch.setattr(os, "execvp", no_exec)
    form = Runner(capsys)
    formfile = (f"NAME web\nUSER username:bob passwd:{BOB_HASH}\n"
                "USER username:alice ssh_authorized_keys:\"ssh-ed25519 AAAAC3Nz a@b\"\nENTRYPOINT [\"id\"]\n")
    async with running_node(tmp_path / "n") as rt:
        await form("kit", "init", "--node", rt.base_url)
        with Client(rt.base_url, load_keystore(cfg / "wallet.json", PASSWORD)) as c:
            def create(**fields):
                return c.post("/v1/instance/create", {"name": "web", **fields})["id"]
            iid = await trio.to_thread.run_sync(lambda: create(formfile=formfile))
            no_keys = await trio.to_thread.run_sync(lambda: create(formfile=f"NAME x\nUSER username:bob passwd:{BOB_HASH}\n"))
            bare = await trio.to_thread.run_sync(create)
        _, _, err = await form("manage", "ssh", "--print", iid, code=1)
        assert f"instance {iid} has no address yet" in err
        _, _, err = await form("manage", "ssh", iid, "--print", code=2)
        assert "--print after the instance id would go to ssh: put it before the id" in err
        for i in (iid, no_keys, bare):
            await rt.write("instance_status", f"{i}@{rt.address}",
                           {"instance_id": i, "node": rt.address, "state": "running", "ip": "10.7.0.9", "reason": ""})
        _, out, _ = await form("manage", "ssh", "--print", iid)
        assert out == "ssh alice@10.7.0.9\n"  # the last USER
        # everything after the ID is ssh's
        _, out, _ = await form("manage", "ssh", "--print", "--user", "bob", iid, "-p", "22", "uptime", "--json")
        assert out == "ssh bob@10.7.0.9 -p 22 uptime --json\n"
        _, out, _ = await form("manage", "ssh", "--json", "--print", iid)
        assert json.loads(out)["argv"] == ["ssh", "alice@10.7.0.9"]
        _, _, err = await form("manage", "ssh", "--print", no_keys, code=1)
        assert "no USER of its Formfile has ssh_authorized_keys" in err
        _, _, err = await form("manage", "ssh", "--print", bare, code=1)
        assert "no Formfile in its record: give the account with --user" in err
        _, out, _ = await form("manage", "ssh", "--print", "--user", "root", bare)
        assert out == "ssh root@10.7.0.9\n"


# ---- a real image, booted ----------------------------------------------------------------------

SERVE = ("mkdir -p /tmp/www && cd /tmp/www && id -un > who && id -Gn > groups"
         " && echo \"$GREETING $FROM_SYSTEM $HOME\" > env && printf %s \"$API_KEY\" > secret-env"
         " && cat /run/secrets/API_KEY > secret-file && exec httpd -f -p 80 -h /tmp/www")


def ssh_formfile(public_key: str) -> str:
    """bob may log in with his (expired) password; alice, the last USER, with her key only; root
    gets alice's key too, which disable_root (the default) must refuse."""
    return f"""NAME ssh-web
USER username:bob passwd:{BOB_HASH} ssh_pwauth:true
USER username:alice passwd:{ALICE_HASH} sudo:true ssh_pwauth:false groups:web ssh_authorized_keys:"{public_key}"
ENV --scope=user:alice GREETING=hello-alice
ENV --scope=system FROM_SYSTEM=sys
RUN mkdir -p /root/.ssh && cp /home/alice/.ssh/authorized_keys /root/.ssh/
EXPOSE 80
ENTRYPOINT sh -c {shlex.quote(SERVE)}
"""


class Ssh:
    """ssh from inside the namespace: with a key, or with a password (given through SSH_ASKPASS,
    so that ssh really offers it), optionally answering the prompts of an interactive session."""

    OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20"]

    def __init__(self, ns: str, ip: str, key, tmp_path):
        self.ns, self.ip, self.key, self.tmp = ns, ip, key, tmp_path

    def key_login(self, user: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return in_netns(self.ns, "ssh", *self.OPTS, "-o", "BatchMode=yes", "-i", str(self.key),
                        f"{user}@{self.ip}", *cmd, timeout=timeout)

    def password_login(self, user: str, password: str, *cmd: str, answers: list[tuple[str, str]] = (),
                       timeout: float = 60) -> tuple[int, str]:
        askpass = self.tmp / f"askpass-{user}"
        askpass.write_text(f"#!/bin/sh\necho {shlex.quote(password)}\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        tty = ["-tt"] if answers else ["-T"]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "ssh", *self.OPTS, *tty, "-o", "PreferredAuthentications=password",
             "-o", "PubkeyAuthentication=no", f"{user}@{self.ip}", *cmd],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        return _converse(proc, answers, timeout)


def _converse(proc: subprocess.Popen, answers, timeout: float) -> tuple[int, str]:
    """Feed each answer once its prompt has appeared in the output: ssh's status (-1 if it did not
    end in time) and its output."""
    out = bytearray()
    reader = threading.Thread(target=lambda: _read_all(proc.stdout, out), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    for prompt, answer in answers:
        while prompt.encode() not in out and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.stdin.write(answer.encode() + b"\n")
            proc.stdin.flush()
    proc.stdin.close()
    try:
        rc = proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -1
    reader.join(5)
    return rc, out.decode(errors="replace")


def _read_all(stream, out: bytearray) -> None:
    while chunk := stream.read1(4096):
        out.extend(chunk)


needs_ssh = pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("ssh-keygen")) and not os.environ.get("CI"),
                               reason="ssh and ssh-keygen are not installed (apt-get install openssh-client)")


@pytest.mark.slow
@needs_qemu
@needs_root
@needs_ssh
async def test_ssh_users_entrypoint_user_and_secrets_in_a_real_vm(tmp_path):
    kit = boot_kit()
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)], check=True)
    public_key = (tmp_path / "id_ed25519.pub").read_text().strip()
    driver = QemuDriver(tmp_path / "vms")
    b = builder(tmp_path, build_machine(driver, kit))
    log: list[str] = []
    image = await b.build(b.prepare(ssh_formfile(public_key), None, tmp_path / "w"), tmp_path, log=log.append)
    secret = "k3y 'with' $quotes\nand a second line"
    secrets = tmp_path / "secrets.tar"
    secrets.write_bytes(secrets_tar({"API_KEY": secret.encode()}))

    with netns() as ns:
        await network.ensure_bridge("fmtbr9", "10.213.9.1/24", ns)
        ip = "10.213.9.2"
        spec = VmSpec(vm_id="sshweb", kernel=kit.kernel, initrd=kit.initrd, image=image.path, tap="fmtssh0",
                      bridge="fmtbr9", ip_cidr=f"{ip}/24", gateway="10.213.9.1", netns=ns, secrets=secrets)
        await driver.create(spec)
        await driver.boot("sshweb")
        ssh = Ssh(ns, ip, key, tmp_path)
        try:
            await _check_the_entrypoint(driver, ns, ip, secret)
            await _check_ssh(ssh)
            assert await driver.stop("sshweb", timeout=30) == "powerdown"  # the user's entrypoint is killed
            log_text = driver.console_log("sshweb")
            assert "FORMATION-GUEST stopped" in log_text
            assert "k3y" not in log_text  # no secret value on the console
        finally:
            print(driver.console_log("sshweb")[-3000:])
            await driver.delete("sshweb")


async def _get(ns: str, url: str) -> str | None:
    return await trio.to_thread.run_sync(http_get, ns, url)


async def _check_the_entrypoint(driver, ns: str, ip: str, secret: str) -> None:
    """Port 80 bound by the last USER, with her groups, her ENV and the secrets."""
    who = None
    with trio.move_on_after(90):
        while who is None:
            who = await _get(ns, f"http://{ip}/who")
            if who is None:
                await trio.sleep(1)
    assert who == "alice\n", driver.console_log("sshweb")
    assert "web" in (await _get(ns, f"http://{ip}/groups")).split()
    assert await _get(ns, f"http://{ip}/env") == "hello-alice sys /home/alice\n"
    assert await _get(ns, f"http://{ip}/secret-env") == secret
    assert await _get(ns, f"http://{ip}/secret-file") == secret


async def _check_ssh(ssh: Ssh) -> None:
    def run(fn, *a, **k):
        return trio.to_thread.run_sync(lambda: fn(*a, **k))

    # a key login, though alice's password has expired (chpasswd_expire): dropbear lets keys in
    with trio.fail_after(120):
        while (r := await run(ssh.key_login, "alice", "id", "-un")).returncode != 0:
            await trio.sleep(2)
    assert r.stdout == "alice\n", r.stderr
    r = await run(ssh.key_login, "alice", "ls -ld /run/secrets /run/secrets/API_KEY; command -v sudo; chage -l alice")
    assert r.stdout.count("alice") >= 2 and "/usr/bin/sudo" in r.stdout and "password must be changed" in r.stdout
    # disable_root (default): root's key is refused
    r = await run(ssh.key_login, "root", "id")
    assert r.returncode != 0
    # alice: ssh_pwauth:false, though the server takes passwords for bob
    rc, out = await run(ssh.password_login, "alice", "alicepw", "id", "-un")
    assert rc != 0 and "password logins are off for alice" in out, out
    # bob: a wrong password is refused; his right one has expired: no command without a new one
    rc, out = await run(ssh.password_login, "bob", "wrong", "id", "-un")
    assert rc == 255 and "Permission denied" in out, out
    rc, out = await run(ssh.password_login, "bob", "bobpw", "id", "-un")
    assert rc != 0 and "has expired: log in with a terminal" in out, out
    new = "Fresh-Passw0rd-42"
    rc, out = await run(ssh.password_login, "bob", "bobpw", "id", "-un",
                        answers=[("Current password", "bobpw"), ("New password", new), ("Retype new password", new)])
    assert rc == 0 and "bob" in out.rpartition("updated successfully")[2], out
    rc, out = await run(ssh.password_login, "bob", new, "id", "-un")
    assert (rc, out.strip()) == (0, "bob"), out
