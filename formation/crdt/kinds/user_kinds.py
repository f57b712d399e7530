"""Kinds that users write: account, instance, model, agent, dns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..passwords import check_no_clear_password, instruction, logical_lines
from ..schema import (
    DESCRIPTION,
    METADATA,
    NAME,
    OBJECT_ID,
    SEALED_BOX,
    SECRET_NAME,
    SHA256_HEX,
    SLUG,
    TAGS,
    TIMESTAMP,
    Record,
    address,
    boolean,
    field,
    integer,
    ip_address,
    is_host_name,
    list_of,
    map_of,
    nested,
    number,
    one_of,
    optional,
    text,
)
from .base import Intent, Invalid, Kind, Route, reject_fields
from .owned import GRANTABLE, PRIVILEGED, OwnedKind, _need, owned_routes

AUTHORIZED = map_of(address, one_of(*GRANTABLE), 256)
HASH_ID = text(128, min_len=1, pattern=r"[A-Za-z0-9._:-]+", what="an id of letters, digits, '.', '_', ':' or '-'")


# ---- Formfile texts in records ---------------------------------------------------------------

def formfile_text(max_len: int):
    """A Formfile's text in a record: text, with no USER password in clear (crdt/passwords.py:
    the record is replicated to every node and kept in every op log)."""
    plain = text(max_len)

    def check(v):
        return check_no_clear_password(plain(v))

    return check


FORMFILE = formfile_text(32 * 1024)
# the Formfile's MODEL line binds the record to a model: the model's id as records hold it
MODEL_REF = text(64, min_len=1, pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*",
                 what="a model id: letters, digits, '.', '_' or '-'")


def formfile_model(formfile: str | None) -> tuple[int, str, bool] | None:
    """(line, model id, required) of the Formfile's MODEL line, read as the parser reads it (its
    first MODEL instruction with an argument: the parser refuses a second one), or None when
    it has none. ValueError when the line binds no model: not `required:<id>` or
    `preferred:<id>`, or an id no model can have."""
    if not formfile or "MODEL" not in formfile:
        return None
    for no, line in logical_lines(formfile):
        word, arg = instruction(line)
        if word != "MODEL" or not arg:
            continue
        how, sep, mid = arg.partition(":")
        if not sep or how not in ("required", "preferred") or not mid or ":" in mid:
            raise ValueError(f"line {no}: MODEL expects 'required:<model-id>' or 'preferred:<model-id>'")
        try:
            MODEL_REF(mid)
        except ValueError as exc:
            raise ValueError(f"line {no}: MODEL {how}:{mid[:64]!r}: {exc} (`form model list` shows them)") from None
        return no, mid, how == "required"
    return None


class BindsModel:
    """A kind whose record carries a Formfile: its `model_id` and `model_required` are the
    Formfile's MODEL line (derived on every write, never set by a request), so the record says
    which model it runs with, on every node alike. Whether a required model exists is not
    validity (a kind reads no other record): the node a create reaches checks it
    (node/api/records.py)."""

    name: str

    def validate(self, value, *, prefix=""):
        out = super().validate(value, prefix=prefix)  # type: ignore[misc]
        try:
            ref = formfile_model(out.get("formfile"))
        except ValueError as exc:
            raise Invalid("bad_field", f"{self.name} field 'formfile': {exc}") from None
        out["model_id"], out["model_required"] = (ref[1], ref[2]) if ref else (None, False)
        return out


# ---- account --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Account(Record):
    address: str = field(address)
    name: str | None = field(optional(NAME), default=None)
    credits: int = field(integer(0, 2**62), default=0)
    is_global_admin: bool = field(boolean, default=False)
    created_at: int = field(TIMESTAMP, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


NEW_ACCOUNT_CREDITS = 100  # as the original: a new account starts with 100 credits


class AccountKind(Kind):
    name = "account"
    record = Account
    user_records = True
    routes = (Route("POST", "/account/create", "create"), Route("POST", "/account/update", "update"),
              Route("POST", "/account/delete", "delete"))
    _settable = frozenset({"name"})
    _privileged = frozenset({"address", "credits", "is_global_admin", "created_at", "updated_at"})

    def key_of(self, intent: Intent) -> str:
        return intent.signer  # an account op is always about the signer's own account

    def user_write(self, intent: Intent, key: str, base: dict | None) -> dict | None:
        body = {k: v for k, v in intent.body.items() if not (k == "address" and isinstance(v, str)
                                                                and v.lower() == key)}
        if intent.action == "create":
            if base is not None:
                raise Invalid("conflict", f"account {key} already exists")
            reject_fields("account", body, self._settable, self._privileged)
            return self.validate({**body, "address": key, "credits": NEW_ACCOUNT_CREDITS,
                                  "created_at": intent.ts, "updated_at": intent.ts})
        if base is None:
            raise Invalid("not_found", f"account {key} does not exist")
        if intent.action == "update":
            reject_fields("account", body, self._settable, self._privileged)
            return self.validate({**base, **body, "updated_at": max(intent.ts, base["updated_at"])})
        return None  # delete

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": None, "text": value.get("name")}


# ---- instance -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Gpu(Record):
    count: int = field(integer(1, 16))
    model: str | None = field(optional(text(64)), default=None)


# Fog-wide bounds of what one instance may ask for. A VM's disk is capped at its DISK (the
# overlay's size) and booked against its node's disk (placement.py); 2 TiB is the most one
# instance may book anywhere.
MAX_VCPUS = 128
MAX_DISK_GB = 2048


@dataclass(frozen=True, slots=True)
class Resources(Record):
    vcpus: int = field(integer(1, MAX_VCPUS), default=1)
    memory_mb: int = field(integer(64, 1024 * 1024), default=512)
    disk_gb: int = field(integer(1, MAX_DISK_GB), default=5)
    gpu: dict | None = field(optional(nested(Gpu)), default=None)


DESIRED_STATES = ("running", "stopped", "paused")

# `form secrets` (formation/sealed.py): a secret's name becomes an environment variable in the
# guest; its value is in the record only as boxes sealed to hosting nodes, with the owner's
# commitment that a box re-sealed by a host is checked against
MAX_SECRETS = 32
MAX_BOXES = 16  # hosts a secret is sealed to by its owner (others get it re-sealed by a host)


@dataclass(frozen=True, slots=True)
class Secret(Record):
    commit: str = field(SHA256_HEX)
    boxes: dict = field(map_of(address, SEALED_BOX, MAX_BOXES), factory=dict)
    updated_at: int = field(TIMESTAMP, default=0)


@dataclass(frozen=True, slots=True)
class Instance(Record):
    instance_id: str = field(text(64, min_len=1))
    owner: str = field(address)
    name: str = field(SLUG)
    build_id: str | None = field(optional(HASH_ID), default=None)
    formfile: str | None = field(optional(FORMFILE), default=None)
    # the Formfile's MODEL (derived from `formfile`, see BindsModel)
    model_id: str | None = field(optional(MODEL_REF), default=None)
    model_required: bool = field(boolean, default=False)
    replicas: int = field(integer(1, 64), default=1)
    resources: dict = field(nested(Resources), factory=lambda: Resources().to_dict())
    # paused: the VMs keep their memory with their vCPUs stopped (resume, or start, runs them on)
    desired_state: str = field(one_of(*DESIRED_STATES), default="running")
    generation: int = field(integer(0, 2**62), default=0)  # bumped by restart (and by a secrets change)
    secrets: dict = field(map_of(SECRET_NAME, nested(Secret), MAX_SECRETS), factory=dict)
    tags: list = field(TAGS, factory=list)
    description: str = field(DESCRIPTION, default="")
    authorized: dict = field(AUTHORIZED, factory=dict)
    created_at: int = field(TIMESTAMP, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


class InstanceKind(BindsModel, OwnedKind):
    name = "instance"
    record = Instance
    id_field = "instance_id"
    settable = frozenset({"name", "build_id", "formfile", "replicas", "resources", "tags", "description"})
    routes = owned_routes(
        "/instance", create=("POST", "/instance/create"), update=("POST", "/instance/{id}/update"),
        delete=("POST", "/instance/{id}/delete"), extra=("start", "stop", "restart", "pause", "resume", "secrets")) + (
        Route("POST", "/instance/update", "update"),)  # the original's form: id in the body

    def _lifecycle(self, intent: Intent, base: dict, **change) -> dict:
        _need(self.name, base, intent.signer, "operator", f"{intent.action}ing")
        reject_fields(self.name, intent.body, frozenset(), frozenset())
        return self.validate({**base, **change, "updated_at": max(intent.ts, base["updated_at"])})

    def _start(self, intent, key, base):
        return self._lifecycle(intent, base, desired_state="running")

    def _stop(self, intent, key, base):
        return self._lifecycle(intent, base, desired_state="stopped")

    def _restart(self, intent, key, base):
        return self._lifecycle(intent, base, desired_state="running", generation=base["generation"] + 1)

    def _pause(self, intent, key, base):
        self._not_stopped(intent, key, base, "pause", "pausing keeps a running VM's memory; a stopped one has none")
        return self._lifecycle(intent, base, desired_state="paused")

    def _resume(self, intent, key, base):
        self._not_stopped(intent, key, base, "resume", "resume runs on a paused VM; start boots a stopped one")
        return self._lifecycle(intent, base, desired_state="running")

    def _secrets(self, intent: Intent, key: str, base: dict) -> dict:
        """Set and unset secrets (body {"set": {NAME: {commit, boxes}}, "unset": [NAME]}). A
        manager's change, which restarts the replicas (the generation goes up) so that each
        boots with the new values, as a restart does."""
        _need(self.name, base, intent.signer, "manager", "changing the secrets of")
        body = intent.body
        reject_fields(self.name, body, frozenset({"set", "unset"}), frozenset())
        given, gone = body.get("set", {}), body.get("unset", [])
        if not isinstance(given, dict) or not isinstance(gone, list):
            raise Invalid("bad_field", "fields 'set' (an object of NAME: {commit, boxes}) and 'unset' "
                          "(a list of names)")
        if not given and not gone:
            raise Invalid("bad_request", "nothing to change: give 'set' or 'unset'")
        if len(gone) > MAX_SECRETS or not all(isinstance(n, str) for n in gone):
            raise Invalid("bad_field", f"field 'unset': a list of up to {MAX_SECRETS} secret names")
        both = set(given) & set(gone)
        if both:
            raise Invalid("bad_field", f"secret {sorted(both)[0]!r} is both set and unset")
        missing = sorted(set(gone) - set(base["secrets"]))
        if missing:
            raise Invalid("not_found", f"instance {key} has no secret {missing[0]!r}")
        secrets = {n: v for n, v in base["secrets"].items() if n not in gone}
        for n, v in given.items():
            secrets[n] = {**v, "updated_at": intent.ts} if isinstance(v, dict) else v
        return self.validate({**base, "secrets": secrets, "generation": base["generation"] + 1,
                              "updated_at": max(intent.ts, base["updated_at"])})

    def _not_stopped(self, intent: Intent, key: str, base: dict, what: str, why: str) -> None:
        """Pause and resume act on VMs that exist: refused (after the level and body checks) on a
        stopped instance, saying what to run instead. Both are idempotent otherwise."""
        _need(self.name, base, intent.signer, "operator", f"{what.rstrip('e')}ing")
        reject_fields(self.name, intent.body, frozenset(), frozenset())
        if base["desired_state"] == "stopped":
            raise Invalid("unprocessable", f"instance {key} is stopped, there is nothing to {what} ({why}): "
                          f"start it with POST /instance/{key}/start (form manage start {key})")

    def index(self, value: dict) -> dict:
        return {"owner": value["owner"], "type": value.get("build_id"),
                "text": " ".join([value["name"], value["description"], *value["tags"]])}


# ---- models and agents ----------------------------------------------------------------------

# The registry plan's fields (seeds/formation-registry-plan.md), bounded like every user value.
MAX_VRAM_GB = 64 * 1024
CAPABILITIES = list_of(text(64, min_len=1), 64, unique=True)
# the plan's `tools: Vec<String>`: tool names (one line each, no markup)
TOOLS = list_of(text(64, min_len=1, pattern=r"[A-Za-z0-9][A-Za-z0-9 ._:/+-]*",
                     what="a tool name: letters, digits, spaces and . _ : / + -"), 64, unique=True)
MODEL_TYPES = list_of(SLUG, 32, unique=True)  # an agent's compatible_model_types (model_type values)
MODEL_IDS = list_of(OBJECT_ID, 32, unique=True)  # an agent's preferred_models (model ids)
CPU_EXTENSIONS = list_of(text(32, min_len=1, pattern=r"[a-z0-9][a-z0-9._-]*",
                              what="a lowercase CPU flag like avx2"), 32, unique=True)
TOKENS_PER_SECOND = optional(integer(0, 2**32 - 1))
FORMFILE_TEMPLATE = FORMFILE  # a Formfile too: no USER password in clear


@dataclass(frozen=True, slots=True)
class ResourceRequirements(Record):
    """What a model or agent needs to run (the plan's Model/AgentResourceRequirements in one
    record: an agent may name GPU needs too). Defaults: the plan's agent defaults."""

    min_vcpus: int = field(integer(1, MAX_VCPUS), default=1)
    recommended_vcpus: int = field(integer(1, MAX_VCPUS), default=1)
    min_memory_mb: int = field(integer(64, 1024 * 1024), default=512)
    recommended_memory_mb: int = field(integer(64, 1024 * 1024), default=1024)
    min_disk_gb: int = field(integer(1, MAX_DISK_GB), default=5)
    recommended_disk_gb: int = field(integer(1, MAX_DISK_GB), default=10)
    requires_gpu: bool = field(boolean, default=False)
    min_vram_gb: int | None = field(optional(integer(0, MAX_VRAM_GB)), default=None)
    cuda_cores: int | None = field(optional(integer(0, 10**7)), default=None)
    tensor_cores: int | None = field(optional(integer(0, 10**6)), default=None)
    required_cpu_extensions: list = field(CPU_EXTENSIONS, factory=list)
    required_cuda_version: str | None = field(optional(text(16, min_len=1, pattern=r"[0-9]+(\.[0-9]+){0,2}",
                                                            what="a version like 12.1")), default=None)


