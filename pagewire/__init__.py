"""pagewire: the shared package — what router, scheduler and worker must agree on.

Sampling parameters and their validation, the block hash, Redis key names, configuration, the
generated protobuf stubs (``pagewire.v1``) and the command line live here, once each.
"""

__version__ = "0.1.0"
