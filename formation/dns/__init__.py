"""The node's DNS server (docs/dns.md): the fog's names from the state, vanity domains their own
DNS proves, everything else forwarded upstream or refused.

    names.py    state records -> a frozen Zone (pure)
    answer.py   query message + Zone -> response message (pure)
    bounds.py   the bounded caches, rate limiter and slots the server keeps (pure)
    forward.py  upstream resolvers: cache, one question in flight, timeouts, TCP on truncation
    verify.py   vanity domains: TXT _formation.<domain> names the owner, checked and re-checked
    server.py   UDP and TCP in the caller's trio nursery; the query path never blocks

formation.dns imports nothing of ours (DESIGN.md §1): the node (formation/node/dnsview.py)
reads the state, adds what only it knows (EXPOSEd ports from the Formfiles, which nodes are
live members and their VM subnets) and swaps each new zone into the server.
"""
