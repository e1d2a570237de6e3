"""Probe: what the CPU kernels of the operators a ``.pt2`` may call do with arguments a crafted
file can give them: indices and offsets out of range, sizes that disagree with the tensors they
describe, modes out of range. Each call runs in a subprocess of its own; it either raises (a
clean error: the operator checks), crashes the process (a signal: the operator read or wrote out
of bounds), or returns (the operator clamps or wraps the argument, or does not check it: judged
case by case). ``benchmarks/probe_program_ops.py`` leaves those that crash or do not check out of
compressdrop's allowlist (``compressdrop/programs/_ops.py``) where no program of a real model
needs them; ``lstm.input`` and ``scaled_dot_product_attention``, which crash on shapes that
disagree, are needed by many and stay.

Run: python benchmarks/probe_op_bounds.py [OP ...]   (a few minutes; prints the table kept in
benchmarks/results/op_bounds.md)
"""

from __future__ import annotations

import argparse
import subprocess
import sys

# (operator, what is wrong, the call): ``A`` is torch.ops.aten, ``P`` torch.ops.prims, ``t`` torch,
# ``C`` a channel count large enough that a kernel reading past a short tensor leaves its page
# fmt: off
CASES: list[tuple[str, str, str]] = [
    ("aten.gather.default", "index past the size", "A.gather(t.zeros(4), 0, t.tensor([9]))"),
    ("aten.gather.default", "negative index", "A.gather(t.zeros(4), 0, t.tensor([-9]))"),
    ("aten.scatter.src", "index past the size",
     "A.scatter.src(t.zeros(4), 0, t.tensor([1 << 40]), t.ones(1))"),
    ("aten.scatter.value", "index past the size",
     "A.scatter.value(t.zeros(4), 0, t.tensor([9]), 1.0)"),
    ("aten.scatter_add.default", "index past the size",
     "A.scatter_add(t.zeros(4), 0, t.tensor([9]), t.ones(1))"),
    ("aten.scatter_reduce.two", "index past the size",
     "A.scatter_reduce.two(t.zeros(4), 0, t.tensor([9]), t.ones(1), 'amax')"),
    ("aten.index.Tensor", "index past the size", "A.index.Tensor(t.zeros(4), [t.tensor([9])])"),
    ("aten.index_put.default", "index past the size",
     "A.index_put(t.zeros(4), [t.tensor([9])], t.ones(1))"),
    ("aten.index_put.default", "index past the size, accumulate",
     "A.index_put(t.zeros(4), [t.tensor([1 << 40])], t.ones(1), True)"),
    ("aten.index_put_.default", "index past the size, accumulate",
     "A.index_put_(t.zeros(4), [t.tensor([9])], t.ones(1), True)"),
    ("aten.index_select.default", "index past the size",
     "A.index_select(t.zeros(4), 0, t.tensor([9]))"),
    ("aten.index_add.default", "index past the size",
     "A.index_add(t.zeros(4), 0, t.tensor([9]), t.ones(1))"),
    ("aten.index_copy.default", "index past the size",
     "A.index_copy(t.zeros(4), 0, t.tensor([9]), t.ones(1))"),
    ("aten.index_fill.int_Scalar", "index past the size",
     "A.index_fill.int_Scalar(t.zeros(4), 0, t.tensor([9]), 1.0)"),
    ("aten.take.default", "index past the size", "A.take(t.zeros(4), t.tensor([9]))"),
    ("aten.put.default", "index past the size",
     "A.put(t.zeros(4), t.tensor([9]), t.ones(1), True)"),
    ("aten.embedding.default", "index past the table", "A.embedding(t.zeros(4, 2), t.tensor([9]))"),
    ("aten.embedding.default", "padding_idx past the table",
     "A.embedding(t.zeros(4, 2), t.tensor([1]), 99)"),
    ("aten._embedding_bag.default", "index past the table",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([9]), t.tensor([0]))"),
    ("aten._embedding_bag.default", "offset past the indices",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1, 2]), t.tensor([0, 1 << 20]))"),
    ("aten._embedding_bag.default", "decreasing offsets",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1, 2, 3]), t.tensor([0, 2, 1]), mode=1)"),
    ("aten._embedding_bag.default", "offsets past the indices, include_last_offset",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1]), t.tensor([0, 5]), False, 0, False,"
     " None, True)"),
    ("aten._embedding_bag.default", "per_sample_weights shorter than the indices",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1, 2, 3]), t.tensor([0]), False, 0, False,"
     " t.ones(1))"),
    ("aten._embedding_bag.default", "mode out of range",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1]), t.tensor([0]), False, 7)"),
    ("aten._embedding_bag.default", "padding_idx past the table",
     "A._embedding_bag(t.zeros(4, 2), t.tensor([1]), t.tensor([0]), False, 0, False, None,"
     " False, 99)"),
    *(
        (f"aten.{op}.default", f"an offset past the indices before the last, mode {mode}",
         f"A.{op}(t.zeros(4, 2), t.tensor([1, 2, 3]), t.tensor([0, 1 << 24, 3]), False,"
         f" {mode})")
        for op in ("_embedding_bag", "_embedding_bag_forward_only")
        for mode in (0, 1, 2)
    ),
    ("aten.embedding_bag.padding_idx", "offset past the indices",
     "A.embedding_bag.padding_idx(t.zeros(4, 2), t.tensor([1, 2]), t.tensor([0, 1 << 20]),"
     " False, 0, False, None, False, None)"),
    ("aten.max_pool2d_with_indices_backward.default", "index past the input",
     "A.max_pool2d_with_indices_backward(t.ones(1, 1, 2, 2), t.zeros(1, 1, 4, 4), [2, 2],"
     " [2, 2], [0, 0], [1, 1], False, t.full((1, 1, 2, 2), 1 << 30))"),
    ("aten.max_unpool2d.default", "index past the output",
     "A.max_unpool2d(t.ones(1, 1, 2, 2), t.full((1, 1, 2, 2), 1 << 30), [4, 4])"),
    ("aten.masked_scatter.default", "source shorter than the mask",
     "A.masked_scatter(t.zeros(64), t.ones(64, dtype=t.bool), t.ones(1))"),
    ("aten.as_strided.default", "view past the storage",
     "A.as_strided(t.zeros(4), [1 << 20], [1]).sum()"),
    ("aten.as_strided.default", "offset past the storage",
     "A.as_strided(t.zeros(4), [1], [1], 1 << 20).sum()"),
    ("aten.as_strided.default", "negative stride",
     "A.as_strided(t.zeros(4), [4], [-1], 0).sum()"),
    ("aten.as_strided_scatter.default", "view past the storage",
     "A.as_strided_scatter(t.zeros(4), t.ones(1 << 20), [1 << 20], [1]).sum()"),
    ("prims.as_strided.default", "view past the storage",
     "P.as_strided(t.zeros(4), [1 << 20], [1], 0).sum()"),
    ("prims.as_strided_scatter.default", "view past the storage",
     "P.as_strided_scatter(t.zeros(4), t.ones(1 << 20), [1 << 20], [1], 0).sum()"),
    ("prims.copy_strided.default", "strides past the storage",
     "P.copy_strided(t.zeros(4), [1 << 20]).sum()"),
    ("prims.view_of_dtype.default", "a wider dtype", "P.view_of_dtype(t.zeros(3, dtype=t.int8),"
     " t.float64).sum()"),
    ("prims.collapse_view.default", "dims out of range", "P.collapse_view(t.zeros(4), 0, 9).sum()"),
    ("prims.split_dim.default", "an outer length that does not divide",
     "P.split_dim(t.zeros(4), 0, 3).sum()"),
    ("prims.broadcast_in_dim.default", "a shape that does not fit",
     "P.broadcast_in_dim(t.zeros(4), [1 << 20], [0]).sum()"),
    ("prims.resize.default", "a larger size", "P.resize(t.zeros(4), [1 << 20]).sum()"),
    ("aten.resize_.default", "a larger size", "A.resize_(t.zeros(4), [1 << 20]).sum()"),
    ("aten._unsafe_view.default", "more elements than the tensor",
     "A._unsafe_view(t.zeros(4), [1 << 20]).sum()"),
    ("aten.view.default", "more elements than the tensor", "A.view(t.zeros(4), [1 << 20]).sum()"),
    ("aten.unfold.default", "a window past the size", "A.unfold(t.zeros(4), 0, 99, 1).sum()"),
    ("aten.diagonal.default", "an offset past the size",
     "A.diagonal(t.zeros(4, 4), 99).sum()"),
    ("aten.select.int", "an index past the size", "A.select.int(t.zeros(4), 0, 9)"),
    ("aten.slice.Tensor", "a start past the size", "A.slice.Tensor(t.zeros(4), 0, 9, 99).sum()"),
    ("aten.narrow.default", "a start past the size", "A.narrow(t.zeros(4), 0, 9, 2).sum()"),
    ("aten.select_scatter.default", "an index past the size",
     "A.select_scatter(t.zeros(4, 2), t.ones(2), 0, 9)"),
    ("aten.slice_scatter.default", "a source larger than the slice",
     "A.slice_scatter(t.zeros(4), t.ones(99), 0, 0, 99)"),
    ("aten.split_with_sizes.default", "sizes past the tensor",
     "A.split_with_sizes(t.zeros(4), [2, 99])"),
    ("aten.topk.default", "k past the size", "A.topk(t.zeros(4), 99)"),
    ("aten.col2im.default", "an output size that disagrees with the columns",
     "A.col2im(t.ones(1, 4, 4), [99, 99], [2, 2], [1, 1], [0, 0], [1, 1])"),
    ("aten.im2col.default", "a kernel past the input",
     "A.im2col(t.ones(1, 1, 2, 2), [9, 9], [1, 1], [0, 0], [1, 1])"),
    ("aten.native_group_norm.default", "N, C, HxW past the input",
     "A.native_group_norm(t.ones(1, 2, 2), None, None, 64, 2, 1 << 10, 1, 1e-5)"),
    ("aten.native_group_norm.default", "a weight shorter than C",
     "A.native_group_norm(t.ones(1, 64, 2), t.ones(1), t.ones(1), 1, 64, 2, 1, 1e-5)"),
    ("aten.native_group_norm_backward.default", "N, C, HxW past the input",
     "A.native_group_norm_backward(t.ones(1, 2, 2), t.ones(1, 2, 2), t.ones(1, 1), t.ones(1, 1),"
     " None, 64, 2, 1 << 10, 1, [True, True, True])"),
    ("aten.native_layer_norm.default", "a weight shorter than the normalized shape",
     "A.native_layer_norm(t.ones(2, 64), [64], t.ones(1), t.ones(1), 1e-5)"),
    ("aten.native_layer_norm_backward.default", "mean and rstd shorter than the rows",
     "A.native_layer_norm_backward(t.ones(64, 8), t.ones(64, 8), [8], t.ones(1, 1), t.ones(1, 1),"
     " None, None, [True, True, True])"),
    ("aten._native_batch_norm_legit_no_training.default", "running stats shorter than C",
     "print(A._native_batch_norm_legit_no_training(t.ones(2, C, 1), None, None, t.zeros(1),"
     " t.ones(1), 0.1, 1e-5)[0].sum())"),
    ("aten._native_batch_norm_legit_no_training.default", "a weight shorter than C",
     "print(A._native_batch_norm_legit_no_training(t.ones(2, C, 1), t.ones(1), t.ones(1),"
     " t.zeros(C), t.ones(C), 0.1, 1e-5)[0].sum())"),
    ("aten._native_batch_norm_legit.default", "running stats shorter than C",
     "A._native_batch_norm_legit(t.ones(2, 64, 2), None, None, t.zeros(1), t.ones(1), True, 0.1,"
     " 1e-5)"),
    ("aten._native_batch_norm_legit.no_stats", "a weight shorter than C",
     "print(A._native_batch_norm_legit.no_stats(t.ones(2, C, 1), t.ones(1), t.ones(1), True,"
     " 0.1, 1e-5)[0].sum())"),
    ("aten._native_batch_norm_legit_functional.default", "running stats shorter than C",
     "A._native_batch_norm_legit_functional(t.ones(2, C, 1), None, None, t.zeros(1), t.ones(1),"
     " True, 0.1, 1e-5)"),
    ("aten.native_batch_norm.default", "running stats shorter than C",
     "print(A.native_batch_norm(t.ones(2, C, 1), None, None, t.zeros(1), t.ones(1), False, 0.1,"
     " 1e-5)[0].sum())"),
    ("aten.batch_norm.default", "running stats shorter than C",
     "A.batch_norm(t.ones(2, C, 1), None, None, t.zeros(1), t.ones(1), False, 0.1, 1e-5,"
     " False)"),
    ("aten.batch_norm.default", "a weight shorter than C",
     "A.batch_norm(t.ones(2, C, 1), t.ones(1), t.ones(1), t.zeros(C), t.ones(C), False, 0.1,"
     " 1e-5, False)"),
    ("aten.layer_norm.default", "a weight shorter than the normalized shape",
     "A.layer_norm(t.ones(2, 64), [64], t.ones(1), t.ones(1))"),
    ("aten.group_norm.default", "a weight shorter than C",
     "A.group_norm(t.ones(1, 64, 2), 1, t.ones(1), t.ones(1))"),
    ("aten.convolution.default", "a bias shorter than the channels",
     "A.convolution(t.ones(1, 1, 4, 4), t.ones(64, 1, 1, 1), t.ones(1), [1, 1], [0, 0], [1, 1],"
     " False, [0, 0], 1)"),
    ("aten.conv2d.default", "groups that do not divide",
     "A.conv2d(t.ones(1, 4, 4, 4), t.ones(4, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 3)"),
    ("aten.convolution_backward.default", "a gradient of another shape",
     "A.convolution_backward(t.ones(1, 8, 9, 9), t.ones(1, 1, 4, 4), t.ones(8, 1, 1, 1), [8],"
     " [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])"),
    ("aten.linear.default", "a bias shorter than the outputs",
     "A.linear(t.ones(2, 4), t.ones(64, 4), t.ones(3))"),
    ("aten.addmm.default", "a bias of another shape",
     "A.addmm(t.ones(3), t.ones(2, 4), t.ones(4, 64))"),
    ("aten._adaptive_avg_pool2d_backward.default", "a gradient of another shape",
     "A._adaptive_avg_pool2d_backward(t.ones(1, 1, 64, 64), t.ones(1, 1, 2, 2))"),
    ("aten.avg_pool2d_backward.default", "a gradient of another shape",
     "A.avg_pool2d_backward(t.ones(1, 1, 64, 64), t.ones(1, 1, 2, 2), [2, 2], [2, 2], [0, 0],"
     " False, True, None)"),
    ("aten.max_pool2d_with_indices.default", "a kernel past the input",
     "A.max_pool2d_with_indices(t.ones(1, 1, 2, 2), [9, 9])"),
    ("aten._fft_c2r.default", "a last size past the input",
     "A._fft_c2r(t.ones(1, 2, dtype=t.complex64), [1], 0, 1 << 10).sum()"),
    ("aten._fft_r2c.default", "a dimension out of range",
     "A._fft_r2c(t.ones(4), [5], 0, True)"),
    ("aten.grid_sampler_2d.default", "modes out of range",
     "A.grid_sampler_2d(t.ones(1, 1, 4, 4), t.full((1, 2, 2, 2), 99.0), 7, 9, False)"),
    ("aten.grid_sampler_2d.default", "a grid far outside, zeros padding",
     "A.grid_sampler_2d(t.ones(1, 1, 4, 4), t.full((1, 2, 2, 2), 1e30), 0, 0, False)"),
    ("aten.upsample_nearest2d.vec", "an output size of another rank",
     "A.upsample_nearest2d.vec(t.ones(1, 1, 2, 2), [4, 4, 4], None)"),
    ("aten.upsample_bilinear2d.vec", "a negative output size",
     "A.upsample_bilinear2d.vec(t.ones(1, 1, 2, 2), [-4, 4], False, None)"),
    ("aten._cdist_forward.default", "compute mode out of range",
     "A._cdist_forward(t.ones(2, 3), t.ones(4, 3), 2.0, 9)"),
    ("aten._pdist_forward.default", "a negative p", "A._pdist_forward(t.ones(3, 2), -1.0)"),
    ("aten.nll_loss_forward.default", "a target past the classes",
     "A.nll_loss_forward(t.zeros(2, 4), t.tensor([1, 99]), None, 1, -100)"),
    ("aten.nll_loss_forward.default", "a weight shorter than the classes",
     "A.nll_loss_forward(t.zeros(2, 64), t.tensor([1, 63]), t.ones(1), 1, -100)"),
    ("aten.nll_loss2d_forward.default", "a target past the classes",
     "A.nll_loss2d_forward(t.zeros(1, 4, 2, 2), t.full((1, 2, 2), 99), None, 1, -100)"),
    ("aten.cross_entropy_loss.default", "a target past the classes",
     "A.cross_entropy_loss(t.zeros(2, 4), t.tensor([1, 99]))"),
    ("aten.multi_margin_loss.default", "a target past the classes",
     "A.multi_margin_loss(t.zeros(2, 4), t.tensor([1, 99]))"),
    ("aten.multilabel_margin_loss_forward.default", "a target past the classes",
     "A.multilabel_margin_loss_forward(t.zeros(2, 4), t.full((2, 4), 99), 1)"),
    ("aten.searchsorted.Tensor", "a sorter past the sequence",
     "A.searchsorted.Tensor(t.arange(4.0), t.ones(2), sorter=t.tensor([0, 1, 2, 99]))"),
    ("aten.bucketize.Tensor", "boundaries unsorted",
     "A.bucketize.Tensor(t.ones(2), t.tensor([3.0, 1.0, 2.0]))"),
    ("aten.repeat_interleave.self_Tensor", "an output size smaller than the repeats",
     "A.repeat_interleave.self_Tensor(t.ones(4), t.tensor([1 << 20, 1, 1, 1]), 0,"
     " output_size=2).sum()"),
    ("aten.repeat_interleave.Tensor", "an output size smaller than the repeats",
     "A.repeat_interleave.Tensor(t.tensor([1 << 20, 1]), output_size=2).sum()"),
    ("aten.bincount.default", "negative values", "A.bincount(t.tensor([-5, 1]))"),
    ("aten.histc.default", "a negative bin count", "A.histc(t.ones(4), -5)"),
    ("aten.lstm.input", "layers without their weights",
     "A.lstm.input(t.ones(2, 1, 4), [t.zeros(1, 1, 8), t.zeros(1, 1, 8)],"
     " [t.ones(32, 4), t.ones(32, 8), t.ones(32), t.ones(32)], True, 3, 0.0, False, False,"
     " False)"),
    ("aten.lstm.input", "weights smaller than the hidden size",
     "A.lstm.input(t.ones(2, 1, 4), [t.zeros(1, 1, 4096), t.zeros(1, 1, 4096)],"
     " [t.ones(4, 4), t.ones(4, 1), t.ones(4), t.ones(4)], True, 1, 0.0, False, False, False)"),
    ("aten.gru.input", "weights smaller than the hidden size",
     "A.gru.input(t.ones(2, 1, 4), t.zeros(1, 1, 4096), [t.ones(3, 4), t.ones(3, 1), t.ones(3),"
     " t.ones(3)], True, 1, 0.0, False, False, False)"),
    ("aten.rnn_tanh.input", "weights smaller than the hidden size",
     "A.rnn_tanh.input(t.ones(2, 1, 4), t.zeros(1, 1, 4096), [t.ones(1, 4), t.ones(1, 1),"
     " t.ones(1), t.ones(1)], True, 1, 0.0, False, False, False)"),
    ("aten.scaled_dot_product_attention.default", "a mask of another shape",
     "A.scaled_dot_product_attention(t.ones(1, 2, 64, 8), t.ones(1, 2, 64, 8),"
     " t.ones(1, 2, 64, 8), t.ones(1, 1, 2, 2))"),
    ("aten.scaled_dot_product_attention.default", "keys and values of other lengths",
     "A.scaled_dot_product_attention(t.ones(1, 2, 4, 8), t.ones(1, 2, 64, 8),"
     " t.ones(1, 2, 2, 8))"),
    ("aten.scaled_dot_product_attention.default", "keys shorter than the values",
     "A.scaled_dot_product_attention(t.ones(1, 1, 4, 8), t.ones(1, 1, 1, 8),"
     " t.ones(1, 1, 1 << 22, 8))"),
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "keys and values of other"
     " lengths", "A._scaled_dot_product_flash_attention_for_cpu(t.ones(1, 2, 4, 8),"
     " t.ones(1, 2, 64, 8), t.ones(1, 2, 2, 8))"),
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "keys shorter than the values",
     "A._scaled_dot_product_flash_attention_for_cpu(t.ones(1, 1, 4, 8), t.ones(1, 1, 1, 8),"
     " t.ones(1, 1, 1 << 22, 8))"),
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "a mask of another shape",
     "A._scaled_dot_product_flash_attention_for_cpu(t.ones(1, 2, 64, 8), t.ones(1, 2, 64, 8),"
     " t.ones(1, 2, 64, 8), attn_mask=t.ones(1, 1, 2, 2))"),
    ("aten.instance_norm.default", "running stats shorter than C",
     "A.instance_norm(t.ones(2, C, 3), None, None, t.zeros(1), t.ones(1), True, 0.1, 1e-5,"
     " False)"),
    ("aten.instance_norm.default", "a weight shorter than C",
     "A.instance_norm(t.ones(2, C, 3), t.ones(1), t.ones(1), None, None, True, 0.1, 1e-5,"
     " False)"),
    ("aten.prelu.default", "a weight shorter than C", "A.prelu(t.ones(2, C, 3), t.ones(2))"),
    ("aten.rms_norm.default", "a weight shorter than the normalized shape",
     "A.rms_norm(t.ones(2, C), [C], t.ones(1))"),
    ("aten.conv_transpose2d.input", "a bias shorter than the channels",
     "A.conv_transpose2d.input(t.ones(1, 4, 4, 4), t.ones(4, C >> 8, 1, 1), t.ones(1))"),
    ("aten.conv_transpose2d.input", "an output padding past the stride",
     "A.conv_transpose2d.input(t.ones(1, 4, 4, 4), t.ones(4, 4, 3, 3), None, [1, 1], [0, 0],"
     " [5, 5])"),
    ("aten._trilinear.default", "dims out of range",
     "A._trilinear(t.ones(2, 3), t.ones(2, 3), t.ones(2, 3), [9], [9], [9], [9], 1)"),
    ("aten.bilinear.default", "a weight of other sizes",
     "A.bilinear(t.ones(2, 3), t.ones(2, 3), t.ones(5, 300, 3), t.ones(1))"),
    ("aten.rrelu_with_noise_functional.default", "a noise tensor shorter than the input",
     "A.rrelu_with_noise_functional(-t.ones(C), t.ones(1), 0.1, 0.3, True)"),
    ("aten.empty_permuted.default", "a layout that is no permutation",
     "A.empty_permuted([2, 3], [5, 9])"),
    ("aten.gru.input", "more layers than weights",
     "A.gru.input(t.ones(2, 1, 4), t.zeros(3, 1, 8), [t.ones(24, 4), t.ones(24, 8), t.ones(24),"
     " t.ones(24)], True, 3, 0.0, False, False, False)"),
    ("aten.lstm.input", "one direction's weights, bidirectional",
     "A.lstm.input(t.ones(2, 1, 4), [t.zeros(2, 1, 8), t.zeros(2, 1, 8)], [t.ones(32, 4),"
     " t.ones(32, 8), t.ones(32), t.ones(32)], True, 1, 0.0, False, True, False)"),
    ("aten.copy.default", "a source of another shape", "A.copy(t.zeros(4), t.ones(64))"),
    ("aten.copy_.default", "a source of another shape", "A.copy_(t.zeros(4), t.ones(64))"),
    ("aten.expand.default", "a size of another length", "A.expand(t.zeros(4), [64]).sum()"),
    ("aten.cat.default", "tensors of other shapes", "A.cat([t.zeros(2, 4), t.zeros(2, 64)])"),
    ("aten.stack.default", "tensors of other shapes", "A.stack([t.zeros(4), t.zeros(64)])"),
    ("aten.mm.default", "inner sizes that differ", "A.mm(t.ones(2, 4), t.ones(64, 2))"),
    ("aten.bmm.default", "batches that differ", "A.bmm(t.ones(2, 2, 4), t.ones(64, 4, 2))"),
    ("aten.where.self", "shapes that do not broadcast",
     "A.where.self(t.ones(4, dtype=t.bool), t.ones(64), t.ones(4))"),
    ("aten.empty_strided.default", "strides past the size",
     "A.empty_strided([2], [1 << 20]).sum()"),
    ("aten.pixel_shuffle.default", "channels that do not divide",
     "A.pixel_shuffle(t.ones(1, 3, 2, 2), 2)"),
    ("aten.channel_shuffle.default", "groups that do not divide",
     "A.channel_shuffle(t.ones(1, 3, 2, 2), 2)"),
    ("aten.roll.default", "shifts and dims of other lengths",
     "A.roll(t.ones(4), [1, 2], [0])"),
    ("aten.constant_pad_nd.default", "a negative pad past the size",
     "A.constant_pad_nd(t.ones(4), [-99, 0])"),
    ("aten.reflection_pad2d.default", "a pad past the size",
     "A.reflection_pad2d(t.ones(1, 1, 2, 2), [9, 9, 9, 9])"),
    ("aten.replication_pad2d.default", "a negative pad past the size",
     "A.replication_pad2d(t.ones(1, 1, 2, 2), [-9, 0, 0, 0])"),
    ("aten.cumsum.default", "a dim out of range", "A.cumsum(t.ones(4), 9)"),
    ("aten.sort.default", "a dim out of range", "A.sort(t.ones(4), 9)"),
    ("aten.flip.default", "a dim out of range", "A.flip(t.ones(4), [9])"),
    ("aten.permute.default", "dims out of range", "A.permute(t.ones(4, 2), [0, 9])"),
    ("aten.adaptive_avg_pool1d.default", "a zero output size",
     "A.adaptive_avg_pool1d(t.ones(1, 1, 4), [0])"),
    ("aten._adaptive_avg_pool2d.default", "an output larger than the input",
     "A._adaptive_avg_pool2d(t.ones(1, 1, 2, 2), [64, 64]).sum()"),
    ("aten._adaptive_avg_pool3d.default", "a negative output size",
     "A._adaptive_avg_pool3d(t.ones(1, 1, 2, 2, 2), [-4, 2, 2])"),
    ("aten.avg_pool2d.default", "a padding past half the kernel",
     "A.avg_pool2d(t.ones(1, 1, 4, 4), [2, 2], [1, 1], [9, 9])"),
    ("aten.max_pool3d_with_indices.default", "a padding past half the kernel",
     "A.max_pool3d_with_indices(t.ones(1, 1, 4, 4, 4), [2, 2, 2], [1, 1, 1], [9, 9, 9])"),
    ("aten.native_dropout.default", "p past 1", "A.native_dropout(t.ones(4), 9.0, True)"),
    ("aten.randperm.default", "a negative n", "A.randperm(-5)"),
    ("aten.multinomial.default", "more samples than categories, without replacement",
     "A.multinomial(t.ones(4), 99)"),
    ("aten.normal_functional.default", "a negative std",
     "A.normal_functional(t.ones(4), 0.0, -1.0)"),
]
# fmt: on


def run(call: str) -> str:
    """What ``call`` does in a fresh process: raised (and what), crashed (the signal), returned."""
    code = f"import torch as t\nA = t.ops.aten\nP = t.ops.prims\nC = 1 << 22\n{call}\n"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "did not finish in 2 minutes"
    if done.returncode < 0:
        return f"CRASHED (signal {-done.returncode})"
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1]
        return f"raised {last[:110]}"
    return "RETURNED (no error)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help="only these operators (aten.gather.default, ...)")
    args = ap.parse_args()
    print("| operator | argument | outcome |\n|---|---|---|")
    for op, what, call in CASES:
        if not args.ops or op in args.ops:
            print(f"| {op} | {what} | {run(call)} |", flush=True)


if __name__ == "__main__":
    main()
