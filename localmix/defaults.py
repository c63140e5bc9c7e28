"""The defaults every entry point shares, in a module that imports nothing.

The command line shows these in its help and passes them on; it imports this module instead of
the runtime's, so that `localmix --help` and the client side of `run` start without PyTorch.
Where a runtime module keeps its own copy (`expert_cache.DEFAULT_POLICY`,
`offload.DEFAULT_PREFETCH`, `quant.formats.METHODS`), tests/test_light_import.py checks that
the two agree (tests/test_cli.py for the group size).
"""

from __future__ import annotations

DEFAULT_CONTEXT = 4096  # rolling KV window, in tokens (at most the model's own window)
DEFAULT_POLICY = "transition"  # expert cache eviction
DEFAULT_PREFETCH = 1  # layers of router-driven prefetch
DEFAULT_EXPERTS = "auto"  # where a missed expert runs: the mode predicted fastest (hybrid.py)
QUANT_METHODS = ("wmse", "mse", "rtn")  # how quantization scales are chosen
DEFAULT_METHOD = "wmse"
DEFAULT_GROUP_SIZE = 64  # weights per quantization group (quant.manifest.Settings.group_size)

# `localmix serve`, and where `run` and `chat` look for it.
SERVER_HOST = "127.0.0.1"  # loopback: nothing outside the machine reaches the server unless told
SERVER_PORT = 11435  # next to Ollama's 11434
SERVER_ENV = "LOCALMIX_HOST"  # "host:port" of the server `run` and `chat` use
API_KEY_ENV = "LOCALMIX_API_KEY"  # the key the server asks for and the client sends
DEFAULT_KEEP_ALIVE = "5m"  # how long an idle model stays loaded
DEFAULT_MAX_QUEUE = 16  # requests waiting for the engine before the server answers "overloaded"
