"""The loss's tables: every loss type and every numeric option the kernels take, in one place.

Part of the specification (:mod:`grpo_kernels.reference` reads it; it imports
only the standard library, so the build reads it too). Everything that
depends on the loss type or on the numeric options derives from these tables:
validation, the kernels' options (Python, Triton constexprs, the C++
``LossConfig`` and its bindings, generated into ``csrc/common/loss_table.h`` by
``python -m grpo_kernels.codegen``), the aggregation, the scale-out checks, the
TRL and verl integrations and the tests.

A new loss type is a row of :data:`LOSS_TYPE_TABLE` (plus its formula in the
reference and in the kernels, if its family is new); a new numeric option is a
keyword of ``reference.grpo_loss`` plus a row of :data:`KERNEL_SCALARS`.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional


class Family(enum.IntEnum):
    """The per-token loss formula (a kernel code path). The values are the Triton constexprs and the C++
    ``Family`` enumerators (generated from this class)."""

    CLIPPED = 0  # -min(c1·A, clip(c1, 1-eps_low, 1+eps_high)·A), with delta and the dual clip
    CISPO = 1  # -sg[min(c1, eps_high)]·A·logp
    SAPO = 2  # -σ(τ(c1 - 1))·4/τ·A
    VESPO = 3  # -sg[φ(w)]·A·logp, w the sequence's weight
    GMPO = 4  # -Ā·exp(mean clipped log-ratio)·ψ, one loss per sequence
    GPG = 5  # -logp·A


# The families that fold the importance weights (rollout ratio, importance_weights) into their sequence weight
# instead of multiplying the per-token loss: token-level rollout modes only.
FOLDS_IMPORTANCE_WEIGHTS = frozenset({Family.VESPO, Family.GMPO})


class Aggregation(enum.Enum):
    """How the per-sequence masked sums S_i = Σ_t m ℓ (token counts n_i) become the loss."""

    SEQUENCE_MEAN = "sequence_mean"  # (1/B) Σ_i S_i / max(1, n_i)
    BATCH_TOKEN_MEAN = "batch_token_mean"  # Σ_i S_i / max(1, Σ_i n_i)
    FIXED_LENGTH = "fixed_length"  # Σ_i S_i / (B·L), L = max_completion_length (default T)
    TOKEN_SUM = "token_sum"  # Σ_i S_i / max(1, N), N = num_items_in_batch (default Σ_i n_i)
    SEQUENCE_SUM = "sequence_sum"  # (1/B) Σ_i S_i


class LossType(NamedTuple):
    name: str
    family: Family
    aggregation: Aggregation
    token_ratio: bool  # has a per-token ratio: importance_sampling_level="sequence" (GSPO) applies
    sequence_pass: bool  # always needs a first pass over each sequence (its own sequence weights)
    scale_out: bool  # defined over process groups (grpo_kernels.distributed) and packed sequences
    trl_name: Optional[str]  # TRL 1.16 GRPOConfig.loss_type, None when TRL lacks it
    verl_policy_loss: Optional[str]  # verl's policy_loss.loss_mode that computes it
    verl_agg_modes: tuple[str, ...]  # the verl loss_agg_modes of verl_policy_loss it computes (gmpo: none, verl's
    # geo_mean has its own aggregation)


LOSS_TYPE_TABLE: dict[str, LossType] = {row.name: row for row in (
    LossType("grpo", Family.CLIPPED, Aggregation.SEQUENCE_MEAN, token_ratio=True, sequence_pass=False,
             scale_out=True, trl_name="grpo", verl_policy_loss="vanilla", verl_agg_modes=("seq-mean-token-mean",)),
    LossType("bnpo", Family.CLIPPED, Aggregation.BATCH_TOKEN_MEAN, token_ratio=True, sequence_pass=False,
             scale_out=True, trl_name="bnpo", verl_policy_loss=None, verl_agg_modes=()),
    LossType("dr_grpo", Family.CLIPPED, Aggregation.FIXED_LENGTH, token_ratio=True, sequence_pass=False,
             scale_out=True, trl_name="dr_grpo", verl_policy_loss="vanilla",
             verl_agg_modes=("seq-mean-token-sum-norm",)),
    LossType("dapo", Family.CLIPPED, Aggregation.TOKEN_SUM, token_ratio=True, sequence_pass=False, scale_out=True,
             trl_name="dapo", verl_policy_loss="vanilla", verl_agg_modes=("token-mean", "token-sum")),
    LossType("luspo", Family.CLIPPED, Aggregation.SEQUENCE_SUM, token_ratio=True, sequence_pass=False,
             scale_out=True, trl_name="luspo", verl_policy_loss="vanilla", verl_agg_modes=("seq-mean-token-sum",)),
    LossType("cispo", Family.CISPO, Aggregation.TOKEN_SUM, token_ratio=True, sequence_pass=False, scale_out=True,
             trl_name="cispo", verl_policy_loss=None, verl_agg_modes=()),
    LossType("sapo", Family.SAPO, Aggregation.SEQUENCE_MEAN, token_ratio=True, sequence_pass=False, scale_out=True,
             trl_name="sapo", verl_policy_loss="sapo", verl_agg_modes=("seq-mean-token-mean",)),
    LossType("vespo", Family.VESPO, Aggregation.TOKEN_SUM, token_ratio=False, sequence_pass=True, scale_out=False,
             trl_name="vespo", verl_policy_loss=None, verl_agg_modes=()),
    LossType("gmpo", Family.GMPO, Aggregation.SEQUENCE_MEAN, token_ratio=False, sequence_pass=True,
             scale_out=False, trl_name=None, verl_policy_loss="geo_mean", verl_agg_modes=()),
    LossType("gpg", Family.GPG, Aggregation.TOKEN_SUM, token_ratio=False, sequence_pass=False, scale_out=False,
             trl_name=None, verl_policy_loss="gpg", verl_agg_modes=("token-mean", "token-sum")),
)}

LOSS_TYPES: tuple[str, ...] = tuple(LOSS_TYPE_TABLE)
# The loss types whose options include delta and clip_ratio_c (the clipped family).
CLIPPED_LOSS_TYPES: tuple[str, ...] = tuple(n for n, row in LOSS_TYPE_TABLE.items() if row.family is Family.CLIPPED)
SCALE_OUT_LOSS_TYPES: tuple[str, ...] = tuple(n for n, row in LOSS_TYPE_TABLE.items() if row.scale_out)


def loss_type_row(loss_type: Any, name: str = "loss_type") -> LossType:
    """The table's row of ``loss_type``, or a ValueError naming ``name`` and the known loss types."""
    try:
        return LOSS_TYPE_TABLE[loss_type]
    except (KeyError, TypeError):
        raise ValueError(f"{name} must be one of {list(LOSS_TYPES)}, got {loss_type!r}") from None


