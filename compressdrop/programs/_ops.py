"""The ATen and prims operators a ``.pt2`` program may call (:mod:`.safety` refuses others).

Written by ``benchmarks/probe_program_ops.py --write`` on torch 2.13.0 (run it again to
regenerate; ``benchmarks/results/program_ops.json`` says which programs call each). The
candidates: the 219 operators that ``torch.export`` programs call, before and after
``run_decompositions()``, of every torchvision classification model, of Hugging Face models from
small configs (BERT, RoBERTa, ELECTRA, DistilBERT, GPT-2, LLaMA, Qwen2, Mistral, Gemma 1 to 3,
OPT, T5's encoder, ViT), of one model a ``torch.nn`` layer, and of the programs compressdrop and
its test suite write (reference nets dense, gated with each gate family, slim, slim with their
noise kept; models pruned as a pickled one is, heads cut), with torch's core ATen opset (193
overloads tagged ``torch.Tag.core``) and the prims (126). Left out (19): what
``safety._NO_OPS`` refuses (files, printing, sparse and unchecked calls), every gradient kernel
(``*_backward``: in no inference program, and fed the forward pass's indices and statistics by
the file), the batch-norm kernels that read running statistics shorter than the channels past
their end (``aten.batch_norm``, which ``torch.export`` writes, checks them), ``resize_`` and
``grid_sampler_2d`` (modes out of range taken silently), the FFT kernels (a negative dim
crashed them); the script says why for each, ``benchmarks/probe_op_bounds.py`` tries the kernels
with the indices, sizes and modes a crafted file can give, and ``benchmarks/fuzz_allowed_ops.py``
with arguments drawn from their schemas. Operators that real models need are kept though their
CPU kernels crash on arguments that disagree (``lstm.input`` with weights smaller than its
hidden state, ``scaled_dot_product_attention`` with keys shorter than its values, ``col2im``
with a padding of 2**32, an embedding bag of no bags): :mod:`._checked` checks them first.
"""

from __future__ import annotations

__all__: list[str] = []  # internal: safety.py uses ALLOWED

