"""Writes ``csrc/common/loss_table.h``, the C++ side of :mod:`grpo_kernels.loss_table`.

``python -m grpo_kernels.codegen`` (re)writes the header; ``--check`` writes nothing and exits with 1
when the committed header differs from what the table gives. ``setup.py`` runs :func:`write` before it
compiles the extension, and ``tests/test_codegen.py`` checks the committed header.

This module reads only ``grpo_kernels/loss_table.py``, loaded from its file path (no torch, no import
of the package), so ``setup.py`` can load this file the same way. The header holds:

- ``enum class Family``, ``KlEstimator``, ``RolloutLevel``, ``RolloutGate``: the IntEnums of the table, values =
  kernel codes; for each, ``kNum<Enum>Codes``, ``<enum>_from_code`` (checked conversion from an int) and ``is_known``;
- ``folds_importance_weights(Family)`` from ``FOLDS_IMPORTANCE_WEIGHTS``, VESPO's log-weight bounds, the
  divergence gates' probability clamp;
- ``template <typename T = double> struct LossScalars``: one field per ``KERNEL_SCALARS`` row, in order,
  ``kNumLossScalars``, ``loss_scalars_from`` / ``loss_scalars_values`` (the float64 values in that order)
  and ``rounded_scalars<T>`` (each value rounded to a kernel's compute dtype).
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "grpo_kernels" / "loss_table.py"
HEADER_PATH = ROOT / "csrc" / "common" / "loss_table.h"
COMMAND = "python -m grpo_kernels.codegen"


def load_table(path: Path = TABLE_PATH) -> ModuleType:
    """``loss_table.py`` as a standalone module (it imports only the standard library)."""
    name = "_grpo_kernels_loss_table"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # typing and enum look their module up while the class bodies run
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def enumerator(name: str) -> str:
    """C++ enumerator of a Python member name: LOW_VAR_KL -> kLowVarKl."""
    return "k" + "".join(part.capitalize() for part in name.lower().split("_"))


def snake(name: str) -> str:
    """KlEstimator -> kl_estimator."""
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _comment(text: str) -> list[str]:
    return ["// " + line for line in textwrap.wrap(" ".join(text.split()), 110)]


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or cls.__name__).split("\n\n")[0].split())


def _enum(cls: type[enum.IntEnum], what: str) -> list[str]:
    """The enum class, its checked conversion from a code and is_known."""
    cpp, fn = cls.__name__, snake(cls.__name__)
    members = list(cls)
    lines = _comment(f"loss_table.{cpp}: {_summary(cls)}") + [f"enum class {cpp} : int64_t {{"]
    lines += [f"  {enumerator(m.name)} = {int(m)}," for m in members]
    lines += ["};", f"constexpr int kNum{cpp}Codes = {len(members)};", ""]
    lines += [f"// The {cpp} of a kernel code; std::invalid_argument (Python: ValueError) for an unknown one.",
              f"inline {cpp} {fn}_from_code(int64_t code) {{", "  switch (code) {"]
    lines += [f"    case {int(m)}:\n      return {cpp}::{enumerator(m.name)};" for m in members]
    lines += ["    default:",
              f'      throw std::invalid_argument("unknown {what} code " + std::to_string(code));',
              "  }", "}", ""]
    lines += [f"// Whether v is one of the enumerators of {cpp} (an enum class may hold any int64_t).",
              f"constexpr bool is_known({cpp} v) {{", "  switch (v) {"]
    lines += [f"    case {cpp}::{enumerator(m.name)}:" for m in members]
    lines += ["      return true;", "    default:", "      return false;", "  }", "}", ""]
    return lines


def _folds(table: ModuleType) -> list[str]:
    lines = ["// Whether the family folds the importance weights (token-level rollout ratio, importance_weights) into",
             "// its sequence weight instead of multiplying the per-token loss (loss_table.FOLDS_IMPORTANCE_WEIGHTS).",
             "GRPO_HOST_DEVICE constexpr bool folds_importance_weights(Family f) {", "  switch (f) {"]
    folded = [m for m in table.Family if m in table.FOLDS_IMPORTANCE_WEIGHTS]
    lines += [f"    case Family::{enumerator(m.name)}:" for m in folded]
    lines += ["      return true;", "    default:", "      return false;", "  }", "}", ""]
    return lines


def _scalars(table: ModuleType) -> list[str]:
    scalars = table.KERNEL_SCALARS
    n = len(scalars)
    width = max(len(s.name) for s in scalars)
    lines = ["// The numeric options of the loss, one field per row of loss_table.KERNEL_SCALARS, in its order:",
             "// float64 on the host (LossScalars<>, LossConfig::scalars); the kernels take them rounded to their",
             "// compute dtype T (rounded_scalars<T>), as PyTorch rounds a Python scalar. Unset fields are NaN.",
             "template <typename T = double>", "struct LossScalars {"]
    lines += [f"  T {s.name + ' = nan_value<T>();':<{width + 19}} // {s.meaning}" for s in scalars]
    lines += ["};", "", f"constexpr int kNumLossScalars = {n};", ""]
    lines += ["// LossScalars<> from the values in KERNEL_SCALARS order; std::invalid_argument (Python: ValueError)",
              "// unless there are kNumLossScalars of them.",
              "inline LossScalars<> loss_scalars_from(const std::vector<double>& values) {",
              "  if (values.size() != static_cast<std::size_t>(kNumLossScalars)) {",
              '    throw std::invalid_argument("LossScalars takes " + std::to_string(kNumLossScalars) +',
              '                                " values (loss_table.KERNEL_SCALARS), got " + '
              "std::to_string(values.size()));",
              "  }", "  LossScalars<> s;"]
    lines += [f"  s.{s.name} = values[{i}];" for i, s in enumerate(scalars)]
    lines += ["  return s;", "}", ""]
    lines += ["// The values of s in KERNEL_SCALARS order.",
              "inline std::vector<double> loss_scalars_values(const LossScalars<>& s) {",
              "  return {"]
    lines += [f"      s.{s.name}," for s in scalars]
    lines += ["  };", "}", ""]
    lines += ["// s with each value rounded to T.", "template <typename T>",
              "LossScalars<T> rounded_scalars(const LossScalars<>& s) {", "  LossScalars<T> r;"]
    lines += [f"  r.{s.name} = static_cast<T>(s.{s.name});" for s in scalars]
    lines += ["  return r;", "}", ""]
    return lines


def render(table: ModuleType) -> str:
    """The text of ``csrc/common/loss_table.h`` for ``table`` (the loaded ``loss_table`` module)."""
    lines = [
        f"// Generated by {COMMAND} from grpo_kernels/loss_table.py; do not edit.",
        f"// Change the table, then run `{COMMAND}` (setup.py runs it too; `--check` tells",
        "// whether this file is current). The kernels' codes and numeric options of the loss, shared by the",
        "// CPU and CUDA kernels.",
        "#pragma once", "",
        "#include <cstddef>", "#include <cstdint>", "#include <limits>", "#include <stdexcept>", "#include <string>",
        "#include <vector>", "",
        '#include "host_device.h"', "",
        "namespace grpo_kernels {", "",
    ]
    lines += _enum(table.Family, "loss family")
    lines += _enum(table.KlEstimator, "KL estimator")
    lines += _enum(table.RolloutLevel, "rollout importance-sampling level")
    lines += _enum(table.RolloutGate, "rollout importance-sampling gate")
    lines += _folds(table)
    lines += ["// VESPO's clamp of its log-weights (loss_table.VESPO_LOG_MIN, VESPO_LOG_MAX).",
              f"constexpr double kVespoLogMin = {table.VESPO_LOG_MIN!r};",
              f"constexpr double kVespoLogMax = {table.VESPO_LOG_MAX!r};", "",
              "// The divergence gates' clamp of p and q to [c, 1 - c] (loss_table.ROLLOUT_GATE_PROB_CLAMP).",
              f"constexpr double kRolloutGateProbClamp = {table.ROLLOUT_GATE_PROB_CLAMP!r};", ""]
    lines += ["template <typename T>", "constexpr T nan_value() {", "  return std::numeric_limits<T>::quiet_NaN();",
              "}", ""]
    lines += _scalars(table)
    lines += ["}  // namespace grpo_kernels", ""]
    return "\n".join(lines)


def write(header: Path = HEADER_PATH, table_path: Path = TABLE_PATH) -> bool:
    """Writes ``header`` from the table when it differs (its time stamp is kept otherwise); True if written."""
    text = render(load_table(table_path))
    if header.exists() and header.read_text() == text:
        return False
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text(text)
    return True


def is_current(header: Path = HEADER_PATH, table_path: Path = TABLE_PATH) -> bool:
    """Whether ``header`` holds exactly what the table gives."""
    return header.exists() and header.read_text() == render(load_table(table_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the header is not what the table gives")
    args = parser.parse_args(argv)
    if args.check:
        if not is_current(HEADER_PATH):
            print(f"{HEADER_PATH} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    print(f"{HEADER_PATH}: {'written' if write(HEADER_PATH) else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
