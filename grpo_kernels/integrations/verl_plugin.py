"""Importing this module registers grpo_kernels' verl policy losses and advantage estimators.

For verl's hooks that import a module by name in every process (the Ray
workers included), e.g. ``actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_plugin``
or ``VERL_USE_EXTERNAL_MODULES=grpo_kernels.integrations.verl_plugin``.
See :func:`grpo_kernels.integrations.verl.register`.
"""

from .verl import register

register()
