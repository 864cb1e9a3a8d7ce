"""llama-cpp-python's JSON grammars, on our native libraries: its JSON-schema-to-GBNF converter (the one
`LlamaGrammar.from_json_schema` uses, itself llama.cpp's json_schema_to_grammar.py) and its any-JSON grammar.
The converter is pure Python, but importing the llama_cpp package loads libllama: the library paths are
configured first, as everywhere llama_cpp is touched (library.py)."""
from __future__ import annotations

from llava_gguf.native.library import configure


def _module():
    configure()
    import llama_cpp.llama_grammar as module  # heavy: importing llama_cpp loads libllama

    return module


def json_schema_to_gbnf(schema_json: str) -> str:
    """The GBNF of a JSON schema given as JSON text (the converter raises on schemas it cannot handle)."""
    return _module().json_schema_to_gbnf(schema_json)


def any_json_gbnf() -> str:
    """The GBNF of any JSON value (llama-cpp-python's JSON_GBNF; its root is an object)."""
    return _module().JSON_GBNF
