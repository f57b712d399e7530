"""Formfile grammar: every instruction and alias, every limit, the exact error per bad line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formation.pack.formfile import Formfile, FormfileError, Step, User, canonical, parse

README_EXAMPLE = r"""NAME my-simple-agent
VCPU 1
MEM 512
DISK 5
USER username:agentuser passwd:somepassword ssh_authorized_keys:"your-ssh-public-key"
INSTALL python3
# Create a dummy app directory for the COPY command to succeed
RUN mkdir -p /app
COPY ./app /app 
WORKDIR /app
RUN echo "from http.server import SimpleHTTPRequestHandler, HTTPServer; server_address = ('', 8000); httpd = HTTPServer(server_address, SimpleHTTPRequestHandler); print('Server running on port 8000...'); httpd.serve_forever()" > /app/server.py
EXPOSE 8000
ENTRYPOINT ["python3", "server.py"]
"""


def test_readme_example_parses():
    ff = parse(README_EXAMPLE)
    assert ff.name == "my-simple-agent" and ff.vcpu == 1 and ff.memory_mb == 512 and ff.disk_gb == 5
    assert ff.users == (User("agentuser", passwd="somepassword", ssh_authorized_keys=("your-ssh-public-key",)),)
    assert [s.kind for s in ff.steps] == ["INSTALL", "RUN", "COPY", "WORKDIR", "RUN"]
    assert ff.steps[2].args == ("./app", "/app")
    assert ff.workdir == "/app" and ff.expose == (8000,) and ff.entrypoint == ("python3", "server.py")


def test_every_instruction_and_alias():
    ff = parse("""
NAME full
DESCRIPTION A full example
MODEL required:llama-3
CORES 4
MBS 2048
STORAGE 20
GPU H100:2
GPU RTX5090
USER username:alice passwd:'s3cret pw' sudo:yes groups:docker,adm lock_passwd:off shell:/bin/zsh
USER username=bob ssh_pwauth=false disable_root:0 chpasswd_expire:no
ENV --scope=user:alice PATH=/opt/bin
ENV --scope=service:web MODE="two words"
ENV PLAIN=1
INSTALL python3 curl=7.88.1-10
RUN pip install \\
    requests
