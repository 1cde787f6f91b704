"""Every op as a ``torch.library`` custom op (namespace ``grpo_kernels``), for ``torch.compile``.

Why: the backends are autograd Functions over Triton kernels and C++ entry
points, which TorchDynamo cannot trace. Registered as custom ops with a fake
(shape/dtype-only) implementation and an autograd formula, each op is one
opaque node of the captured graph: ``torch.compile(..., fullgraph=True)``
runs without a graph break, and on CUDA the same ops run the Triton/CUDA
kernels. The public ops (:mod:`grpo_kernels.ops`) validate their inputs and
resolve the backend first (outside the ops), then take this route while
TorchDynamo traces (``torch.compiler.is_compiling()``); eager calls keep the
backends' autograd Functions directly, unchanged.

Design:

- **Schemas.** Every op takes tensors and scalars only, the resolved backend
  name as a ``str`` and the loss options as explicit arguments, derived from
  the keyword options of :func:`grpo_kernels.reference.grpo_loss` (through
  :data:`grpo_kernels.kernel_options.LOSS_DEFAULTS` and the reference's type
  hints), so a new loss option needs no edit here; a type hint that has no
  schema type fails at import with a ``TypeError`` naming the option. An option
  that is a number or a tensor (``num_items_in_batch``) takes two arguments: a
  ``Tensor?`` and a ``Scalar?``; so does the row ops' ``temperature`` (a float ``temperature`` and a
  ``Tensor? temperature_tensor``, which wins when given). Process groups and other objects are no schema
  types: code that needs them (distributed reductions) calls the backend
  functions of :mod:`grpo_kernels.backends` itself, around these ops.
- **Implementations** run the backend's own function for the op (what eager
  calls run), so every backend and every option has one implementation. A
  custom op runs below autograd; where it needs the backend's gradient it
  re-enables autograd for its own leaves (:func:`_autograd_inside`).
- **Fake implementations** run :mod:`grpo_kernels.reference` (the
  specification, device-generic PyTorch) on the fake tensors: the output
  shapes and dtypes come from the one place that defines them.
  ``group_advantages`` with ``group_ids`` has a data-dependent group count.
- **Autograd.** The differentiable inputs are those of the kernel backends,
  for every backend: ``logits`` (``token_logprobs``, ``fused_grpo_loss``),
  ``logprobs`` (``grpo_loss``), ``hidden``/``weight``/``bias`` (fused-linear
  ops); the differentiable outputs are ``logp``/``entropy`` and ``loss``/
  ``entropy``; the other outputs are marked non-differentiable, and
  ``old_logprobs``, ``advantages``, ``ref_logprobs``, ``importance_weights``,
  ``rewards`` are constants. ``token_logprobs``, ``grpo_loss`` and
  ``linear_token_logprobs`` have backward ops (``<op>_backward``) that
  recompute the backend's forward and run its backward (for
  ``token_logprobs`` one more read of the logits than the eager backward,
  which saves the log-sum-exp; ``linear_token_logprobs``' backward recomputes
  the tiles anyway). The fused losses keep their precomputed gradient: the
  forward op returns the gradient of ``loss`` w.r.t. the differentiable
  inputs that need one (the backend forms it in its forward), the backward
  only scales it by the incoming gradient; an entropy bonus's gradient comes
  from an ``<op>_entropy_backward`` op that recomputes the entropies (with
  ``return_entropy=True`` and the entropy requiring grad, the compiled
  backward runs it whatever its incoming gradient: detach a metric-only entropy).
- **In place.** A custom op with autograd cannot mutate its inputs, so
  ``inplace_backward=True`` (a memory option that changes no number) is not
  honored under ``torch.compile``: the gradient gets a buffer of its own, which
  the compiler manages, and the logits are left intact.
"""

from __future__ import annotations

import typing
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends, reference
from .kernel_options import LOSS_DEFAULTS
from .reference import GRPOLossOutput

NAMESPACE = "grpo_kernels"

# --------------------------------------------------------------------------- #
# the loss options as schema arguments
# --------------------------------------------------------------------------- #
_SCALARS = {bool: "bool", int: "SymInt", float: "float", str: "str"}


