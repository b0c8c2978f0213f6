"""Fake top-level `networks` module of the built-in Lora extension (docs/host-formats.md#refresh-without-a-restart)."""

from modules import shared


def list_available_networks():
    shared.CALLS.append(("networks.list_available_networks", None))


def network_restore_weights_from_backup(module):
    """As the host: copy the backup taken before a LoRA was merged back into the weight."""
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None:
        module.weight.data.copy_(backup)
