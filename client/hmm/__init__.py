"""hmm: the client side of hmmd — device SDK, process client, shared ABI numbers.

Importing this package pulls in no gRPC; the SDK modules that talk to the daemon
(`hmm.device`, `hmm.process`) do.
"""

from hmm.errors import KernelError

__all__ = ["KernelError"]
