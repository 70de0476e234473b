"""Model builders: the paper's MLPs and VGG-7, as plain ``nn.Sequential``."""

from .mlp import PAPER_MLPS, mlp
from .vgg7 import vgg7

__all__ = ["PAPER_MLPS", "mlp", "vgg7"]
