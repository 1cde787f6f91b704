"""Input validation shared by every op and backend.

Each public op calls one ``check_*`` function here before any computation.
Errors are ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
range or option) and name the offending argument and what was expected.

Checks that read tensor *values* (ids in range, mask in {0, 1}, advantages
finite where the mask is 1) need a device
synchronization; they are skipped while ``torch.compile`` traces, for fake or
meta tensors, and when the environment sets ``GRPO_KERNELS_CHECK_VALUES=0``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from typing import NoReturn, Optional, Sequence

import torch
from torch import Tensor

from ._extension import _C
from .loss_table import (
    CLIPPED_LOSS_TYPES,
    FOLDS_IMPORTANCE_WEIGHTS,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    ROLLOUT_IS_GATES,
    ROLLOUT_IS_MODES,
    SCALE_OUT_LOSS_TYPES,
    Family,
    RolloutGate,
    RolloutLevel,
    loss_type_row,
)
from .reference import ESTIMATORS, MULTI_OBJECTIVES, SCALES, broadcast_temperature

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
def _values_checkable(*tensors: Tensor) -> bool:
    if os.environ.get("GRPO_KERNELS_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.is_meta or isinstance(t, torch._subclasses.FakeTensor):
            return False
    return True


def _tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _floating(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:  # (not the float8 types: no kernel reads them)
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _integer(name: str, t: Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")


def _same_device(**tensors: Optional[Tensor]) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device"
            )


def _shape(name: str, t: Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {list(expected)}, got {list(t.shape)}")


def _real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
          low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def _choice(name: str, value, choices) -> None:
    choices = list(choices)  # a table's keys: membership by ==, whatever value is
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _int(name: str, value, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _mask(name: str, mask: Tensor, shape: Sequence[int], what: str, *, values: bool = True) -> None:
    """A mask of ``shape``; ``values``: also its values (0 and 1 only)."""
    _tensor(name, mask)
    if mask.dtype != torch.bool and mask.dtype not in _FLOAT_DTYPES and mask.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be a bool or 0/1 numeric tensor, got {mask.dtype}")
    _shape(name, mask, shape, what)
    if values:
        _mask_values(name, mask)


def _mask_values(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and mask.numel() and _values_checkable(mask):
        if not bool(((mask == 0) | (mask == 1)).all()):
            _binary_mask_error(name)


def _binary_mask_error(name: str) -> NoReturn:
    raise ValueError(f"{name} must contain only 0 and 1 (or be bool)")


# --------------------------------------------------------------------------- #
# per-op checks
# --------------------------------------------------------------------------- #
# The ops whose every backend takes a tensor temperature (one per row, broadcast over the rows' trailing dims).
TENSOR_TEMPERATURE_OPS = frozenset({"token_logprobs", "fused_grpo_loss", "linear_token_logprobs",
                                    "fused_linear_grpo_loss"})


def check_temperature(temperature, rows: Optional[Tensor] = None, counted: Optional[Tensor] = None, *,
                      op: Optional[str] = None, rows_name: str = "logits", unsupported: Optional[str] = None) -> None:
    """A positive finite float, or (for an op of ``TENSOR_TEMPERATURE_OPS`` on ``rows [..., V]``) a floating
    tensor of shape ``rows.shape[:k]`` on the rows' device, positive and finite where ``counted`` (bool, the
    rows' shape) is True. ``unsupported``: why a tensor is refused here (an option that does not take one)."""
    if not isinstance(temperature, Tensor):
        _real("temperature", temperature, low=0.0, low_open=True)
        return
    if rows is None or op not in TENSOR_TEMPERATURE_OPS or unsupported is not None:
        where = unsupported or (f"{op}" if op else "here")
        raise TypeError(f"temperature must be a float {'with ' if unsupported else 'for '}{where}; a per-row "
                        f"temperature tensor is taken by {sorted(TENSOR_TEMPERATURE_OPS)} only")
    _floating("temperature", temperature)
    row_shape = tuple(rows.shape[:-1])
    if temperature.ndim > len(row_shape) or tuple(temperature.shape) != row_shape[:temperature.ndim]:
        raise ValueError(
            f"temperature must be a float or a tensor of shape {rows_name}.shape[:k] (one temperature per "
            f"sequence or per token, a prefix of {list(row_shape)}), got {list(temperature.shape)}"
        )
    _same_device(**{rows_name: rows, "temperature": temperature})
    if counted is not None and temperature.numel() and _values_checkable(temperature):
        t = broadcast_temperature(temperature, row_shape)
        bad = counted & ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            value = float(t[bad].flatten()[0])
            raise ValueError(f"temperature must be positive and finite at every row that counts, found {value}")


