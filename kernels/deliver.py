"""Deliver: gather the fan-out rows of the selected outboxes and add their currents
into the receivers (SPEC 5.3), and the backward of that.

Work per step is K x F_max (F_max = widest fan-out), never N x N. The forward keeps
nothing but the [B, K] values and indices: the backward re-gathers rows and targets
(a K x F gather is cheaper than keeping a [B, K, F] float and int64 tensor per step,
which was 12 x B x K x F bytes per step in the first version).

Triton (`deliver_triton`, `deliver_backward_triton`): programs tile (sample,
K-block, F-block) so that K = 1 with a wide fan-out and K = 512 with a narrow one
both fill the device; a tile gathers BLOCK_K rows of the weight and target tables
and skips slots whose value is 0 (empty, dropped, dump: they add nothing).
- Forward: float atomics into the receivers. Several sources of one sample share
  receivers, so the order of the additions, hence the last bits of a current, can
  change from run to run (not its value beyond fp rounding: tests bound the error
  by 2x that of the twin against fp64). A potential that lands within rounding of
  theta can therefore fire in one run and not in another (or not in the twin); a
  deterministic forward would need the receivers' side (a fan-in / CSR-by-target
  gather) and is not built.
- Backward, grad_vals: each F-block writes its partial dot product to [B, K, nF]
  and torch sums the partials in a fixed order: deterministic, no atomics.
- Backward, grad_weight_table: a row selected by several samples gets several
  contributions. Default (`deterministic=False`): float atomics, order
  nondeterministic. `deterministic=True`: the nonzero-valued slots are sorted by
  source row (stable), each row's segment is summed by one program in (sample, slot)
  order and stored without atomics; bitwise reproducible, costs a sort of B x K
  ints and serialises rows shared by many samples (segment length <= B).
Supported dtypes: float32, float64 (vals and weight_table alike); indices int32 or
int64.
"""

from __future__ import annotations

import torch

from ._triton import check_dtype, check_shape, check_tensors, jit, tl, triton


