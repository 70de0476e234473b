"""The Triton kernels compile once per dtype, K and network (per-launch
integers are never specialised on), counted with Triton's own rules
(tests/specialization.py) over one training iteration on backend="triton".

Where the tests run: as in tests/test_kernels_triton.py (tests/interpreter_child.py),
the kernels interpreted on CPU tensors, keys computed for sm_90; ``test_cuda_*`` do
the same with the compiled kernels on a GPU (skipped without one).

What is demanded:
- shd-like MLP (fused steps, MS and RS, K = 8; and the per-op kernels of
  ``deterministic=True``): at most 2 variants of each kernel (there is 1); the same
  launches keyed with every argument specialised give more, so the count is not
  vacuous (without `do_not_specialize` the persistent forward kernel needed 7-8
  variants in this iteration, the replay 4, the uniform draws 2: index views at
  varying alignment);
- the per-op select kernel is the keyed one (`select_keyed._select_keyed_kernel`) where the
  step loop is sync-free (CUDA; forced on the CPU in the ``sync_free`` tests), the
  listed one elsewhere;
- narrow VGG-7 (per-op select, every layer's delivery and its reverse in one launch
  each (`kernels/image_steps.py`), uniform draws, K = 8): exactly 1 variant of each
  kernel, so neither the layer geometry nor the hashes and step counters that change
  every step add one; the same in the sync-free mode (forced on the CPU);
- full-width VGG-7 geometry (every conv / rows map of ``vgg7()``: C_out 64, 128, 256,
  pooled and not, and the pooled 4096 -> 10 linear layer), each delivery kernel
  launched once per map with 2 entries, forward and backward, atomic and
  deterministic weight gradients recorded apart (a run uses one): at most 2 variants
  of each (there is 1; the per-layer tile and POOL constexprs gave 3 for conv
  delivery), and keyed with every int specialised the launches need more.
"""

from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

import asynctrain as at  # noqa: E402
from asynctrain import plan  # noqa: E402
from asynctrain.kernels import steps_triton  # noqa: E402
from asynctrain.kernels.conv_deliver import conv_deliver_backward_triton, conv_deliver_triton  # noqa: E402
from asynctrain.kernels.rows_deliver import rows_deliver_backward_triton, rows_deliver_triton  # noqa: E402
from asynctrain.network import Network  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from asynctrain.models import vgg7  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402
from specialization import all_kernels, record_variants  # noqa: E402

INTERPRETED = is_interpreted(steps_triton._forward_kernel)
FUSED = ("steps_triton._forward_kernel", "steps_triton._replay_kernel", "steps_triton._backward_kernel")
IMAGE = ("conv_deliver._conv_deliver_kernel", "conv_deliver._conv_deliver_backward_kernel",
         "rows_deliver._rows_deliver_kernel", "rows_deliver._rows_deliver_backward_kernel")
# a training iteration of an image network: every layer's delivery (and its reverse) in one launch
IMAGE_STEPS = ("image_steps._image_deliver_kernel", "image_steps._image_deliver_backward_kernel")
PER_OP = ("deliver._deliver_kernel", "deliver._deliver_backward_kernel",
          "deliver._deliver_table_grad_kernel", "lif._lif_kernel", "lif._lif_backward_kernel",
          "rng_triton._uniform_at_kernel")
PASS = ("pass_stats._pass_stats_kernel",)  # every pass's stats, any step mode


def _select(dev) -> str:
    """The per-op select kernel of `dev`: sync-free devices (`plan.SYNC_FREE_DEVICES`,
    CUDA, or the mode forced) compute the keys in the kernel (`select_keyed_triton`),
    others list them."""
    return "select_keyed._select_keyed_kernel" if plan.sync_free_on(dev) else "select._select_kernel"