def check_token_logprobs(logits, token_ids, *, temperature, ignore_index, return_entropy,
                         inplace_backward=False, sharded=False, op="token_logprobs", counted=None,
                         scale_out: Optional[str] = None) -> None:
    """``sharded``: ``logits`` hold a vocabulary shard; the ids are checked against the whole vocabulary later.
    ``counted``: the rows whose temperature must be valid (default: the ids that are not ``ignore_index``).
    ``scale_out``: the scale-out option in use (``vocab_group``, ...), which takes a float temperature only."""
    _tensor("logits", logits)
    _tensor("token_ids", token_ids)
    _floating("logits", logits)
    _integer("token_ids", token_ids)
    if logits.ndim < 1:
        raise ValueError("logits must have shape [..., V] with at least one dimension, got a 0-d tensor")
    _shape("token_ids", token_ids, logits.shape[:-1], "logits.shape[:-1]")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V >= 1), got V = 0")
    if token_ids.numel() == 0:
        raise ValueError(f"empty batch: logits has shape {list(logits.shape)} with no rows")
    _same_device(logits=logits, token_ids=token_ids)
    _check_row_options(temperature, ignore_index, return_entropy)  # (a tensor temperature: below)
    if isinstance(temperature, Tensor):
        check_temperature(temperature, logits, token_ids != ignore_index if counted is None else counted, op=op,
                          unsupported=scale_out)
    _bool("inplace_backward", inplace_backward)
    # (traced calls do not write in place: grpo_kernels.custom_ops)
    if inplace_backward and logits.requires_grad and logits.is_leaf and not torch.compiler.is_compiling():
        raise ValueError(
            "inplace_backward=True would overwrite logits with their gradient, but logits is a leaf tensor that "
            "requires grad (its .grad would alias its values, as PyTorch refuses for in-place ops on such leaves); "
            "pass the output of the LM head (a non-leaf tensor) or use inplace_backward=False"
        )
    if not sharded:
        _check_ids_in_range(token_ids, vocab, ignore_index)


def _check_row_options(temperature, ignore_index, return_entropy) -> None:
    if not isinstance(temperature, Tensor):  # a tensor is checked against the rows by the caller
        check_temperature(temperature)
    _int("ignore_index", ignore_index, low=-(2**63))
    _bool("return_entropy", return_entropy)


def _check_ids_in_range(token_ids: Tensor, vocab: int, ignore_index: int) -> None:
    if _values_checkable(token_ids):
        bad = (token_ids != ignore_index) & ((token_ids < 0) | (token_ids >= vocab))
        if bool(bad.any()):
            value = int(token_ids[bad].flatten()[0])
            raise ValueError(
                f"token_ids must be in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}, found {value}"
            )


def check_group_advantages(rewards, *, group_size, group_ids, scale, estimator, eps, reward_weights,
                           multi_objective, return_stats) -> None:
    _tensor("rewards", rewards)
    if rewards.dtype not in _FLOAT_DTYPES and rewards.dtype not in _INT_DTYPES:
        raise TypeError(f"rewards must be a floating-point or integer tensor, got {rewards.dtype}")
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must have shape [B] or [B, K], got {list(rewards.shape)}")
    batch = rewards.shape[0]
    if batch == 0 or rewards.numel() == 0:
        raise ValueError(f"empty batch: rewards has shape {list(rewards.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) or group_ids (a group label per row)")
    if group_size is not None:
        _int("group_size", group_size, low=1)
        if batch % group_size:
            raise ValueError(f"group_size={group_size} must divide the batch size B={batch}")
    else:
        _tensor("group_ids", group_ids)
        _integer("group_ids", group_ids)
        _shape("group_ids", group_ids, (batch,), "[B]")
    _choice("scale", scale, SCALES)
    _choice("estimator", estimator, ESTIMATORS)
    _choice("multi_objective", multi_objective, MULTI_OBJECTIVES)
    _real("eps", eps, low=0.0)
    _bool("return_stats", return_stats)
    if reward_weights is not None:
        if rewards.ndim != 2:
            raise ValueError("reward_weights needs rewards of shape [B, K] (one column per reward function)")
        if isinstance(reward_weights, (list, tuple)):
            for k, w in enumerate(reward_weights):
                _real(f"reward_weights[{k}]", w)
            if len(reward_weights) != rewards.shape[1]:
                raise ValueError(f"reward_weights must have K = {rewards.shape[1]} entries, got {len(reward_weights)}")
        else:
            _tensor("reward_weights", reward_weights)
            _floating("reward_weights", reward_weights)
            _shape("reward_weights", reward_weights, (rewards.shape[1],), "[K]")
            if _values_checkable(reward_weights) and not bool(torch.isfinite(reward_weights).all()):
                raise ValueError("reward_weights must be finite")
            _same_device(rewards=rewards, reward_weights=reward_weights)
    _same_device(rewards=rewards, group_ids=group_ids)


