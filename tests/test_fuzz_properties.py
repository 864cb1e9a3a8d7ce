"""Property-based fuzzing of every parser of untrusted input: safetensors headers, config.json and images
here, GGUF files (inspect, quantize, chat, llama.cpp's own loading) in test_fuzz_gguf.py. The property is always the same: an input ends in a result or in
our one-line LlavaGgufError — never another exception type, never a hang, never a native crash.

Inputs are mutations of real files (tiny checkpoints saved by transformers, their conversions, images
written by Pillow), steered at the fields parsers trust (lengths, counts, types, offsets: fuzz/mutate.py),
plus arbitrary bytes and JSON. Bounded and deterministic (derandomized, no example database) so the suite
stays fast and CI sees the same inputs every run; the coverage-guided harnesses in fuzz/ (bin/fuzz) are
the long-running search, and what they find lands here as explicit examples.

A case marked FOUND below is a finding of fuzzing (issue 23), kept as a regression case; the comment
names the file that was fixed."""
from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz.mutate import JSON_ODD_VALUES, apply, dumps, image_slots, safetensors_slots
from fuzz.properties import ends_well, fuzz_settings, json_mutation, json_values, steps
from fuzz.seeds import bf16_safetensors, header_only, sample_images, sample_safetensors
from llava_gguf.errors import LlavaGgufWarning


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------- (a) safetensors
def _read_all(ckpt_dir: Path):
    """read_checkpoint, then every small tensor it accepted, read: an accepted header must be readable."""
    from llava_gguf.convert.checkpoint import read_checkpoint

    ck = read_checkpoint(ckpt_dir)
    for ref in ck.tensors.values():
        if ref.nbytes <= 2**20:
            ref.read()
    return ck


@pytest.fixture(scope="module")
def st_dir(scratch) -> Path:
    d = scratch / "st"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _st_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8", "surrogatepass")
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


# FOUND (fixed in convert/checkpoint.py _parse_safetensors_header): dimensions are not checked to be
# non-negative integers. Negative ones whose product matches the byte range are accepted (shape [-2, -3]
# over 24 bytes; [0, -2] over 0; [-1] with data_offsets [2, 0], a negative length) and TensorRef.read()
# then raises numpy's ValueError (reshape, or bytearray's "negative count"); a dimension >= 2**63, or
# 1e308, raises OverflowError from np.prod (with a raw numpy RuntimeWarning on the way), and Infinity
# (which Python's json accepts) OverflowError from int(); neither is caught.
@example(_st_file({"t": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, bytes(24)))
@example(_st_file({"t": {"dtype": "BF16", "shape": [-1], "data_offsets": [2, 0]}}, bytes(2)))
@example(_st_file({"t": {"dtype": "F32", "shape": [2**63], "data_offsets": [0, 8]}}, bytes(8)))
@example(_st_file({"t": {"dtype": "F32", "shape": [1e308, 2], "data_offsets": [0, 8]}}, bytes(8)))
@example(_st_file(b'{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', bytes(8)))
@example(_st_file(b"[" * 100_000 + b"]" * 100_000))  # issue 23 item 8: nested JSON
@example(_st_file(b"{}", length=2**64 - 1))
@given(data=st.binary(max_size=300))
@fuzz_settings(150)
def test_safetensors_arbitrary_bytes(st_dir, data):
    _write(st_dir / "model.safetensors", data)
    ends_well(_read_all, st_dir)


_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
dims = st.integers(-4, 6) | st.sampled_from([0, 2**31, 2**32, 2**62, 2**63, 2**64])


@st.composite
def safetensors_files(draw) -> bytes:
    """Headers whose fields are mostly self-consistent (data_offsets spanning the shape's bytes, with the
    data present), so the checks past the first one are reached; then one field is made odd or dropped."""
    header: dict = {}
    data = b""
    for name in draw(st.lists(st.sampled_from(["a", "b.weight", "__metadata__", ""]) | st.text(max_size=4),
                              max_size=3, unique=True)):
        dtype = draw(st.sampled_from(sorted(_ST_SIZES)))
        shape = draw(st.lists(dims, max_size=4))
        n = _ST_SIZES[dtype]
        for d in shape:
            n *= d
        begin = len(data)
        info = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n]}
        if 0 <= n <= 256:
            data += bytes(n)
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(info)))
            if draw(st.booleans()):
                del info[key]
            else:
                info[key] = draw(st.sampled_from(JSON_ODD_VALUES) | json_values)
        header[name] = info if name != "__metadata__" or draw(st.booleans()) else draw(json_values)
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    length = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, -8]))
    return _st_file(raw, data + draw(st.binary(max_size=8)), max(0, length))