def _schema_arguments(name: str, hint: Any) -> tuple[tuple[str, str], ...]:
    """``((schema type, argument name), ...)`` of the loss option ``name`` with type hint ``hint``."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    optional = origin is Union and type(None) in args
    members = tuple(a for a in args if a is not type(None)) if origin is Union else (hint,)
    suffix = "?" if optional else ""
    if members == (Tensor,):
        return (("Tensor" + suffix, name),)
    if len(members) == 1 and members[0] in _SCALARS:
        return ((_SCALARS[members[0]] + suffix, name),)
    if len(members) == 1 and typing.get_origin(members[0]) is typing.Literal:
        kinds = {type(v) for v in typing.get_args(members[0])}
        if len(kinds) == 1 and kinds.pop() in _SCALARS:
            return ((_SCALARS[type(typing.get_args(members[0])[0])] + suffix, name),)
    numbers = [m for m in members if m in (int, float)]
    if numbers and set(members) <= {int, float, Tensor}:
        scalar = ("Scalar?", name) if len(numbers) > 1 else (_SCALARS[numbers[0]] + "?", name)
        return (("Tensor?", name + "__tensor"), scalar) if Tensor in members else ((scalar[0].rstrip("?") + suffix,
                                                                                    name),)
    if len(members) == 1 and typing.get_origin(members[0]) in (tuple, list, Sequence, typing.Sequence):
        items = {a for a in typing.get_args(members[0]) if a is not Ellipsis}
        if len(items) == 1 and items <= {int, float}:
            return ((_SCALARS[items.pop()].replace("SymInt", "int") + "[]" + suffix, name),)
    raise TypeError(
        f"grpo_kernels.custom_ops: the loss option {name!r} has type {hint!r}, which has no torch.library schema "
        "type; give reference.grpo_loss's option a tensor/number/str/bool (or Optional/sequence of them) type, or "
        "map it in custom_ops._schema_arguments"
    )


def _loss_schema() -> tuple[tuple[str, str, str], ...]:
    """``((option, schema type, argument name), ...)`` of every keyword option of the reference ``grpo_loss``."""
    hints = typing.get_type_hints(reference.grpo_loss)
    return tuple((name, *arg) for name in LOSS_DEFAULTS for arg in _schema_arguments(name, hints[name]))


_LOSS_ARGS = _loss_schema()
_LOSS_SCHEMA = ", ".join(f"{kind} {arg}" for _, kind, arg in _LOSS_ARGS)


def _pack_loss(options: dict) -> list:
    """The loss options (all of them, absent ones at their defaults) as the ops' positional arguments."""
    options = {**LOSS_DEFAULTS, **options}
    packed = []
    for name, kind, arg in _LOSS_ARGS:
        value = options[name]
        if arg.endswith("__tensor"):
            packed.append(value if isinstance(value, Tensor) else None)
        elif name + "__tensor" in (a for _, _, a in _LOSS_ARGS):
            packed.append(None if isinstance(value, Tensor) else value)
        elif kind.startswith(("int[]", "float[]")) and value is not None:
            packed.append(list(value))
        else:
            packed.append(value)
    return packed


def _unpack_loss(args: Sequence) -> dict:
    """The inverse of :func:`_pack_loss`: the keyword options of the reference ``grpo_loss``."""
    options = {}
    for (name, kind, arg), value in zip(_LOSS_ARGS, args):
        if arg.endswith("__tensor"):
            options[name] = value
        elif name in options and options[name] is not None:
            continue  # the tensor form was given
        elif kind.startswith(("int[]", "float[]")) and value is not None:
            options[name] = tuple(value) if isinstance(LOSS_DEFAULTS[name], tuple) else value
        else:
            options[name] = value
    return options


_TENSOR_SLOTS = tuple(kind.startswith("Tensor") for _, kind, _ in _LOSS_ARGS)


def _split_loss_args(loss_args: Sequence) -> tuple[list, list]:
    """``(the arguments with None in their tensor slots, the tensor slots)``: tensors are saved for the backward."""
    return ([None if slot else a for a, slot in zip(loss_args, _TENSOR_SLOTS)],
            [a for a, slot in zip(loss_args, _TENSOR_SLOTS) if slot])


def _join_loss_args(rest: Sequence, tensors: Sequence[Optional[Tensor]]) -> list:
    it = iter(tensors)
    return [next(it) if slot else a for a, slot in zip(rest, _TENSOR_SLOTS)]


def _loss_tensors(options: dict) -> list[Tensor]:
    return [v for v in options.values() if isinstance(v, Tensor)]


