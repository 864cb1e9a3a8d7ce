"""What a run prints: timestamped log lines, and accuracy per question kind as the logs and the model card
give it."""
from __future__ import annotations

import time


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def kinds_text(by_kind: dict[str, float]) -> str:
    """Accuracy per question kind, as the logs and the model card print it."""
    return ", ".join(f"{k} {v:.1%}" for k, v in by_kind.items())
