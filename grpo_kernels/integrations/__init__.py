"""Integrations of the ops into training libraries.

Each integration is a module of its own that imports its library
(``grpo_kernels.integrations.trl``: trl and transformers;
``grpo_kernels.integrations.verl``: verl), so ``import grpo_kernels`` never
imports any of them: only the users of an integration do.
"""
