"""IBM DVS Gesture (Amir et al. 2017): the paper's tables 2-3 and figures 4-6, one
command.

    python recipes/dvs_gesture.py --data-dir data --out runs/dvs_gesture
    python recipes/dvs_gesture.py --quick                        # smoke run

Data: tonic's layout under --data-dir: DVSGesture/ibmGestureTrain.tar.gz +
DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy (test: ibmGestureTest).
tonic lists the recordings in file-system order; `asynctrain.data.dvs_gesture` sorts
them by (user, lighting, label), so runs repeat on any machine. Frames: 32 x 32 x 2
(4 x 4 pixel blocks summed), dt = 20 ms; the paper does not state the duration used:
default 1.5 s (T = 75). Network [128 x 3]-11, the paper's table 6 (see HYPER).
"""

from __future__ import annotations

import sys

from asynctrain import data
from asynctrain import cli
from asynctrain.experiment import Hyper
from asynctrain.recipe import DataSpec, recipe_main

HYPER = Hyper(hidden=(128, 128, 128), dt=20.0, batch_size=32, epochs=70, lr=1e-4, theta=0.3,
              weight_decay=1e-5, tau=100.0, steepness=10.0, input_dropout=0.2, K=8,
              refractory_dropout=0.8, momentum_noise=0.1)


def _args(ap) -> None:
    ap.add_argument("--duration-ms", type=cli.positive(float), default=1500.0,
                    help=f"recording time used, in ms, a whole number of dt = {HYPER.dt:g} ms frames; "
                         f"longer recordings are cropped")
    ap.add_argument("--min-files", type=cli.positive(int), default=None,
                    help="accept a partial copy of the data set with at least this many "
                         ".npy files (none: tonic's 100)")


def _load(args, train: bool):
    return data.dvs_gesture(args.data_dir, train=train, dt=HYPER.dt,
                            duration_ms=args.duration_ms, download=args.download,
                            min_files=args.min_files)


SPEC = DataSpec(name="dvs_gesture", title="DVS Gesture", n_inputs=2048, n_classes=11,
                hyper=HYPER, load=_load, extra_args=_args)


def main(argv=None) -> int:
    return recipe_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