class KlEstimator(enum.IntEnum):
    """``kl_estimator`` of the loss: values are the kernels' codes (Triton constexpr, C++ enum)."""

    K3 = 0  # exp(ref - logp) - (ref - logp) - 1 (TRL)
    K1 = 1  # logp - ref
    K2 = 2  # (logp - ref)² / 2
    LOW_VAR_KL = 3  # k3 clamped to [-10, 10] (verl)


KL_ESTIMATORS: dict[str, KlEstimator] = {"k3": KlEstimator.K3, "k1": KlEstimator.K1, "k2": KlEstimator.K2,
                                         "low_var_kl": KlEstimator.LOW_VAR_KL}


class RolloutLevel(enum.IntEnum):
    """Where the rollout importance ratio (``rollout_is_mode``) is formed: kernel codes."""

    NONE = 0
    TOKEN = 1
    SEQUENCE = 2


class RolloutMode(NamedTuple):
    level: RolloutLevel
    mask: bool  # masked (MIS) instead of truncated (TIS)


ROLLOUT_IS_MODES: dict[Optional[str], RolloutMode] = {
    None: RolloutMode(RolloutLevel.NONE, mask=False),
    "token_truncate": RolloutMode(RolloutLevel.TOKEN, mask=False),
    "token_mask": RolloutMode(RolloutLevel.TOKEN, mask=True),
    "sequence_truncate": RolloutMode(RolloutLevel.SEQUENCE, mask=False),
    "sequence_mask": RolloutMode(RolloutLevel.SEQUENCE, mask=True),
}


