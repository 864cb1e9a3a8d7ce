"""The shipped model and its task: run.py (`llava-gguf demo`: convert, quantize, quiz; DemoReport) and
shapes.py (the synthetic shapes scenes and questions the shipped model was trained on)."""
