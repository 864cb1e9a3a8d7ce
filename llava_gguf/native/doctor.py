"""`doctor`: what this installation runs on, established by looking, not assumed. `diagnose()` returns a
DoctorReport (rendered by cli/render.py; `to_json()` is `doctor --json`'s shape)."""
from __future__ import annotations

import importlib.metadata as md
import platform
import re
from dataclasses import asdict, dataclass, fields

from llava_gguf.native import library as native
from llava_gguf.native.probe import probe_cls_fix
from llava_gguf.settings import VERSION as __version__


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def parse_system_info(info: str) -> dict[str, dict[str, bool]]:
    """llama_print_system_info's `CPU : AVX = 1 | ...` into {"CPU": {"AVX": True, ...}}."""
    out: dict[str, dict[str, bool]] = {}
    backend = None
    for part in info.split("|"):
        part = part.strip()
        m = re.match(r"^(?:(\S+) : )?(\S+) = (\S+)$", part)
        if not m:
            continue
        if m[1]:
            backend = m[1]
        out.setdefault(backend or "?", {})[m[2]] = m[3] not in ("0", "")
    return out


@dataclass(frozen=True)
class Device:
    """One of ggml's backend devices in the loaded build."""

    name: str
    description: str
    type: str  # cpu | gpu | igpu | accel | other


@dataclass(frozen=True)
class DoctorReport:
    """What `doctor` found. The fields' order is the JSON's key order and the text's line order."""

    llava_gguf: str
    python: str
    platform: str
    llama_cpp_python: str | None
    gguf: str | None
    transformers: str | None
    torch: str | None
    llama_cpp_lib_path: str
    mtmd_lib_path: str
    mtmd_variant: str
    tools_path: str | None
    llava_fix: bool  # what the loaded libmtmd does (native/probe.py), not what its path suggests
    llava_fix_detail: str
    gpu_offload: bool
    llm_backend: str  # gpu | cpu
    vision_backend: str  # gpu | cpu
    devices: tuple[Device, ...]
    cpu_features: tuple[str, ...]  # the CPU backend's features that are on, sorted
    system_info: str  # llama_print_system_info, whole (only in the JSON: the text shows cpu_features)

    def to_json(self) -> dict:
        """`doctor --json`: every field by name, the devices as {name, description, type} objects."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["devices"] = [asdict(d) for d in self.devices]
        out["cpu_features"] = list(self.cpu_features)
        return out


def diagnose() -> DoctorReport:
    libs = native.configure()
    lc = native.llama_cpp()
    fixed, detail = probe_cls_fix()
    info = lc.llama_print_system_info().decode(errors="replace")
    features = parse_system_info(info)
    devices = native.backend_devices()
    gpu = bool(lc.llama_supports_gpu_offload())
    return DoctorReport(
        llava_gguf=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        llama_cpp_python=_version("llama-cpp-python") or _version("llama_cpp_python"),
        gguf=_version("gguf"),
        transformers=_version("transformers"),
        torch=_version("torch"),
        llama_cpp_lib_path=str(libs.lib_dir),
        mtmd_lib_path=str(libs.mtmd_dir),
        mtmd_variant=libs.variant,
        tools_path=str(libs.tools_dir) if libs.tools_dir else None,
        llava_fix=fixed,
        llava_fix_detail=detail,
        gpu_offload=gpu,
        llm_backend="gpu" if gpu else "cpu",
        vision_backend="gpu" if gpu else "cpu",
        devices=tuple(Device(d["name"], d["description"], d["type"]) for d in devices),
        cpu_features=tuple(sorted(k for k, v in features.get("CPU", {}).items() if v)),
        system_info=info.strip(),
    )
