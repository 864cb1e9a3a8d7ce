"""The training code of the model llava-gguf ships (llava_gguf/data/shapes-llava): LLaVA's recipe, at small
scale, on the synthetic shapes task. Not part of the wheel; `python -m training --out DIR` runs it.

    config    Config (every knob), --set parsing, same_run (a run directory resumes only its own run)
    report    log lines and accuracy per question kind
    data      the scenes, patch labels, the tokenizer and every stage's batches (Data)
    models    the CLIP tower + text side, the LLaVA configurations, cached tower features, Whitening
    loop      run_stage (the resumable optimisation loop) and one step of each stage
    stages    the four stages, each ending in its saved weights
    card      the model card's text
    export    the exported model directory (weights, tokenizer, training.json, card), measured on the test split
    cli       the command line (`python -m training`)
    train     the command's first name (`python -m training.train`), and the stages' parts the tests drive

Nothing is imported here: config and card need neither torch nor transformers, and their tests load neither."""
