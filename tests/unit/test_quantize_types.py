"""llama-quantize's types: one table (gguf/classify.py's FILE_TYPES) for the quantizer and for reading a
file's type, looked up in any case, and the output names beside the source."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import FILE_TYPE_NAMES, FILE_TYPES, TYPE_ALIASES
from llava_gguf.quantize.types import MMPROJ_CHOICES, QUANT_TYPES, find_type, output_path


def test_one_table_of_types():
    assert [t.name for t in QUANT_TYPES] == list(FILE_TYPES)
    assert all(t.ftype == FILE_TYPES[t.name] for t in QUANT_TYPES)
    assert FILE_TYPE_NAMES[15] == "Q4_K_M" and FILE_TYPE_NAMES[1] == "F16"  # an alias never names a file's type
    assert all(FILE_TYPES[a] == FILE_TYPES[m] for a, m in TYPE_ALIASES.items())
    assert [t.name for t in QUANT_TYPES if t.needs_imatrix][:3] == ["IQ2_XXS", "IQ2_XS", "IQ2_S"]
    assert MMPROJ_CHOICES == ("keep", "f32", "f16", "q8_0", "q4_k_m")


def test_find_type_and_bits_per_weight():
    assert find_type("q4_k_m") is find_type("Q4_K_M")
    assert find_type("Q4_K").bpw == find_type("Q4_K_M").bpw == pytest.approx(4.9, abs=0.01)
    assert find_type("F16").bpw == 16.0 and find_type("IQ2_XS").bpw == 2.31  # a storage type; a note's bpw
    with pytest.raises(LlavaGgufError, match="unknown quantization type 'Q9'"):
        find_type("Q9")


def test_output_names():
    q4 = find_type("q4_k_m")
    assert output_path(Path("d/x-F16.gguf"), q4) == Path("d/x-Q4_K_M.gguf")
    assert output_path(Path("x-q8_0.gguf"), q4) == Path("x-Q4_K_M.gguf")
    assert output_path(Path("mmproj-x-F16.gguf"), find_type("q8_0")) == Path("mmproj-x-Q8_0.gguf")
    assert output_path(Path("model.gguf"), q4) == Path("model-Q4_K_M.gguf")
