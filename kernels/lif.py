"""LIF evaluation of the neurons that received a current in one forward step
(SPEC 5.4), and its backward with the arctan surrogate (SPEC 8).

Forward, per neuron:  V1 = 0 if refractory else V + I;  s = gate * H(V1 - theta);
V' = V1 * (1 - s) for receivers, V for everyone else. `gate` = received this step
and n_in >= sync_threshold. The forward keeps V1 (one float per neuron) and three
bool masks; s is recomputed from V1 in the backward (a compare is cheaper than a
stored float).

Triton (`lif_triton`, `lif_backward_triton`): one elementwise pass each over
[B, W] tiles (grid: column blocks x samples; theta is read per column). The forward
does the same three IEEE operations as the twin, so its outputs are bitwise equal
(spikes exact; tested). The backward matches the twin to fp rounding: the compiler
may contract a multiply-add into an FMA; fp32 division uses `div_rn` (IEEE) rather
than Triton's default approximate division. The surrogate constants alpha / 2 and
pi / 2 * alpha are passed as a 2-element tensor of the data dtype (a Python float
argument would be truncated to fp32 and break float64). Supported dtypes: float32,
float64 (v, current, theta and the gradients alike).
"""

from __future__ import annotations

import math

import torch

from ._triton import check_dtype, check_shape, check_tensors, jit, tl, triton