def _mlp(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(*[torch.nn.Linear(n, m, bias=False) for n, m in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for m in net:
            m.weight.copy_(0.3 * torch.randn(m.weight.shape, generator=g) + 0.05)
    return net


def _train_step(net, cfg, frames, **kw):
    snn = at.AsyncSNN(net, cfg, backend="triton", **kw).train()
    out = snn(frames, seed=3)
    out.sum().backward()
    return snn.stats


def _mlp_iteration(policy, dev, sizes=(40, 24, 24, 10), batch=3, T=3, deterministic=False):
    """One shd-like training iteration (MS with momentum noise, RS; both with network
    and refractory dropout, so every hash stream is drawn); `deterministic`: the
    per-op kernels instead of the fused steps."""
    net = _mlp(list(sizes)).to(dev)
    cfg = at.SimConfig(policy=policy, K=8, theta=0.3, tau=100.0, dt=10.0, refractory_dropout=0.5,
                       network_dropout=0.1, momentum_noise=0.1 if policy == "MS" else 0.0)
    frames = (torch.rand(T, batch, sizes[0], generator=torch.Generator().manual_seed(1)) < 0.15).float()
    with record_variants(all_kernels()) as seen:
        stats = _train_step(net, cfg, frames.to(dev), deterministic=deterministic)
    return seen, stats, dev


def _check_compiled(seen):
    # compiled kernels (a GPU): Triton's own cache gained no more entries than keys seen
    # (`.get`: indexing the defaultdict would add an empty entry for a kernel compiled but
    # not launched here, and the checks below would then list it as launched)
    for name, n in seen.compiled_new.items():
        keys = seen.keys.get(name, ())
        assert n <= len(keys), f"{name}: {n} new compiled entries, {len(keys)} keys"


def _check_mlp(seen, stats, dev, deterministic=False):
    assert int(stats["forward_steps"].max()) > 3, "vacuous: too few forward steps"
    _check_compiled(seen)
    expected = ((_select(dev),) + PER_OP if deterministic else FUSED) + PASS
    assert set(seen.keys) == set(expected), f"kernels launched: {sorted(seen.keys)}"
    # the passes' step counts and stats rows did vary (rows at 24-byte steps: batch 3)
    assert len(seen.all_specialised["pass_stats._pass_stats_kernel"]) > len(seen.keys["pass_stats._pass_stats_kernel"])
    for name in expected:
        assert len(seen.keys[name]) <= 2, f"{name}: {len(seen.keys[name])} variants:\n" + \
            "\n".join(sorted(seen.keys[name]))
    if deterministic:
        assert len(seen.all_specialised["rng_triton._uniform_at_kernel"]) > \
            len(seen.keys["rng_triton._uniform_at_kernel"])
        return
    assert seen.launches["steps_triton._forward_kernel"] > 2
    # the launches did vary: with every int specialised they need more variants
    assert len(seen.all_specialised["steps_triton._forward_kernel"]) > len(seen.keys["steps_triton._forward_kernel"])
    assert len(seen.all_specialised["steps_triton._replay_kernel"]) > len(seen.keys["steps_triton._replay_kernel"])


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_mlp_training_iteration_compiles_each_kernel_once(policy):
    _check_mlp(*_mlp_iteration(policy, torch.device("cpu")))


def test_mlp_deterministic_iteration_compiles_each_kernel_once():
    _check_mlp(*_mlp_iteration("MS", torch.device("cpu"), deterministic=True), deterministic=True)


def test_mlp_deterministic_sync_free_iteration_compiles_each_kernel_once():
    """The sync-free loop (CUDA's) forced on the CPU: the keyed select kernel."""
    with plan.forced(sync_free=True):
        for policy in ("MS", "RS"):
            _check_mlp(*_mlp_iteration(policy, torch.device("cpu"), deterministic=True), deterministic=True)


def _vgg_iteration(dev):
    torch.manual_seed(0)
    net = vgg7(width=0.0625, image_size=8).to(dev)
    # a low threshold: spikes reach the linear layer within the 60 steps kept for time
    cfg = at.SimConfig(policy="MS", K=8, theta=0.1, tau=float("inf"), momentum_noise=0.1,
                       refractory_dropout=0.5, network_dropout=0.1, max_steps=60)
    frames = torch.rand(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with record_variants(all_kernels()) as seen, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "2 of 2 passes reached max_steps", RuntimeWarning)
        stats = _train_step(net, cfg, frames.to(dev))
    return seen, stats, dev


def _check_vgg(seen, stats, dev):
    assert int(stats["forward_steps"].max()) > 5, "vacuous: too few forward steps"
    _check_compiled(seen)
    for name in (_select(dev), *IMAGE_STEPS, "rng_triton._uniform_at_kernel"):
        assert seen.launches[name] > 3, f"{name} launched {seen.launches[name]} times"
    assert set(IMAGE_STEPS) <= set(seen.keys), f"kernels launched: {sorted(seen.keys)}"
    for name, keys in seen.keys.items():
        assert len(keys) <= 2, f"{name}: {len(keys)} variants:\n" + "\n".join(sorted(keys))
    for name, classes in seen.by_class.items():
        for cls, keys in classes.items():
            assert len(keys) == 1, f"{name}: {len(keys)} variants within one tile class {cls}:\n" + \
                "\n".join(sorted(keys))
    for name in (_select(dev), "rng_triton._uniform_at_kernel", *IMAGE_STEPS):
        assert len(seen.keys[name]) == 1, name
    # the launches did vary (hashes, step counters): every int specialised needs more
    assert len(seen.all_specialised["rng_triton._uniform_at_kernel"]) > \
        len(seen.keys["rng_triton._uniform_at_kernel"])
    if plan.sync_free_on(dev):  # the keyed select's hashes do vary
        assert len(seen.all_specialised[_select(dev)]) > len(seen.keys[_select(dev)])


def test_narrow_vgg7_training_iteration_compiles_each_kernel_at_most_twice():
    _check_vgg(*_vgg_iteration(torch.device("cpu")))


def test_narrow_vgg7_sync_free_iteration_compiles_each_kernel_at_most_twice():
    # CUDA's mode (each conv/rows launch over its own segment of the sorted entries,
    # the segment a [2] view into one [L + 2, 2] tensor), forced on the CPU
    with plan.forced(sync_free=True):
        _check_vgg(*_vgg_iteration(torch.device("cpu")))


def _full_width_vgg7_launches(dev, entries=2, batch=2):
    """Each conv / rows delivery kernel launched once per map of the full-width VGG-7
    (the engine's maps: kind, source shape, pooling, the target layer's offset in a
    [batch, all neurons] buffer), `entries` entries each, fp32, int64 indices:
    forward and atomic backward in one recording, deterministic backward in another."""
    net = Network.from_module(vgg7())
    g = torch.Generator().manual_seed(0)
    width = sum(net.layer_sizes)
    current = torch.zeros(batch, width, device=dev)
    counts = torch.zeros(batch, width, dtype=torch.int32, device=dev)
    grad = torch.randn(batch, width, generator=g).to(dev)
    launches = []
    offset = net.layer_sizes[0]
    for m in net.maps:
        weight = (0.01 * torch.randn(m.weight_shape, generator=g)).to(dev)
        src = torch.randint(0, m.n_in, (entries,), generator=g).to(dev)
        sample = (torch.arange(entries) % batch).to(dev)
        vals = (torch.rand(entries, generator=g) + 0.5).to(dev)  # nonzero: the deterministic sums run
        launches.append((m, (vals, sample, src, weight, m.in_shape, m.pool, offset)))
        offset += m.n_out
    assert offset == width
    recorded = []
    for deterministic in (False, True):
        with record_variants(all_kernels()) as seen:
            for m, args in launches:
                fwd, bwd = ((conv_deliver_triton, conv_deliver_backward_triton) if m.kind == "conv" else
                            (rows_deliver_triton, rows_deliver_backward_triton))
                if not deterministic:
                    fwd(*args, current, counts)
                _, gw = bwd(grad, *args, deterministic=deterministic)
                assert gw.abs().sum() > 0, f"{m}: vacuous: no weight gradient"
        recorded.append(seen)
    assert int(counts.sum()) > 0
    return net, recorded


def _check_full_width(net, recorded):
    conv = [m for m in net.maps if m.kind == "conv"]
    # the geometry that gave 3 conv classes with per-layer constexprs (POOL x BLOCK_O)
    assert {(m.pool, m.out_shape[0]) for m in conv} == {(False, 64), (True, 128), (False, 128), (True, 256),
                                                        (False, 256)}
    assert [m.kind for m in net.maps].count("fc") == 1 and net.maps[-1].pool
    atomic, det = recorded
    expected = [(atomic, IMAGE),
                (det, ("conv_deliver._conv_deliver_backward_kernel", "conv_deliver._conv_weight_grad_kernel",
                       "rows_deliver._rows_deliver_backward_kernel", "rows_deliver._rows_weight_grad_kernel"))]
    for seen, names in expected:
        _check_compiled(seen)
        assert set(seen.keys) == set(names), f"kernels launched: {sorted(seen.keys)}"
        for name in names:
            assert len(seen.keys[name]) <= 2, f"{name}: {len(seen.keys[name])} variants:\n" + \
                "\n".join(sorted(seen.keys[name]))
    for name in ("conv_deliver._conv_deliver_kernel", "conv_deliver._conv_deliver_backward_kernel"):
        assert len(atomic.all_specialised[name]) > len(atomic.keys[name]), name
    assert len(det.all_specialised["conv_deliver._conv_weight_grad_kernel"]) > \
        len(det.keys["conv_deliver._conv_weight_grad_kernel"])


def test_full_width_vgg7_geometry_compiles_each_delivery_kernel_once():
    _check_full_width(*_full_width_vgg7_launches(torch.device("cpu")))


def test_narrow_vgg7_sync_free_iteration_compiles_once_per_layer_class():
    with plan.forced(sync_free=True):
        _check_vgg(*_vgg_iteration(torch.device("cpu")))


def test_jit_rejects_an_unknown_do_not_specialize_name():
    from asynctrain.kernels._triton import jit

    def f(x_ptr, n):
        pass
    with pytest.raises(ValueError, match=r"\['m'\] are not parameters"):
        jit(f, do_not_specialize=("n", "m"))


wrap_tests(globals(), interpreted=INTERPRETED, keep=("test_cuda", "test_jit"))


# --- on a GPU (gpu_check.sh, stage pytest-fused) ------------------------------------------------
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if INTERPRETED:
        pytest.skip("Triton was imported with TRITON_INTERPRET=1: no compiled kernels in this process")
    return torch.device("cuda")


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_cuda_mlp_training_iteration_compiles_each_kernel_once(policy):
    dev = _cuda_or_skip()
    _check_mlp(*_mlp_iteration(policy, dev, sizes=(350, 128, 128, 128, 20), batch=16, T=6))


def test_cuda_narrow_vgg7_compiles_each_kernel_at_most_twice():
    _check_vgg(*_vgg_iteration(_cuda_or_skip()))


def test_cuda_full_width_vgg7_geometry_compiles_each_delivery_kernel_once():
    _check_full_width(*_full_width_vgg7_launches(_cuda_or_skip(), entries=64, batch=8))


def test_cuda_mlp_deterministic_iteration_compiles_each_kernel_once():
    dev = _cuda_or_skip()
    _check_mlp(*_mlp_iteration("MS", dev, sizes=(350, 128, 128, 128, 20), batch=16, T=6, deterministic=True),
               deterministic=True)
