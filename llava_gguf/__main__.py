"""`python -m llava_gguf`: the same command line as the `llava-gguf` console script."""
from llava_gguf.cli.app import main

main()
