"""Spiking Heidelberg Digits (Cramer et al. 2020): the paper's tables 2-3 and
figures 4-6, one command.

    python recipes/shd.py --data-dir data --out runs/shd      # paper settings
    python recipes/shd.py --quick                              # smoke run

Data: tonic's layout under --data-dir: SHD/shd_train.h5.zip + SHD/shd_train.h5
(test: shd_test.*). The 700 channels are downsampled to 350 (pairs summed), framed
at dt = 10 ms; the paper does not state the duration used: default 1 s (T = 100).
Network [128 x 3]-20 and the hyper-parameters of the paper's table 6 (see HYPER).
"""

from __future__ import annotations

import sys

from asynctrain import data
from asynctrain import cli
from asynctrain.experiment import Hyper
from asynctrain.recipe import DataSpec, recipe_main

HYPER = Hyper(hidden=(128, 128, 128), dt=10.0, batch_size=32, epochs=100, lr=7e-4, theta=0.3,
              weight_decay=1e-4, tau=100.0, steepness=10.0, input_dropout=0.2, K=8,
              refractory_dropout=0.8, momentum_noise=0.1)


def _args(ap) -> None:
    ap.add_argument("--duration-ms", type=cli.positive(float), default=1000.0,
                    help=f"recording time used, in ms, a whole number of dt = {HYPER.dt:g} ms frames; "
                         f"longer recordings are cropped")


def _load(args, train: bool):
    return data.shd(args.data_dir, train=train, dt=HYPER.dt, duration_ms=args.duration_ms,
                    download=args.download)


SPEC = DataSpec(name="shd", title="SHD", n_inputs=350, n_classes=20, hyper=HYPER, load=_load,
                extra_args=_args)


def main(argv=None) -> int:
    return recipe_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