# --------------------------------------------------------------------------- #
# running the backends
# --------------------------------------------------------------------------- #
# The keys that autograd.Function-based dispatch (and so every custom op implementation) excludes.
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextmanager
def _autograd_inside():
    """Autograd for the leaves an implementation creates itself.

    A custom op's implementation runs below the autograd dispatch keys, but the
    backends form their gradients through autograd (their autograd Functions).
    This restores those keys and grad mode for the block; it is used only on
    detached leaves of the implementation's own, whose graph ends inside it.
    """
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude - C.DispatchKeySet(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _function(backend: str, device: torch.device, op: str) -> Callable:
    return backends.backend_function(backend, device, op)


def _detach(*tensors: Optional[Tensor]) -> tuple:
    return tuple(None if t is None else t.detach() for t in tensors)


def _leaf(t: Optional[Tensor], needs: bool) -> Optional[Tensor]:
    return None if t is None else t.detach().requires_grad_(needs)


def _outputs(inputs: Sequence[Optional[Tensor]], *outputs: Tensor) -> tuple[Tensor, ...]:
    """``outputs`` detached, contiguous, sharing memory with no input and no other output (a custom op's outputs
    must not alias)."""
    storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    fresh = []
    for out in outputs:
        out = out.detach().contiguous()
        if out.numel() and out.untyped_storage().data_ptr() in storages:
            out = out.clone()
        if out.numel():
            storages.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return tuple(fresh)


def _nothing(like: Tensor) -> Tensor:
    """The placeholder of an absent tensor output: empty, ``like``'s dtype and device."""
    return like.new_empty((0,))


def _grad_or_nothing(grad: Optional[Tensor], like: Optional[Tensor]) -> Tensor:
    if grad is not None:
        return grad
    if like is None:
        return torch.empty((0,))
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


def _result_tensors(out: GRPOLossOutput) -> tuple[Tensor, ...]:
    """``(loss, per_token_loss, kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, entropy)``, zeros for None."""
    kl = out.loss.new_zeros(()) if out.kl is None else out.kl
    entropy = out.loss.new_zeros(()) if out.entropy is None else out.entropy
    return (out.loss, out.per_token_loss, kl, out.clip_ratio_low, out.clip_ratio_high, out.clip_ratio_region, entropy)


def _result(tensors: Sequence[Tensor], has_ref: bool, return_entropy: bool) -> GRPOLossOutput:
    loss, per_token_loss, kl, low, high, region = tensors[:6]
    return GRPOLossOutput(loss=loss, per_token_loss=per_token_loss, kl=kl if has_ref else None, clip_ratio_low=low,
                          clip_ratio_high=high, clip_ratio_region=region,
                          entropy=tensors[6] if return_entropy else None)


def _define(name: str, schema: str, impl: Callable, fake: Callable):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _no_grad_backward(ctx, *grads):
    return (None,) * len(ctx.needs_input_grad)


def _set_nondifferentiable(ctx, outputs: Sequence[Tensor], differentiable: Sequence[int]) -> None:
    ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i not in differentiable))


# --------------------------------------------------------------------------- #
# token_logprobs
# --------------------------------------------------------------------------- #
_TEMPERATURE = "float temperature, Tensor? temperature_tensor"
_ROW = f"str backend, {_TEMPERATURE}, SymInt ignore_index, bool return_entropy"


def _pack_temperature(temperature) -> tuple[float, Optional[Tensor]]:
    """A float or a per-row tensor temperature as the two schema arguments ``(temperature, temperature_tensor)``."""
    return (1.0, temperature) if isinstance(temperature, Tensor) else (float(temperature), None)


def _temperature(temperature: float, temperature_tensor: Optional[Tensor]):
    """The inverse of :func:`_pack_temperature`."""
    return temperature if temperature_tensor is None else temperature_tensor.detach()


def _token_logprobs_impl(logits, token_ids, backend, temperature, temperature_tensor, ignore_index, return_entropy):
    fn = _function(backend, logits.device, "token_logprobs")
    with torch.no_grad():
        out = fn(logits.detach(), token_ids, temperature=_temperature(temperature, temperature_tensor),
                 ignore_index=ignore_index, return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, _nothing(out))
    return _outputs((logits, token_ids), logp, entropy)


def _token_logprobs_fake(logits, token_ids, backend, temperature, temperature_tensor, ignore_index, return_entropy):
    out = reference.token_logprobs(logits, token_ids, temperature=_temperature(temperature, temperature_tensor),
                                   ignore_index=ignore_index, return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, _nothing(out))
    return logp.contiguous(), entropy.contiguous()


token_logprobs_op = _define(
    "token_logprobs", f"(Tensor logits, Tensor token_ids, {_ROW}) -> (Tensor, Tensor)",
    _token_logprobs_impl, _token_logprobs_fake,
)


def _token_logprobs_backward_impl(logits, token_ids, grad_logp, grad_entropy, backend, temperature,
                                  temperature_tensor, ignore_index, return_entropy):
    fn = _function(backend, logits.device, "token_logprobs")
    with _autograd_inside():
        leaf = _leaf(logits, True)
        out = fn(leaf, token_ids, temperature=_temperature(temperature, temperature_tensor), ignore_index=ignore_index,
                 return_entropy=return_entropy)
        outs, grads = ((out[0], out[1]), (grad_logp, grad_entropy)) if return_entropy else ((out,), (grad_logp,))
        (grad,) = torch.autograd.grad(outs, leaf, grads)
    return _outputs((logits,), grad)[0]


def _token_logprobs_backward_fake(logits, token_ids, grad_logp, grad_entropy, backend, temperature,
                                  temperature_tensor, ignore_index, return_entropy):
    return logits.new_empty(logits.shape)


token_logprobs_backward_op = _define(
    "token_logprobs_backward",
    f"(Tensor logits, Tensor token_ids, Tensor grad_logp, Tensor grad_entropy, {_ROW}) -> Tensor",
    _token_logprobs_backward_impl, _token_logprobs_backward_fake,
)