# 408 overloads as str(torch.ops.aten.add.Tensor) writes them, sorted; a node's target is
# "torch.ops." and one of these
_ATEN = """
aten.__and__.Tensor aten._adaptive_avg_pool2d.default aten._adaptive_avg_pool3d.default
aten._assert_tensor_metadata.default aten._cdist_forward.default aten._embedding_bag.default
aten._local_scalar_dense.default aten._log_softmax.default aten._pdist_forward.default
aten._softmax.default aten._to_copy.default aten._trilinear.default aten.abs.default
aten.acos.default aten.acosh.default aten.adaptive_avg_pool1d.default
aten.adaptive_avg_pool2d.default aten.adaptive_max_pool1d.default aten.adaptive_max_pool2d.default
aten.add.Scalar aten.add.Tensor aten.add_.Tensor aten.addmm.default aten.alias.default
aten.alpha_dropout.default aten.amax.default aten.amin.default aten.any.default aten.any.dim
aten.any.dims aten.arange.default aten.arange.start_step aten.argmax.default aten.argmin.default
aten.argsort.default aten.as_strided.default aten.asin.default aten.asinh.default aten.atan.default
aten.atan2.default aten.atan2.out aten.atanh.default aten.avg_pool1d.default
aten.avg_pool2d.default aten.avg_pool3d.default aten.batch_norm.default aten.bernoulli.p
aten.bilinear.default aten.bitwise_and.Scalar aten.bitwise_and.Tensor aten.bitwise_not.default
aten.bitwise_or.Scalar aten.bitwise_or.Tensor aten.bitwise_xor.Scalar aten.bitwise_xor.Tensor
aten.bmm.default aten.cat.default aten.cdist.default aten.ceil.default aten.celu.default
aten.chunk.default aten.clamp.Tensor aten.clamp.default aten.clamp_min.default aten.clone.default
aten.col2im.default aten.constant_pad_nd.default aten.contiguous.default aten.conv1d.default
aten.conv2d.default aten.conv3d.default aten.conv_transpose1d.default aten.conv_transpose2d.input
aten.conv_transpose3d.input aten.convolution.default aten.copy.default aten.cos.default
aten.cosh.default aten.cosine_similarity.default aten.cumsum.default aten.diagonal.default
aten.diff.default aten.div.Scalar aten.div.Scalar_mode aten.div.Tensor aten.div.Tensor_mode
aten.dropout.default aten.dropout_.default aten.einsum.default aten.elu.default
aten.embedding.default aten.embedding_bag.padding_idx aten.empty.memory_format
aten.empty_permuted.default aten.empty_strided.default aten.eq.Scalar aten.eq.Tensor
aten.erf.default aten.exp.default aten.expand.default aten.expand_as.default aten.expm1.default
aten.feature_alpha_dropout.default aten.feature_dropout.default aten.fill.Scalar aten.fill_.Tensor
aten.flatten.using_ints aten.flip.default aten.floor.default aten.fmod.Scalar aten.fmod.Tensor
aten.full.default aten.full_like.default aten.gather.default aten.ge.Scalar aten.ge.Tensor
aten.gelu.default aten.glu.default aten.group_norm.default aten.gru.input aten.gt.Scalar
aten.gt.Tensor aten.hardshrink.default aten.hardsigmoid.default aten.hardswish_.default
aten.hardtanh.default aten.hardtanh_.default aten.im2col.default aten.index.Tensor
aten.index_put.default aten.index_select.default aten.instance_norm.default aten.isinf.default
aten.isnan.default aten.layer_norm.default aten.le.Scalar aten.le.Tensor aten.leaky_relu.default
aten.lift_fresh_copy.default aten.linalg_vector_norm.default aten.linear.default aten.log.default
aten.log10.default aten.log1p.default aten.log2.default aten.log_sigmoid.default
aten.log_softmax.int aten.logical_and.default aten.logical_not.default aten.logical_or.default
aten.logical_xor.default aten.lstm.input aten.lt.Scalar aten.lt.Tensor aten.masked_fill.Scalar
aten.masked_fill_.Scalar aten.masked_scatter.default aten.matmul.default aten.max.dim
aten.max_pool1d.default aten.max_pool2d.default aten.max_pool2d_with_indices.default
aten.max_pool3d.default aten.max_pool3d_with_indices.default aten.maximum.default aten.mean.default
aten.mean.dim aten.min.dim aten.min.other aten.minimum.default aten.mish.default aten.mm.default
aten.mul.Scalar aten.mul.Tensor aten.nan_to_num.default aten.narrow.default
aten.native_dropout.default aten.native_group_norm.default aten.native_layer_norm.default
aten.ne.Scalar aten.ne.Tensor aten.neg.default aten.new_ones.default aten.new_zeros.default
aten.nonzero.default aten.numpy_T.default aten.ones.default aten.pad.default
aten.pairwise_distance.default aten.permute.default aten.pixel_shuffle.default
aten.pixel_unshuffle.default aten.pow.Scalar aten.pow.Tensor_Scalar aten.pow.Tensor_Tensor
aten.prelu.default aten.prod.default aten.prod.dim_int aten.rand.default aten.randn.default
aten.randperm.default aten.reciprocal.default aten.reflection_pad1d.default
aten.reflection_pad2d.default aten.reflection_pad3d.default aten.relu.default aten.relu_.default
aten.remainder.Scalar aten.remainder.Tensor aten.repeat.default aten.replication_pad2d.default
aten.replication_pad3d.default aten.reshape.default aten.rms_norm.default aten.rnn_tanh.input
aten.roll.default aten.round.default aten.rrelu.default aten.rrelu_with_noise_functional.default
aten.rsqrt.default aten.scalar_tensor.default aten.scaled_dot_product_attention.default
aten.scatter.src aten.scatter.value aten.scatter_add.default aten.scatter_reduce.two
aten.select.int aten.select_scatter.default aten.selu.default aten.sigmoid.default
aten.sign.default aten.silu.default aten.silu_.default aten.sin.default aten.sinh.default
aten.slice.Tensor aten.slice_scatter.default aten.softmax.int aten.softplus.default
aten.softshrink.default aten.sort.default aten.split.Tensor aten.split_with_sizes.default
aten.sqrt.default aten.square.default aten.squeeze.dim aten.squeeze.dims aten.stack.default
aten.std.dim aten.sub.Scalar aten.sub.Tensor aten.sum.default aten.sum.dim_IntList
aten.swapaxes.default aten.sym_is_contiguous.default aten.sym_numel.default aten.sym_size.int
aten.sym_storage_offset.default aten.sym_stride.int aten.tan.default aten.tanh.default
aten.threshold.default aten.to.device aten.to.dtype aten.to.dtype_layout aten.topk.default
aten.transpose.int aten.tril.default aten.triu.default aten.trunc.default aten.type_as.default
aten.unbind.int aten.unflatten.int aten.unsqueeze.default aten.upsample_bicubic2d.vec
aten.upsample_bilinear2d.vec aten.upsample_nearest2d.vec aten.var.correction aten.var.dim
aten.view.default aten.where.ScalarOther aten.where.ScalarSelf aten.where.self aten.zero_.default
aten.zeros.default aten.zeros_like.default
"""
_PRIMS = """
prims._make_token.default prims._sink_tokens.default prims.abs.default prims.acos.default
prims.acosh.default prims.add.default prims.amax.default prims.amin.default
prims.as_strided.default prims.as_strided_scatter.default prims.asin.default prims.asinh.default
prims.atan.default prims.atan2.default prims.atanh.default prims.bessel_i0.default
prims.bessel_i0e.default prims.bessel_i1.default prims.bessel_i1e.default prims.bessel_j0.default
prims.bessel_j1.default prims.bitwise_and.default prims.bitwise_not.default
prims.bitwise_or.default prims.bitwise_xor.default prims.broadcast_in_dim.default prims.cat.default
prims.cbrt.default prims.ceil.default prims.clone.default prims.collapse.default
prims.collapse_view.default prims.conj.default prims.conj_physical.default
prims.convert_element_type.default prims.copy_strided.default prims.copy_to.default
prims.cos.default prims.cosh.default prims.device_put.default prims.digamma.default
prims.div.default prims.empty.default prims.empty_permuted.default prims.empty_strided.default
prims.eq.default prims.erf.default prims.erf_inv.default prims.erfc.default prims.erfcx.default
prims.exp.default prims.exp2.default prims.expm1.default prims.fill.default prims.floor.default
prims.fmax.default prims.fmin.default prims.fmod.default prims.frexp.default prims.full.default
prims.full_like.default prims.gcd.default prims.ge.default prims.gt.default prims.hypot.default
prims.igamma.default prims.igammac.default prims.imag.default prims.iota.default
prims.isfinite.default prims.item.default prims.le.default prims.lgamma.default prims.log.default
prims.log10.default prims.log1p.default prims.log2.default prims.lt.default prims.maximum.default
prims.maximum_value.default prims.minimum.default prims.minimum_value.default prims.mul.default
prims.ndtri.default prims.ne.default prims.neg.default prims.nextafter.default prims.normal.default
prims.pow.default prims.prod.default prims.real.default prims.reciprocal.default
prims.remainder.default prims.reshape.default prims.rev.default prims.round.default
prims.rsqrt.default prims.scalar_tensor.default prims.shift_left.default
prims.shift_right_arithmetic.default prims.sign.default prims.signbit.default prims.sin.default
prims.sinh.default prims.spherical_bessel_j0.default prims.split_dim.default prims.sqrt.default
prims.squeeze.default prims.sub.default prims.sum.default prims.svd.default prims.tan.default
prims.tanh.default prims.transpose.default prims.trunc.default prims.uniform.default
prims.var.default prims.view_of.default prims.view_of_dtype.default prims.where.default
prims.xor_sum.default prims.zeta.default
"""

#: the operators a program read from a file may call
ALLOWED: frozenset[str] = frozenset(_ATEN.split() + _PRIMS.split())
