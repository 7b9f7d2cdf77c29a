"""Deprecated location of :mod:`ddk.distributed` (the helpers moved to the library's base layer).

``from ddk.integrations.distributed import X`` keeps working; import from ``ddk.distributed``.
"""

from ddk.distributed import *  # noqa: F403
