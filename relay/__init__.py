"""mailflow-relay: a simulated Exchange Online cloud relay for mail-system test labs."""

__version__ = "0.1.0"
