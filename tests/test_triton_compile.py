"""Compile-only check of every Triton kernel, no GPU needed: each builds to a cubin
for sm_90 (H100/H200) and sm_80 (A100) with the ptxas bundled in the Triton wheel,
and the cubin uses no local memory (no register spills, no stack frame).

Triton reports ``n_spills`` only after loading the binary on a device; here the
cubin's resource table is read with the bundled ``cuobjdump --dump-resource-usage``
(spilled registers live in local memory, so LOCAL:0 and STACK:0 mean no spills).

Signatures are those the launchers produce: float tensors fp32 (every variant) and
fp64 (one variant per kernel), bool masks as u8, indices i64, sizes i32; constexprs
as the launchers pick them for typical shapes. The first run compiles (~1 s per
kernel); later runs hit Triton's on-disk cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from asynctrain.kernels import (conv_deliver, deliver, image_steps, lif, listed_steps, pass_stats,  # noqa: E402
                                rng_triton, rows_deliver, select, select_keyed)
from asynctrain.kernels._triton import is_interpreted  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}


def _deliver_sig(fp: str) -> dict:
    return {"vals_ptr": f"*{fp}", "sel_ptr": "*i64", "table_ptr": f"*{fp}", "targets_ptr": "*i64",
            "out_ptr": f"*{fp}", "k": "i32", "f": "i32", "width": "i32"}


def _deliver_bwd_sig(fp: str) -> dict:
    return {"grad_ptr": f"*{fp}", "vals_ptr": f"*{fp}", "sel_ptr": "*i64", "table_ptr": f"*{fp}",
            "targets_ptr": "*i64", "part_ptr": f"*{fp}", "gtable_ptr": f"*{fp}", "k": "i32", "f": "i32",
            "width": "i32", "n_fb": "i32"}


def _table_sig(fp: str) -> dict:
    return {"grad_ptr": f"*{fp}", "vals_ptr": f"*{fp}", "targets_ptr": "*i64", "rows_ptr": "*i64",
            "order_ptr": "*i64", "seg_end_ptr": "*i64", "gtable_ptr": f"*{fp}", "k": "i32", "f": "i32",
            "width": "i32", "n_rows": "i32"}


def _lif_sig(fp: str) -> dict:
    return {"v_ptr": f"*{fp}", "cur_ptr": f"*{fp}", "refr_ptr": "*u8", "recv_ptr": "*u8", "gate_ptr": "*u8",
            "theta_ptr": f"*{fp}", "v_new_ptr": f"*{fp}", "spikes_ptr": f"*{fp}", "v_pre_ptr": f"*{fp}",
            "width": "i32"}


def _lif_bwd_sig(fp: str) -> dict:
    return {"gvn_ptr": f"*{fp}", "gs_ptr": f"*{fp}", "v_pre_ptr": f"*{fp}", "refr_ptr": "*u8",
            "recv_ptr": "*u8", "gate_ptr": "*u8", "last_ptr": "*u8", "theta_ptr": f"*{fp}", "const_ptr": f"*{fp}",
            "grad_v_ptr": f"*{fp}", "grad_cur_ptr": f"*{fp}", "width": "i32"}


def _image_sig(fp: str, idx: str = "i64") -> dict:
    """conv_deliver / rows_deliver forward (`n_a`, `n_b`: C_out, C_in or M, F)."""
    return {"vals_ptr": f"*{fp}", "sample_ptr": f"*{idx}", "src_ptr": f"*{idx}", "w_ptr": f"*{fp}",
            "cur_ptr": f"*{fp}", "cnt_ptr": "*i32", "e": "i32", "n_a": "i32", "n_b": "i32", "h": "i32",
            "w": "i32", "width": "i32", "out_offset": "i32", "pool": "i32", "seg_ptr": f"*{idx}"}


def _image_bwd_sig(fp: str, idx: str = "i64") -> dict:
    return {"grad_ptr": f"*{fp}", "vals_ptr": f"*{fp}", "sample_ptr": f"*{idx}", "src_ptr": f"*{idx}",
            "w_ptr": f"*{fp}", "part_ptr": f"*{fp}", "gw_ptr": f"*{fp}", "e": "i32", "n_a": "i32", "n_b": "i32",
            "h": "i32", "w": "i32", "width": "i32", "out_offset": "i32", "n_blocks": "i32", "pool": "i32",
            "seg_ptr": f"*{idx}"}


def _conv_wgrad_sig(fp: str) -> dict:
    return {"grad_ptr": f"*{fp}", "vals_ptr": f"*{fp}", "sample_ptr": "*i64", "src_ptr": "*i64",
            "rows_ptr": "*i64", "order_ptr": "*i64", "seg_end_ptr": "*i64", "gw_ptr": f"*{fp}", "c_out": "i32",
            "c_in": "i32", "h": "i32", "w": "i32", "width": "i32", "out_offset": "i32", "pool": "i32"}


def _rows_wgrad_sig(fp: str) -> dict:
    return {"grad_ptr": f"*{fp}", "vals_ptr": f"*{fp}", "sample_ptr": "*i64", "rows_ptr": "*i64",
            "order_ptr": "*i64", "seg_end_ptr": "*i64", "gw_ptr": f"*{fp}", "m": "i32", "f": "i32",
            "width": "i32", "out_offset": "i32", "pool": "i32"}


def _named(kernel, sig: dict) -> dict:
    """`sig`'s types under the kernel's own argument names (in order)."""
    names = kernel.arg_names[:len(sig)]
    return dict(zip(names, sig.values()))


def _image_case(kernel, sig: dict, **consts):
    """A delivery kernel unsegmented (seg_ptr: `sample`, never read) unless
    ``SEGMENT=True`` is given (seg_ptr: the int64 (start, count) of the sync-free path)."""
    if "BLOCK_E" in consts:  # the forward / backward kernels, not the weight-grad ones
        consts.setdefault("SEGMENT", False)
        if consts["SEGMENT"]:
            sig = dict(sig, seg_ptr="*i64")
    return kernel, _named(kernel, sig), consts, 4


def _conv_tile(c_out: int) -> dict:
    """The conv launchers' tile for a layer of `c_out` output channels."""
    block_e, block_o = conv_deliver._blocks(0, c_out)
    return dict(BLOCK_E=block_e, BLOCK_OUT=block_o)


