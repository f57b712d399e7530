"""The soak, short (issue 13, "Budgets and bounds"; tests/soak.py runs it, docs/soak.md says
what it shows): 3 `form node` processes on 127.0.0.1, 20 signed clients writing for a minute
while a hostile peer floods gossip and sync and a tenant uploads archive bombs. Afterwards every
acknowledged write is on every node, the nodes stayed under a memory bound and kept answering
/health, every bomb was refused with a 4xx, and every identity of the attacker was banned by
every node (and no honest node banned another). About 100 s.
"""

from __future__ import annotations

import pytest

from tests.soak import SoakConfig, run_soak, table

pytestmark = pytest.mark.slow

SECONDS = 60.0
NODES = 3
# Measured (docs/soak.md): 112 MB before, a peak of 136-137 MB, 20 clients for 60 s. The bound is
# twice the peak: a node that kept what it is flooded with (pending forged ops, rejected ops,
# bodies, sessions) past its own bounds would pass it within a minute.
RSS_PEAK_MB = 280
# /health answers in 130-150 ms at the median, p99 1.0-1.1 s and max 1.4 s on the 2 shared
# cores this runs on (3 nodes, the build node, the load and the attacker all on them): generous
HEALTH_P99_MS = 2000
HEALTH_MAX_MS = 5000


async def test_soak_every_acked_write_survives_a_flood_within_bounds(tmp_path):
    r = await run_soak(SoakConfig(seconds=SECONDS, nodes=NODES), tmp_path)
    print(table(r))

    # the load ran, and nothing it was told was written is missing anywhere
    assert r.writes_acked >= 20 * SECONDS * 0.4, (r.writes_acked, r.writes_refused, r.writes_failed)
    assert not r.writes_failed, r.writes_failed
    assert r.missing == 0, f"{r.missing} acknowledged writes missing, e.g. {r.missing_examples}"
    assert r.nodes_running == list(range(NODES)), f"nodes running afterwards: {r.nodes_running}"

    # memory: a stated bound, and the figures for the record
    for node, rss in r.rss_kb.items():
        assert rss["peak"] < RSS_PEAK_MB * 1024, f"{node}: RSS {rss} kB, bound {RSS_PEAK_MB} MB"

    # /health kept answering, quickly, on every node
    for node, h in r.health_per_node.items():
        assert h["n"] >= SECONDS, f"{node}: only {h['n']} /health samples"
        assert h["failed"] == 0, f"{node}: {h['failed']} /health probes failed"
        assert h["p99_ms"] < HEALTH_P99_MS and h["max_ms"] < HEALTH_MAX_MS, f"{node}: /health {h}"

    # every archive bomb was refused with a 4xx by the node that checks archives; the fog's
    # nodes (VMs off) refuse the build itself
    build = [a for a in r.archives if a["target"] == "build-node"]
    assert len(build) >= 12, f"only {len(build)} hostile uploads"
    assert all(a["status"] in (400, 413) and a["error"] in ("bad_context", "too_large") for a in build), \
        [a for a in build if a["status"] not in (400, 413)]
    assert r.archives_accepted == 0
    assert all(a["status"] == 503 and a["error"] == "vm_disabled" for a in r.archives if a["target"] != "build-node")

    # the hostile peer flooded, then every identity it used was banned by every node, and cut off
    a = r.attacker
    assert a["waves"] >= 3 and not a["errors"], a
    assert a["sybil_ops"] > 0 and a["forged_dep_ops"] > 0 and a["sync_sessions"] > 0, a
    assert a["bans"] == a["waves"] * NODES, f"bans: {a['banned_by']}"
    assert a["not_dropped"] == 0, a
    assert not r.honest_bans, r.honest_bans
    # the forged ops wait in the pending buffer (bounded), the fog still agrees on everything else
    assert r.converge_seconds is not None and len(set(r.ops_after)) == 1
