"""`llava-gguf batch`: answers for a whole folder, question file or Parquet, resumable, in one process or on
Ray (a front end over the runtime's scheduler). `llava_gguf.batch.run(model_dir, source, ...)` is the Python
API the command uses; `Cluster(workers, threads, address)` asks for Ray."""
from llava_gguf.batch.api import run
from llava_gguf.batch.cluster import Cluster

__all__ = ["Cluster", "run"]