def _check_per_token(name: str, t: Optional[Tensor], shape, *, optional: bool = True) -> None:
    _tensor(name, t, optional=optional)
    if t is not None:
        _floating(name, t)
        _shape(name, t, shape, "[B, T]")


def _check_per_sequence_or_token(name: str, t: Optional[Tensor], batch: int, length: int) -> None:
    _tensor(name, t, optional=True)
    if t is None:
        return
    _floating(name, t)
    if tuple(t.shape) not in ((batch,), (batch, 1), (batch, length)):
        raise ValueError(f"{name} must have shape [B], [B, 1] or [B, T] = [{batch}, {length}], got {list(t.shape)}")


# Options held per call (tensors or batch-dependent counts), not by GRPOLoss.
PER_CALL_OPTIONS = ("ref_logprobs", "importance_weights", "num_items_in_batch", "sampling_logprobs")


def check_loss_options(*, beta, epsilon_low, epsilon_high, delta, clip_ratio_c, loss_type,
                       importance_sampling_level, kl_estimator, use_bias_correction_kl, max_completion_length,
                       sapo_temperature_pos, sapo_temperature_neg, rollout_is_mode, rollout_is_min, rollout_is_max,
                       rollout_is_gate, off_policy_mask_threshold, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                       vespo_lambda_neg, log_ratio_clamp) -> None:
    """Checks of the scalar options of grpo_loss / fused_grpo_loss / GRPOLoss."""
    row = loss_type_row(loss_type)
    _choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _real("beta", beta, low=0.0)
    _real("epsilon_low", epsilon_low, low=0.0, high=1.0, high_open=True)
    if epsilon_high is not None:
        _real("epsilon_high", epsilon_high, low=0.0)
    for name, value in (("delta", delta), ("clip_ratio_c", clip_ratio_c)):
        if value is not None and row.family is not Family.CLIPPED:
            raise ValueError(f"{name} applies to the clipped loss types {list(CLIPPED_LOSS_TYPES)}, not {loss_type!r}")
    if delta is not None:
        _real("delta", delta, low=0.0, low_open=True)
    if clip_ratio_c is not None:
        _real("clip_ratio_c", clip_ratio_c, low=1.0, low_open=True)
    _bool("use_bias_correction_kl", use_bias_correction_kl)
    if max_completion_length is not None:
        _int("max_completion_length", max_completion_length, low=1)
    _real("sapo_temperature_pos", sapo_temperature_pos, low=0.0, low_open=True)
    _real("sapo_temperature_neg", sapo_temperature_neg, low=0.0, low_open=True)
    if not row.token_ratio and importance_sampling_level != "token":
        raise ValueError(f"loss_type={loss_type!r} forms its own sequence weights: importance_sampling_level must be "
                         f"'token', got {importance_sampling_level!r}")
    if row.family is Family.GMPO and use_bias_correction_kl:
        raise ValueError("use_bias_correction_kl is not defined for loss_type='gmpo' (no per-token ratio)")
    _check_rollout_is(row.family, loss_type, rollout_is_mode, rollout_is_min, rollout_is_max, rollout_is_gate)
    if off_policy_mask_threshold is not None:
        _real("off_policy_mask_threshold", off_policy_mask_threshold, low=0.0)
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        _real(name, value, low=0.0)
    if log_ratio_clamp is not None:
        _real("log_ratio_clamp", log_ratio_clamp, low=0.0, low_open=True)


_SCALAR_OPTIONS = tuple(inspect.signature(check_loss_options).parameters)


def _check_scalar_options(options: dict) -> None:
    """check_loss_options on the scalar options in ``options`` (all the loss options), memoized: options that
    passed, as plain values of the same types, pass again without a check (a call's Python overhead matters
    at small batches)."""
    try:
        values = tuple(map(options.__getitem__, _SCALAR_OPTIONS))
    except KeyError:
        values = None
    key = None
    if values is not None:
        types = tuple(map(type, values))
        if _PLAIN_TYPES.issuperset(types):
            key = (values, types)  # the types too: True == 1 == 1.0 but only True is a valid bool option
            if key in _PASSED_OPTIONS:
                return
    check_loss_options(**{k: v for k, v in options.items() if k not in PER_CALL_OPTIONS})
    if key is not None:
        _PASSED_OPTIONS.add(key)


class _PassedKeys:
    """Keys of checks that passed, for calls that repeat them; bounded (past 256 keys it starts over)."""

    def __init__(self) -> None:
        self._keys: set = set()

    def __contains__(self, key) -> bool:
        return key in self._keys

    def add(self, key) -> None:
        if len(self._keys) >= 256:
            self._keys.clear()
        self._keys.add(key)


