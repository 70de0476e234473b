"""VGG-7 for CIFAR-10 (paper, appendix A.10 and figure 11), as a plain ``nn.Sequential``.

Reading of the paper (its figure 11 did not survive the text extraction; SPEC 10
fixes the rest): seven weight layers, no batch norm, no dropout, no biases,

    conv3x3 64 - conv3x3 64 - avgpool2 - conv3x3 128 - conv3x3 128 - avgpool2
    - conv3x3 256 - conv3x3 256 - avgpool2 - flatten - linear 4096 -> 10

for 3x32x32 inputs. Every weight layer is followed by IF neurons (tau = inf, theta 0.2)
when executed by `AsyncSNN`; pooling is average pooling, which is linear and is folded
into the next layer's synaptic map (SPEC 1), so it adds no neurons: 229,386 neurons
(65536 + 65536 + 32768 + 32768 + 16384 + 16384 + 10), 1.19 M weights. "VGG-7" counts
the seven weight layers; a hidden fully connected layer (as in some VGG-7 variants)
is not in the paper's description of the model and is left out.

Initialisation: PyTorch's default (Kaiming-uniform, a = sqrt(5)). With analog inputs
in [0, 1] and theta 0.2 it gives 15-30% spike density in every layer of a layered
pass (measured on smooth random images); Kaiming-normal gives 35-45%, which makes
asynchronous execution (one forward step per K spikes) twice as long.

The returned module carries ``input_shape = (3, 32, 32)`` so `AsyncSNN` knows the
image geometry without being told.
"""

from __future__ import annotations

from torch import nn

VGG7_LAYOUT = (64, 64, "P", 128, 128, "P", 256, 256, "P")


def vgg7(num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
         image_size: int = 32) -> nn.Sequential:
    """VGG-7 as above. `width` scales every conv's channel count (at least 1 channel;
    1.0 is the paper's model; smaller values make tiny copies for tests and smoke runs).
    `image_size` must be divisible by 8 (three 2x2 poolings)."""
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a number > 0, got {width!r}")
    if not (isinstance(image_size, int) and image_size >= 8 and image_size % 8 == 0):
        raise ValueError(f"image_size must be a multiple of 8 (three 2x2 poolings), got {image_size!r}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for v in VGG7_LAYOUT:
        if v == "P":
            layers.append(nn.AvgPool2d(2))
            size //= 2
        else:
            out = max(1, round(v * width))
            layers.append(nn.Conv2d(c, out, 3, stride=1, padding=1, bias=False))
            c = out
    layers += [nn.Flatten(), nn.Linear(c * size * size, num_classes, bias=False)]
    net = nn.Sequential(*layers)
    net.input_shape = (in_channels, image_size, image_size)
    return net
