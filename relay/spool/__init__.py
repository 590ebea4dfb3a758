"""The spool: where queued mail lives, behind one interface (`relay.spool.protocol.Spool`),
with its value types in `relay.spool.rows`."""
