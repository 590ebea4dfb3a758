"""The spool: where queued mail lives, behind one interface.

- `protocol`: `Spool`, what the intake, the queue manager, the admin functions and the CLI
  may ask of a queue backend; `rows`: the value types that cross it; `settings`: the runtime
  settings' typed keys.
- The SQLite backend: `sqlite` (`SqliteSpool`, `open_spool`) composes `schema` (opening,
  migrations), `writer` (the group commit, the only code that writes), `reads` (the queue
  manager's reads) and `views` (list, show, digest, settings).
"""