_PLAIN_TYPES = frozenset({bool, int, float, str, type(None)})
_PASSED_OPTIONS = _PassedKeys()


def _check_rollout_is(family: Family, loss_type: str, mode, low, high, gate) -> None:
    _choice("rollout_is_gate", gate, ROLLOUT_IS_GATES)
    ratio_gate = ROLLOUT_IS_GATES[gate] == RolloutGate.RATIO
    if mode is None:
        if not ratio_gate:
            raise ValueError(f"rollout_is_gate={gate!r} gates the rollout importance sampling: set rollout_is_mode "
                             f"('token_mask' or 'sequence_mask')")
        return
    _choice("rollout_is_mode", mode, [m for m in ROLLOUT_IS_MODES if m is not None])
    level, masked = ROLLOUT_IS_MODES[mode]
    ratio_bounds = ROLLOUT_IS_GATES[gate] in (RolloutGate.RATIO, RolloutGate.GEOMETRIC_MEAN)
    if low is not None:  # a ratio is at least 0; a divergence gate's band may start anywhere
        _real("rollout_is_min", low, low=0.0 if ratio_bounds else None)
    if high is not None:
        _real("rollout_is_max", high, low=0.0 if ratio_bounds else None, low_open=ratio_bounds)
    if low is not None and high is not None and low >= high:
        raise ValueError(f"rollout_is_min ({low}) must be less than rollout_is_max ({high})")
    if not ratio_gate and not masked:
        raise ValueError(f"rollout_is_gate={gate!r} masks, it does not truncate: rollout_is_mode must be "
                         f"'token_mask' or 'sequence_mask' with it, got rollout_is_mode={mode!r}")
    if ROLLOUT_IS_GATES[gate] == RolloutGate.GEOMETRIC_MEAN and level != RolloutLevel.SEQUENCE:
        raise ValueError(f"rollout_is_gate='geometric_mean' is a sequence statistic (at token level it equals the "
                         f"ratio: use rollout_is_gate='ratio'): rollout_is_mode must be 'sequence_mask', got {mode!r}")
    if not masked and low is None and high is None:
        raise ValueError(f"rollout_is_mode={mode!r} truncates: set rollout_is_min or rollout_is_max (or both)")
    if family in FOLDS_IMPORTANCE_WEIGHTS and level == RolloutLevel.SEQUENCE:
        raise ValueError(f"loss_type={loss_type!r} folds token-level importance weights into its sequence weight: "
                         f"rollout_is_mode must be 'token_truncate' or 'token_mask', got {mode!r}")


def _check_num_items(num_items_in_batch) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, Tensor):
        t = num_items_in_batch
        if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element real tensor, got shape {list(t.shape)} "
                f"dtype {t.dtype}"
            )
        if _values_checkable(t):
            _real("num_items_in_batch", float(t), low=1.0)
    else:
        _real("num_items_in_batch", num_items_in_batch, low=1.0)


def _check_advantages_finite(advantages: Tensor, keep: Tensor) -> None:
    """Advantages are finite wherever they count: at kept tokens (``keep [..., T]`` bool), or for per-sequence
    advantages ``[B]`` / ``[B, 1]``, in sequences with a kept token. Masked positions may hold anything."""
    if not _values_checkable(advantages, keep):
        return
    adv = advantages
    if adv.shape != keep.shape:  # one value per sequence
        keep = keep.reshape(keep.shape[0], -1).any(-1).reshape(adv.shape)
    bad = keep & ~torch.isfinite(adv)
    if bool(bad.any()):
        _advantages_error(float(adv[bad].flatten()[0]))


def _advantages_error(value: float) -> NoReturn:
    raise ValueError(f"advantages must be finite where the mask is 1 (masked positions may hold anything), "
                     f"found {value}")


# The extension's one-pass value checks of grpo_loss's mask and advantages (CPU tensors).
_LOSS_VALUE_PROBLEM = getattr(_C, "grpo_loss_value_problem", None)


def _loss_value_problem(mask: Tensor, advantages: Tensor, token_ids: Optional[Tensor]) -> Optional[tuple]:
    """The value checks of grpo_loss's mask and advantages (shapes checked) on CPU tensors, in one C++ pass:
    ``("", 0.0)`` when they pass, else the argument that fails first (``"mask"``, ``"advantages"``) and the
    advantage found; None when not scanned here (the fused losses' token ids, other devices: torch ops)."""
    if (token_ids is not None or _LOSS_VALUE_PROBLEM is None or mask.device.type != "cpu"
            or advantages.device.type != "cpu" or not _values_checkable(mask, advantages)):
        return None
    return _LOSS_VALUE_PROBLEM(mask, advantages)