def _rows_tile(m: int) -> dict:
    """The rows launchers' tile for a linear layer of `m` neurons."""
    block_e, block_m = rows_deliver._blocks(0, m)
    return dict(BLOCK_E=block_e, BLOCK_OUT=block_m)


def _image_deliver_sig(fp: str) -> dict:
    return {"vals_ptr": f"*{fp}", "sel_ptr": "*i64", "slot_ptr": "*i64", "table_ptr": "*i64", "w_ptr": f"*{fp}",
            "cur_ptr": f"*{fp}", "cnt_ptr": "*i32", "e": "i32", "k": "i32", "width": "i32", "n_maps": "i32",
            "list_width": "i32", "unit": "i32"}


def _listed_step_sig(fp: str) -> dict:
    f = f"*{fp}"
    return {"cols_ptr": "*i64", "slot_ptr": "*i64", "table_ptr": "*i64", "cur_ptr": f, "cnt_ptr": "*i32",
            "v_ptr": f, "o_ptr": f, "nin_ptr": "*i32", "refr_ptr": "*u8", "acc_ptr": f, "sync_ptr": "*i32",
            "theta_ptr": f, "srcf_ptr": f, "is_src_ptr": "*u8", "hidden_ptr": "*u8", "pend_ptr": "*u8",
            "fillable_ptr": "*u8", "pre_ptr": f, "ssum_ptr": f, "fired_ptr": "*u8", "hist_ptr": "*i64",
            "r_idx_ptr": "*i32", "r_vpre_ptr": f, "r_refr_ptr": "*u8", "r_gate_ptr": "*u8", "r_recv_ptr": "*u8",
            "e": "i32", "k": "i32", "width": "i32", "n_maps": "i32", "list_width": "i32", "out_lo": "i32",
            "out_hi": "i32", "n_bins": "i32", "h_refr": "i64", "p_ref": "fp32"}