_PAIRED = ("vcpus", "memory_mb", "disk_gb")  # each has a min_ and a recommended_ field


def requirements(v):
    """A ResourceRequirements object whose minimums do not exceed what it recommends. Of a pair
    given half, the other half follows it: a minimum above the default recommendation raises
    the recommendation, a recommendation below the default minimum lowers the minimum."""
    if isinstance(v, dict):
        v = dict(v)
        defaults = {f.name: f.default for f in dataclasses.fields(ResourceRequirements)}
        for what in _PAIRED:
            lo, hi = f"min_{what}", f"recommended_{what}"
            if (lo in v) != (hi in v):
                given = v.get(lo, v.get(hi))
                if isinstance(given, int) and not isinstance(given, bool):
                    if lo in v:
                        v[hi] = max(given, defaults[hi])
                    else:
                        v[lo] = min(given, defaults[lo])
    out = ResourceRequirements.normalize(v)
    for what in _PAIRED:
        if out[f"min_{what}"] > out[f"recommended_{what}"]:
            raise ValueError(f"min_{what} ({out[f'min_{what}']}) is more than recommended_{what} "
                             f"({out[f'recommended_{what}']})")
    return out


@dataclass(frozen=True, slots=True)
class Model(Record):
    model_id: str = field(text(64, min_len=1))
    owner: str = field(address)
    name: str = field(NAME)
    version: str = field(text(32), default="")
    description: str = field(DESCRIPTION, default="")
    model_type: str = field(SLUG, default="other")
    framework: str = field(SLUG, default="other")
    license: str = field(text(64), default="")
    parameters: int = field(integer(0, 2**62), default=0)
    context_length: int | None = field(optional(integer(0, 2**40)), default=None)
    quantization: str | None = field(optional(text(32)), default=None)
    input_tokens_per_second: int | None = field(TOKENS_PER_SECOND, default=None)
    output_tokens_per_second: int | None = field(TOKENS_PER_SECOND, default=None)
    tags: list = field(TAGS, factory=list)
    capabilities: list = field(CAPABILITIES, factory=list)
    resource_requirements: dict | None = field(optional(requirements), default=None)
    formfile: str | None = field(optional(FORMFILE), default=None)
    formfile_template: str = field(FORMFILE_TEMPLATE, default="")
    weights_url: str | None = field(optional(text(2048)), default=None)
    weights_checksum: str | None = field(optional(text(128)), default=None)
    repository_url: str | None = field(optional(text(2048)), default=None)
    price_per_1k_tokens: float | None = field(optional(number(0, 1e9)), default=None)
    # what an instance bound to the model (its Formfile's MODEL) pays per hour it runs, in credits,
    # when its owner is not the model's (docs/economy.md, "Rent"); None or 0: free
    price_credits_per_hour: int | None = field(optional(integer(0, 10**12)), default=None)
    is_private: bool = field(boolean, default=False)
    metadata: dict = field(METADATA, factory=dict)
    authorized: dict = field(AUTHORIZED, factory=dict)
    created_at: int = field(TIMESTAMP, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


@dataclass(frozen=True, slots=True)
class Plan(Record):
    """A tier of an agent (docs/economy.md): `calls` calls for `price_credits`, usable for `days`
    days from the purchase, through the node that sold it."""

    price_credits: int = field(integer(0, 10**12))
    calls: int = field(integer(1, 10**9))
    days: int = field(integer(1, 366))


PLAN_NAME = text(32, min_len=1, pattern=r"[a-z0-9][a-z0-9-]*", what="a plan name (a-z, 0-9, '-')")
MAX_PLANS = 8


@dataclass(frozen=True, slots=True)
class Agent(Record):
    agent_id: str = field(text(64, min_len=1))
    owner: str = field(address)
    name: str = field(NAME)
    version: str = field(text(32), default="")
    description: str = field(DESCRIPTION, default="")
    agent_type: str = field(SLUG, default="other")
    framework: str = field(SLUG, default="other")
    runtime: str = field(SLUG, default="other")
    license: str = field(text(64), default="")
    tags: list = field(TAGS, factory=list)
    capabilities: list = field(CAPABILITIES, factory=list)
    tools: list = field(TOOLS, factory=list)
    compatible_model_types: list = field(MODEL_TYPES, factory=list)
    preferred_models: list = field(MODEL_IDS, factory=list)
    resource_requirements: dict | None = field(optional(requirements), default=None)
    formfile: str | None = field(optional(FORMFILE), default=None)
    formfile_template: str = field(FORMFILE_TEMPLATE, default="")
    # the MODEL line of `formfile` (derived, see BindsModel; the original's Formfile model_id
    # and model_required); the agent's own choices are preferred_models / compatible_model_types
    model_id: str | None = field(optional(MODEL_REF), default=None)
    model_required: bool = field(boolean, default=False)
    build_id: str | None = field(optional(HASH_ID), default=None)
    port: int = field(integer(1, 65535), default=8000)  # where /agents/:id/hire proxies to
    path: str = field(text(256, min_len=1, pattern=r"/[^\s]*", what="a path starting with '/'"), default="/")
    repository_url: str | None = field(optional(text(2048)), default=None)
    price_per_request: float | None = field(optional(number(0, 1e9)), default=None)  # shown, not charged
    # what the hire proxy charges a call, in credits (docs/economy.md, crdt/credits.Price); None or 0: free
    price_credits_per_call: int | None = field(optional(integer(0, 10**12)), default=None)
    price_credits_per_1k_tokens: int | None = field(optional(integer(0, 10**12)), default=None)
    max_billed_tokens: int | None = field(optional(integer(1, 10**9)), default=None)  # a call's; None: 4096
    plans: dict = field(map_of(PLAN_NAME, nested(Plan), MAX_PLANS), factory=dict)  # name -> Plan
    is_private: bool = field(boolean, default=False)
    metadata: dict = field(METADATA, factory=dict)
    authorized: dict = field(AUTHORIZED, factory=dict)
    created_at: int = field(TIMESTAMP, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


def _catalog_index(value: dict, type_field: str) -> dict:
    return {"owner": value["owner"], "type": value[type_field],
            "text": " ".join([value["name"], value["description"], *value["tags"]])}


class ModelKind(OwnedKind):
    name = "model"
    record = Model
    id_field = "model_id"
    settable = frozenset(Model.__dataclass_fields__) - PRIVILEGED - {"model_id"}
    routes = owned_routes("/models", create=("POST", "/models"), update=("PUT", "/models/{id}"),
                          delete=("DELETE", "/models/{id}"))

    def index(self, value: dict) -> dict:
        return _catalog_index(value, "model_type")


class AgentKind(BindsModel, OwnedKind):
    name = "agent"
    record = Agent
    id_field = "agent_id"
    settable = frozenset(Agent.__dataclass_fields__) - PRIVILEGED - {"agent_id", "model_id", "model_required"}
    routes = owned_routes("/agents", create=("POST", "/agents"), update=("PUT", "/agents/{id}"),
                          delete=("DELETE", "/agents/{id}"))

    def index(self, value: dict) -> dict:
        return _catalog_index(value, "agent_type")


# ---- dns ------------------------------------------------------------------------------------

def domain_name(v) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a domain name string")
    d = v.lower().rstrip(".")
    if not is_host_name(d):
        raise ValueError(f"{v!r} is not a valid domain name")
    return d


def _target(v):
    if not isinstance(v, str) or not v:
        raise ValueError("a target is an instance id or an IP address")
    try:
        return ip_address(v)
    except ValueError:
        return text(64, min_len=1, pattern=r"[a-z0-9][a-z0-9_-]*", what="an instance id or IP address")(v)


@dataclass(frozen=True, slots=True)
class DnsRecord(Record):
    record_id: str = field(text(64, min_len=1))
    domain: str = field(domain_name)
    owner: str = field(address)
    record_type: str = field(one_of("A", "AAAA", "CNAME"), default="A")
    targets: list = field(list_of(_target, 64, unique=True), factory=list)
    cname_target: str | None = field(optional(domain_name), default=None)
    ttl: int = field(integer(1, 86400), default=60)
    authorized: dict = field(AUTHORIZED, factory=dict)
    created_at: int = field(TIMESTAMP, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


class DnsKind(OwnedKind):
    """A DNS record: its owner's claim on a name. The record id derives from its creator like
    every other; many owners may hold records for one domain (which one a name resolves to is
    the DNS server's decision, not a first-come race in the state)."""

    name = "dns"
    record = DnsRecord
    id_field = "record_id"
    settable = frozenset({"domain", "record_type", "targets", "cname_target", "ttl"})
    routes = owned_routes("/dns", create=("POST", "/dns/create"), update=("POST", "/dns/{id}/update"),
                          delete=("POST", "/dns/{id}/delete"))

    def validate(self, value, *, prefix=""):
        out = super().validate(value, prefix=prefix)
        if out["record_type"] == "CNAME" and not out["cname_target"]:
            raise Invalid("unprocessable", "dns field 'cname_target': a CNAME record needs one")
        return out

    def index(self, value: dict) -> dict:
        return {"owner": value["owner"], "type": value["record_type"], "text": value["domain"]}
