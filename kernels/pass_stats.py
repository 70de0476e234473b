"""A pass's stats (SPEC 9) from its per-step records, in one launch: what `Pass.store`
(asynctrain/passes.py) reduces when a pass ends.

`pass_stats_torch` is the reduction as torch ops (~30 launches per pass on a GPU);
`pass_stats_triton` the same numbers in one kernel, one program per sample. Both
write the stats' rows of the pass in place. Tests: tests/test_pass_stats.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import check_tensors, jit, tl, triton


class StatRows(NamedTuple):
    """The rows a pass writes (int64 [B] unless said): forward_steps, synops,
    spikes_processed, first_output_step, spikes_to_first_output, capped (bool [B]),
    and hidden_spikes (int64 [B], added to: it sums over the passes)."""
    forward_steps: torch.Tensor
    synops: torch.Tensor
    spikes_processed: torch.Tensor
    first_output_step: torch.Tensor
    spikes_to_first_output: torch.Tensor
    capped: torch.Tensor
    hidden_spikes: torch.Tensor


def pass_stats_torch(rows: StatRows, vals: torch.Tensor | None, sel: torch.Tensor | None,
                     fired: torch.Tensor | None, fan_out: torch.Tensor, input_synops: torch.Tensor | None,
                     input_processed: torch.Tensor | None, steps: torch.Tensor, first_out: torch.Tensor,
                     pending: torch.Tensor, spike_sum: torch.Tensor, hidden_f: torch.Tensor, *,
                     max_steps: int, stop_output: bool, steps_after_output: int) -> None:
    """Write one pass's stats into `rows` (`StatRows`).

    Args:
        vals, sel: the pass's event steps, float ``[S, B, K]`` (delivered values; 0:
            empty, dropped or filler slots) and int ``[S, B, K]`` (their columns; a
            filler's -1 - column counts nowhere), or None without event steps.
        fired: bool ``[E, B]``: an output neuron fired at evaluation e (the prioritized
            input step first when there is one), or None without evaluations.
        fan_out: int64 ``[W]``: synapses per column.
        input_synops, input_processed: int64 ``[B]`` of the prioritized input step,
            or None when the input was queued.
        steps, first_out: int64 ``[B]``: forward steps of the pass, and the step of
            the first output spike (-1: none yet).
        pending: bool ``[B, W]`` after the pass; spike_sum: float ``[B, W]`` spikes
            per column in the pass; hidden_f: float ``[W]``, 1 at hidden neurons.
        max_steps, stop_output, steps_after_output: the config's stop rule (SPEC 4.2).
    """
    B = steps.shape[0]
    zero = torch.zeros_like(steps)
    synops = zero if input_synops is None else input_synops
    per_step = [zero if input_processed is None else input_processed]
    if vals is not None:
        sel = sel.long().clamp(min=0)  # fillers (-1 - column) hold 0: column 0, counted nowhere
        spikes = vals != 0  # empty and dropped slots hold 0; barrier messages are 0 too
        synops = synops + (fan_out[sel] * spikes).sum((0, 2))
        per_step.append(spikes.sum(2))
    # spikes delivered up to and including each evaluation: [evaluations, B]
    cum = torch.cat([p.reshape(-1, B) for p in per_step]).cumsum(0)
    if input_processed is None:
        cum = cum[1:]
    if fired is not None:
        any_out = fired.any(0)
        first_eval = fired.to(torch.int8).argmax(0)  # first evaluation with an output spike
    else:  # nothing was evaluated in this pass
        any_out, first_eval = torch.zeros_like(steps, dtype=torch.bool), zero
    capped = (steps >= max_steps) & pending.any(1)
    if stop_output:
        capped &= ~((first_out >= 0) & (steps >= first_out + steps_after_output))
    rows.forward_steps.copy_(steps)
    rows.synops.copy_(synops)
    rows.spikes_processed.copy_(cum[-1] if len(cum) else zero)
    # evaluation i is forward step i + 1 of a sample still running then
    rows.first_output_step.copy_(torch.where(any_out, first_eval + 1, -1))
    rows.spikes_to_first_output.copy_(torch.where(
        any_out, cum.gather(0, first_eval[None]).squeeze(0) if len(cum) else zero, -1))
    rows.capped.copy_(capped)
    rows.hidden_spikes.add_((spike_sum * hidden_f).sum(1).to(torch.int64))


# Not specialised on: the step and evaluation counts (every pass its own), and the
# output rows, views into the stats' one buffer at row t (16-byte aligned or not by t,
# T and B: a second variant per pointer otherwise).
@jit(do_not_specialize=("n_steps", "n_evals", "max_steps", "steps_after_output", "o_steps", "o_synops",
                        "o_processed", "o_first", "o_to_first", "o_capped", "o_hidden"))
def _pass_stats_kernel(vals_ptr, sel_ptr, fired_ptr, fan_ptr, in_syn_ptr, in_proc_ptr, steps_ptr, first_out_ptr,
                       pending_ptr, spike_sum_ptr, hidden_f_ptr, o_steps, o_synops, o_processed, o_first,
                       o_to_first, o_capped, o_hidden, n_steps, n_evals, B, K, W, max_steps, steps_after_output,
                       HAS_INPUT: tl.constexpr, STOP_OUTPUT: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # the first evaluation with an output spike (n_evals: none)
    first = n_evals
    for e0 in range(0, n_evals, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        f = tl.load(fired_ptr + e.to(tl.int64) * B + b, mask=e < n_evals, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(f, e, n_evals), axis=0))
    any_out = first < n_evals
    fe = tl.where(any_out, first, 0)
    if HAS_INPUT:  # the input step is evaluation 0; event step s is evaluation s + 1
        syn = tl.load(in_syn_ptr + b)
        processed = tl.load(in_proc_ptr + b)
        last_s = fe - 1
    else:
        syn = tl.zeros((), tl.int64)
        processed = tl.zeros((), tl.int64)
        last_s = fe
    to_first = processed
    ks = tl.arange(0, BLOCK_K)[None, :]
    for s0 in range(0, n_steps, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s[:, None] < n_steps) & (ks < K)
        at = (s[:, None].to(tl.int64) * B + b) * K + ks
        spk = (tl.load(vals_ptr + at, mask=m, other=0.0) != 0) & m
        col = tl.maximum(tl.load(sel_ptr + at, mask=spk, other=0).to(tl.int64), 0)
        syn += tl.sum(tl.sum(tl.load(fan_ptr + col, mask=spk, other=0).to(tl.int64), axis=1), axis=0)
        per = tl.sum(spk.to(tl.int64), axis=1)
        processed += tl.sum(per, axis=0)
        to_first += tl.sum(tl.where(s <= last_s, per, 0), axis=0)
    # the columns: anything still pending, hidden spikes
    any_p = tl.zeros((), tl.int32)
    hid = tl.zeros((), tl.float32)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        inside = w < W
        any_p = tl.maximum(any_p, tl.max((tl.load(pending_ptr + b * W + w, mask=inside, other=0) != 0)
                                         .to(tl.int32), axis=0))
        hid += tl.sum((tl.load(spike_sum_ptr + b * W + w, mask=inside, other=0.0) *
                       tl.load(hidden_f_ptr + w, mask=inside, other=0.0)).to(tl.float32), axis=0)
    steps = tl.load(steps_ptr + b)
    capped = (steps >= max_steps) & (any_p != 0)
    if STOP_OUTPUT:
        fo = tl.load(first_out_ptr + b)
        capped = capped & ~((fo >= 0) & (steps >= fo + steps_after_output))
    tl.store(o_steps + b, steps)
    tl.store(o_synops + b, syn)
    tl.store(o_processed + b, processed)
    tl.store(o_first + b, tl.where(any_out, fe + 1, -1).to(tl.int64))
    tl.store(o_to_first + b, tl.where(any_out, to_first, -1))
    tl.store(o_capped + b, capped.to(tl.uint8))
    tl.store(o_hidden + b, tl.load(o_hidden + b) + hid.to(tl.int64))


def pass_stats_triton(rows: StatRows, vals: torch.Tensor | None, sel: torch.Tensor | None,
                      fired: torch.Tensor | None, fan_out: torch.Tensor, input_synops: torch.Tensor | None,
                      input_processed: torch.Tensor | None, steps: torch.Tensor, first_out: torch.Tensor,
                      pending: torch.Tensor, spike_sum: torch.Tensor, hidden_f: torch.Tensor, *,
                      max_steps: int, stop_output: bool, steps_after_output: int) -> None:
    """`pass_stats_torch` in one launch (one program per sample): same arguments,
    the same values written. Hidden spikes are summed in float32 (counts: exact below
    2**24 per sample and pass)."""
    op = "pass_stats_triton"
    check_tensors(op, _pass_stats_kernel, steps=steps, pending=pending, spike_sum=spike_sum, fan_out=fan_out)
    B, W = pending.shape
    if (input_synops is None) != (input_processed is None):
        raise ValueError(f"{op}: input_synops and input_processed come together")
    if (vals is None) != (sel is None):
        raise ValueError(f"{op}: vals and sel come together")
    for name, t in rows._asdict().items():
        if t.shape != (B,) or not t.is_contiguous():
            raise ValueError(f"{op}: rows.{name} must be a contiguous [{B}] tensor, got {tuple(t.shape)}")
    if B == 0:
        return
    n_steps, K = (0, 1) if vals is None else (vals.shape[0], vals.shape[2])
    if vals is None:
        vals = torch.zeros(1, dtype=spike_sum.dtype, device=steps.device)
        sel = torch.zeros(1, dtype=torch.int64, device=steps.device)
    n_evals = 0 if fired is None else fired.shape[0]
    fired = steps if fired is None else fired.contiguous().view(torch.uint8)  # (not read when n_evals == 0)
    has_input = input_synops is not None
    _pass_stats_kernel[(B,)](
        vals.contiguous(), sel.contiguous(), fired, fan_out, input_synops if has_input else steps,
        input_processed if has_input else steps, steps, first_out, pending.contiguous().view(torch.uint8),
        spike_sum.contiguous(), hidden_f, rows.forward_steps, rows.synops, rows.spikes_processed,
        rows.first_output_step, rows.spikes_to_first_output, rows.capped.view(torch.uint8), rows.hidden_spikes,
        n_steps, n_evals, B, K, W, int(max_steps), int(steps_after_output), HAS_INPUT=has_input,
        STOP_OUTPUT=bool(stop_output), BLOCK_S=32, BLOCK_K=triton.next_power_of_2(K), BLOCK_E=256,
        BLOCK_W=1024)
