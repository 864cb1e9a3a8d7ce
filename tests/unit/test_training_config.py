"""training.config without torch: `--set FIELD=VALUE` parsing, `--steps-scale`, and which stored run
directory is this run (`same_run`)."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from training.config import BEFORE_FIELD, Config, same_run, with_fields


def test_set_values_take_their_fields_type():
    cfg = with_fields(Config(), ["qa_steps=10", "qa_lr=3e-4", "whiten=off", "seed=7"])
    assert (cfg.qa_steps, cfg.qa_lr, cfg.whiten, cfg.seed) == (10, 3e-4, False, 7)
    for word, value in (("true", True), ("YES", True), ("1", True), ("on", True), ("False", False), ("0", False)):
        assert with_fields(cfg, [f"whiten={word}"]).whiten is value
    assert with_fields(cfg, []) == cfg


@pytest.mark.parametrize("bad, says", [("whiten=maybe", "whiten takes a bool, not 'maybe'"),
                                       ("qa_steps=1.5", "qa_steps takes a int"),
                                       ("qa_lr=fast", "qa_lr takes a float"),
                                       ("nope=1", "'nope=1' is not FIELD=VALUE with one of: seed, threads,"),
                                       ("qa_steps", "is not FIELD=VALUE")])
def test_a_bad_assignment_is_one_line_naming_the_field(bad, says):
    with pytest.raises(ValueError, match=says) as e:
        with_fields(Config(), [bad])
    assert "\n" not in str(e.value)


def test_steps_scale_scales_every_stage_and_keeps_an_absent_phase_absent():
    small = Config().scaled(0.1)
    assert (small.clip_steps, small.qa_polish_steps, small.qa_steps) == (160, 120, 240)
    assert Config().scaled(0.0001).lm_steps == 2  # at least two steps: a stage always runs
    assert replace(Config(), qa_recital_steps=0).scaled(0.5).qa_recital_steps == 0
    assert small.clip_batch == Config().clip_batch and small.clip_lr == Config().clip_lr  # steps only


def test_same_run_reads_a_missing_field_as_what_such_a_run_did(tmp_path):
    stored = tmp_path / "config.json"
    assert same_run(stored, Config(seed=3))  # a new directory: any run
    stored.write_text(json.dumps(asdict(Config())))
    assert same_run(stored, Config()) and not same_run(stored, Config(threads=4))
    old = {k: v for k, v in asdict(Config()).items() if k not in ("qa_turns", *BEFORE_FIELD)}
    stored.write_text(json.dumps(old))
    assert not same_run(stored, Config())  # it ran without the polish phase ...
    assert same_run(stored, replace(Config(), **BEFORE_FIELD))  # ... and with qa_turns' default
