"""The operator key step: the key unlocked from its file, or made in memory (written at the
config step, once the checks pass)."""

from __future__ import annotations

from dataclasses import dataclass

from formation.crdt.keys import PrivateKey, format_address, to_checksum
from formation.keystore import load_keystore, resolve_password

from .plan import Plan
from .steps import Step


@dataclass
class Operator:
    key: PrivateKey
    created: bool
    password: str | None  # only for a key still to be written

    @property
    def address(self) -> str:
        return format_address(self.key.address)


def operator_key(plan: Plan, st: Step) -> Operator | None:
    config = plan.config
    if plan.running is not None:
        st.done(f"held by the running node ({plan.address})")
        return None
    path = config.keystore_path
    if path.exists():
        password = resolve_password(config.node.password_file, prompt=True, confirm=False)
        key = load_keystore(path, password)
        st.done(f"unlocked {to_checksum(key.address)} ({path})")
        return Operator(key, False, None)
    password = resolve_password(config.node.password_file, prompt=True, confirm=True)
    key = PrivateKey()
    st.ok(f"new key {to_checksum(key.address)} (written to {path} once the checks pass)")
    return Operator(key, True, password)
