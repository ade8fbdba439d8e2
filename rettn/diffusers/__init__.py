"""Floor 3, the diffusers integration: apply / handle / the processor wrapper and its routing,
step detection, sequence parallelism and the family table. Imports ``rettn.core`` and ``rettn.ops``."""

from rettn.diffusers.apply import apply_rettention, describe
from rettn.diffusers.handle import RettnHandle

__all__ = ["RettnHandle", "apply_rettention", "describe"]