def check_grpo_loss(logprobs, old_logprobs, advantages, mask, options: dict) -> None:
    """The inputs of :func:`grpo_kernels.ops.grpo_loss`; ``options``: its loss options (every one)."""
    _tensor("logprobs", logprobs)
    _floating("logprobs", logprobs)
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must have shape [B, T] (batch, completion length), got {list(logprobs.shape)}")
    batch, length = logprobs.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty batch: logprobs has shape {list(logprobs.shape)}")
    _check_loss_inputs(logprobs, "logprobs", logprobs.shape, old_logprobs, advantages, mask, options)
    key = grpo_loss_call_key(options)
    if key is not None:
        _PASSED_LOSS_CALLS.add(key)


def loss_options_key(options: dict) -> Optional[tuple]:
    """The loss options as a key of what is derived from them alone (validation's verdict, the kernels' setup):
    their names, values and types, each tensor option by its presence; None for an option of another type."""
    plain = options.copy()
    for name in PER_CALL_OPTIONS:
        value = plain.get(name)
        if isinstance(value, Tensor):
            plain[name] = _TENSOR
        elif value is not None and name in _TENSOR_OPTIONS:
            return None
    values = tuple(plain.values())
    types = tuple(map(type, values))
    return (tuple(plain), values, types) if _KEYED_TYPES.issuperset(types) else None


def grpo_loss_call_key(options: dict) -> Optional[tuple]:
    """What :func:`check_grpo_loss` read of ``options`` besides its tensors (:func:`loss_options_key`); None for
    a tensor ``num_items_in_batch`` too (its value is checked at each call)."""
    if isinstance(options.get("num_items_in_batch"), Tensor):
        return None
    return loss_options_key(options)


class _TensorOption:
    """A tensor option in a key: present (its values are the call's)."""


_TENSOR = _TensorOption()
_KEYED_TYPES = _PLAIN_TYPES | {_TensorOption}
# the per-call options that are always tensors when given
_TENSOR_OPTIONS = tuple(name for name in PER_CALL_OPTIONS if name != "num_items_in_batch")


def grpo_loss_options_passed(key: Optional[tuple]) -> bool:
    """Whether a :func:`check_grpo_loss` that passed had options of this :func:`grpo_loss_call_key`: then a call
    needs only the checks of its tensors (``logprobs``, ``old_logprobs``, ``advantages``, ``mask`` and the
    tensor options, with the vespo shape of ``importance_weights``), which a backend's ``grpo_loss_checked``
    does itself."""
    return key is not None and key in _PASSED_LOSS_CALLS


_PASSED_LOSS_CALLS = _PassedKeys()


def _check_loss_inputs(main: Tensor, main_name: str, shape, old_logprobs, advantages, mask, options: dict,
                       token_ids: Optional[Tensor] = None, ignore_index: int = -100) -> None:
    """The [B, T] tensors and the options of the loss; ``main`` is logprobs or logits (then ``token_ids``: the
    tokens whose id is ``ignore_index`` count as masked)."""
    batch, length = shape
    ref_logprobs, importance_weights = options["ref_logprobs"], options["importance_weights"]
    sampling_logprobs = options["sampling_logprobs"]
    _check_per_token("old_logprobs", old_logprobs, shape)
    _tensor("advantages", advantages)
    _check_per_sequence_or_token("advantages", advantages, batch, length)
    _mask("mask", mask, shape, "[B, T]", values=False)
    problem = _loss_value_problem(mask, advantages, token_ids)  # None: the torch ops below
    if problem is None:
        _mask_values("mask", mask)
    elif problem[0] == "mask":
        _binary_mask_error("mask")
    _check_per_token("ref_logprobs", ref_logprobs, shape)
    _check_per_sequence_or_token("importance_weights", importance_weights, batch, length)
    _check_per_token("sampling_logprobs", sampling_logprobs, shape)
    _same_device(**{main_name: main}, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                 ref_logprobs=ref_logprobs, importance_weights=importance_weights,
                 sampling_logprobs=sampling_logprobs)
    if options["rollout_is_mode"] is not None and sampling_logprobs is None:
        raise ValueError(f"rollout_is_mode={options['rollout_is_mode']!r} needs sampling_logprobs (the sampling "
                         "engine's per-token log-probs)")
    if options["loss_type"] == "vespo" and importance_weights is not None and tuple(importance_weights.shape) != (
            batch, length):
        raise ValueError(f"loss_type='vespo' folds token-level importance_weights into its sequence weight: they "
                         f"must have shape [B, T] = [{batch}, {length}], got {list(importance_weights.shape)}")
    _check_num_items(options["num_items_in_batch"])
    _check_scalar_options(options)
    if options["beta"] != 0.0 and ref_logprobs is None:
        raise ValueError(f"beta={options['beta']} needs ref_logprobs (the reference policy's per-token log-probs)")
    if problem is None:
        _check_advantages_finite(advantages, _kept(mask, token_ids, ignore_index))
    elif problem[0] == "advantages":
        _advantages_error(problem[1])