def _listed_case(fp: str, record: bool) -> tuple:
    """The listed step with every knob on: the forward's (bookkeeping) or a replay's (record)."""
    consts = dict(BLOCK_E=listed_steps._LISTED_BLOCK_E, BLOCK_F=listed_steps._LISTED_BLOCK_F, REFRACTORY=True,
                  HAS_PREF=True, BARRIER=True, POLICY_MS=True, FILL=not record, BOOKKEEP=not record,
                  HISTOGRAM=not record, RECORD=record)
    return listed_steps._listed_step_kernel, _listed_step_sig(fp), consts, 4


_SELECT_SIG = {"pending_ptr": "*u8", "keys_ptr": "*fp32", "out_ptr": "*i64", "width": "i32", "k": "i32",
               "kk": "i32", "stride_p": "i32", "stride_k": "i32", "stride_o": "i32"}
_KEYED_SIG = {"pending_ptr": "*u8", "values_ptr": "*fp32", "is_input_ptr": "*u8", "sel_ptr": "*i64",
              "out_ptr": "*i64", "keys_ptr": "*i64", "fill_ptr": "*i64", "width": "i32", "k": "i32", "kk": "i32",
              "stride_p": "i32", "stride_v": "i32", "stride_s": "i32", "stride_o": "i32", "h_key": "i64",
              "h_order": "i64", "noise": "fp32"}
_CHUNK_SIG = {"pending_ptr": "*u8", "values_ptr": "*fp32", "is_input_ptr": "*u8", "ckey_ptr": "*i64",
              "ccol_ptr": "*i32", "width": "i32", "kk": "i32", "n_chunks": "i32", "stride_p": "i32",
              "stride_v": "i32", "h_key": "i64", "h_order": "i64", "noise": "fp32"}
_MERGE_SIG = {"ckey_ptr": "*i64", "ccol_ptr": "*i32", "sel_ptr": "*i64", "out_ptr": "*i64", "pos_ptr": "*i64",
              "width": "i32", "k": "i32", "kk": "i32", "n_cand": "i32", "stride_s": "i32", "stride_o": "i32"}
_STATS_SIG = {"vals_ptr": "*fp32", "sel_ptr": "*i64", "fired_ptr": "*u8", "fan_ptr": "*i64", "in_syn_ptr": "*i64",
              "in_proc_ptr": "*i64", "steps_ptr": "*i64", "first_out_ptr": "*i64", "pending_ptr": "*u8",
              "spike_sum_ptr": "*fp32", "hidden_f_ptr": "*fp32", "o_steps": "*i64", "o_synops": "*i64",
              "o_processed": "*i64", "o_first": "*i64", "o_to_first": "*i64", "o_capped": "*u8",
              "o_hidden": "*i64", "n_steps": "i32", "n_evals": "i32", "B": "i32", "K": "i32", "W": "i32",
              "max_steps": "i32", "steps_after_output": "i32"}
_RNG_SIG = {"rows_ptr": "*i64", "index_ptr": "*i64", "out_ptr": "*fp32", "h0": "i64", "n": "i32", "n_cols": "i32",
            "rs0": "i32", "rs1": "i32", "is0": "i32", "is1": "i32"}

# id -> (kernel, signature, constexprs, num_warps). "all" variants compile for both
# targets; the fp64 and flag variants for sm_90 only (the code paths are the same).
def _select_case(width: int):
    consts = select._config(width)
    return select._select_kernel, _SELECT_SIG, consts, consts.pop("num_warps")


def _keyed_case(width: int, fp: str = "fp32", **flags):
    """`select_keyed_triton`'s kernel: MS with noise and random input order (the most
    key math) unless `flags` say otherwise."""
    consts = {**dict(FROM_VALUES=True, HAS_NOISE=True, INPUTS_FIRST=True, INPUT_RANDOM=True, FILL=False),
              **flags, **select._config(width)}
    return select_keyed._select_keyed_kernel, dict(_KEYED_SIG, values_ptr=f"*{fp}"), consts, consts.pop("num_warps")


def _chunk_case(kk: int, fp: str = "fp32"):
    """The staged select's chunk kernel (MS with noise and random input order)."""
    consts = dict(FROM_VALUES=True, HAS_NOISE=True, INPUTS_FIRST=True, INPUT_RANDOM=True,
                  CHUNK=select_keyed._CHUNK, KPAD=triton.next_power_of_2(kk))
    return select_keyed._chunk_top_kernel, dict(_CHUNK_SIG, values_ptr=f"*{fp}"), consts, 4


