"""The Formfile: parser, validator and canonical form.

Grammar of the original (../shared/notes/original-formation.md §4.1), with its silent cases made
errors: unknown instructions, lowercase instructions, bad values and repeated single-use
instructions are reported with their line number, all of them at once. A trailing backslash
continues a line. The reading of the text (logical lines, instruction word, shell words, USER
fields) is formation/crdt/passwords.py's, shared with the validity rule that refuses a USER
password in clear in any op: one implementation, so the rule sees what this parser sees. `canonical()` renders a parsed Formfile back to text that parses to the same
thing, so two spellings of one Formfile have one canonical text (and one build hash).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from formation.crdt.kinds.user_kinds import MAX_DISK_GB, MAX_VCPUS
from formation.crdt.passwords import instruction, split_words, user_field
from formation.crdt.passwords import logical_lines as _logical_lines

GPU_MODELS = ("RTX5090", "H100", "H200", "B200")
# VCPU and DISK within what an instance record may ask for (fog-wide bounds, user_kinds.py)
LIMITS = {"vcpu": (1, MAX_VCPUS), "memory_mb": (512, 256_000), "disk_gb": (5, MAX_DISK_GB), "gpu_count": (1, 8)}
ALIASES = {"CPU": "VCPU", "CORES": "VCPU", "MEM": "MEMORY", "MBS": "MEMORY", "STORAGE": "DISK"}
INSTRUCTIONS = ("NAME", "DESCRIPTION", "MODEL", "USER", "VCPU", "MEMORY", "DISK", "GPU", "COPY",
                "RUN", "INSTALL", "ENV", "WORKDIR", "ENTRYPOINT", "EXPOSE")
SINGLE = frozenset({"NAME", "DESCRIPTION", "MODEL", "VCPU", "MEMORY", "DISK", "ENTRYPOINT"})
USER_FIELDS = ("username", "passwd", "ssh_authorized_keys", "lock_passwd", "sudo", "ssh_pwauth",
               "disable_root", "chpasswd_expire", "groups", "shell")
_BOOLS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USERNAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*(=[A-Za-z0-9.+~:-]+)?")


class FormfileError(ValueError):
    def __init__(self, errors: list[tuple[int, str]], source: str = "Formfile"):
        self.errors = errors
        self.source = source
        super().__init__("\n".join(f"{source}:{line}: {msg}" for line, msg in errors))


@dataclass(frozen=True)
class User:
    username: str
    passwd: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    lock_passwd: bool = False
    sudo: bool = False
    ssh_pwauth: bool = True
    disable_root: bool = True
    chpasswd_expire: bool = True
    groups: tuple[str, ...] = ()
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class Step:
    """A build step, in Formfile order: RUN, COPY, INSTALL or ENV."""

    kind: str  # "RUN" | "COPY" | "INSTALL" | "ENV" | "WORKDIR"
    # RUN: (command,); COPY: (src, dest); INSTALL: packages; ENV: (scope, key, value); WORKDIR: (path,)
    args: tuple[str, ...]
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Formfile:
    name: str
    description: str = ""
    model: tuple[str, str] | None = None  # ("required" | "preferred", model id)
    vcpu: int = 1
    memory_mb: int = 512
    disk_gb: int = 5
    gpus: tuple[tuple[str, int], ...] = ()
    users: tuple[User, ...] = ()
    steps: tuple[Step, ...] = ()
    workdir: str = "/"  # the last WORKDIR: where the ENTRYPOINT runs (each RUN runs in the one before it)
    entrypoint: tuple[str, ...] = ()
    expose: tuple[int, ...] = ()

    def canonical(self) -> str:
        return canonical(self)


def parse(text: str, *, source: str = "Formfile") -> Formfile:
    errors: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    values: dict = {"gpus": [], "users": [], "steps": [], "expose": []}
    for no, line in _logical_lines(text):
        word, arg = instruction(line)
        instr = ALIASES.get(word, word)
        if instr not in INSTRUCTIONS:
            upper = ALIASES.get(word.upper(), word.upper())
            hint = f" (instructions are upper case: {upper})" if upper in INSTRUCTIONS else \
                f"; known: {', '.join(INSTRUCTIONS)} and aliases {', '.join(ALIASES)}"
            errors.append((no, f"unknown instruction {word!r}{hint}"))
            continue
        if not arg:
            errors.append((no, f"{word} needs an argument"))
            continue
        if instr in SINGLE:
            if instr in seen:
                errors.append((no, f"{instr} given twice (first on line {seen[instr]})"))
                continue
            seen[instr] = no
        try:
            _apply(instr, arg, no, values)
        except ValueError as exc:
            errors.append((no, f"{word}: {exc}"))
    if errors:
        raise FormfileError(sorted(errors), source)
    return Formfile(
        # as the original: a Formfile without NAME gets one (from its text, so the same file
        # gets the same name, and the same image id)
        name=values.get("name") or "formfile-" + hashlib.sha256(text.encode()).hexdigest()[:8], description=values.get("description", ""), model=values.get("model"),
        vcpu=values.get("vcpu", 1), memory_mb=values.get("memory_mb", 512), disk_gb=values.get("disk_gb", 5),
        gpus=tuple(values["gpus"]), users=tuple(values["users"]), steps=tuple(values["steps"]),
        workdir=values.get("workdir", "/"), entrypoint=tuple(values.get("entrypoint", ())),
        expose=tuple(sorted(set(values["expose"]))),
    )


def _int_in(text: str, lo: int, hi: int, what: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text):
        raise ValueError(f"{what} must be a whole number, got {text!r}")
    v = int(text)
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be between {lo} and {hi}, got {v}")
    return v


def _words(arg: str) -> list[str]:
    try:
        return split_words(arg)  # shlex.split's words and errors
    except ValueError as exc:
        raise ValueError(f"cannot split {arg!r}: {exc}") from None


def _apply(instr: str, arg: str, no: int, v: dict) -> None:
    if instr == "NAME":
        if not _NAME.fullmatch(arg):
            raise ValueError(f"{arg!r} is not a name: lowercase letters, digits, '.', '_', '-', up to 63")
        v["name"] = arg
    elif instr == "DESCRIPTION":
        v["description"] = arg
    elif instr == "MODEL":
        how, sep, mid = arg.partition(":")
        if not sep or how not in ("required", "preferred") or not mid or ":" in mid:
            raise ValueError(f"expected 'required:<model-id>' or 'preferred:<model-id>', got {arg!r}")
        v["model"] = (how, mid)
    elif instr == "VCPU":
        v["vcpu"] = _int_in(arg, *LIMITS["vcpu"], "vCPUs")
    elif instr == "MEMORY":
        v["memory_mb"] = _int_in(arg, *LIMITS["memory_mb"], "memory (MB)")
    elif instr == "DISK":
        v["disk_gb"] = _int_in(arg, *LIMITS["disk_gb"], "disk (GB)")
    elif instr == "GPU":
        model, _, count = arg.partition(":")
        if model not in GPU_MODELS:
            raise ValueError(f"GPU model must be one of {', '.join(GPU_MODELS)}, got {model!r}")
        v["gpus"].append((model, _int_in(count, *LIMITS["gpu_count"], "GPU count") if count else 1))
    elif instr == "USER":
        v["users"].append(_user(arg))
    elif instr == "RUN":
        v["steps"].append(Step("RUN", (arg,), no))
    elif instr == "COPY":
        parts = _words(arg)
        if len(parts) != 2:
            raise ValueError(f"expected 'COPY <source> <destination>', got {len(parts)} argument(s)")
        src, dest = parts
        if src.startswith("/") or ".." in src.split("/"):
            raise ValueError(f"source {src!r} must be a path inside the build context (relative, no '..')")
        v["steps"].append(Step("COPY", (src, dest), no))
    elif instr == "INSTALL":
        pkgs = arg.split()
        for p in pkgs:
            if not _PACKAGE.fullmatch(p):
                raise ValueError(f"{p!r} is not a Debian package name")
        v["steps"].append(Step("INSTALL", tuple(pkgs), no))
    elif instr == "ENV":
        v["steps"].append(Step("ENV", _env(arg), no))
    elif instr == "WORKDIR":
        if not arg.startswith("/") or any(p in (".", "..") for p in arg.split("/")):
            raise ValueError(f"{arg!r} must be an absolute path without '.' or '..'")
        v["workdir"] = posixpath.normpath(arg)
        v["steps"].append(Step("WORKDIR", (v["workdir"],), no))
    elif instr == "ENTRYPOINT":
        v["entrypoint"] = _entrypoint(arg)
    elif instr == "EXPOSE":
        for p in arg.replace(",", " ").split():
            port, _, proto = p.partition("/")
            if proto not in ("", "tcp"):
                raise ValueError(f"only TCP ports can be exposed, got {p!r}")
            v["expose"].append(_int_in(port, 1, 65535, "port"))


def _env(arg: str) -> tuple[str, str, str]:
    scope = "system"
    if arg.startswith("--scope="):
        scope_text, _, arg = arg.partition(" ")
        scope = scope_text[len("--scope="):]
        kind, _, name = scope.partition(":")
        if not (scope == "system" or (kind in ("user", "service") and name and re.fullmatch(r"[a-z_][a-z0-9_.@-]*", name))):
            raise ValueError(f"scope must be system, user:<name> or service:<name>, got {scope!r}")
    parts = _words(arg.strip())
    if len(parts) != 1 or "=" not in parts[0]:
        raise ValueError("expected one KEY=value (quote a value that has spaces)")
    key, _, value = parts[0].partition("=")
    if not _ENV_KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a variable name")
    return (scope, key, value)


def _entrypoint(arg: str) -> tuple[str, ...]:
    if arg.startswith("["):
        try:
            cmd = json.loads(arg)
        except ValueError as exc:
            raise ValueError(f"not a JSON array: {exc}") from None
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise ValueError("the JSON form is a non-empty array of strings") from None
        return tuple(cmd)
    return tuple(_words(arg))


def _user(arg: str) -> User:
    fields: dict = {}
    for word in _words(arg):
        key, sep, val = user_field(word)
        if not sep:
            raise ValueError(f"{word!r} is not field:value")
        if key not in USER_FIELDS:
            raise ValueError(f"unknown USER field {key!r}; known: {', '.join(USER_FIELDS)}")
        if key in fields:
            raise ValueError(f"USER field {key!r} given twice")
        fields[key] = val
    name = fields.get("username")
    if not name or not _USERNAME.fullmatch(name):
        raise ValueError("username:<name> is required: lowercase, starting with a letter or '_', up to 32")
    out: dict = {"username": name}
    if "passwd" in fields:
        if not fields["passwd"]:
            raise ValueError("passwd must not be empty")
        out["passwd"] = fields["passwd"]
    for b in ("lock_passwd", "sudo", "ssh_pwauth", "disable_root", "chpasswd_expire"):
        if b in fields:
            if fields[b].lower() not in _BOOLS:
                raise ValueError(f"{b} must be true/false/yes/no/1/0/on/off, got {fields[b]!r}")
            out[b] = _BOOLS[fields[b].lower()]
    for lst in ("ssh_authorized_keys", "groups"):
        if lst in fields:
            out[lst] = tuple(x.strip() for x in fields[lst].split(",") if x.strip())
    if "shell" in fields:
        if not fields["shell"].startswith("/"):
            raise ValueError(f"shell must be an absolute path, got {fields['shell']!r}")
        out["shell"] = fields["shell"]
    return User(**out)


def _q(s: str) -> str:
    return shlex.quote(s)


def canonical(ff: Formfile) -> str:
    """One text per meaning: fixed order of the single-use instructions, steps in their order."""
    out = [f"NAME {ff.name}"]
    if ff.description:
        out.append(f"DESCRIPTION {ff.description}")
    if ff.model:
        out.append(f"MODEL {ff.model[0]}:{ff.model[1]}")
    out += [f"VCPU {ff.vcpu}", f"MEMORY {ff.memory_mb}", f"DISK {ff.disk_gb}"]
    out += [f"GPU {m}:{c}" for m, c in ff.gpus]
    default = User("x")
    for u in ff.users:
        words = [f"username:{u.username}"]
        if u.passwd is not None:
            words.append(_q(f"passwd:{u.passwd}"))
        if u.ssh_authorized_keys:
            words.append(_q("ssh_authorized_keys:" + ",".join(u.ssh_authorized_keys)))
        if u.groups:
            words.append("groups:" + ",".join(u.groups))
        for b in ("lock_passwd", "sudo", "ssh_pwauth", "disable_root", "chpasswd_expire"):
            if getattr(u, b) != getattr(default, b):
                words.append(f"{b}:{str(getattr(u, b)).lower()}")
        if u.shell != default.shell:
            words.append(f"shell:{u.shell}")
        out.append("USER " + " ".join(words))
    for s in ff.steps:
        if s.kind == "RUN":
            out.append(f"RUN {s.args[0]}")
        elif s.kind == "COPY":
            out.append(f"COPY {_q(s.args[0])} {_q(s.args[1])}")
        elif s.kind == "INSTALL":
            out.append("INSTALL " + " ".join(s.args))
        elif s.kind == "WORKDIR":
            out.append(f"WORKDIR {s.args[0]}")
        else:
            scope, key, value = s.args
            out.append(f"ENV --scope={scope} {_q(f'{key}={value}')}")
    if ff.expose:
        out.append("EXPOSE " + " ".join(str(p) for p in ff.expose))
    if ff.entrypoint:
        out.append("ENTRYPOINT " + json.dumps(list(ff.entrypoint)))
    return "\n".join(out) + "\n"


def exposed_ports(text: str | None) -> list[int]:
    """The ports a Formfile EXPOSEs ([] without a Formfile, or for one that does not parse)."""
    if not text:
        return []
    try:
        return list(parse(text).expose)
    except FormfileError:
        return []
