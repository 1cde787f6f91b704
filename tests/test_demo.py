"""The R1-Zero toy demo (examples/r1_zero_toy.py): a shortened run learns and writes its outputs."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "r1_zero_toy.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("r1_zero_toy", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_rewards_follow_the_rules():
    demo = load_demo()
    ids = {tok: i for i, tok in enumerate(demo.TOKENS)}
    well_formed = [ids["<a>"], 7, ids["</a>"], ids["<eos>"], ids["<pad>"]]
    assert demo.score((3, 4), well_formed) == (1.0, 1.0)
    assert demo.score((3, 3), well_formed) == (0.0, 1.0)
    assert demo.score((3, 4), [7, ids["<eos>"], ids["<pad>"], ids["<pad>"], ids["<pad>"]]) == (1.0, 0.0)
    assert demo.score((3, 4), [ids["<a>"], 7, ids["+"], 1, 1]) == (1.0, 0.5)
    assert demo.score((3, 4), [ids["<a>"], 7, ids["</a>"], 7, 7]) == (1.0, 0.75)


def test_quick_demo_learns_and_writes_outputs(tmp_path):
    demo = load_demo()
    threads = torch.get_num_threads()
    try:
        summary = demo.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    start, end = summary["start"], summary["end"]
    # From a random init: no correct greedy answers, almost no reward.
    assert start["eval_accuracy"] <= 0.1
    assert start["batch_reward"] <= 0.2
    # After 80 GRPO steps: accuracy and reward clearly up (0.56 and 1.31 when written).
    assert end["eval_accuracy"] >= start["eval_accuracy"] + 0.3
    assert end["batch_reward"] >= start["batch_reward"] + 0.8
    assert end["eval_format"] >= 0.5

    png, js = tmp_path / "r1_zero_toy.png", tmp_path / "r1_zero_toy.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads(js.read_text())
    assert written["end"] == end
    assert len(written["history"]) == summary["config"]["steps"]