def _merge_case(width: int, kk: int, fill: bool):
    """The staged select's merge over a VGG-7-wide row's candidates."""
    plan = select_keyed.staged_plan(width, kk)
    consts = dict(FILL=fill, KBLOCK=triton.next_power_of_2(kk), **select_keyed._merge_config(plan["n_cand"]))
    return select_keyed._merge_kernel, _MERGE_SIG, consts, consts.pop("num_warps")


CASES = {
    "select_w300": _select_case(300),
    "select_w1500": _select_case(1500),
    "select_one_block_max": _select_case(select._ONE_BLOCK_MAX),
    "select_stream": _select_case(70001),
    "select_keyed_one_block_max": _keyed_case(select._ONE_BLOCK_MAX),
    "select_keyed_stream": _keyed_case(70001),
    "select_keyed_rs_fill_one_block": _keyed_case(1500, FROM_VALUES=False, HAS_NOISE=False, INPUTS_FIRST=False,
                                                  INPUT_RANDOM=False, FILL=True),
    "select_keyed_ms_fill_stream": _keyed_case(70001, HAS_NOISE=False, INPUTS_FIRST=False, INPUT_RANDOM=False,
                                               FILL=True),
    "select_chunk_k8": _chunk_case(8),
    "select_chunk_k512": _chunk_case(select_keyed._STAGED_MAX_KK),
    "select_merge_k8_one_block": _merge_case(229_387, 8, fill=False),
    "select_merge_k8_one_block_fill": _merge_case(229_387, 8, fill=True),
    "select_merge_k64_stream": _merge_case(229_387, 64, fill=False),
    "select_merge_k64_stream_fill": _merge_case(229_387, 64, fill=True),
    "pass_stats": (pass_stats._pass_stats_kernel, _STATS_SIG,
                   dict(HAS_INPUT=True, STOP_OUTPUT=True, BLOCK_S=32, BLOCK_K=8, BLOCK_E=256, BLOCK_W=1024), 4),
    "deliver_f256": (deliver._deliver_kernel, _deliver_sig("fp32"), dict(BLOCK_K=8, BLOCK_F=256), 4),
    "deliver_k32": (deliver._deliver_kernel, _deliver_sig("fp32"), dict(BLOCK_K=32, BLOCK_F=64), 4),
    "deliver_bwd_atomic": (deliver._deliver_backward_kernel, _deliver_bwd_sig("fp32"),
                           dict(BLOCK_K=8, BLOCK_F=256, ATOMIC_TABLE=True), 4),
    "deliver_bwd_parts": (deliver._deliver_backward_kernel, _deliver_bwd_sig("fp32"),
                          dict(BLOCK_K=32, BLOCK_F=64, ATOMIC_TABLE=False), 4),
    "deliver_table_det": (deliver._deliver_table_grad_kernel, _table_sig("fp32"), dict(BLOCK_F=256), 4),
    "lif": (lif._lif_kernel, _lif_sig("fp32"), dict(BLOCK=lif._BLOCK), 4),
    "lif_bwd": (lif._lif_backward_kernel, _lif_bwd_sig("fp32"),
                dict(BLOCK=lif._BLOCK, HAS_GRAD_SPIKES=True, DETACH_RESET=False, HAS_LAST=False), 4),
    "lif_bwd_last": (lif._lif_backward_kernel, _lif_bwd_sig("fp32"),
                     dict(BLOCK=lif._BLOCK, HAS_GRAD_SPIKES=True, DETACH_RESET=False, HAS_LAST=True), 4),
    "uniform_at": (rng_triton._uniform_at_kernel, _RNG_SIG, dict(BLOCK=rng_triton._BLOCK), 4),
    # every layer of an image network in one launch (kernels/image_steps.py)
    "image_deliver": (image_steps._image_deliver_kernel, _image_deliver_sig("fp32"),
                      dict(BLOCK_E=image_steps._BLOCK_E, BLOCK_F=image_steps._BLOCK_F), 4),
    "listed_step": _listed_case("fp32", record=False),
    "listed_step_record": _listed_case("fp32", record=True),
    # conv: the launchers' two tiles, wide (C_out > 16, VGG-7: 4 x 64) and narrow
    # (C_out <= 16: 16 x 16); pool is a runtime argument
    "conv_deliver_wide": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp32"), **_conv_tile(256)),
    "conv_deliver_narrow": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp32"), **_conv_tile(3)),
    "conv_bwd_atomic": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                   **_conv_tile(128), ATOMIC_WEIGHT=True),
    "conv_bwd_parts": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                  **_conv_tile(3), ATOMIC_WEIGHT=False),
    "conv_wgrad_det": _image_case(conv_deliver._conv_weight_grad_kernel, _conv_wgrad_sig("fp32"),
                                  BLOCK_OUT=_conv_tile(128)["BLOCK_OUT"]),
    "conv_wgrad_det_narrow": _image_case(conv_deliver._conv_weight_grad_kernel, _conv_wgrad_sig("fp32"),
                                         BLOCK_OUT=_conv_tile(3)["BLOCK_OUT"]),
    # rows: the two tiles, wide (M > 32, a 1024-neuron linear layer: 4 x 256) and narrow
    # (M <= 32, VGG-7's 10-way output: 16 x 32)
    "rows_deliver_wide": _image_case(rows_deliver._rows_deliver_kernel, _image_sig("fp32"), **_rows_tile(1024)),
    "rows_deliver_narrow": _image_case(rows_deliver._rows_deliver_kernel, _image_sig("fp32"), **_rows_tile(10)),
    "rows_bwd_atomic": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                   **_rows_tile(1024), ATOMIC_WEIGHT=True),
    "rows_bwd_parts": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                  **_rows_tile(10), ATOMIC_WEIGHT=False),
    "rows_wgrad_det": _image_case(rows_deliver._rows_weight_grad_kernel, _rows_wgrad_sig("fp32"),
                                  BLOCK_OUT=_rows_tile(1024)["BLOCK_OUT"]),
    # the sync-free path's segmented launches (start, count read in the kernel)
    "conv_deliver_wide_seg": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp32"),
                                         **_conv_tile(256), SEGMENT=True),
    "conv_deliver_narrow_seg": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp32"),
                                           **_conv_tile(3), SEGMENT=True),
    "conv_bwd_atomic_seg": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                       **_conv_tile(128), ATOMIC_WEIGHT=True, SEGMENT=True),
    "conv_bwd_parts_seg": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                      **_conv_tile(3), ATOMIC_WEIGHT=False, SEGMENT=True),
    "rows_deliver_wide_seg": _image_case(rows_deliver._rows_deliver_kernel, _image_sig("fp32"),
                                         **_rows_tile(1024), SEGMENT=True),
    "rows_bwd_atomic_seg": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                       **_rows_tile(1024), ATOMIC_WEIGHT=True, SEGMENT=True),
    "rows_bwd_parts_seg": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp32"),
                                      **_rows_tile(10), ATOMIC_WEIGHT=False, SEGMENT=True),
}
SM90_ONLY = {
    "image_deliver_fp64": (image_steps._image_deliver_kernel, _image_deliver_sig("fp64"),
                           dict(BLOCK_E=image_steps._BLOCK_E, BLOCK_F=image_steps._BLOCK_F), 4),
    "listed_step_fp64": _listed_case("fp64", record=False),
    "select_keyed_fp64_one_block": _keyed_case(select._ONE_BLOCK_MAX, "fp64"),
    "select_keyed_fp64_stream": _keyed_case(70001, "fp64"),
    "select_chunk_fp64": _chunk_case(64, "fp64"),
    "pass_stats_fp64": (pass_stats._pass_stats_kernel,
                        dict(_STATS_SIG, vals_ptr="*fp64", spike_sum_ptr="*fp64", hidden_f_ptr="*fp64",
                             sel_ptr="*i32"),
                        dict(HAS_INPUT=False, STOP_OUTPUT=False, BLOCK_S=32, BLOCK_K=64, BLOCK_E=256,
                             BLOCK_W=1024), 4),
    "deliver_fp64": (deliver._deliver_kernel, _deliver_sig("fp64"), dict(BLOCK_K=8, BLOCK_F=256), 4),
    "deliver_bwd_fp64": (deliver._deliver_backward_kernel, _deliver_bwd_sig("fp64"),
                         dict(BLOCK_K=8, BLOCK_F=256, ATOMIC_TABLE=True), 4),
    "deliver_table_fp64": (deliver._deliver_table_grad_kernel, _table_sig("fp64"), dict(BLOCK_F=256), 4),
    "lif_fp64": (lif._lif_kernel, _lif_sig("fp64"), dict(BLOCK=lif._BLOCK), 4),
    "lif_bwd_fp64_detached": (lif._lif_backward_kernel, _lif_bwd_sig("fp64"),
                              dict(BLOCK=lif._BLOCK, HAS_GRAD_SPIKES=False, DETACH_RESET=True,
                                   HAS_LAST=True), 4),
    "uniform_at_h0_i32": (rng_triton._uniform_at_kernel, dict(_RNG_SIG, h0="i32"),
                          dict(BLOCK=rng_triton._BLOCK), 4),
    "conv_deliver_fp64_i32": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp64", "i32"),
                                         **_conv_tile(128)),
    "conv_deliver_fp64_narrow": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp64"),
                                            **_conv_tile(3)),
    "conv_bwd_fp64": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp64"),
                                 **_conv_tile(128), ATOMIC_WEIGHT=True),
    "conv_wgrad_fp64": _image_case(conv_deliver._conv_weight_grad_kernel, _conv_wgrad_sig("fp64"),
                                   BLOCK_OUT=_conv_tile(128)["BLOCK_OUT"]),
    "rows_deliver_fp64_i32": _image_case(rows_deliver._rows_deliver_kernel, _image_sig("fp64", "i32"),
                                         **_rows_tile(1024)),
    "rows_bwd_fp64": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp64"),
                                 **_rows_tile(1024), ATOMIC_WEIGHT=True),
    "rows_wgrad_fp64": _image_case(rows_deliver._rows_weight_grad_kernel, _rows_wgrad_sig("fp64"),
                                   BLOCK_OUT=_rows_tile(1024)["BLOCK_OUT"]),
    "conv_deliver_fp64_seg": _image_case(conv_deliver._conv_deliver_kernel, _image_sig("fp64"),
                                         **_conv_tile(128), SEGMENT=True),
    "conv_bwd_fp64_seg": _image_case(conv_deliver._conv_deliver_backward_kernel, _image_bwd_sig("fp64"),
                                     **_conv_tile(128), ATOMIC_WEIGHT=True, SEGMENT=True),
    "rows_bwd_fp64_seg": _image_case(rows_deliver._rows_deliver_backward_kernel, _image_bwd_sig("fp64"),
                                     **_rows_tile(1024), ATOMIC_WEIGHT=True, SEGMENT=True),
}
PARAMS = [(c, a) for c in CASES for a in TARGETS] + [(c, "sm90") for c in SM90_ONLY]


