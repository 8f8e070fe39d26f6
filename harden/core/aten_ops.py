"""The ATen overloads a graph from a file may call: the one explicit list for bundles and ``.pt2`` programs.

torch has thousands of ATen overloads; some are memory-unsafe by design (``_sparse_coo_tensor_unsafe``
trusts its indices), some print (``_print``), some read or write files.  A graph harden did not build itself
(a bundle's classifier, a ``.pt2`` program) may call only the overloads listed here: side-effect free, no
sparse, quantized, "unsafe", random, printing or file variant, every allocation following from the input's
shape (checked separately on the meta device, ``harden.graph.sizes``), and every call's arguments checked
against the op's schema (``harden.graph.graphfile.check_aten_call``).  The ATen spellings of
``harden.graph.ops`` are all here (a test keeps them so).

One line per op: add one when a real model needs it, with a test that stores and reloads a model using it.
Lives in ``harden.core`` because both loaders need it: ``harden.io.pt2`` (before torch reads a program)
and ``harden.graph.graphfile`` (bundles).
"""

from __future__ import annotations

ATEN_OPS: frozenset[str] = frozenset({
    # shapes and views
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
    "aten.unflatten.int", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
    "aten.unsqueeze.default", "aten.permute.default", "aten.transpose.int", "aten.t.default",
    "aten.expand.default", "aten.slice.Tensor", "aten.select.int", "aten.narrow.default", "aten.split.Tensor",
    "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int", "aten.contiguous.default",
    "aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.sym_size.int",
    "aten.sym_numel.default", "aten.cat.default", "aten.concat.default", "aten.stack.default", "aten.repeat.default",
    "aten.index_select.default", "aten.to.dtype", "aten._to_copy.default", "aten.type_as.default",
    # layers
    "aten.conv1d.default", "aten.conv2d.default", "aten.linear.default", "aten.addmm.default",
    "aten.matmul.default", "aten.mm.default", "aten.bmm.default", "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default", "aten.layer_norm.default", "aten.group_norm.default",
    "aten.max_pool2d.default", "aten.max_pool1d.default", "aten.avg_pool2d.default", "aten.avg_pool1d.default",
    "aten.adaptive_avg_pool2d.default", "aten.adaptive_avg_pool1d.default", "aten.adaptive_max_pool2d.default",
    "aten.dropout.default", "aten.pad.default", "aten.constant_pad_nd.default",
    "aten.scaled_dot_product_attention.default",
    # activations
    "aten.relu.default", "aten.relu6.default", "aten.hardtanh.default", "aten.leaky_relu.default",
    "aten.sigmoid.default", "aten.tanh.default", "aten.silu.default", "aten.gelu.default",
    "aten.hardswish.default", "aten.hardsigmoid.default", "aten.mish.default", "aten.elu.default",
    "aten.selu.default", "aten.celu.default", "aten.softplus.default", "aten.softshrink.default",
    "aten.hardshrink.default", "aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int",
    "aten._log_softmax.default",
    # element-wise arithmetic and reductions
    "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.rsub.Scalar",
    "aten.rsub.Tensor", "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar",
    "aten.div.Tensor_mode", "aten.neg.default", "aten.reciprocal.default", "aten.abs.default",
    "aten.exp.default", "aten.log.default", "aten.sqrt.default", "aten.rsqrt.default", "aten.pow.Tensor_Scalar",
    "aten.pow.Tensor_Tensor", "aten.square.default", "aten.erf.default", "aten.clamp.default",
    "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default", "aten.maximum.default",
    "aten.minimum.default", "aten.where.self", "aten.mean.dim", "aten.mean.default", "aten.sum.dim_IntList",
    "aten.sum.default", "aten.amax.default", "aten.amin.default", "aten.max.dim", "aten.min.dim",
    "aten.argmax.default", "aten.var.correction", "aten.std.correction", "aten.logsumexp.default",
    "aten.eq.Scalar", "aten.gt.Scalar", "aten.lt.Scalar", "aten.ge.Scalar", "aten.le.Scalar",
    "aten.isfinite.default", "aten.logical_not.default",
})

# In-place forms a ``.pt2`` program may hold (torch.export keeps ``nn.ReLU(inplace=True)`` as ``relu_``, a residual
# ``out += identity`` as ``add_``): each the in-place twin of an op above.  harden rewrites them out of place when it
# loads the program (``harden.core.inplace``), before any graph is traced or stored, so a bundle never holds one.
INPLACE_ATEN_OPS: frozenset[str] = frozenset({
    "aten.relu_.default", "aten.hardtanh_.default", "aten.leaky_relu_.default", "aten.silu_.default",
    "aten.hardswish_.default", "aten.hardsigmoid_.default", "aten.sigmoid_.default", "aten.mish_.default",
    "aten.elu_.default", "aten.gelu_.default", "aten.dropout_.default", "aten.clamp_.default",
    "aten.add_.Tensor", "aten.sub_.Tensor", "aten.mul_.Tensor", "aten.div_.Tensor",
})
