"""The keys: `form key show|import` (the node operator's, DATA_DIR/operator.key) and `form kit
init` (the user's wallet, CONFIG_DIR/wallet.json, and config.toml). Both through the key reader
(keyfile.py)."""

from __future__ import annotations

import argparse

from formation.cli import output
from formation.cli.keyfile import new_key, operator_key, read_key
from formation.cli.output import EXIT_FAILURE, EXIT_OK, CliError
from formation.cli.parsing import CONFIG_HELP, DATA_DIR_HELP, group, leaf
from formation.cli.session import Settings
from formation.crdt.keys import PrivateKey, to_checksum
from formation.node.config import Config, load_config
from formation.node.setup import ensure_data_dir

# ---- form key ----------------------------------------------------------------------------------


def _node_config(args: argparse.Namespace) -> Config:
    if args.data_dir is None:
        return load_config(args.config, {})
    return load_config(args.config, {"node.data_dir": args.data_dir},
                       override_names={"node.data_dir": "--data-dir"})


def _show(args: argparse.Namespace, key: PrivateKey, config: Config) -> None:
    address = to_checksum(key.address)
    if args.json:
        output.print_json({"address": address, "keystore": str(config.keystore_path)}, indent=None)
    else:
        output.result(address)


def cmd_key_show(args: argparse.Namespace) -> int:
    config = _node_config(args)
    _show(args, read_key(operator_key(config.keystore_path, config.node.password_file)), config)
    return EXIT_OK


def cmd_key_import(args: argparse.Namespace) -> int:
    config = _node_config(args)
    kf = operator_key(config.keystore_path, config.node.password_file)
    key = new_key(kf, import_hex=True, prepare=lambda: ensure_data_dir(config))
    output.note(f"imported the key into {kf.path}")
    _show(args, key, config)
    return EXIT_OK


# ---- form kit ----------------------------------------------------------------------------------


def cmd_kit_init(args: argparse.Namespace) -> int:
    settings = Settings(args)
    wallet = settings.wallet.path

    def make_dirs() -> None:
        try:
            settings.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            wallet.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise CliError(f"cannot create {settings.dir}: {exc.strerror or exc}", EXIT_FAILURE) from None

    key = new_key(settings.wallet, import_hex=args.import_key, prepare=make_dirs)
    settings.write({**settings.values, "node": settings.node_url, "wallet": str(wallet)})
    address = to_checksum(key.address)
    if args.json:
        output.print_json({"address": address, "wallet": str(wallet), "config": str(settings.path),
                           "node": settings.node_url})
    else:
        output.result(address)
        output.note(f"{'imported the key into' if args.import_key else 'created a new wallet in'} "
                    f"{wallet}; keep its password safe, it cannot be recovered (scripts give it in "
                    "FORM_WALLET_PASSWORD)")
        output.note(f"settings in {settings.path}; next: form account create --name NAME")
    return EXIT_OK


def register(commands, common: argparse.ArgumentParser) -> None:
    _, key = group(commands, "key", "manage the operator key",
                   "Manage the operator key (DATA_DIR/operator.key).")
    for name, fn, help_, description, data_dir in (
        ("show", cmd_key_show, "unlock the keystore and print its address",
         "Unlock the operator keystore and print its address.", DATA_DIR_HELP),
        ("import", cmd_key_import, "create the keystore from a hex private key read on stdin",
         "Read a secp256k1 private key (64 hex digits, optionally 0x-prefixed) from stdin and "
         "encrypt it into DATA_DIR/operator.key. Refuses to overwrite an existing keystore.",
         None),  # None: --data-dir is required
    ):
        p = leaf(key, name, help_, fn, None, description=description)
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        p.add_argument("--data-dir", metavar="DIR", required=data_dir is None,
                       help=data_dir or "data directory")
        p.add_argument("--json", action="store_true", help="print one JSON object")


def register_kit(commands, common: argparse.ArgumentParser) -> None:
    _, kit = group(commands, "kit", "your wallet and settings",
                   "Your wallet (the key that signs every request) and settings (config.toml).")
    p = leaf(kit, "init", "create a wallet (or import a key) and write config.toml", cmd_kit_init,
             common, description="Create a new wallet, or with --import-key encrypt a hex private "
                                 "key read from stdin, at CONFIG_DIR/wallet.json, and write "
                                 "CONFIG_DIR/config.toml (node, wallet). The password comes from "
                                 "FORM_WALLET_PASSWORD or a prompt (the node's FORMATION_PASSWORD "
                                 "is not the wallet's). Prints the wallet's address.")
    p.add_argument("--import-key", action="store_true",
                   help="read a secp256k1 private key (64 hex digits) from stdin instead of making one")
