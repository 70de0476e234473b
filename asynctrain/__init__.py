"""asynctrain: train spiking neural networks for asynchronous (unlayered) execution.

    import asynctrain as at
    snn = at.AsyncSNN(net, at.SimConfig(forward_group_size=8, policy="MS"))
"""

from . import _layout

_layout.install()  # a checkout on sys.path: asynctrain.kernels / .models are ../kernels, ../models

from .config import SimConfig  # noqa: E402
from .module import AsyncSNN  # noqa: E402
from .network import Network  # noqa: E402
from ._version import __version__  # noqa: E402

__all__ = ["AsyncSNN", "Network", "SimConfig", "__version__"]