def _token_logprobs_setup(ctx, inputs, output):
    logits, token_ids, backend, temperature, temperature_tensor, ignore_index, return_entropy = inputs
    ctx.options = (backend, temperature, ignore_index, return_entropy)
    ctx.save_for_backward(logits, token_ids, temperature_tensor)


def _token_logprobs_backward(ctx, grad_logp, grad_entropy):
    logits, token_ids, temperature_tensor = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    backend, temperature, ignore_index, return_entropy = ctx.options
    grad_entropy = grad_entropy if return_entropy else grad_logp.new_empty((0,))
    grad = token_logprobs_backward_op(logits, token_ids, grad_logp, grad_entropy, backend, temperature,
                                      temperature_tensor, ignore_index, return_entropy)
    return (grad,) + (None,) * 6


token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def token_logprobs(logits: Tensor, token_ids: Tensor, *, temperature: reference.Temperature, ignore_index: int,
                   return_entropy: bool, backend: str) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.ops.token_logprobs` through ``grpo_kernels::token_logprobs`` (inputs validated,
    ``backend`` resolved)."""
    logp, entropy = token_logprobs_op(logits, token_ids, backend, *_pack_temperature(temperature), ignore_index,
                                      bool(return_entropy))
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------- #
# group_advantages (not differentiable: advantages are constants of the loss)
# --------------------------------------------------------------------------- #
def _group_advantages_impl(rewards, group_size, group_ids, scale, estimator, eps, reward_weights, multi_objective,
                           return_stats, backend):
    fn = _function(backend, rewards.device, "group_advantages")
    with torch.no_grad():
        out = fn(rewards.detach(), group_size=group_size, group_ids=group_ids, scale=scale, estimator=estimator,
                 eps=eps, reward_weights=reward_weights, multi_objective=multi_objective, return_stats=return_stats)
    adv, mean, std = out if return_stats else (out, _nothing(out), _nothing(out))
    return _outputs((rewards, group_ids, reward_weights), adv, mean, std)


def _group_advantages_fake(rewards, group_size, group_ids, scale, estimator, eps, reward_weights, multi_objective,
                           return_stats, backend):
    dtype = reference.compute_dtype(rewards)
    adv = rewards.new_empty((rewards.shape[0],), dtype=dtype)
    if not return_stats:
        return adv, _nothing(adv), _nothing(adv)
    groups = rewards.shape[0] // group_size if group_ids is None else torch.library.get_ctx().new_dynamic_size()
    return adv, adv.new_empty((groups,)), adv.new_empty((groups,))


group_advantages_op = _define(
    "group_advantages",
    "(Tensor rewards, SymInt? group_size, Tensor? group_ids, str scale, str estimator, float eps, "
    "Tensor? reward_weights, str multi_objective, bool return_stats, str backend) -> (Tensor, Tensor, Tensor)",
    _group_advantages_impl, _group_advantages_fake,
)


def _group_advantages_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


group_advantages_op.register_autograd(_no_grad_backward, setup_context=_group_advantages_setup)


def group_advantages(rewards: Tensor, *, group_size, group_ids, scale, estimator, eps, reward_weights,
                     multi_objective, return_stats, backend: str):
    """:func:`grpo_kernels.ops.group_advantages` through ``grpo_kernels::group_advantages``."""
    adv, mean, std = group_advantages_op(rewards, group_size, group_ids, scale, estimator, float(eps), reward_weights,
                                         multi_objective, bool(return_stats), backend)
    return (adv, mean, std) if return_stats else adv


# --------------------------------------------------------------------------- #
# grpo_loss
# --------------------------------------------------------------------------- #
_LOSS_INPUTS = "Tensor? old_logprobs, Tensor advantages, Tensor mask"
_LOSS_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def _grpo_loss_impl(logprobs, old_logprobs, advantages, mask, backend, *loss_args):
    options = _unpack_loss(loss_args)
    fn = _function(backend, logprobs.device, "grpo_loss")
    with torch.no_grad():
        out = fn(logprobs.detach(), *_detach(old_logprobs, advantages, mask), **options)
    return _outputs((logprobs, old_logprobs, advantages, mask, *_loss_tensors(options)), *_result_tensors(out)[:6])


def _grpo_loss_fake(logprobs, old_logprobs, advantages, mask, backend, *loss_args):
    out = reference.grpo_loss(logprobs, old_logprobs, advantages, mask, **_unpack_loss(loss_args))
    return tuple(t.contiguous() for t in _result_tensors(out)[:6])


grpo_loss_op = _define(
    "grpo_loss", f"(Tensor logprobs, {_LOSS_INPUTS}, str backend, {_LOSS_SCHEMA}) -> {_LOSS_OUTPUTS}",
    _grpo_loss_impl, _grpo_loss_fake,
)


def _grpo_loss_backward_impl(logprobs, old_logprobs, advantages, mask, grad_loss, backend, *loss_args):
    options = _unpack_loss(loss_args)
    fn = _function(backend, logprobs.device, "grpo_loss")
    with _autograd_inside():
        leaf = _leaf(logprobs, True)
        loss = fn(leaf, *_detach(old_logprobs, advantages, mask), **options).loss
        (grad,) = torch.autograd.grad(loss, leaf, grad_loss)
    return _outputs((logprobs,), grad)[0]


def _grpo_loss_backward_fake(logprobs, old_logprobs, advantages, mask, grad_loss, backend, *loss_args):
    return logprobs.new_empty(logprobs.shape)


grpo_loss_backward_op = _define(
    "grpo_loss_backward",
    f"(Tensor logprobs, {_LOSS_INPUTS}, Tensor grad_loss, str backend, {_LOSS_SCHEMA}) -> Tensor",
    _grpo_loss_backward_impl, _grpo_loss_backward_fake,
)


def _grpo_loss_setup(ctx, inputs, output):
    logprobs, old_logprobs, advantages, mask, ctx.backend, *loss_args = inputs
    ctx.loss_args, tensors = _split_loss_args(loss_args)
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, *tensors)
    _set_nondifferentiable(ctx, output, differentiable=(0,))


def _grpo_loss_backward(ctx, grad_loss, *_metrics):
    n = len(ctx.needs_input_grad)
    if not ctx.needs_input_grad[0]:
        return (None,) * n
    logprobs, old_logprobs, advantages, mask, *tensors = ctx.saved_tensors
    loss_args = _join_loss_args(ctx.loss_args, tensors)
    grad = grpo_loss_backward_op(logprobs, old_logprobs, advantages, mask, grad_loss, ctx.backend, *loss_args)
    return (grad,) + (None,) * (n - 1)


grpo_loss_op.register_autograd(_grpo_loss_backward, setup_context=_grpo_loss_setup)


def grpo_loss(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor, mask: Tensor, *, backend: str,
              **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.grpo_loss` through ``grpo_kernels::grpo_loss`` (inputs validated, backend resolved)."""
    out = grpo_loss_op(logprobs, old_logprobs, advantages, mask, backend, *_pack_loss(loss_options))
    return _result(out, loss_options.get("ref_logprobs") is not None, False)


# --------------------------------------------------------------------------- #
# fused_grpo_loss: the gradient of loss w.r.t. logits formed in the forward
# --------------------------------------------------------------------------- #
_FUSED_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_DIFFERENTIABLE = (0, 6)  # loss, entropy


def _fused_grpo_loss_impl(logits, token_ids, old_logprobs, advantages, mask, backend, temperature,
                          temperature_tensor, ignore_index, return_entropy, needs_grad, *loss_args):
    options = _unpack_loss(loss_args)
    fn = _function(backend, logits.device, "fused_grpo_loss")
    with _autograd_inside() if needs_grad else torch.no_grad():
        leaf = _leaf(logits, needs_grad)
        out = fn(leaf, token_ids, *_detach(old_logprobs, advantages, mask),
                 temperature=_temperature(temperature, temperature_tensor), ignore_index=ignore_index,
                 return_entropy=return_entropy, **options)
        grad = torch.autograd.grad(out.loss, leaf)[0] if needs_grad else _nothing(logits)
    inputs = (logits, token_ids, old_logprobs, advantages, mask, *_loss_tensors(options))
    return _outputs(inputs, *_result_tensors(out), grad)


def _fused_grpo_loss_fake(logits, token_ids, old_logprobs, advantages, mask, backend, temperature,
                          temperature_tensor, ignore_index, return_entropy, needs_grad, *loss_args):
    out = reference.fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask,
                                    temperature=_temperature(temperature, temperature_tensor),
                                    ignore_index=ignore_index, return_entropy=return_entropy, **_unpack_loss(loss_args))
    grad = logits.new_empty(logits.shape) if needs_grad else _nothing(logits)
    return (*(t.contiguous() for t in _result_tensors(out)), grad)


fused_grpo_loss_op = _define(
    "fused_grpo_loss",
    f"(Tensor logits, Tensor token_ids, {_LOSS_INPUTS}, {_ROW}, bool needs_grad, {_LOSS_SCHEMA}) -> {_FUSED_OUTPUTS}",
    _fused_grpo_loss_impl, _fused_grpo_loss_fake,
)


def _entropy_backward_impl(logits, token_ids, mask, grad_entropy, backend, temperature, temperature_tensor,
                           ignore_index):
    fn = _function(backend, logits.device, "token_logprobs")
    keep = reference.fused_loss_mask(mask, token_ids, ignore_index)
    with _autograd_inside():
        leaf = _leaf(logits, True)
        _, entropy = fn(leaf, reference.kept_ids(token_ids, keep, ignore_index),
                        temperature=_temperature(temperature, temperature_tensor), ignore_index=ignore_index,
                        return_entropy=True)
        (grad,) = torch.autograd.grad(reference.masked_mean_entropy(entropy, keep), leaf, grad_entropy)
    return _outputs((logits,), grad)[0]


def _entropy_backward_fake(logits, token_ids, mask, grad_entropy, backend, temperature, temperature_tensor,
                           ignore_index):
    return logits.new_empty(logits.shape)


fused_grpo_loss_entropy_backward_op = _define(
    "fused_grpo_loss_entropy_backward",
    f"(Tensor logits, Tensor token_ids, Tensor mask, Tensor grad_entropy, str backend, {_TEMPERATURE}, "
    "SymInt ignore_index) -> Tensor",
    _entropy_backward_impl, _entropy_backward_fake,
)


def _fused_grpo_loss_setup(ctx, inputs, output):
    (logits, token_ids, _, _, mask, backend, temperature, temperature_tensor, ignore_index, return_entropy,
     needs_grad, *_) = inputs
    ctx.options = (backend, temperature, ignore_index, return_entropy, needs_grad)
    ctx.save_for_backward(output[-1], logits if return_entropy else None, token_ids, mask, temperature_tensor)
    _set_nondifferentiable(ctx, output, _DIFFERENTIABLE)


def _fused_grpo_loss_backward(ctx, grad_loss, _ptl, _kl, _low, _high, _region, grad_entropy, _grad):
    n = len(ctx.needs_input_grad)
    backend, temperature, ignore_index, return_entropy, needs_grad = ctx.options
    if not ctx.needs_input_grad[0]:
        return (None,) * n
    if not needs_grad:
        raise RuntimeError("grpo_kernels::fused_grpo_loss ran with needs_grad=False: no logits gradient was formed")
    grad, logits, token_ids, mask, temperature_tensor = ctx.saved_tensors
    grad = grad * grad_loss.to(grad.dtype)
    if return_entropy and grad_entropy is not None:
        grad = grad + fused_grpo_loss_entropy_backward_op(logits, token_ids, mask, grad_entropy, backend, temperature,
                                                          temperature_tensor, ignore_index)
    return (grad,) + (None,) * (n - 1)


fused_grpo_loss_op.register_autograd(_fused_grpo_loss_backward, setup_context=_fused_grpo_loss_setup)


def _needs_grad(*tensors: Optional[Tensor]) -> list[bool]:
    return [t is not None and t.requires_grad and torch.is_grad_enabled() for t in tensors]


def fused_grpo_loss(logits: Tensor, token_ids: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                    mask: Tensor, *, temperature: reference.Temperature, ignore_index: int, return_entropy: bool,
                    backend: str, **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.fused_grpo_loss` through ``grpo_kernels::fused_grpo_loss`` (inputs validated,
    ``backend`` resolved; ``inplace_backward`` does not apply, see the module docstring)."""
    out = fused_grpo_loss_op(logits, token_ids, old_logprobs, advantages, mask, backend,
                             *_pack_temperature(temperature), ignore_index, bool(return_entropy),
                             _needs_grad(logits)[0], *_pack_loss(loss_options))
    return _result(out, loss_options.get("ref_logprobs") is not None, return_entropy)