def _kept(mask: Tensor, token_ids: Optional[Tensor], ignore_index: int) -> Tensor:
    """The positions that count: ``mask`` and, for the fused losses, ``token_ids != ignore_index`` (bool)."""
    keep = mask.to(torch.bool)
    return keep if token_ids is None else keep & (token_ids != ignore_index)


def check_fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask, *, temperature, ignore_index,
                          return_entropy, inplace_backward=False, **options) -> None:
    _tensor("logits", logits)
    if isinstance(logits, Tensor) and logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {list(logits.shape)}")
    check_token_logprobs(logits, token_ids, temperature=temperature, ignore_index=ignore_index,
                         return_entropy=return_entropy, inplace_backward=inplace_backward, op="fused_grpo_loss",
                         counted=_temperature_rows(token_ids, mask, temperature, ignore_index))
    _check_loss_inputs(logits, "logits", token_ids.shape, old_logprobs, advantages, mask, options, token_ids,
                       ignore_index)


def _temperature_rows(token_ids, mask, temperature, ignore_index) -> Optional[Tensor]:
    """The rows of a fused loss whose tensor temperature must be valid: the counted tokens (None otherwise)."""
    if not isinstance(temperature, Tensor) or not isinstance(mask, Tensor) or not isinstance(token_ids, Tensor):
        return None
    if mask.shape != token_ids.shape:
        return None  # the mask's own check names the problem
    return _kept(mask, token_ids, ignore_index)


def check_linear_token_logprobs(hidden, weight, token_ids, *, bias, temperature, logit_scale, softcap, ignore_index,
                                return_entropy, chunk_size, sharded=False, op="linear_token_logprobs",
                                counted=None, scale_out: Optional[str] = None) -> None:
    """``sharded``: ``weight`` holds a vocabulary shard; the ids are checked against the whole vocabulary later."""
    _tensor("hidden", hidden)
    _tensor("weight", weight)
    _tensor("token_ids", token_ids)
    _tensor("bias", bias, optional=True)
    _floating("hidden", hidden)
    _integer("token_ids", token_ids)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
    if hidden.ndim < 1:
        raise ValueError("hidden must have shape [..., H] with at least one dimension, got a 0-d tensor")
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape [V, H] (vocabulary, hidden size), got {list(weight.shape)}")
    vocab, size = weight.shape
    if size != hidden.shape[-1]:
        raise ValueError(
            f"weight must have H = hidden.shape[-1] = {hidden.shape[-1]} columns, got shape {list(weight.shape)}"
        )
    if vocab == 0:
        raise ValueError("weight must have a non-empty vocabulary dimension (V >= 1), got V = 0")
    if bias is not None:
        _shape("bias", bias, (vocab,), "[V]")
    _shape("token_ids", token_ids, hidden.shape[:-1], "hidden.shape[:-1]")
    if token_ids.numel() == 0:
        raise ValueError(f"empty batch: hidden has shape {list(hidden.shape)} with no rows")
    _same_device(hidden=hidden, weight=weight, token_ids=token_ids, bias=bias)
    _check_row_options(temperature, ignore_index, return_entropy)
    if isinstance(temperature, Tensor):
        check_temperature(temperature, hidden, token_ids != ignore_index if counted is None else counted, op=op,
                          rows_name="hidden", unsupported=scale_out or ("vocab_group" if sharded else None))
    _real("logit_scale", logit_scale, low=0.0, low_open=True)
    if softcap is not None:
        _real("softcap", softcap, low=0.0, low_open=True)
    if chunk_size is not None:
        _int("chunk_size", chunk_size, low=1)
    if not sharded:
        _check_ids_in_range(token_ids, vocab, ignore_index)


def check_fused_linear_grpo_loss(hidden, weight, token_ids, old_logprobs, advantages, mask, *, bias, temperature,
                                 logit_scale, softcap, ignore_index, return_entropy, chunk_size, **options) -> None:
    _tensor("hidden", hidden)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {list(hidden.shape)}")
    check_linear_token_logprobs(hidden, weight, token_ids, bias=bias, temperature=temperature,
                                logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                                return_entropy=return_entropy, chunk_size=chunk_size, op="fused_linear_grpo_loss",
                                counted=_temperature_rows(token_ids, mask, temperature, ignore_index))
    _check_loss_inputs(hidden, "hidden", token_ids.shape, old_logprobs, advantages, mask, options, token_ids,
                       ignore_index)


