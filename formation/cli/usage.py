"""How `form account usage`, `form manage usage ID` and `form agent usage ID` show usage (GET
/account/usage, GET /instance/ID/usage, GET /agents/ID/usage; docs/economy.md): one row per instance or per measuring node, then the total,
in units people read (CPU time, GB-hours, bytes, calls); --json prints the node's answer."""

from __future__ import annotations

from formation.cli import output
from formation.cli.output import EXIT_OK, Column


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m, 4d03h."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.3g}s" if 0 < seconds < 10 and seconds != s else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def hours(unit_seconds: int, per: int = 1) -> str:
    """GB-hours (or any unit-hours) of a unit-seconds figure, to three figures."""
    h = unit_seconds / per / 3600
    if h == 0:
        return "0"
    if h >= 100:
        return f"{h:,.0f}"
    return f"{h:.2f}" if h >= 1 else f"{h:.3g}"


USAGE_COLUMNS: list[Column] = [
    ("CPU", lambda r: duration(r["cpu_seconds"])),
    ("MEM-GB-H", lambda r: hours(r["memory_mb_seconds"], 1024)),
    ("DISK-GB-H", lambda r: hours(r["disk_gb_seconds"])),
    ("NET-IN", lambda r: output.size(r["net_rx_bytes"])),
    ("NET-OUT", lambda r: output.size(r["net_tx_bytes"])),
    ("HIRES", lambda r: r["hires"]),
    ("HIRE-TIME", lambda r: duration(r["hire_ms"] / 1000)),
    ("TOKENS-IN/OUT", lambda r: f"{r['tokens_in']}/{r['tokens_out']}"),
]


def show_instance(json_mode: bool, res: dict) -> int:
    if json_mode:
        output.print_json(res)
        return EXIT_OK
    nodes = res.get("nodes") or []
    rows = [*nodes, {"node": "total", **res["total"]}] if nodes else []
    output.table(rows, [("NODE", lambda r: r["node"]), *USAGE_COLUMNS,
                        ("UPDATED", lambda r: output.when(r["updated_at"]) if r.get("updated_at") else "")],
                 f"no usage of instance {res.get('instance_id')} recorded yet (its nodes write it every "
                 "[node] usage_interval_seconds while it runs or is called)")
    return EXIT_OK


def show_account(json_mode: bool, res: dict) -> int:
    if json_mode:
        output.print_json(res)
        return EXIT_OK
    _instances_table(res, f"account {res.get('address')} owns no instances")
    return EXIT_OK


def _instances_table(res: dict, empty: str) -> None:
    """A row per instance, then the total."""
    instances = res.get("instances") or []
    rows = [*instances, {"instance_id": "total", "name": "", "nodes": "", **res["total"]}] if instances else []
    output.table(rows, [("INSTANCE", lambda r: r["instance_id"]), ("NAME", lambda r: r.get("name") or ""),
                        ("NODES", lambda r: r["nodes"]), *USAGE_COLUMNS], empty)


def show_agent(json_mode: bool, res: dict) -> int:
    if json_mode:
        output.print_json(res)
        return EXIT_OK
    _instances_table(res, f"no instance of agent {res.get('agent_id')}'s build "
                          f"({res.get('build_id') or 'none set'}) is yours")
    charged = res["charged"]
    output.blank()
    nodes = charged.get("nodes") or []
    rows = [*nodes, {"node": "total", "host": "", **charged}] if nodes else []
    output.table(rows, [("CHARGED BY", lambda r: r["node"]), ("HOST", lambda r: r["host"]),
                        ("CALLS", lambda r: r["calls"]), ("CREDITS", lambda r: r["credits"]),
                        ("TOKENS-IN/OUT", lambda r: f"{r['tokens_in']}/{r['tokens_out']}")],
                 "no priced call of it charged yet")
    if nodes:
        output.note(f"{charged['consumers']} consumer(s); you get the credits less the hosts' operator share "
                    "(`form account credits`)")
    return EXIT_OK