# --------------------------------------------------------------------------- #
# the fused-linear ops
# --------------------------------------------------------------------------- #
_HEAD = (f"str backend, {_TEMPERATURE}, float logit_scale, float? softcap, SymInt ignore_index, "
         "bool return_entropy, SymInt? chunk_size")
_HEAD_RETURN_ENTROPY = 6  # the position of return_entropy in _HEAD


def _head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                  chunk_size) -> dict:
    return dict(temperature=_temperature(temperature, temperature_tensor), logit_scale=logit_scale, softcap=softcap,
                ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size)


def _linear_grads(outputs: Sequence[Tensor], grads: Sequence[Tensor], leaves: Sequence[Optional[Tensor]],
                  needs: Sequence[bool]) -> list[Tensor]:
    """The gradients of ``outputs`` (incoming ``grads``) w.r.t. the ``leaves`` that need one, placeholders else."""
    wanted = [leaf for leaf, need in zip(leaves, needs) if need and leaf is not None]
    found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if wanted else ())
    return [_grad_or_nothing(next(found), leaf) if need and leaf is not None else _nothing(leaves[0])
            for leaf, need in zip(leaves, needs)]


def _linear_token_logprobs_impl(hidden, weight, token_ids, bias, backend, temperature, temperature_tensor,
                                logit_scale, softcap, ignore_index, return_entropy, chunk_size):
    fn = _function(backend, hidden.device, "linear_token_logprobs")
    with torch.no_grad():
        out = fn(hidden.detach(), weight.detach(), token_ids, bias=None if bias is None else bias.detach(),
                 **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                chunk_size))
    logp, entropy = out if return_entropy else (out, _nothing(out))
    return _outputs((hidden, weight, token_ids, bias), logp, entropy)


