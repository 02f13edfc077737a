"""Which autocast is in force: the layers that compute in float32 under it
(GRN's norm, the stem) hand back what the rest of the network expects."""
from typing import Optional

import torch

# device types with autocast in every torch we meet: no availability query
# for them (torch 2.11's Dynamo broke the graph at this query in GRN's norm on
# an H100, 2026-11-25; which of its calls it could not trace is not
# established, and torch 2.13 traces them all)
ALWAYS_AUTOCAST = ('cpu', 'cuda')


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on this device type, None where it is off
    (or the device type has no autocast, e.g. ``meta``)."""
    if device_type not in ALWAYS_AUTOCAST and not torch.amp.is_autocast_available(device_type):
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