# --------------------------------------------------------------------------- #
# scale-out: process groups (grpo_kernels.distributed), packed sequences (grpo_kernels.packed)
# --------------------------------------------------------------------------- #
# The loss types and options whose loss of a data-parallel batch or of packed sequences is defined
# (grpo_kernels.distributed.batch_normalized, grpo_kernels.packed); the other options must keep their defaults.
SCALE_OUT_OPTIONS = ("ref_logprobs", "beta", "epsilon_low", "epsilon_high", "delta", "clip_ratio_c", "loss_type",
                     "importance_sampling_level", "kl_estimator", "use_bias_correction_kl", "importance_weights",
                     "max_completion_length", "num_items_in_batch", "sapo_temperature_pos", "sapo_temperature_neg")


def check_process_group(name: str, group) -> None:
    """``group`` is ``None`` or a ``torch.distributed`` process group of an initialized default group."""
    if group is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} needs torch.distributed to be initialized (torch.distributed.init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD or "
                        f"torch.distributed.new_group(...)), got {type(group).__name__}")


def check_ids_in_range(token_ids: Tensor, vocab: int, ignore_index: int) -> None:
    """Token ids in ``[0, vocab)`` or ``ignore_index`` (``vocab``: the whole vocabulary of a sharded op)."""
    _check_ids_in_range(token_ids, vocab, ignore_index)