def deliver_torch(vals: torch.Tensor, sel: torch.Tensor, weight_table: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """Currents of one forward step.

    Args:
        vals: ``[B, K]`` delivered outbox values (0 for empty slots and dropped ones).
        sel: int64 ``[B, K]`` flat source indices (dump index for empty/dropped slots).
        weight_table: ``[W, F]`` outgoing weights per flat source (zeros for padding).
        targets: int64 ``[W, F]`` flat receiver per fan-out entry (dump for padding).

    Returns:
        ``[B, W]`` summed currents (the dump column collects padding).
    """
    b, width = vals.shape[0], weight_table.shape[0]
    contrib = (weight_table[sel] * vals[..., None]).view(b, -1)
    return vals.new_zeros(b, width).scatter_add_(1, targets[sel].view(b, -1), contrib)


def deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                           weight_table: torch.Tensor, targets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `deliver_torch`'s current w.r.t. the values and the weight table.

    Returns:
        grad_vals ``[B, K]``; grad_weight_table ``[W, F]`` (rows of the K sources of
        each sample accumulated; duplicates across samples add up).
    """
    b, k = sel.shape
    f = weight_table.shape[1]
    g_at_targets = grad_current.gather(1, targets[sel].view(b, -1)).view(b, k, f)
    grad_vals = (g_at_targets * weight_table[sel]).sum(-1)
    grad_table = torch.zeros_like(weight_table).index_put_(
        (sel.reshape(-1),), (g_at_targets * vals[..., None]).reshape(-1, f), accumulate=True)
    return grad_vals, grad_table


# --- Triton ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_TILE = 2048  # BLOCK_K x BLOCK_F elements per program (4 warps: 16 per thread)


# Int arguments (k, f, width; n_fb and n_rows below) are fixed for a network (K, the
# fan-out table's width, the state width): specialised, one compile per network.
@jit
def _deliver_kernel(vals_ptr, sel_ptr, table_ptr, targets_ptr, out_ptr, k, f, width,
                    BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    fs = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    v = tl.load(vals_ptr + b * k + ks, mask=ks < k, other=0.0)
    src = tl.load(sel_ptr + b * k + ks, mask=ks < k, other=0).to(tl.int64)
    live = (v != 0)[:, None] & (fs < f)[None, :]
    at = src[:, None] * f + fs[None, :]
    w = tl.load(table_ptr + at, mask=live, other=0.0)
    tgt = tl.load(targets_ptr + at, mask=live, other=0).to(tl.int64)
    tl.atomic_add(out_ptr + b * width + tgt, w * v[:, None], mask=live, sem="relaxed")


# k, f, width, n_fb: fixed for a network (as `_deliver_kernel`), specialised.
@jit
def _deliver_backward_kernel(grad_ptr, vals_ptr, sel_ptr, table_ptr, targets_ptr, part_ptr,
                             gtable_ptr, k, f, width, n_fb,
                             BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, ATOMIC_TABLE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pf = tl.program_id(2)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    fs = pf * BLOCK_F + tl.arange(0, BLOCK_F)
    v = tl.load(vals_ptr + b * k + ks, mask=ks < k, other=0.0)
    src = tl.load(sel_ptr + b * k + ks, mask=ks < k, other=0).to(tl.int64)
    inside = (ks < k)[:, None] & (fs < f)[None, :]
    at = src[:, None] * f + fs[None, :]
    w = tl.load(table_ptr + at, mask=inside, other=0.0)
    tgt = tl.load(targets_ptr + at, mask=inside, other=0).to(tl.int64)
    g = tl.load(grad_ptr + b * width + tgt, mask=inside, other=0.0)
    # zero-valued slots still get d/dvals (barrier messages and silent neurons do)
    tl.store(part_ptr + (b * k + ks) * n_fb + pf, tl.sum(g * w, axis=1), mask=ks < k)
    if ATOMIC_TABLE:
        tl.atomic_add(gtable_ptr + at, g * v[:, None], mask=inside & (v != 0)[:, None], sem="relaxed")


# k, f, width, n_rows: fixed for a network, specialised (the segments come in tensors).
@jit
def _deliver_table_grad_kernel(grad_ptr, vals_ptr, targets_ptr, rows_ptr, order_ptr, seg_end_ptr,
                               gtable_ptr, k, f, width, n_rows, BLOCK_F: tl.constexpr):
    """Deterministic grad_weight_table: program i owns the segment of sorted slots
    that starts at i (if one does) and sums it in order."""
    i = tl.program_id(0)
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row = tl.load(rows_ptr + i)
    prev = tl.load(rows_ptr + i - 1, mask=i > 0, other=-1)
    if (row != prev) & (row < n_rows):
        end = tl.load(seg_end_ptr + i)
        tgt = tl.load(targets_ptr + row * f + fs, mask=fs < f, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_F], dtype=gtable_ptr.dtype.element_ty)
        for j in range(i, end):
            slot = tl.load(order_ptr + j)
            v = tl.load(vals_ptr + slot)
            g = tl.load(grad_ptr + (slot // k) * width + tgt, mask=fs < f, other=0.0)
            acc += g * v
        tl.store(gtable_ptr + row * f + fs, acc, mask=fs < f)


def _blocks(k: int, f: int) -> tuple[int, int]:
    block_f = min(triton.next_power_of_2(f), 256)
    block_k = min(triton.next_power_of_2(k), max(1, _TILE // block_f))
    return block_k, block_f


def _check(op: str, kernel, vals, sel, weight_table, targets, grad_current=None):
    named = dict(vals=vals, sel=sel, weight_table=weight_table, targets=targets)
    if grad_current is not None:
        named = dict(grad_current=grad_current, **named)
    check_tensors(op, kernel, **named)
    check_shape(op, "weight_table", weight_table, (None, None))
    width, f = weight_table.shape
    check_shape(op, "vals", vals, (None, None))
    check_shape(op, "sel", sel, tuple(vals.shape))
    check_shape(op, "targets", targets, (width, f))
    check_dtype(op, "vals", vals, _FLOATS)
    check_dtype(op, "weight_table", weight_table, (vals.dtype,))
    check_dtype(op, "sel", sel, _INDEX)
    check_dtype(op, "targets", targets, _INDEX)
    if grad_current is not None:
        check_shape(op, "grad_current", grad_current, (vals.shape[0], width))
        check_dtype(op, "grad_current", grad_current, (vals.dtype,))
    return vals.contiguous(), sel.contiguous(), weight_table.contiguous(), targets.contiguous()


def deliver_triton(vals: torch.Tensor, sel: torch.Tensor, weight_table: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Currents of one forward step.

    Args:
        vals: ``[B, K]`` delivered outbox values (0 for empty slots and dropped ones).
        sel: int64 ``[B, K]`` flat source indices (dump index for empty/dropped slots).
        weight_table: ``[W, F]`` outgoing weights per flat source (zeros for padding).
        targets: int64 ``[W, F]`` flat receiver per fan-out entry (dump for padding).

    Returns:
        ``[B, W]`` summed currents (the dump column collects padding).
    """
    vals, sel, weight_table, targets = _check("deliver_triton", _deliver_kernel, vals, sel, weight_table,
                                              targets)
    (b, k), (width, f) = vals.shape, weight_table.shape
    out = torch.zeros(b, width, dtype=vals.dtype, device=vals.device)
    if out.numel() == 0 or k == 0 or f == 0:
        return out
    block_k, block_f = _blocks(k, f)
    grid = (b, triton.cdiv(k, block_k), triton.cdiv(f, block_f))
    _deliver_kernel[grid](vals, sel, weight_table, targets, out, k, f, width,
                                      BLOCK_K=block_k, BLOCK_F=block_f)
    return out


def deliver_backward_triton(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                            weight_table: torch.Tensor, targets: torch.Tensor, *,
                            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `deliver_torch`'s current w.r.t. the values and the weight table.

    Args:
        deterministic: sum each weight-table row's contributions in a fixed order
            (bitwise reproducible) instead of with float atomics (see module doc).

    Returns:
        grad_vals ``[B, K]``; grad_weight_table ``[W, F]`` (rows of the K sources of
        each sample accumulated; duplicates across samples add up).
    """
    op = "deliver_backward_triton"
    vals, sel, weight_table, targets = _check(op, _deliver_backward_kernel, vals, sel, weight_table,
                                              targets, grad_current)
    grad_current = grad_current.contiguous()
    (b, k), (width, f) = vals.shape, weight_table.shape
    grad_table = torch.zeros_like(weight_table)
    if b * k == 0 or f == 0:
        return torch.zeros_like(vals), grad_table
    block_k, block_f = _blocks(k, f)
    n_fb = triton.cdiv(f, block_f)
    part = torch.empty(b, k, n_fb, dtype=vals.dtype, device=vals.device)
    _deliver_backward_kernel[(b, triton.cdiv(k, block_k), n_fb)](
        grad_current, vals, sel, weight_table, targets, part, grad_table, k, f, width, n_fb,
        BLOCK_K=block_k, BLOCK_F=block_f, ATOMIC_TABLE=not deterministic)
    grad_vals = part.sum(-1) if n_fb > 1 else part.view(b, k)
    if deterministic:
        # zero-valued slots add nothing: give them a row past the table so they form
        # one segment that no program sums (the dump slots would be a long one)
        rows = torch.where(vals != 0, sel.to(torch.int64), width).view(-1)
        rows, order = torch.sort(rows, stable=True)
        seg_end = torch.searchsorted(rows, rows, right=True)
        _deliver_table_grad_kernel[(b * k, n_fb)](
            grad_current, vals, targets, rows, order, seg_end, grad_table, k, f, width, width,
            BLOCK_F=block_f)
    return grad_vals, grad_table
