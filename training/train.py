"""`python -m training.train --out DIR ...`: the command under the name README.md and the shipped model card
give it (the same as `python -m training`), and, gathered from the modules that hold them, the parts of the
stages that tests/test_training.py drives one by one (`from training import train as T`)."""
from devkit.tokenizer_files import write_tokenizer
from training.card import model_card, status_note
from training.cli import main
from training.config import BEFORE_FIELD, STAGES, Config, same_run, with_fields
from training.data import CELL_PATCHES, LM_VALIDATION, PATCH_CELLS, PHRASES, Data, patch_labels
from training.export import export
from training.loop import (clip_step, llava_params, llava_step, lm_step, run_stage, schedule, token_accuracy,
                           token_hits)
from training.models import (Contrastive, Whitening, build_llava, grid_positions, llava_logits, text_config,
                             tower_features, vision_config)
from training.report import kinds_text, log
from training.stages import assemble, stage_clip, stage_llava, stage_lm

__all__ = ["BEFORE_FIELD", "CELL_PATCHES", "Config", "Contrastive", "Data", "LM_VALIDATION", "PATCH_CELLS", "PHRASES",
           "STAGES", "Whitening", "assemble", "build_llava", "clip_step", "export", "grid_positions", "kinds_text",
           "llava_logits", "llava_params", "llava_step", "lm_step", "log", "main", "model_card", "patch_labels",
           "run_stage", "same_run", "schedule", "stage_clip", "stage_llava", "stage_lm", "status_note", "text_config",
           "token_accuracy", "token_hits", "tower_features", "vision_config", "with_fields", "write_tokenizer"]

if __name__ == "__main__":
    main()
