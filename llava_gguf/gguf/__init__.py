"""GGUF files without llama_cpp or torch: the lowest layer above errors/settings.

    layout.py          the walk, as gguf.cpp reads a file: structure, key types and places, tensor infos;
                       Defect (the typed record of every rule) and the structure's defects
    header.py          GGUFHeader: a walked file's header bytes, values decoded on demand (no gguf-py)
    info.py            GGUFInfo: what the runtime reads (widths, template, geometry, KV-cache numbers);
                       open_gguf, the gguf-py reader kept for tensor data (repair, LLaVA-1.6's image_newline)
    classify.py        LLM or mmproj, its type, and the one "is it quantized" rule; llama.cpp's file types
    pairing.py         the one LLM <-> mmproj pairing policy (runtime, quality/imatrix, quantize)
    key_checks.py      the keys a loader reads, checked for presence and type (shared by the two below)
    llm_defects.py     what makes llama.cpp refuse or abort on an LLM
    mmproj_defects.py  what makes libmtmd refuse, abort on or miscompute an mmproj
    vocab_defects.py   duplicate tokens (vectorised over the header bytes) and an unusable chat template
    defects.py         the load gate: every defect of a file, require_loadable
    inspect.py         GGUFReport, the typed `inspect` report (to_json() is its JSON)
    repair.py          rewriting an mmproj's repairable defects
    chat_template.py   the one Jinja environment templates are compiled in
    outputs.py         atomic, exclusive outputs (OutputSet, atomic_outputs)
    output_errors.py   a failed write as one line (errno, a native writer's lost errno, the lock holder)
"""
