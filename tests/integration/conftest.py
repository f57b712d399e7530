from tests.netns_node import node  # noqa: F401 - a node with VMs in its own network namespace
