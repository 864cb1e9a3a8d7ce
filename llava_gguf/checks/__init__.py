"""The checks: how far the GGUF files and our runtime are from the Hugging Face reference, and what a file
holds. They read files and report (frozen dataclasses with `to_json()`); they never feed the runtime back.

    metrics.py    cosine, log-softmax, KL divergence, top-1 agreement on arrays
    reference.py  transformers' side (torch and transformers imported inside its functions)
    samples.py    the built-in test images
    inspect.py    InspectReport of a checkpoint or a GGUF (what `inspect` shows)
    verify.py     VerifyReport: a converted pair against the checkpoint in transformers
    quality.py    QualityReport: a quantized model against its unquantized base"""
