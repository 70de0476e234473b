"""asynctrain: train spiking neural networks for asynchronous (unlayered) execution.

    import asynctrain as at
    snn = at.AsyncSNN(net, at.SimConfig(forward_group_size=8, policy="MS"))
"""

from .config import SimConfig
from .module import AsyncSNN
from .network import Network

__all__ = ["AsyncSNN", "Network", "SimConfig"]
__version__ = "0.1.0"
