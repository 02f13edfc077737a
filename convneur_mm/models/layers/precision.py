"""Which autocast is in force: the layers that compute in float32 under it
(GRN's norm, the stem) hand back what the rest of the network expects."""
from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on this device type, None where it is off
    (or the device type has no autocast, e.g. ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
