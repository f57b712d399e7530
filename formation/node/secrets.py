"""An instance's secrets on the nodes that host it (formation/sealed.py, docs/secrets.md).

A hosting node opens the boxes sealed to it (the owner's, in the instance record, or one a host
re-sealed for it, a `secret_box` record), checks each against the owner's commitment, and hands
the values to its VM as a small read-only disk (formation.guest.secrets_tar) at every boot. A
node that holds the values re-seals them for the other nodes placed for the instance that have
no box yet, so a replica that moves finds its secrets without its owner. Values are never
logged; the disk file is the node's own (0600), removed with the VM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from formation import guest, sealed

from .ports import NodeState

log = logging.getLogger("formation.secrets")
MAX_BOXES_READ = 1024  # secret_box records read for one instance and this node


class SecretsUnavailable(Exception):
    """Some secret has no box this node can open yet: its replica waits (its status says which)."""


class Keeper:
    def __init__(self, node: NodeState, secret_key: bytes):
        self.node = node
        self._secret_key = secret_key
        self.dir = node.config.data_dir / "secrets"

    async def open_all(self, inst: dict) -> dict[str, sealed.Plain]:
        """Every secret of the instance, opened with this node's key; SecretsUnavailable names
        the ones it cannot open (no box for it yet, or only boxes that fail the commitment)."""
        secrets = inst.get("secrets") or {}
        if not secrets:
            return {}
        iid, me = inst["instance_id"], self.node.address
        resealed = await self.node.astore.list("secret_box", owner=me, text=iid, limit=MAX_BOXES_READ)
        out, missing = {}, []
        for name, secret in sorted(secrets.items()):
            boxes = [secret["boxes"][me]] if me in secret["boxes"] else []
            boxes += [b["box"] for b in resealed
                      if b["instance_id"] == iid and b["name"] == name and b["commit"] == secret["commit"]]
            plain = self._first_open(iid, name, secret["commit"], boxes)
            if plain is None:
                missing.append(name)
            else:
                out[name] = plain
        if missing:
            raise SecretsUnavailable(
                f"waiting for secret{'s' * (len(missing) > 1)} {', '.join(missing)} to be sealed for this node "
                "(by a node that hosts the instance, or by its owner: form secrets set)")
        return out

    def _first_open(self, iid: str, name: str, commit: str, boxes: list[str]) -> sealed.Plain | None:
        for box in boxes:
            try:
                return sealed.unseal(self._secret_key, box, instance_id=iid, name=name,
                                     target=self.node.address, commit=commit)
            except sealed.SealError as exc:
                log.warning("instance %s: a box of secret %s for this node is refused: %s", iid, name, exc)
        return None

    async def disk_for(self, inst: dict) -> Path | None:
        """The secrets disk of the instance's VM, written anew (None: it has no secrets)."""
        plains = await self.open_all(inst)
        path = self.dir / f"{inst['instance_id']}.tar"
        if not plains:
            path.unlink(missing_ok=True)
            return None
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = guest.secrets_tar({n: p.value for n, p in plains.items()})
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
        return path

    def forget(self, instance_id: str) -> None:
        (self.dir / f"{instance_id}.tar").unlink(missing_ok=True)

    async def reseal(self, inst: dict, placed: list[str]) -> int:
        """Seal the instance's secrets for the placed nodes that have no box from its owner nor
        from this node; how many boxes were written. Only when this node can open them all."""
        secrets = inst.get("secrets") or {}
        others = [n for n in placed if n != self.node.address]
        if not secrets or not others:
            return 0
        keys = await self._public_keys(others)
        iid, me = inst["instance_id"], self.node.address
        due = []  # (name, target, box key): boxes to write; usually none (every pass asks)
        for name, secret in sorted(secrets.items()):
            for target in others:
                if target in secret["boxes"] or target not in keys:
                    continue
                key = f"{iid}:{name}:{target}@{me}"
                mine = await self.node.astore.get("secret_box", key)
                if mine is None or mine["commit"] != secret["commit"]:
                    due.append((name, target, key))
        if not due:
            return 0
        try:
            plains = await self.open_all(inst)  # the values are opened only when a box is due
        except SecretsUnavailable:
            return 0
        for name, target, key in due:
            box = sealed.seal(plains[name], keys[target], instance_id=iid, name=name, target=target)
            await self.node.write("secret_box", key, {"instance_id": iid, "name": name, "target": target,
                                                      "commit": secrets[name]["commit"], "box": box})
        written = len(due)
        if written:
            log.info("instance %s: %d secret box(es) sealed for nodes placed for it since", iid, written)
        return written

    async def _public_keys(self, addresses: list[str]) -> dict[str, bytes]:
        out = {}
        for rec in await self.node.fog_nodes():
            if rec["address"] in addresses and rec.get("public_key"):
                out[rec["address"]] = bytes.fromhex(rec["public_key"])
        return out
