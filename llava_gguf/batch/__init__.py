"""`llava-gguf batch`: answers for a whole folder or question file, resumable (a front end over the scheduler).
`llava_gguf.batch.run(model_dir, source, ...)` is the Python API the command uses."""
from llava_gguf.batch.runner import run

__all__ = ["run"]