def _linear_token_logprobs_fake(hidden, weight, token_ids, bias, backend, temperature, temperature_tensor,
                                logit_scale, softcap, ignore_index, return_entropy, chunk_size):
    out = reference.linear_token_logprobs(
        hidden, weight, token_ids, bias=bias,
        **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                chunk_size))
    logp, entropy = out if return_entropy else (out, _nothing(out))
    return logp.contiguous(), entropy.contiguous()


linear_token_logprobs_op = _define(
    "linear_token_logprobs",
    f"(Tensor hidden, Tensor weight, Tensor token_ids, Tensor? bias, {_HEAD}) -> (Tensor, Tensor)",
    _linear_token_logprobs_impl, _linear_token_logprobs_fake,
)


def _linear_token_logprobs_backward_impl(hidden, weight, token_ids, bias, grad_logp, grad_entropy, needs, backend,
                                         temperature, temperature_tensor, logit_scale, softcap, ignore_index,
                                         return_entropy, chunk_size):
    fn = _function(backend, hidden.device, "linear_token_logprobs")
    with _autograd_inside():
        leaves = [_leaf(t, need) for t, need in zip((hidden, weight, bias), needs)]
        out = fn(leaves[0], leaves[1], token_ids, bias=leaves[2],
                 **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                chunk_size))
        outs, grads = ((out[0], out[1]), (grad_logp, grad_entropy)) if return_entropy else ((out,), (grad_logp,))
        found = _linear_grads(outs, grads, leaves, needs)
    return _outputs((hidden, weight, bias), *found)