@given(file=safetensors_files())
@fuzz_settings(200)
def test_safetensors_header_fields(st_dir, file):
    _write(st_dir / "model.safetensors", file)
    ends_well(_read_all, st_dir)


@pytest.fixture(scope="module")
def st_bases(tiny) -> dict[str, bytes]:
    """Real safetensors files: the library's own, and a tiny checkpoint's header (its tensors past the end)."""
    ckpt = tiny()
    return {**sample_safetensors(), "bf16": bf16_safetensors(),
            "checkpoint-header": header_only(ckpt / "model.safetensors", keep=256)}


@given(base=st.sampled_from(["floats.safetensors", "ints.safetensors", "scalar-empty.safetensors", "bf16",
                             "checkpoint-header"]), data=st.data())
@fuzz_settings(150)
def test_safetensors_mutated_real_files(st_dir, st_bases, base, data):
    raw = st_bases[base]
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if data.draw(st.booleans()):  # a field of the JSON header changed
        out = _st_file(dumps(data.draw(json_mutation(header))), body)
    else:  # bytes changed: the length field, the JSON text, the data
        out = apply(raw, data.draw(steps), *safetensors_slots(raw))
    _write(st_dir / "model.safetensors", out)
    ends_well(_read_all, st_dir)


# -------------------------------------------------------------------------------------- (b) config.json
# FOUND (fixed in families/__init__.py find_family, families/hparams.py resolve_llava): a non-string
# architecture (`"architectures": [1]` or `true`) raises AttributeError (`a.endswith`); a list or object as
# text_config.model_type raises TypeError (unhashable, `model_type not in TEXT_DEFAULTS`); rope_scaling /
# rope_parameters that is a number or a list raises TypeError (`"rope_theta" in rope`, `rope["rope_theta"]`);
# an explicit null num_attention_heads or hidden_size raises TypeError in _check_text_heads (`_check_ints`
# skips None, and the null overrides the default). The zero and string head counts pass since today's fix.
@example({"architectures": [1]})
@example({"architectures": True})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": ["llama"]}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"rope_scaling": 2}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"rope_scaling": ["rope_theta"]}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"num_attention_heads": None}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"hidden_size": None}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"num_attention_heads": 0}})
@example({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"hidden_size": "4096"}})
@given(config=st.dictionaries(st.sampled_from(["architectures", "text_config", "vision_config", "model_type",
                                               "vision_feature_layer", "image_token_index", "image_token_id"])
                              | st.text(max_size=6), json_values, max_size=5))
@fuzz_settings(200)
def test_config_family_and_hparams_arbitrary_json(config):
    from llava_gguf.families import find_family
    from llava_gguf.families.hparams import resolve_llava

    ends_well(find_family, config)
    ends_well(resolve_llava, config)


@pytest.fixture(scope="module")
def config_bases(tiny, scratch) -> dict[str, Path]:
    """Real checkpoints (llava-1.5, BakLLaVA's mistral, 1.6 anyres, liuhaotian with its CLIP beside it)."""
    from devkit.tiny import make_tiny_liuhaotian

    bases = {"llava15": tiny(), "mistral": tiny(text_model="mistral"), "anyres": tiny(anyres=True)}
    clip = scratch / "liuhaotian-clip"
    bases["liuhaotian"] = make_tiny_liuhaotian(bases["llava15"], scratch / "liuhaotian", clip,
                                               weights_format="safetensors", tower_name=str(clip))
    return bases


