"""Fake top-level `networks` module of the built-in Lora extension (docs/host-formats.md#refresh-without-a-restart)."""

from modules import shared


def list_available_networks():
    shared.CALLS.append(("networks.list_available_networks", None))


def network_restore_weights_from_backup(module):
    """As the host (`restore_weights_backup`): an in-place copy of the backup into the parameter itself, which
    fails outside no-grad on a weight that requires grad (the host's UNet weights do)."""
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None:
        module.weight.copy_(backup)