def _tool(name: str) -> str | None:
    from triton.backends.nvidia import compiler as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.access(path, os.X_OK) else shutil.which(name)


_compiled: dict = {}


def _compile(case: str, arch: str):
    if is_interpreted(select._select_kernel):
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1 at import); "
                    "compiling needs them as JITFunctions")
    if _tool("ptxas") is None:
        pytest.skip("no ptxas: neither Triton's bundled triton/backends/nvidia/bin/ptxas nor one on "
                    "PATH, so no cubin can be built on this machine")
    key = (case, arch)
    if key not in _compiled:
        kernel, sig, consts, warps = {**CASES, **SM90_ONLY}[case]
        sig = dict(sig, **{name: "constexpr" for name in consts})
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        _compiled[key] = triton.compile(src, target=TARGETS[arch], options=dict(num_warps=warps))
    return _compiled[key]


@pytest.mark.parametrize("case,arch", PARAMS)
def test_kernel_compiles_to_cubin_without_spills(case, arch, tmp_path):
    ck = _compile(case, arch)
    assert ck.asm.get("cubin"), f"{case} ({arch}): no cubin"
    assert ck.metadata.arch == arch
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("compiled, but no cuobjdump to read the cubin's register/local-memory usage")
    path = tmp_path / f"{case}.cubin"
    path.write_bytes(ck.asm["cubin"])
    out = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, f"unexpected cuobjdump output:\n{out}"
    reg, stack, _shared, local = map(int, usage.groups())
    assert local == 0 and stack == 0, f"{case} ({arch}): {reg} registers, spills to local memory:\n{out}"
    assert reg <= 255
