"""Queue scale benchmark for issue 6, section 3 (stub: waits for the store API to settle).

Planned, one command (``.venv/bin/python bench/queue_scale.py --messages 100000``):

1. generate 100,000 deferred messages through ``relay.store`` (not raw SQL), each with
   one recipient for a disabled or unreachable connector and a next attempt far in
   the future;
2. time the first page of ``relay queue list --status deferred`` and ``relay queue
   digest`` (each must answer in under 1 s);
3. start ``relay serve`` on that queue: time until it answers 220 (restart ready in
   under 5 s), sample its RSS (VmRSS / VmHWM, under 200 MB) and its idle CPU over
   ~30 s from /proc/<pid>/stat (under 2 % while nothing is due);
4. 10,000 messages queued for a connector whose smart host (smtp-sink) comes back:
   all delivered, in arrival order (checked against the sink's dump files), with the
   number of simultaneous connections never above the connector's limit.

The cheaper variant (20,000 messages, no timing assertions) belongs in the test suite.
"""

raise SystemExit("bench/queue_scale.py is not written yet: see its docstring")