def check_scale_out_options(options: dict, what: str, defaults: dict) -> None:
    """The loss options usable with ``what`` (``batch_group`` or ``cu_seqlens``): ``defaults`` for the others."""
    _choice(f"loss_type with {what}", options["loss_type"], SCALE_OUT_LOSS_TYPES)
    for name, default in defaults.items():
        value = options.get(name, default)
        if name in SCALE_OUT_OPTIONS or (value is None and default is None):
            continue
        if isinstance(value, Tensor) or value != default:
            raise ValueError(f"{name} is not supported with {what} (only {list(SCALE_OUT_OPTIONS)}); got {name}="
                             f"{value if not isinstance(value, Tensor) else 'a tensor'}")


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device) -> int:
    """``cu_seqlens [B + 1]`` int32/int64: 0, strictly increasing, ``total`` last; returns B."""
    _tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [num_seqs + 1] with num_seqs >= 1, got {list(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the packed tensors are on {device}")
    if _values_checkable(cu_seqlens):
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the number of packed tokens {total}, got "
                             f"{int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}")
        if not bool((cu_seqlens.diff() > 0).all()):
            raise ValueError("cu_seqlens must be strictly increasing (every sequence has at least one token)")
    return cu_seqlens.numel() - 1


def _check_packed_tokens(name: str, t: Optional[Tensor], shape, num_seqs: int, *, per_sequence: bool,
                         floating: bool = True) -> None:
    _tensor(name, t, optional=True)
    if t is None:
        return
    if floating:
        _floating(name, t)
    shapes = [tuple(shape)] + ([(num_seqs,)] if per_sequence else [])
    if tuple(t.shape) not in shapes:
        what = " or [num_seqs] = " + str([num_seqs]) if per_sequence else ""
        raise ValueError(f"{name} must have the packed token shape {list(shape)}{what}, got {list(t.shape)}")


def check_packed_loss(main: Tensor, main_name: str, shape, old_logprobs, advantages, mask, cu_seqlens,
                      options: dict, defaults: dict, token_ids: Optional[Tensor] = None,
                      ignore_index: int = -100) -> None:
    """The packed inputs of the loss: per-token tensors of ``shape`` (``[total]`` or ``[1, total]``), per-sequence
    ones ``[num_seqs]`` or per token; ``main`` is logprobs or logits."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
        raise ValueError(f"packed {main_name} must have token shape [total] or [1, total], got {list(shape)}")
    total = shape[-1]
    if total == 0:
        raise ValueError("empty batch: no packed tokens")
    num_seqs = check_cu_seqlens(cu_seqlens, total, main.device)
    _check_packed_tokens("old_logprobs", old_logprobs, shape, num_seqs, per_sequence=False)
    _tensor("advantages", advantages)
    _check_packed_tokens("advantages", advantages, shape, num_seqs, per_sequence=True)
    _mask("mask", mask, shape, "the packed token shape")
    _check_packed_tokens("ref_logprobs", options["ref_logprobs"], shape, num_seqs, per_sequence=False)
    _check_packed_tokens("importance_weights", options["importance_weights"], shape, num_seqs, per_sequence=True)
    _same_device(**{main_name: main}, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                 ref_logprobs=options["ref_logprobs"], importance_weights=options["importance_weights"])
    _check_num_items(options["num_items_in_batch"])
    check_scale_out_options(options, "cu_seqlens", defaults)
    _check_scalar_options(options)
    if options["beta"] != 0.0 and options["ref_logprobs"] is None:
        raise ValueError(f"beta={options['beta']} needs ref_logprobs (the reference policy's per-token log-probs)")
    keep = _kept(mask, token_ids, ignore_index).reshape(-1)
    if tuple(advantages.shape) == (num_seqs,) and keep.numel() != num_seqs and _values_checkable(cu_seqlens, keep):
        seq = torch.repeat_interleave(torch.arange(num_seqs, device=keep.device), cu_seqlens.diff().to(torch.int64))
        keep = torch.zeros(num_seqs, dtype=torch.bool, device=keep.device).index_put_((seq,), keep, accumulate=True)
    _check_advantages_finite(advantages.reshape(keep.shape), keep)


def _scale_out_name(vocab_group, batch_group, cu_seqlens) -> Optional[str]:
    """The first scale-out option in use, by name (they take a float temperature only)."""
    for name, value in (("vocab_group", vocab_group), ("batch_group", batch_group), ("cu_seqlens", cu_seqlens)):
        if value is not None:
            return name
    return None


def check_scale_out_grpo_loss(logprobs, old_logprobs, advantages, mask, *, batch_group, cu_seqlens, defaults: dict,
                              **options) -> None:
    """:func:`grpo_kernels.ops.grpo_loss` with ``batch_group`` and/or ``cu_seqlens``."""
    check_process_group("batch_group", batch_group)
    if cu_seqlens is None:
        check_grpo_loss(logprobs, old_logprobs, advantages, mask, options)
    else:
        _tensor("logprobs", logprobs)
        _floating("logprobs", logprobs)
        check_packed_loss(logprobs, "logprobs", logprobs.shape, old_logprobs, advantages, mask, cu_seqlens, options,
                          defaults)
    if batch_group is not None:
        check_scale_out_options(options, "batch_group", defaults)


def check_scale_out_fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask, *, vocab_group, batch_group,
                                    cu_seqlens, temperature, ignore_index, return_entropy, inplace_backward,
                                    defaults: dict, **options) -> None:
    """:func:`grpo_kernels.ops.fused_grpo_loss` with ``vocab_group``, ``batch_group`` and/or ``cu_seqlens``."""
    check_process_group("vocab_group", vocab_group)
    check_process_group("batch_group", batch_group)
    _tensor("logits", logits)
    if cu_seqlens is None and logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {list(logits.shape)}")
    if cu_seqlens is not None and logits.ndim not in (2, 3):
        raise ValueError(f"packed logits must have shape [total, V] or [1, total, V], got {list(logits.shape)}")
    check_token_logprobs(logits, token_ids, temperature=temperature, ignore_index=ignore_index,
                         return_entropy=return_entropy, inplace_backward=inplace_backward,
                         sharded=vocab_group is not None, op="fused_grpo_loss",
                         scale_out=_scale_out_name(vocab_group, batch_group, cu_seqlens))
    if cu_seqlens is None:
        _check_loss_inputs(logits, "logits", token_ids.shape, old_logprobs, advantages, mask, options, token_ids,
                           ignore_index)
    else:
        check_packed_loss(logits, "logits", token_ids.shape, old_logprobs, advantages, mask, cu_seqlens, options,
                          defaults, token_ids, ignore_index)
    if batch_group is not None:
        check_scale_out_options(options, "batch_group", defaults)


def check_scale_out_fused_linear_grpo_loss(hidden, weight, token_ids, old_logprobs, advantages, mask, *, vocab_group,
                                           batch_group, cu_seqlens, head_options: dict, defaults: dict,
                                           **options) -> None:
    """:func:`grpo_kernels.ops.fused_linear_grpo_loss` with ``vocab_group``, ``batch_group`` and/or ``cu_seqlens``."""
    check_process_group("vocab_group", vocab_group)
    check_process_group("batch_group", batch_group)
    _tensor("hidden", hidden)
    if cu_seqlens is None and hidden.ndim != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {list(hidden.shape)}")
    if cu_seqlens is not None and hidden.ndim not in (2, 3):
        raise ValueError(f"packed hidden must have shape [total, H] or [1, total, H], got {list(hidden.shape)}")
    check_linear_token_logprobs(hidden, weight, token_ids, **head_options, sharded=vocab_group is not None,
                                op="fused_linear_grpo_loss",
                                scale_out=_scale_out_name(vocab_group, batch_group, cu_seqlens))
    ignore_index = head_options["ignore_index"]
    if cu_seqlens is None:
        _check_loss_inputs(hidden, "hidden", token_ids.shape, old_logprobs, advantages, mask, options, token_ids,
                           ignore_index)
    else:
        check_packed_loss(hidden, "hidden", token_ids.shape, old_logprobs, advantages, mask, cu_seqlens, options,
                          defaults, token_ids, ignore_index)
    if batch_group is not None:
        check_scale_out_options(options, "batch_group", defaults)