def _linear_backward_fake(hidden, weight, token_ids, bias, *args):
    needs = next(a for a in args if isinstance(a, list))
    return tuple(t.new_empty(t.shape) if need and t is not None else hidden.new_empty((0,))
                 for t, need in zip((hidden, weight, bias), needs))


linear_token_logprobs_backward_op = _define(
    "linear_token_logprobs_backward",
    f"(Tensor hidden, Tensor weight, Tensor token_ids, Tensor? bias, Tensor grad_logp, Tensor grad_entropy, "
    f"bool[] needs, {_HEAD}) -> (Tensor, Tensor, Tensor)",
    _linear_token_logprobs_backward_impl, _linear_backward_fake,
)


def _linear_token_logprobs_setup(ctx, inputs, output):
    hidden, weight, token_ids, bias, *ctx.options = inputs
    ctx.save_for_backward(hidden, weight, token_ids, bias)


def _linear_token_logprobs_backward(ctx, grad_logp, grad_entropy):
    hidden, weight, token_ids, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2]) + [bias is not None and ctx.needs_input_grad[3]]
    if not any(needs):
        return (None,) * len(ctx.needs_input_grad)
    return_entropy = ctx.options[_HEAD_RETURN_ENTROPY]
    grad_entropy = grad_entropy if return_entropy else grad_logp.new_empty((0,))
    dh, dw, db = linear_token_logprobs_backward_op(hidden, weight, token_ids, bias, grad_logp, grad_entropy, needs,
                                                   *ctx.options)
    grads = [g if need else None for g, need in zip((dh, dw, db), needs)]
    return grads[0], grads[1], None, grads[2], *(None,) * len(ctx.options)


linear_token_logprobs_op.register_autograd(_linear_token_logprobs_backward,
                                           setup_context=_linear_token_logprobs_setup)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, token_ids: Tensor, *, bias, temperature, logit_scale,
                          softcap, ignore_index, return_entropy, chunk_size, backend: str):
    """:func:`grpo_kernels.ops.linear_token_logprobs` through ``grpo_kernels::linear_token_logprobs``."""
    logp, entropy = linear_token_logprobs_op(hidden, weight, token_ids, bias, backend,
                                             *_pack_temperature(temperature), float(logit_scale),
                                             None if softcap is None else float(softcap), ignore_index,
                                             bool(return_entropy), chunk_size)
    return (logp, entropy) if return_entropy else logp


_FUSED_LINEAR_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def _fused_linear_grpo_loss_impl(hidden, weight, token_ids, bias, old_logprobs, advantages, mask, needs, backend,
                                 temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                 chunk_size, *loss_args):
    options = _unpack_loss(loss_args)
    fn = _function(backend, hidden.device, "fused_linear_grpo_loss")
    with _autograd_inside() if any(needs) else torch.no_grad():
        leaves = [_leaf(t, need) for t, need in zip((hidden, weight, bias), needs)]
        out = fn(leaves[0], leaves[1], token_ids, *_detach(old_logprobs, advantages, mask), bias=leaves[2],
                 **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                chunk_size),
                 **options)
        grads = _linear_grads((out.loss,), (None,), leaves, needs)
    inputs = (hidden, weight, token_ids, bias, old_logprobs, advantages, mask, *_loss_tensors(options))
    return _outputs(inputs, *_result_tensors(out), *grads)


