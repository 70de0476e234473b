"""Which compiled variants the Triton kernels would need, by Triton's own rules.

Triton's JIT compiles one binary per cache key: the types and specialisation
attributes of the arguments (an int is i32 or i64 by value, 1 becomes a constant, a
multiple of 16 is marked divisible; a tensor pointer is marked 16-byte aligned or not),
the constexpr values and the launch options. `record_variants` wraps every launch of
the given kernels and computes that key with Triton's own binder
(`triton.runtime.jit.create_function_from_signature`, the C specialiser it calls)
for the CUDA backend, honouring each kernel's `do_not_specialize`. Compiled kernels
(a GPU) and interpreted ones (TRITON_INTERPRET=1, CPU tensors) are counted the same
way, so a CPU test sees the recompiles a GPU run would pay. Each launch's key is also
computed as if no argument were excluded (`all_specialised`), which shows that the
recorded launches did vary. For compiled kernels the entries Triton's in-memory
cache gained meanwhile are counted too (`compiled_new`): they cannot outnumber the
keys, or this count would be wrong.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict

from triton.runtime.jit import KernelParam, create_function_from_signature


def _backend():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no GPU driver (interpreted tests): sm_90, the GPU machine's
        target = GPUTarget("cuda", 90, 32)
    return make_backend(target)


def _params(kernel, honour: bool):
    sig = inspect.signature(kernel.fn)
    dns = set(kernel.kwargs.get("do_not_specialize") or ()) if hasattr(kernel, "kwargs") else \
        {p.name for p in kernel.params if p.do_not_specialize}
    dns = dns if honour else set()
    return sig, [KernelParam(i, p, p.name in dns or i in dns, False) for i, p in enumerate(sig.parameters.values())]


class Variants:
    """Per kernel name: the set of cache keys seen (`keys`), the same keys grouped by
    their constexpr values and options (`by_class`: a layer's shape class), and the
    keys had every int been specialised (`all_specialised`)."""

    def __init__(self):
        self.keys = defaultdict(set)
        self.by_class = defaultdict(lambda: defaultdict(set))
        self.all_specialised = defaultdict(set)
        self.launches = defaultdict(int)
        self.compiled_new: dict[str, int] = {}  # compiled kernels only


def _cached_keys(kernel) -> set:
    """Keys of a compiled kernel's in-memory cache (`JITFunction.device_caches`:
    device -> (kernel_cache, ...)); empty for an interpreted kernel."""
    caches = getattr(kernel, "device_caches", None) or {}
    return {key for entry in caches.values() for key in entry[0]}


@contextlib.contextmanager
def record_variants(kernels: dict):
    """`kernels`: {name: kernel object}; yields a `Variants` filled while inside."""
    backend = _backend()
    seen = Variants()
    originals = {}
    cached_before = {name: _cached_keys(kernel) for name, kernel in kernels.items()}
    for name, kernel in kernels.items():
        binders = [create_function_from_signature(*_params(kernel, honour), backend) for honour in (True, False)]
        originals[name] = kernel.__dict__.get("run")

        def run(*args, grid, warmup, _orig=kernel.run, _binders=binders, _name=name, **kw):
            for binder, store in zip(_binders, (seen.keys, seen.all_specialised)):
                _, spec, opts = binder(*args, **kw)
                key = repr((spec, sorted(opts.items())))
                store[_name].add(key)
                if store is seen.keys:
                    consts = [s for s in spec if s[0] == "constexpr"]
                    seen.by_class[_name][repr((consts, sorted(opts.items())))].add(key)
            seen.launches[_name] += 1
            return _orig(*args, grid=grid, warmup=warmup, **kw)

        kernel.run = run
    try:
        yield seen
    finally:
        for name, kernel in kernels.items():
            if hasattr(kernel, "device_caches"):
                seen.compiled_new[name] = len(_cached_keys(kernel) - cached_before[name])
            if originals[name] is None:
                del kernel.run
            else:
                kernel.run = originals[name]


def all_kernels() -> dict:
    """Every `_*_kernel` of the kernels package: {"module._name_kernel": kernel}."""
    from asynctrain.kernels import (conv_deliver, deliver, image_steps, lif, listed_steps, pass_stats,
                                    rng_triton, rows_deliver, select, select_keyed, steps_triton)
    out = {}
    for mod in (select, select_keyed, deliver, lif, rng_triton, steps_triton, conv_deliver, rows_deliver,
                image_steps, listed_steps, pass_stats):
        for name, obj in vars(mod).items():
            if name.startswith("_") and name.endswith("_kernel"):
                out[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = obj
    return out
