"""Formation: a peer-to-peer fog cloud for AI agents and models."""