class RolloutGate(enum.IntEnum):
    """``rollout_is_gate``: the statistic that the rollout importance sampling bounds (kernel codes). ``RATIO``
    bounds the ratio itself (truncated or masked); the others are masks only: a token keeps its ratio where
    its unit's statistic (the token's, or its sequence's mean at sequence level) lies in the bounds, else 0."""

    RATIO = 0  # ρ_t = e^{d_t} (sequence level: e^{Σ_t d_t}, TRL)
    GEOMETRIC_MEAN = 1  # e^{mean_t d_t} over the sequence's tokens: sequence level only
    BINARY_KL = 2  # p log(p/q) + (1-p) log((1-p)/(1-q)), p = e^{sampling}, q = e^{old}
    TV = 3  # |p - q|


ROLLOUT_IS_GATES: dict[str, RolloutGate] = {"ratio": RolloutGate.RATIO, "geometric_mean": RolloutGate.GEOMETRIC_MEAN,
                                            "binary_kl": RolloutGate.BINARY_KL, "tv": RolloutGate.TV}
# The divergence gates clamp p and q to [c, 1 - c] first (OpenRLHF's 1e-6: the binary KL's logs stay finite).
ROLLOUT_GATE_PROB_CLAMP = 1e-6

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

# VESPO clamps its log-weights to [log(1e-8), 20] and its lambdas to at least 1e-4 (TRL's get_gamma_weights).
VESPO_LOG_MIN = -18.420680743952367  # log(1e-8) in float64
VESPO_LOG_MAX = 20.0
VESPO_MIN_LAMBDA = 1e-4


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def _eps_high(o: Mapping[str, Any]) -> float:
    return float(o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"])


class KernelScalar(NamedTuple):
    """A number every loss kernel takes as a float64 argument (rounded to its compute dtype in the kernel, as
    PyTorch rounds a Python scalar), formed on the host from the loss's keyword options."""

    name: str  # the kernels' name: a Triton kernel parameter, a C++ LossScalars field
    meaning: str
    value: Callable[[Mapping[str, Any]], float]  # from the keyword options of reference.grpo_loss (all present)


# The numeric options of the loss, in the order of the kernels' arguments.
KERNEL_SCALARS: tuple[KernelScalar, ...] = (
    KernelScalar("lo", "1 - epsilon_low", lambda o: float(1 - o["epsilon_low"])),
    KernelScalar("hi", "1 + epsilon_high", lambda o: float(1 + _eps_high(o))),
    KernelScalar("eps_high", "epsilon_high (epsilon_low when None; cispo's absolute cap)", _eps_high),
    KernelScalar("delta", "delta, the upper clamp of c1 (0 when None)", lambda o: _or(o["delta"], 0.0)),
    KernelScalar("clip_c", "clip_ratio_c, the dual clip (0 when None)", lambda o: _or(o["clip_ratio_c"], 0.0)),
    KernelScalar("beta", "beta, the KL coefficient", lambda o: float(o["beta"])),
    KernelScalar("tau_pos", "sapo_temperature_pos", lambda o: float(o["sapo_temperature_pos"])),
    KernelScalar("tau_neg", "sapo_temperature_neg", lambda o: float(o["sapo_temperature_neg"])),
    KernelScalar("eps_low", "epsilon_low (gmpo's log-space range is [-eps_low, eps_high])",
                 lambda o: float(o["epsilon_low"])),
    KernelScalar("is_min", "rollout_is_min (-inf when None)", lambda o: _or(o["rollout_is_min"], -math.inf)),
    KernelScalar("is_max", "rollout_is_max (+inf when None)", lambda o: _or(o["rollout_is_max"], math.inf)),
    KernelScalar("off_policy_threshold", "off_policy_mask_threshold (0 when None)",
                 lambda o: _or(o["off_policy_mask_threshold"], 0.0)),
    KernelScalar("k_pos", "vespo_k_pos", lambda o: float(o["vespo_k_pos"])),
    KernelScalar("lambda_pos", "vespo_lambda_pos, at least VESPO_MIN_LAMBDA",
                 lambda o: max(float(o["vespo_lambda_pos"]), VESPO_MIN_LAMBDA)),
    KernelScalar("k_neg", "vespo_k_neg", lambda o: float(o["vespo_k_neg"])),
    KernelScalar("lambda_neg", "vespo_lambda_neg, at least VESPO_MIN_LAMBDA",
                 lambda o: max(float(o["vespo_lambda_neg"]), VESPO_MIN_LAMBDA)),
    KernelScalar("log_clamp", "log_ratio_clamp (0 when None)", lambda o: _or(o["log_ratio_clamp"], 0.0)),
)
SCALAR_NAMES: tuple[str, ...] = tuple(s.name for s in KERNEL_SCALARS)
