"""The node's HTTP API (quart-trio on hypercorn, inside the node's nursery)."""
