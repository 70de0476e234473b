from setuptools import setup

setup(
    name="asynctrain",
    version="0.1.0",
    description="Train spiking neural networks for asynchronous (unlayered) execution",
    python_requires=">=3.10",
    packages=["asynctrain", "asynctrain.kernels", "asynctrain.models"],
    package_dir={"asynctrain": "asynctrain", "asynctrain.kernels": "kernels",
                 "asynctrain.models": "models"},
    # the fused CPU steps are built from source on first use (kernels/cpu_step.py)
    package_data={"asynctrain.kernels": ["cpu_step.c", "cpu_step_impl.h"]},
    install_requires=["torch>=2.1", "numpy", "tqdm"],
    extras_require={
        "data": ["tonic>=1.4", "torchvision", "scikit-learn", "h5py"],
        "plots": ["matplotlib"],
        # NIR export / import (asynctrain.nir)
        "nir": ["nir>=1.0.8"],
        # snnTorch and nirtorch (which snnTorch's NIR exporter runs on): cross-library tests
        "test": ["pytest", "snntorch>=1.0", "nirtorch>=2.6"],
    },
)
