"""Counting what a training step asks of the device: kernel-equivalent ops, and host reads.

A GPU step of small matrices is paced by the host, which dispatches one op at a time; so the number
of ops that launch work, and the reads that make the host wait for the device, are the costs to cut.

- `OpCounter` (a TorchDispatchMode) sees every aten op of eager code after autograd and the
  composite ops' decompositions, i.e. what the dispatcher really runs. Views, metadata and bare
  allocations launch nothing, so they are counted apart from the kernel-equivalent ops. It also
  records host reads: `_local_scalar_dense` (under .item(), float(), bool(), f-strings), and
  Tensor.tolist (through a TorchFunctionMode, as a CPU tensor's tolist dispatches nothing).
- Compiled code cannot be watched that way (dynamo steps aside under a dispatch mode), so
  `profiled_kernels` counts from torch.profiler's events instead: on CUDA every kernel the device
  ran; on CPU every innermost aten op that is not a view or an allocation (an extern call of
  inductor's wrapper, or an eager op) plus every kernel inductor generated, which appear by name
  once `torch._inductor.config.cpp.enable_kernel_profile` is set before compiling.
"""
import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
NO_KERNEL = {"to", "resolve_conj", "resolve_neg", "conj", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
             "lift_fresh", "_reshape_alias", "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
             "is_same_size", "result_type", "_has_compatible_shallow_copy_type", "record_stream"}
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
              "_unique2", "allclose"}


def launches_nothing(name: str, is_view: bool) -> bool:
    return is_view or name in NO_KERNEL


class _ToList(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist and not self.counter.paused:
            self.counter.reads.append("tolist")
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts aten ops: `kernels` (launch work), `dispatched` (all), `by_name`, and `reads` (the
    host reads, by name, in order). Set `paused` to leave out a stretch (e.g. the data sampler)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.dispatched, self.paused = 0, 0, False
        self.by_name, self.reads = collections.Counter(), []
        self._tolist = _ToList(self)

    def __enter__(self):
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.dispatched += 1
            if name in HOST_READS:
                self.reads.append(name)
            elif not launches_nothing(name, func.is_view):
                self.kernels += 1
                self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused


def profiled_kernels(fn, device: str) -> int:
    """Kernels launched by fn(): device kernels on CUDA; on CPU innermost aten ops that launch work,
    a multi-tensor (_foreach_, _fused_) op as one, plus inductor's generated kernels (see above)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    counted = {}  # id(event) -> kernels launched by the event and what it calls

    def kernels(e) -> int:
        if id(e) not in counted:
            inner = sum(kernels(c) for c in e.cpu_children)
            own = "cpp_fused" in e.name or multi_tensor(e) or (  # an inductor kernel; a multi-tensor op
                e.name.startswith("aten::") and e.name[6:] not in VIEWS | HOST_READS and
                not launches_nothing(e.name[6:], False))
            counted[id(e)] = 1 if multi_tensor(e) else inner or int(own)  # innermost ops that launch work
        return counted[id(e)]
    return sum(kernels(e) for e in prof.events() if e.cpu_parent is None)


def multi_tensor(event) -> bool:
    return event.name.startswith(("aten::_foreach_", "aten::_fused_"))


VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "slice", "select",
         "unsqueeze", "squeeze", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind", "narrow",
         "unflatten", "flatten", "view_as", "reshape", "expand_as", "contiguous", "_unsafe_split",
         "numpy_T", "matrix_H", "mT", "movedim", "unfold", "real", "view_as_real", "diagonal"}