def _with_config(base: Path, where: Path, config_text: bytes) -> Path:
    """A checkpoint directory that is `base` with another config.json (the other files linked, not copied)."""
    where.mkdir(exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json" and not (where / f.name).exists():
            (where / f.name).symlink_to(f.resolve())
    (where / "config.json").write_bytes(config_text)
    return where


def _open_and_inspect(ckpt: Path):
    from llava_gguf.convert import open_llava
    from llava_gguf.checks.inspect import inspect_path
    from llava_gguf.cli.render import inspect_lines as render

    ends_well(open_llava, ckpt)
    report = ends_well(inspect_path, ckpt)
    if isinstance(report, dict):
        render(report)
        json.dumps(report)


@given(base=st.sampled_from(["llava15", "mistral", "anyres", "liuhaotian"]), data=st.data())
@fuzz_settings(120)
def test_config_mutations_open_and_inspect(config_bases, scratch, base, data):
    config = json.loads((config_bases[base] / "config.json").read_text())
    mutated = data.draw(json_mutation(config))
    _open_and_inspect(_with_config(config_bases[base], scratch / f"cfg-{base}", dumps(mutated)))


@given(text=st.binary(max_size=64) | st.sampled_from([b"", b"[]", b"null", b"{", b"\xff\xfe{}", b'{"a": NaN}',
                                                      b"[" * 50_000]))
@fuzz_settings(40)
def test_config_arbitrary_text(config_bases, scratch, text):
    _open_and_inspect(_with_config(config_bases["llava15"], scratch / "cfg-text", text))


# ----------------------------------------------------------------------------------------- (d) images
IMAGES = sample_images()


def _load(image):
    from llava_gguf.runtime.images import load_image

    img = load_image(image)
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    return img


# FOUND (fixed in runtime/images.py load_image): Pillow opens a truncated animated GIF, then counting its
# frames (`getattr(img, "n_frames", 1)`, outside _open_bytes' error handling) raises IndexError or
# struct.error; a damaged TIFF raises TypeError("Missing dimensions") there. (The truncation lengths are
# those of the GIF Pillow writes for fuzz/seeds.py's sample; bin/fuzz's findings/ has the raw inputs.)
TIFF_MISSING_DIMENSIONS = bytes.fromhex(
    "49492a00080000000a0000010400010000001400000001010400010000000e00000002010300030080000000000003010300"
    "010000000100000006010300010010000200000011010400010000008c00000000000000000100000003000000160104001b"
    "0000000e00000900000001000000480300001c885441110c49c221c16c443f340888c751113504222a23c445b4e088c4a911"
    "1a56c223830c447768088fcdd11215d422463dc4453000cc2a0d1987034331189c")


@example(name="animated.gif", mutation=[("truncate", 0, 1144)], as_uri=False)  # IndexError
@example(name="animated.gif", mutation=[("truncate", 0, 1147)], as_uri=False)  # struct.error
@given(name=st.sampled_from(sorted(IMAGES)), mutation=steps, as_uri=st.booleans())
@fuzz_settings(250)
def test_image_mutations(name, mutation, as_uri):
    data = apply(IMAGES[name], mutation, *image_slots(IMAGES[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings have their own property below
        ends_well(_load, f"data:image/png;base64,{base64.b64encode(data).decode()}" if as_uri else data)


@example(TIFF_MISSING_DIMENSIONS)
@given(data=st.binary(max_size=128) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM",
                                                        b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]))
@fuzz_settings(100)
def test_image_arbitrary_bytes(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ends_well(_load, data)


@given(uri=st.text(max_size=40).map(lambda s: "data:" + s)
       | st.tuples(st.sampled_from(["data:image/png;base64,", "data:;base64,", "data:image/png,", "data:,"]),
                   st.text(alphabet="ABCDEFGHabcdefgh0123456789+/=%,; \n", max_size=40)).map("".join))
@fuzz_settings(100)
def test_image_data_uris(uri):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ends_well(_load, uri)


@given(name=st.sampled_from(sorted(IMAGES)), mutation=steps)
@fuzz_settings(150)
def test_image_mutations_warn_only_in_our_words(name, mutation):
    """Issue 23 item 12: Pillow's own warnings (DecompressionBombWarning, corrupt-EXIF UserWarning) reach the
    user as our one-line LlavaGgufWarning, never raw."""
    data = apply(IMAGES[name], mutation, *image_slots(IMAGES[name]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ends_well(_load, data)
    foreign = [f"{w.category.__name__}: {w.message}" for w in seen if not issubclass(w.category, LlavaGgufWarning)]
    assert not foreign, foreign
