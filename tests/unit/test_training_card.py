"""training.card without torch: the shipped model's README.md is what `model_card` writes for the shipped
run, byte for byte, and the status line appears only under the 95% target, naming the kind left behind."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from training.card import model_card, status_note
from training.config import Config

SHIPPED = Path(__file__).resolve().parents[2] / "llava_gguf" / "data" / "shapes-llava"


def shipped_run() -> tuple[Config, dict, dict, float]:
    run = json.loads((SHIPPED / "training.json").read_text())
    return Config(**run["config"]), json.loads((SHIPPED / "config.json").read_text()), run["metrics"], run["minutes"]


def test_the_shipped_card_is_the_shipped_runs():
    assert model_card(*shipped_run()) == (SHIPPED / "README.md").read_text()


def test_the_card_follows_the_configuration():
    cfg, cfgj, metrics, minutes = shipped_run()
    bare = replace(cfg, qa_frozen_steps=0, qa_recital_steps=0, qa_polish_steps=0, qa_recital_share=0.0,
                   clip_patch_weight=0.0)
    plain = model_card(bare, cfgj, {}, 1.0)  # no phase but the questions', no metrics yet
    assert "in 1.0 minutes" in plain and "answers: n/a" in plain and "On the test split" not in plain
    assert "polish phase" not in plain and "recitals" not in plain and "patches/phrases" not in plain
    assert "Status: interim" not in plain
    full = model_card(cfg, cfgj, metrics, minutes)
    assert f"| {cfg.qa_frozen_steps} + {cfg.qa_recital_steps} + {cfg.qa_steps} + {cfg.qa_polish_steps} x" in full


def test_status_note_only_under_the_target():
    by_kind = {"color": 1.0, "shape": 0.99, "count": 0.98, "position": 0.73, "exists": 0.998}
    assert status_note({}) == "" and status_note({"accuracy": 0.95, "by_kind": by_kind}) == ""
    note = status_note({"accuracy": 0.9, "by_kind": by_kind})
    assert note.endswith("\n\n") and max(len(line) for line in note.splitlines()) <= 108
    assert "position questions (73.0% right" in " ".join(note.split()) and "qa_position_weight" in note
    other = status_note({"accuracy": 0.9, "by_kind": {**by_kind, "position": 1.0, "shape": 0.5}})
    assert "shape questions (50.0%" in " ".join(other.split()) and "qa_position_weight" not in other
