"""csrc/common/loss_table.h is what ``python -m grpo_kernels.codegen`` makes of grpo_kernels/loss_table.py,
and the extension's LossConfig takes the table's numeric options in its order."""

import re
import subprocess
import sys

import pytest

from grpo_kernels import codegen, loss_table
from grpo_kernels._extension import _C


def test_committed_header_is_the_generators_output():
    assert codegen.HEADER_PATH.read_text() == codegen.render(codegen.load_table()), (
        f"{codegen.HEADER_PATH} is stale: run `python -m grpo_kernels.codegen` and commit it")


def test_check_flags_a_stale_header(tmp_path):
    header = tmp_path / "loss_table.h"
    assert not codegen.is_current(header)  # absent
    header.write_text(codegen.HEADER_PATH.read_text().replace("kCispo = 1", "kCispo = 7"))
    assert not codegen.is_current(header)
    assert codegen.write(header) and codegen.is_current(header)
    assert not codegen.write(header)  # unchanged: not rewritten


def test_check_command(tmp_path, monkeypatch, capsys):
    """``python -m grpo_kernels.codegen --check``'s exit status (its main, in process: a new interpreter
    importing the package takes seconds)."""
    assert codegen.main(["--check"]) == 0
    stale = tmp_path / "loss_table.h"
    stale.write_text("// old\n")
    monkeypatch.setattr(codegen, "HEADER_PATH", stale)
    assert codegen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert stale.read_text() == "// old\n"  # --check writes nothing


def test_setup_loads_the_generator_without_torch():
    """setup.py loads codegen.py from its file; the table it reads imports only the standard library."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cg', {str(codegen.__file__)!r})\n"
            "cg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cg)\n"
            "assert cg.is_current()\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'grpo_kernels')], sorted(sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _enum_values(text: str, name: str) -> dict:
    body = re.search(rf"enum class {name} : int64_t \{{(.*?)\}};", text, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+) = (-?\d+),", body)}


@pytest.mark.parametrize("enum", [loss_table.Family, loss_table.KlEstimator, loss_table.RolloutLevel,
                                  loss_table.RolloutGate])
def test_header_enums_are_the_tables(enum):
    text = codegen.HEADER_PATH.read_text()
    assert _enum_values(text, enum.__name__) == {codegen.enumerator(m.name): int(m) for m in enum}


def test_header_scalars_are_the_tables_in_order():
    text = codegen.HEADER_PATH.read_text()
    body = re.search(r"struct LossScalars \{(.*?)\};", text, re.S).group(1)
    assert tuple(re.findall(r"^\s+T (\w+) = ", body, re.M)) == loss_table.SCALAR_NAMES
    assert f"constexpr int kNumLossScalars = {len(loss_table.KERNEL_SCALARS)};" in text
    for name in loss_table.SCALAR_NAMES:  # every field filled, read back and rounded by the generated functions
        assert len(re.findall(rf"\b[sr]\.{name} = ", text)) == 2 and f"s.{name}," in text, name


needs_ext = pytest.mark.skipif(_C is None, reason="grpo_kernels._C not built")


@needs_ext
def test_loss_config_takes_the_scalars_in_table_order():
    assert _C.NUM_LOSS_SCALARS == len(loss_table.KERNEL_SCALARS)
    values = [0.5 + i for i in range(len(loss_table.KERNEL_SCALARS))]
    assert _C.LossConfig(values).scalars == values
    with pytest.raises(ValueError, match="LossScalars takes 17 values"):
        _C.LossConfig(values[:-1])


@needs_ext
def test_loss_config_codes_are_checked():
    cfg = _C.LossConfig([0.0] * len(loss_table.KERNEL_SCALARS))
    for field, enum in (("family", loss_table.Family), ("kl_estimator", loss_table.KlEstimator),
                        ("rollout_is", loss_table.RolloutLevel), ("rollout_is_gate", loss_table.RolloutGate)):
        for member in enum:
            setattr(cfg, field, member)
            assert getattr(cfg, field) == int(member)
        with pytest.raises(ValueError, match="unknown"):
            setattr(cfg, field, max(enum) + 1)
        with pytest.raises(ValueError, match="unknown"):
            setattr(cfg, field, -1)
