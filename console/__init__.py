"""``oms console``: a web console for operators.

An application-layer client of the service: it speaks to the intake endpoint
(requests) and the events endpoint (live updates) with ``gateways.client``, as any
channel or the CLI does, so it works the same for one node or a sharded
service, and it never opens the data folder. See ``docs/console.md``.
"""
