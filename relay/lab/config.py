"""A complete relay configuration that points at the lab's fault targets (`--write-config`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from relay.config import Config, Connector, ConnectorType, DnsConfig, dump_toml
from relay.lab.faults import Fault, FaultLab

HEADER = """\
# Written by `relay lab faults --write-config`: the relay's configuration with
#  - [dns] pointing at the lab's DNS server,
#  - every on-premises connector's smart host at the lab's refused endpoint (on-premises
#    "shut down", the seed's Fix now scenario), and
#  - one partner connector per failure mode (send to user@<mode>.lab.test),
#  - alerts that fire after one message and a few seconds, as a lab wants, and
#  - a queue and mailboxes of its own next to this file, apart from any other relay's.
# Start the relay with: relay --config <this file> serve
"""


def spool_dir(config_path: Path) -> str:
    """The lab's own spool directory, next to its config and named after it: `lab-queue`
    for lab.toml (relative, so it resolves against the config file's directory)."""
    return f"{config_path.stem}-queue"


def lab_config(base: Config, lab: FaultLab, *, spool: str) -> str:
    """The base config with the lab wired in, as TOML (comments are not kept); its queue
    and mailboxes under `spool`, so the lab's mail and ids start apart from any other
    relay's (`make run`'s queue/, say)."""
    blocks = tomllib.loads(lab.connector_blocks())
    lab_connectors = [Connector.model_validate(c) for c in blocks["connectors"]]
    refused = lab.smart_host(Fault.REFUSED)
    own = [
        c.model_copy(update={"smart_hosts": [refused], "use_mx": False, "ca_file": ""})
        if c.type is ConnectorType.ON_PREMISES
        else c
        for c in base.connectors
    ]
    taken = {c.name for c in own}
    config = base.model_copy(
        update={
            "dns": DnsConfig.model_validate(blocks["dns"]),
            "connectors": own + [c for c in lab_connectors if c.name not in taken],
            "alerts": base.alerts.model_copy(update={"threshold": 1, "after": 10.0}),
            "queue": base.queue.model_copy(update={"path": f"{spool}/relay.db"}),
            "mailboxes": base.mailboxes.model_copy(update={"path": f"{spool}/mailboxes"}),
        }
    )
    return HEADER + "\n" + dump_toml(config)
