"""serve/grammar.py: response_format as GBNF through llama-cpp-python's converter (it loads our native
libraries, hence not in the unit tier), and every shape it cannot take as a 400 naming the field."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_gguf.serve.errors import ApiError
from llava_gguf.native.json_grammar import any_json_gbnf, json_schema_to_gbnf
from llava_gguf.serve.grammar import MAX_REPEAT, SCHEMA_PARAM, grammar_for

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer"}},
          "required": ["colour", "count"], "additionalProperties": False}


def rules(grammar: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9-]+)\s*::=\s*(.*)$", grammar, re.M))


def test_free_text_has_no_grammar():
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None


def test_json_object_is_llama_cpps_json_grammar():
    g = grammar_for({"type": "json_object"})
    assert g == any_json_gbnf()
    assert "root" in rules(g) and rules(g)["root"].strip() == "object"


def test_a_schema_becomes_its_grammar():
    g = grammar_for({"type": "json_schema", "json_schema": {"name": "shape", "strict": True, "schema": SCHEMA}})
    r = rules(g)
    assert r["root"].startswith('"{"') and "colour-kv" in r["root"] and "count-kv" in r["root"]
    assert r["root"].index("colour-kv") < r["root"].index("count-kv")  # the schema's order
    assert '\\"red\\"' in g and '\\"blue\\"' in g
    assert g == json_schema_to_gbnf(json.dumps(SCHEMA))  # no string of free characters: as the converter gave it
    # llama-cpp-python's server extension: a schema on json_object
    assert grammar_for({"type": "json_object", "schema": SCHEMA}) == g


def refused(response_format, param, code=None, *words) -> ApiError:
    with pytest.raises(ApiError) as info:
        grammar_for(response_format)
    e = info.value
    assert (e.status, e.param) == (400, param), e.body()
    if code:
        assert e.code == code, e.body()
    assert set(e.body()["error"]) == {"message", "type", "param", "code"} and "\n" not in e.message
    for w in words:
        assert w.lower() in e.message.lower(), e.message
    return e


@pytest.mark.parametrize("rf,param,code", [
    ("json_object", "response_format", "invalid_type"),
    ({"type": "yaml"}, "response_format.type", "invalid_value"),
    ({}, "response_format.type", "invalid_value"),
    ({"type": "json_schema"}, "response_format.json_schema", "invalid_type"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, SCHEMA_PARAM, "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": {"schema": "an object please"}}, SCHEMA_PARAM, "invalid_type"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, SCHEMA_PARAM, "invalid_type"),
    ({"type": "json_object", "schema": 3}, "response_format.schema", "invalid_type"),
])
def test_bad_shapes(rf, param, code):
    refused(rf, param, code)


@pytest.mark.parametrize("schema,words", [
    ({"type": "frobnicate"}, ["cannot be turned into a grammar"]),
    ({"$ref": "https://example.com/schema.json"}, ["https://example.com/schema.json"]),
    ({"$ref": "#/$defs/missing"}, ["missing"]),
    ({"type": "string", "pattern": "[a-z]+"}, ["pattern"]),  # the converter wants ^...$
])
def test_schemas_the_converter_cannot_take(schema, words):
    refused({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, SCHEMA_PARAM,
            "invalid_json_schema", *words)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**6},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 10**5},
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 10**7}}},
    {"type": "string", "pattern": "^a{1,100000}$"},
])
def test_repetitions_the_converter_would_spell_out_are_capped(schema):
    e = refused({"type": "json_schema", "json_schema": {"schema": schema}}, SCHEMA_PARAM, "invalid_value",
                str(MAX_REPEAT))
    assert "limit" in e.message


def test_a_deeply_nested_schema_is_a_400():
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    refused({"type": "json_schema", "json_schema": {"schema": schema}}, SCHEMA_PARAM, "invalid_value", "nested")


# ---- any schema-shaped value: a grammar or an ApiError, never another exception

WORDS = st.sampled_from(["type", "object", "array", "string", "integer", "number", "boolean", "null", "properties",
                         "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "#", "#/$defs/a",
                         "$defs", "a", "pattern", "^[a-z]{2,3}$", "(", "format", "date", "minItems", "maxLength",
                         "minimum", "maximum", "additionalProperties", "prefixItems"])
LEAF = WORDS | st.integers(-3, 5) | st.booleans() | st.none() | st.sampled_from([1.5, 2000, -1])
SCHEMAS = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WORDS, inner, max_size=4),
                       max_leaves=14)


@given(schema=SCHEMAS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_schema_is_a_grammar_or_a_400(schema):
    try:
        g = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    except ApiError as e:
        assert e.status == 400 and e.param == SCHEMA_PARAM and "\n" not in e.message
    else:
        assert "root" in rules(g)


def test_strings_cannot_hold_control_characters():
    """llama-cpp-python 0.3.36's converter lets a string hold U+0000..U+001F (`char ::= [^"\\\\]`), which strict
    JSON parsers refuse; the server's grammar keeps them out (tests/test_native_grammar.py parses strictly)."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    raw = [line for line in json_schema_to_gbnf(json.dumps(schema)).splitlines() if line.startswith("char ::=")]
    ours = [line for line in grammar_for({"type": "json_schema", "json_schema": {"schema": schema}}).splitlines()
            if line.startswith("char ::=")]
    assert raw[0].startswith('char ::= [^"\\\\] |')
    assert ours[0].startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F] |')
