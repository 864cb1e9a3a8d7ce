"""`llava-gguf serve`: an OpenAI-compatible HTTP server and its web page, on one engine of N sequences (a front end)."""
