"""The HTTP API assembled: the endpoint table of the handler modules, served by one app.

    http.py       plumbing: Call, ApiError, Endpoint, arguments, paging, errors, the routes
    records.py    the shared state: health, accounts, instances, nodes, DNS, catalog, records,
                  events, every signed write
    workloads.py  builds, and a replica's console, metrics and addresses
    hire.py       hiring an agent: its answer, proxied from a running replica
    usage.py      usage reports (instance, account) and the node's Prometheus /metrics
    openapi.py    /openapi.json, generated from the same table (so it cannot drift)
    schemas.py    bodies and answers as JSON Schema, derived from the records' dataclasses
    views.py      who may see what, and the reads the handler modules share
"""

from __future__ import annotations

from quart_trio import QuartTrio

from . import credits, hire, records, usage, workloads
from .http import Endpoint, build_app
from .openapi import document


def endpoints() -> list[Endpoint]:
    return records.endpoints() + workloads.endpoints() + hire.endpoints() + usage.endpoints() + credits.endpoints()


def create_app(runtime) -> QuartTrio:
    table = endpoints()
    # each endpoint declares the body it takes (Endpoint.max_body): a build's context is the
    # largest (POST /pack/build), a signed write takes 48 KiB, a GET none
    return build_app(runtime, table, document=document(table))
