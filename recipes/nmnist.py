"""N-MNIST (Orchard et al. 2015): the paper's tables 2-3 and figures 4-6, one command.

    python recipes/nmnist.py --data-dir data --out runs/nmnist      # paper settings
    python recipes/nmnist.py --quick                                 # smoke run

Data: tonic's layout under --data-dir: NMNIST/train.zip + NMNIST/Train/<digit>/*.bin
(test: test.zip, Test/); only the first 100 ms (the first saccade) is used, framed at
dt = 10 ms (T = 10), 34 x 34 x 2 = 2312 inputs. Network [64 x 3]-10 and the
hyper-parameters of the paper's table 6 (see HYPER). `--help` lists every option.
"""

from __future__ import annotations

import sys

from asynctrain import data
from asynctrain import cli
from asynctrain.experiment import Hyper
from asynctrain.recipe import DataSpec, recipe_main

HYPER = Hyper(hidden=(64, 64, 64), dt=10.0, batch_size=256, epochs=50, lr=5e-4, theta=0.3,
              weight_decay=1e-5, tau=1.0, steepness=2.0, input_dropout=0.25, K=8,
              refractory_dropout=0.8, momentum_noise=1e-6)


def _args(ap) -> None:
    ap.add_argument("--duration-ms", type=cli.positive(float), default=100.0,
                    help="recording time used, in ms, a whole number of dt = 10 ms frames (paper: the "
                         "first 100 ms saccade)")
    ap.add_argument("--min-files", type=cli.positive(int), default=None,
                    help="accept a partial copy of the data set with at least this many "
                         ".bin files (none: tonic's 10000)")


def _load(args, train: bool):
    return data.nmnist(args.data_dir, train=train, dt=HYPER.dt, duration_ms=args.duration_ms,
                       download=args.download, min_files=args.min_files)


SPEC = DataSpec(name="nmnist", title="N-MNIST", n_inputs=2312, n_classes=10, hyper=HYPER,
                load=_load, extra_args=_args)


def main(argv=None) -> int:
    return recipe_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