COPY src /srv/src
WORKDIR /srv/src/
EXPOSE 8000 9000/tcp, 8000
ENTRYPOINT python3 -m http.server "8000"
""")
    assert (ff.description, ff.model) == ("A full example", ("required", "llama-3"))
    assert (ff.vcpu, ff.memory_mb, ff.disk_gb) == (4, 2048, 20)
    assert ff.gpus == (("H100", 2), ("RTX5090", 1))
    alice, bob = ff.users
    assert alice.passwd == "s3cret pw" and alice.sudo and alice.groups == ("docker", "adm") and alice.shell == "/bin/zsh"
    assert not bob.ssh_pwauth and not bob.disable_root and not bob.chpasswd_expire
    envs = [s.args for s in ff.steps if s.kind == "ENV"]
    assert envs == [("user:alice", "PATH", "/opt/bin"), ("service:web", "MODE", "two words"), ("system", "PLAIN", "1")]
    assert ff.steps[4] == Step("RUN", ("pip install requests",))
    assert ff.workdir == "/srv/src" and ff.expose == (8000, 9000)
    assert ff.entrypoint == ("python3", "-m", "http.server", "8000")
    assert (parse("NAME x\nCPU 2\nMEMORY 600\n").vcpu, parse("NAME x\nMEM 600\n").memory_mb) == (2, 600)


@pytest.mark.parametrize("text, line, message", [
    ("NAME a\nFROM debian", 2, "unknown instruction 'FROM'"),
    ("NAME a\nrun ls", 2, "instructions are upper case: RUN"),
    ("NAME a\nRUN", 2, "RUN needs an argument"),
    ("NAME a\nNAME b", 2, "NAME given twice (first on line 1)"),
    ("NAME Bad Name", 1, "is not a name"),
    ("NAME a\nVCPU 0", 2, "vCPUs must be between 1 and 128, got 0"),
    ("NAME a\nVCPU 129", 2, "vCPUs must be between 1 and 128, got 129"),
    ("NAME a\nCPU two", 2, "vCPUs must be a whole number, got 'two'"),
    ("NAME a\nMEM 256", 2, "memory (MB) must be between 512 and 256000, got 256"),
    ("NAME a\nMEMORY 256001", 2, "memory (MB) must be between 512 and 256000"),
    ("NAME a\nDISK 4", 2, "disk (GB) must be between 5 and 2048, got 4"),
    ("NAME a\nGPU A100", 2, "GPU model must be one of RTX5090, H100, H200, B200, got 'A100'"),
    ("NAME a\nGPU H100:9", 2, "GPU count must be between 1 and 8, got 9"),
    ("NAME a\nMODEL llama", 2, "expected 'required:<model-id>' or 'preferred:<model-id>'"),
    ("NAME a\nCOPY onlyone", 2, "expected 'COPY <source> <destination>', got 1 argument(s)"),
    ("NAME a\nCOPY /etc/passwd /x", 2, "must be a path inside the build context"),
    ("NAME a\nCOPY ../up /x", 2, "must be a path inside the build context"),
    ("NAME a\nINSTALL Py;rm", 2, "is not a Debian package name"),
    ("NAME a\nENV NOVALUE", 2, "expected one KEY=value"),
    ("NAME a\nENV 1X=2", 2, "'1X' is not a variable name"),
    ("NAME a\nENV --scope=galaxy X=1", 2, "scope must be system, user:<name> or service:<name>"),
    ("NAME a\nWORKDIR app", 2, "must be an absolute path"),
    ("NAME a\nWORKDIR /a/../b", 2, "without '.' or '..'"),
    ("NAME a\nENTRYPOINT a\nENTRYPOINT b", 3, "ENTRYPOINT given twice"),
    ("NAME a\nENTRYPOINT [\"python3\", 3]", 2, "non-empty array of strings"),
    ("NAME a\nENTRYPOINT [oops", 2, "not a JSON array"),
    ("NAME a\nEXPOSE 70000", 2, "port must be between 1 and 65535"),
    ("NAME a\nEXPOSE 53/udp", 2, "only TCP ports"),
    ("NAME a\nUSER passwd:x", 2, "username:<name> is required"),
    ("NAME a\nUSER username:a colour:red", 2, "unknown USER field 'colour'"),
    ("NAME a\nUSER username:a sudo:maybe", 2, "sudo must be true/false"),
    ("NAME a\nUSER username:a shell:bash", 2, "shell must be an absolute path"),
    ("NAME a\nUSER username:a passwd:", 2, "passwd must not be empty"),
])
def test_each_bad_line_gets_its_error(text, line, message):
    """Every error at once, each with its line."""
    with pytest.raises(FormfileError) as exc:
        parse(text)
    assert any(ln == line and message in msg for ln, msg in exc.value.errors), exc.value.errors
    assert f"Formfile:{line}:" in str(exc.value)


def test_all_errors_are_reported_at_once():
    with pytest.raises(FormfileError) as exc:
        parse("VCPU 0\nFOO bar\nNAME ok\nDISK 1\n")
    assert [ln for ln, _ in exc.value.errors] == [1, 2, 4]


names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
words = st.from_regex(r"[A-Za-z0-9_./-]{1,12}", fullmatch=True)


@st.composite
def formfiles(draw):
    steps = draw(st.lists(st.one_of(
        st.builds(lambda c: Step("RUN", (c,)), st.from_regex(r"echo [a-z0-9]{1,10}( [a-z0-9]{1,5}){0,3}", fullmatch=True)),
        st.builds(lambda a, b: Step("COPY", (a, "/" + b)), st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?", fullmatch=True), words),
        st.builds(lambda p: Step("INSTALL", tuple(p)), st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), min_size=1, max_size=3)),
        st.builds(lambda k, v: Step("ENV", ("system", k, v)), st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                  st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10)),
        st.builds(lambda d: Step("WORKDIR", ("/" + d,)), st.from_regex(r"[a-z]{0,8}", fullmatch=True)),
    ), max_size=6))
    workdirs = [s.args[0] for s in steps if s.kind == "WORKDIR"]
    users = draw(st.lists(st.builds(User, names, st.none() | words, sudo=st.booleans()), max_size=2))
    return Formfile(name=draw(names), vcpu=draw(st.integers(1, 128)), memory_mb=draw(st.integers(512, 256000)),
                    disk_gb=draw(st.integers(5, 100)), users=tuple(users), steps=tuple(steps),
                    workdir=workdirs[-1] if workdirs else "/",
                    expose=tuple(sorted(draw(st.sets(st.integers(1, 65535), max_size=3)))),
                    entrypoint=tuple(draw(st.lists(words, max_size=3))))


@settings(max_examples=200, deadline=None)
@given(formfiles())
def test_canonical_form_round_trips(ff):
    text = canonical(ff)
    again = parse(text)
    assert again == ff
    assert canonical(again) == text


def test_a_formfile_without_name_gets_one_from_its_text_and_workdir_applies_from_its_line():
    ff = parse("RUN echo a\nWORKDIR /app\nRUN echo b\nWORKDIR /srv\n")
    assert ff.name.startswith("formfile-") and ff.name == parse("RUN echo a\nWORKDIR /app\nRUN echo b\nWORKDIR /srv\n").name
    assert ff.name != parse("RUN echo c\n").name
    assert [(s.kind, s.args[0]) for s in ff.steps] == [("RUN", "echo a"), ("WORKDIR", "/app"), ("RUN", "echo b"),
                                                        ("WORKDIR", "/srv")]
    assert ff.workdir == "/srv"  # the ENTRYPOINT's