def _fused_linear_grpo_loss_fake(hidden, weight, token_ids, bias, old_logprobs, advantages, mask, needs, backend,
                                 temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                 chunk_size, *loss_args):
    out = reference.fused_linear_grpo_loss(
        hidden, weight, token_ids, old_logprobs, advantages, mask, bias=bias,
        **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                chunk_size),
        **_unpack_loss(loss_args))
    grads = _linear_backward_fake(hidden, weight, token_ids, bias, needs)
    return (*(t.contiguous() for t in _result_tensors(out)), *grads)


fused_linear_grpo_loss_op = _define(
    "fused_linear_grpo_loss",
    f"(Tensor hidden, Tensor weight, Tensor token_ids, Tensor? bias, {_LOSS_INPUTS}, bool[] needs, {_HEAD}, "
    f"{_LOSS_SCHEMA}) -> {_FUSED_LINEAR_OUTPUTS}",
    _fused_linear_grpo_loss_impl, _fused_linear_grpo_loss_fake,
)


def _linear_entropy_backward_impl(hidden, weight, token_ids, bias, mask, grad_entropy, needs, backend, temperature,
                                  temperature_tensor, logit_scale, softcap, ignore_index, return_entropy,
                                  chunk_size):
    fn = _function(backend, hidden.device, "linear_token_logprobs")
    with _autograd_inside():
        leaves = [_leaf(t, need) for t, need in zip((hidden, weight, bias), needs)]
        _, entropy = fn(leaves[0], leaves[1], token_ids, bias=leaves[2],
                        **_head_options(temperature, temperature_tensor, logit_scale, softcap, ignore_index, True,
                                        chunk_size))
        keep = reference.fused_loss_mask(mask, token_ids, ignore_index)
        found = _linear_grads((reference.masked_mean_entropy(entropy, keep),), (grad_entropy,), leaves, needs)
    return _outputs((hidden, weight, bias), *found)


fused_linear_grpo_loss_entropy_backward_op = _define(
    "fused_linear_grpo_loss_entropy_backward",
    f"(Tensor hidden, Tensor weight, Tensor token_ids, Tensor? bias, Tensor mask, Tensor grad_entropy, bool[] needs, "
    f"{_HEAD}) -> (Tensor, Tensor, Tensor)",
    _linear_entropy_backward_impl, _linear_backward_fake,
)


def _fused_linear_grpo_loss_setup(ctx, inputs, output):
    hidden, weight, token_ids, bias, _, _, mask, needs, *rest = inputs
    ctx.head = rest[:8]
    ctx.needs = needs
    ctx.save_for_backward(*output[-3:], hidden, weight, token_ids, bias, mask)
    _set_nondifferentiable(ctx, output, _DIFFERENTIABLE)


def _fused_linear_grpo_loss_backward(ctx, grad_loss, _ptl, _kl, _low, _high, _region, grad_entropy, *_grads):
    n = len(ctx.needs_input_grad)
    dh, dw, db, hidden, weight, token_ids, bias, mask = ctx.saved_tensors
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    if not any(wanted):
        return (None,) * n
    if any(w and not need for w, need in zip(wanted, ctx.needs)):
        raise RuntimeError("grpo_kernels::fused_linear_grpo_loss ran without forming a gradient that is now needed")
    grads = [g * grad_loss.to(g.dtype) for g in (dh, dw, db)]
    return_entropy = ctx.head[_HEAD_RETURN_ENTROPY]
    if return_entropy and grad_entropy is not None:
        extra = fused_linear_grpo_loss_entropy_backward_op(hidden, weight, token_ids, bias, mask, grad_entropy,
                                                           ctx.needs, *ctx.head)
        grads = [g + e if need else g for g, e, need in zip(grads, extra, ctx.needs)]
    grads = [g if w else None for g, w in zip(grads, wanted)]
    return grads[0], grads[1], None, grads[2], *(None,) * (n - 4)


fused_linear_grpo_loss_op.register_autograd(_fused_linear_grpo_loss_backward,
                                            setup_context=_fused_linear_grpo_loss_setup)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, token_ids: Tensor, old_logprobs: Optional[Tensor],
                           advantages: Tensor, mask: Tensor, *, bias, temperature, logit_scale, softcap, ignore_index,
                           return_entropy, chunk_size, backend: str, **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.fused_linear_grpo_loss` through ``grpo_kernels::fused_linear_grpo_loss``."""
    out = fused_linear_grpo_loss_op(
        hidden, weight, token_ids, bias, old_logprobs, advantages, mask, _needs_grad(hidden, weight, bias), backend,
        *_pack_temperature(temperature), float(logit_scale), None if softcap is None else float(softcap),
        ignore_index, bool(return_entropy), chunk_size, *_pack_loss(loss_options))
    return _result(out, loss_options.get("ref_logprobs") is not None, return_entropy)