def lif_torch(v: torch.Tensor, current: torch.Tensor, refractory: torch.Tensor,
              received: torch.Tensor, gate: torch.Tensor, theta: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Args: v, current ``[B, W]``; refractory, received, gate bool ``[B, W]``;
    theta ``[W]`` (+inf where a column must never fire).

    Returns: (v_new, spikes, v_pre) all ``[B, W]``; ``v_pre`` is V1, the pre-spike
    potential (the MS priority of a neuron that fired).
    """
    v_pre = torch.where(refractory, 0.0, v + current)
    spikes = (gate & (v_pre >= theta)).to(v.dtype)
    v_new = torch.where(received, v_pre - v_pre * spikes, v)
    return v_new, spikes, v_pre


def arctan_surrogate(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """d spike / dV = (alpha / 2) / (1 + (pi/2 * alpha * x)^2), x = V - theta."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def lif_backward_torch(grad_v_new: torch.Tensor, grad_spikes: torch.Tensor | None,
                       v_pre: torch.Tensor, refractory: torch.Tensor, received: torch.Tensor,
                       gate: torch.Tensor, theta: torch.Tensor, alpha: float, detach_reset: bool,
                       last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `lif_torch` w.r.t. v and current (the same on receivers).

    `last` (bool ``[B, W]``, `SimConfig.surrogate_at="fire_or_last"`): the evaluations
    that end their outbox window; the spike's surrogate derivative is then taken only
    where the neuron fired or `last` holds (0 elsewhere, in the outbox path and the
    reset path alike). None: at every synced evaluation (SPEC 8)."""
    spikes = (gate & (v_pre >= theta)).to(v_pre.dtype)
    counts = gate if last is None else gate & ((spikes > 0) | last)
    dsdv = torch.where(counts, arctan_surrogate(v_pre - theta, alpha), 0.0)
    g_pre = grad_v_new * (1 - spikes)
    if not detach_reset:
        g_pre = g_pre - grad_v_new * v_pre * dsdv
    if grad_spikes is not None:
        g_pre = g_pre + grad_spikes * dsdv
    g_pre = torch.where(received & ~refractory, g_pre, 0.0)
    grad_v = torch.where(received, g_pre, grad_v_new)
    return grad_v, g_pre


# --- Triton ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64)
_BLOCK = 1024


# `width` is the state width, fixed for a network: specialised (its multiple-of-16
# class lets the compiler vectorise the row loads).
@jit
def _lif_kernel(v_ptr, cur_ptr, refr_ptr, recv_ptr, gate_ptr, theta_ptr,
                v_new_ptr, spikes_ptr, v_pre_ptr, width, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    at = tl.program_id(1).to(tl.int64) * width + cols
    v = tl.load(v_ptr + at, mask=inside, other=0.0)
    cur = tl.load(cur_ptr + at, mask=inside, other=0.0)
    refr = tl.load(refr_ptr + at, mask=inside, other=0) != 0
    recv = tl.load(recv_ptr + at, mask=inside, other=0) != 0
    gate = tl.load(gate_ptr + at, mask=inside, other=0) != 0
    theta = tl.load(theta_ptr + cols, mask=inside, other=0.0)
    v_pre = tl.where(refr, 0.0, v + cur)
    s = (gate & (v_pre >= theta)).to(v.dtype)
    tl.store(v_new_ptr + at, tl.where(recv, v_pre - v_pre * s, v), mask=inside)
    tl.store(spikes_ptr + at, s, mask=inside)
    tl.store(v_pre_ptr + at, v_pre, mask=inside)


@jit
def _lif_grad(gvn, g_s, v_pre, gate, theta, last, const_ptr, DETACH_RESET: tl.constexpr,
              HAS_GRAD_SPIKES: tl.constexpr, HAS_LAST: tl.constexpr, RECIP_FIRST: tl.constexpr):
    """The LIF evaluation's reverse at evaluated lanes, before masking: the gradient of
    the pre-step potential from the post-step one's `gvn` and (HAS_GRAD_SPIKES) the
    spikes' `g_s`, with the surrogate (alpha / 2) / (1 + (scale (V1 - theta))^2) from
    `const_ptr` (`surrogate_constants`) where the lane is synced (`gate`) and
    (HAS_LAST, fire_or_last) fired or ends its window (`last`). The surrogate rounds as
    the caller's twin does: (alpha / 2) / den, or RECIP_FIRST (1 / den) x (alpha / 2);
    fp32 division IEEE (`div_rn`). Shared by `_lif_backward_kernel` and the listed
    steps' reverse (kernels/listed_steps.py)."""
    half_alpha = tl.load(const_ptr)
    scale = tl.load(const_ptr + 1)
    s = (gate & (v_pre >= theta)).to(v_pre.dtype)
    y = scale * (v_pre - theta)
    den = 1 + y * y
    if v_pre.dtype == tl.float32:
        if RECIP_FIRST:
            sur = tl.math.div_rn(tl.full(den.shape, 1.0, tl.float32), den) * half_alpha
        else:
            sur = tl.math.div_rn(tl.zeros_like(den) + half_alpha, den)
    else:
        if RECIP_FIRST:
            sur = (1.0 / den) * half_alpha
        else:
            sur = half_alpha / den
    counts = gate
    if HAS_LAST:  # fire_or_last: only evaluations that fire or end their window
        counts = gate & ((s > 0) | last)
    dsdv = tl.where(counts, sur, 0.0)
    g_pre = gvn * (1 - s)
    if not DETACH_RESET:
        g_pre = g_pre - gvn * v_pre * dsdv
    if HAS_GRAD_SPIKES:
        g_pre = g_pre + g_s * dsdv
    return g_pre


# As `_lif_kernel`: `width` specialised (fixed for a network).
@jit
def _lif_backward_kernel(gvn_ptr, gs_ptr, v_pre_ptr, refr_ptr, recv_ptr, gate_ptr, last_ptr, theta_ptr,
                         const_ptr, grad_v_ptr, grad_cur_ptr, width, BLOCK: tl.constexpr,
                         HAS_GRAD_SPIKES: tl.constexpr, DETACH_RESET: tl.constexpr,
                         HAS_LAST: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    at = tl.program_id(1).to(tl.int64) * width + cols
    gvn = tl.load(gvn_ptr + at, mask=inside, other=0.0)
    v_pre = tl.load(v_pre_ptr + at, mask=inside, other=0.0)
    refr = tl.load(refr_ptr + at, mask=inside, other=0) != 0
    recv = tl.load(recv_ptr + at, mask=inside, other=0) != 0
    gate = tl.load(gate_ptr + at, mask=inside, other=0) != 0
    theta = tl.load(theta_ptr + cols, mask=inside, other=0.0)
    last = gate  # (not read without HAS_LAST)
    if HAS_LAST:
        last = tl.load(last_ptr + at, mask=inside, other=0) != 0
    g_s = gvn  # (not read without HAS_GRAD_SPIKES)
    if HAS_GRAD_SPIKES:
        g_s = tl.load(gs_ptr + at, mask=inside, other=0.0)
    g_pre = _lif_grad(gvn, g_s, v_pre, gate, theta, last, const_ptr, DETACH_RESET, HAS_GRAD_SPIKES, HAS_LAST,
                      False)
    g_pre = tl.where(recv & ~refr, g_pre, 0.0)
    tl.store(grad_cur_ptr + at, g_pre, mask=inside)
    tl.store(grad_v_ptr + at, tl.where(recv, g_pre, gvn), mask=inside)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def surrogate_constants(alpha: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[alpha / 2, pi / 2 * alpha]`` in `dtype` on `device` (the surrogate's constants
    as the kernels read them), cached per (alpha, dtype, device). Filled from the
    Python floats as kernel arguments (`torch.full`, `fill_`: rounded to `dtype` as
    ``torch.tensor`` rounds them), so even the first call copies nothing from the host
    (on CUDA a ``torch.tensor`` of Python values is a blocking copy, a host sync inside
    the backward sweep)."""
    key = (float(alpha), dtype, torch.device(device))
    if key not in _CONSTANTS:
        const = torch.full((2,), alpha / 2, dtype=dtype, device=device)
        const[1:].fill_(math.pi / 2 * alpha)
        _CONSTANTS[key] = const
    return _CONSTANTS[key]


def _check(op: str, kernel, floats: dict, masks: dict, theta: torch.Tensor):
    check_tensors(op, kernel, **floats, **masks, theta=theta)
    name0, t0 = next(iter(floats.items()))
    check_shape(op, name0, t0, (None, None))
    check_dtype(op, name0, t0, _FLOATS)
    for name, t in floats.items():
        check_shape(op, name, t, tuple(t0.shape))
        check_dtype(op, name, t, (t0.dtype,))
    for name, t in masks.items():
        check_shape(op, name, t, tuple(t0.shape))
        check_dtype(op, name, t, (torch.bool,))
    check_shape(op, "theta", theta, (t0.shape[1],))
    check_dtype(op, "theta", theta, (t0.dtype,))
    return ([t.contiguous() for t in floats.values()],
            [t.contiguous().view(torch.uint8) for t in masks.values()], theta.contiguous())


def _grid(b: int, width: int):
    return (triton.cdiv(width, _BLOCK), b)


def lif_triton(v: torch.Tensor, current: torch.Tensor, refractory: torch.Tensor,
               received: torch.Tensor, gate: torch.Tensor, theta: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Args: v, current ``[B, W]``; refractory, received, gate bool ``[B, W]``;
    theta ``[W]`` (+inf where a column must never fire).

    Returns: (v_new, spikes, v_pre) all ``[B, W]``; ``v_pre`` is V1, the pre-spike
    potential (the MS priority of a neuron that fired).
    """
    (v, current), masks, theta = _check("lif_triton", _lif_kernel, dict(v=v, current=current),
                                        dict(refractory=refractory, received=received, gate=gate), theta)
    v_new, spikes, v_pre = (torch.empty_like(v) for _ in range(3))
    b, width = v.shape
    if v.numel():
        _lif_kernel[_grid(b, width)](v, current, *masks, theta, v_new, spikes, v_pre, width,
                                                 BLOCK=_BLOCK)
    return v_new, spikes, v_pre


def lif_backward_triton(grad_v_new: torch.Tensor, grad_spikes: torch.Tensor | None,
                        v_pre: torch.Tensor, refractory: torch.Tensor, received: torch.Tensor,
                        gate: torch.Tensor, theta: torch.Tensor, alpha: float, detach_reset: bool,
                        last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lif_backward_torch` (its twin: same arguments, `last` included, and results) as
    one Triton kernel."""
    floats = dict(grad_v_new=grad_v_new, v_pre=v_pre)
    if grad_spikes is not None:
        floats["grad_spikes"] = grad_spikes
    mask_args = dict(refractory=refractory, received=received, gate=gate)
    if last is not None:
        mask_args["last"] = last
    fl, masks, theta = _check("lif_backward_triton", _lif_backward_kernel, floats, mask_args, theta)
    grad_v_new, v_pre = fl[0], fl[1]
    gs = fl[2] if grad_spikes is not None else grad_v_new  # never read without grad_spikes
    const = surrogate_constants(alpha, v_pre.dtype, v_pre.device)
    grad_v, grad_cur = torch.empty_like(v_pre), torch.empty_like(v_pre)
    b, width = v_pre.shape
    if v_pre.numel():
        last_m = masks[3] if last is not None else masks[2]  # never read without `last`
        _lif_backward_kernel[_grid(b, width)](
            grad_v_new, gs, v_pre, *masks[:3], last_m, theta, const, grad_v, grad_cur, width, BLOCK=_BLOCK,
            HAS_GRAD_SPIKES=grad_spikes is not None, DETACH_RESET=bool(detach_reset),
            HAS_LAST=last is not None)
    return grad_v, grad_cur
