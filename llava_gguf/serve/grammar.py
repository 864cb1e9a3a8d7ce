"""A request's `response_format` as the GBNF grammar the answer must follow (serve layer, request side):
"json_object" is any JSON object, "json_schema" is the schema through llama-cpp-python's converter (the one
`LlamaGrammar.from_json_schema` uses, itself llama.cpp's json_schema_to_grammar.py). The grammar goes to the
engine's grammar sampler; a schema the converter cannot handle is the client's 400, not a server error."""
from __future__ import annotations

import json
import re

from llava_gguf.native.json_grammar import any_json_gbnf, json_schema_to_gbnf
from llava_gguf.serve.errors import ApiError, invalid

SCHEMA_PARAM = "response_format.json_schema.schema"
# The converter spells a repetition out (minItems 10**6 is a million copies of the item's rule, a maxItems
# nests one level per item), so counts are capped before it runs, and the grammar it returns too.
MAX_REPEAT = 1000
MAX_GRAMMAR_CHARS = 256 * 1024
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def grammar_for(response_format: object) -> str | None:
    """The GBNF for a request's `response_format` (None: free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise invalid("response_format must be an object such as {\"type\": \"json_object\"}", "response_format",
                      "invalid_type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-cpp-python's server also takes a schema here ({"type": "json_object", "schema": {...}})
        schema = response_format.get("schema")
        if schema is None:
            return any_json_gbnf()
        return schema_grammar(schema, "response_format.schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("response_format.json_schema must be an object with a \"schema\"",
                          "response_format.json_schema", "invalid_type")
        if "schema" not in spec:
            raise invalid("response_format.json_schema.schema is missing", SCHEMA_PARAM, "missing_required_parameter")
        return schema_grammar(spec["schema"], SCHEMA_PARAM)
    raise invalid(f"response_format.type must be \"text\", \"json_object\" or \"json_schema\", not {kind!r}"[:300],
                  "response_format.type")


def _check_schema(node: object, param: str, depth: int = 0) -> None:
    """Refuse what the converter would spell out at a harmful size (repetition counts, regex quantifiers),
    and a remote $ref (never fetched; the converter's own message names a CLI option that is not ours)."""
    if depth > 64:
        raise invalid(f"{param} is nested more than 64 levels deep", param)
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _COUNTS and isinstance(value, int) and value > MAX_REPEAT:
                raise invalid(f"{param}: {key} {value} is above this server's limit of {MAX_REPEAT}", param)
            if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                raise invalid(f"{param}: $ref {value[:100]!r} is not a reference inside the schema (\"#/...\"); "
                              "remote schemas are not fetched", param, "invalid_json_schema")
            if key == "pattern" and isinstance(value, str):
                for low, high in _QUANTIFIER.findall(value):
                    if int(low) > MAX_REPEAT or (high and int(high) > MAX_REPEAT):
                        raise invalid(f"{param}: a repetition in the pattern {value[:80]!r} is above this server's "
                                      f"limit of {MAX_REPEAT}", param)
            _check_schema(value, param, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_schema(value, param, depth + 1)


def schema_grammar(schema: object, param: str = SCHEMA_PARAM) -> str:
    """The GBNF of a JSON schema (a JSON object), or a 400 naming `param`."""
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON schema object, not {type(schema).__name__}", param, "invalid_type")
    _check_schema(schema, param)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise invalid(f"{param}: the schema refers to itself too deeply to turn into a grammar", param) from None
    except Exception as e:  # noqa: BLE001 - the converter asserts and raises KeyError/TypeError/ValueError on
        # schemas it does not handle (a remote $ref, an unknown type, a regex it cannot parse)
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise invalid(f"{param}: the JSON schema cannot be turned into a grammar ({why})", param,
                      "invalid_json_schema") from None
    # llama-cpp-python 0.3.36's converter lets a string hold control characters (`[^"\\]`), which strict JSON
    # parsers (json.loads, JSON.parse) refuse; llama.cpp's own converter has since excluded them
    grammar = grammar.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |', 1)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ApiError(400, f"{param}: the schema's grammar is {len(grammar)} characters, above this server's "
                       f"limit of {MAX_GRAMMAR_CHARS}", param=param, code="invalid_json_schema")
    return grammar
