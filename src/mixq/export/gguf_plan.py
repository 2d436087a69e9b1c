"""What a GGUF file can hold of a plan, and the plan in llama.cpp's own terms.

A GGUF tensor is one GGML type over plain weights: an option exports when its quantizer is
round to nearest or GPTQ (both leave plain codes), it has no transform (llama.cpp runs no
rotation, smoothing or low-rank branch), its format *is* a GGML type (`formats.gguf.
ggml_type_of`: the GGUF formats, `int4:g32` = Q4_0, `int5:g32` = Q5_0, fp16/bf16/fp32) and the
unit's rows fit the type's blocks. `gguf_refusal` says why an option does not; the exporter
refuses a plan with any such unit, naming the units and the nearest GGUF types, and
`mixq plan --target gguf` offers only options that export.

`tensor_name` maps a unit (a Hugging Face module name) to its GGUF tensor name with the
`gguf` package's own table; `llama_quantize_args` writes a plan as llama-quantize's
`--tensor-type` overrides (anchored regular expressions, one per role and type).
"""

from __future__ import annotations

from collections import defaultdict

from mixq.formats.gguf import TYPES, ggml_type_of, nearest_ggml
from mixq.option import Option, parse_option


def gguf_refusal(option: Option | str, shape: tuple[int, int]) -> str | None:
    """None when a unit of `shape` under `option` can be stored in a GGUF tensor as it is,
    else the reason it cannot."""
    opt = parse_option(option)
    if opt.transforms:
        return (f"{opt} carries {'+'.join(opt.transforms)}, which llama.cpp does not run (GGUF stores plain "
                "weights)")
    if ggml_type_of(opt.fmt) is None:
        return f"{opt.format} is not a GGML type (GGUF types: {', '.join(TYPES)}, int4:g32, int5:g32, fp16, bf16, fp32)"
    why = opt.fmt.supports(tuple(shape))
    return why


def refusal_message(bad: dict[str, tuple[Option, tuple[int, int], str]], max_listed: int = 6) -> str:
    """One message for units that cannot export: each with its option, the reason, and the
    nearest GGUF types its shape can take."""
    parts = []
    for name, (opt, shape, why) in list(bad.items())[:max_listed]:
        near = nearest_ggml(opt.fmt, shape)
        parts.append(f"{name} ({opt}): {why}; nearest GGUF types: {', '.join(near)}")
    more = f" (and {len(bad) - max_listed} more)" if len(bad) > max_listed else ""
    return (f"{len(bad)} unit(s) cannot be stored in a GGUF file: " + "; ".join(parts) + more
            + ". Plan with --target gguf to choose only GGUF types, or quantize these units again")


def tensor_name(unit: str, n_blocks: int, arch: str = "llama") -> str:
    """The GGUF tensor name of a unit's weight (e.g. model.layers.3.self_attn.q_proj ->
    blk.3.attn_q.weight)."""
    from mixq.errors import MixqError

    name = _name_map(arch, n_blocks).get_name(unit + ".weight", try_suffixes=(".weight", ".bias"))
    if name is None:
        raise MixqError(f"unit {unit!r} has no GGUF tensor name for architecture {arch!r}")
    return name


_MAPS: dict = {}


def _name_map(arch: str, n_blocks: int):
    import gguf

    key = (arch, n_blocks)
    if key not in _MAPS:
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        _MAPS[key] = gguf.get_tensor_name_map(arch_id, n_blocks)
    return _MAPS[key]


def llama_quantize_args(plan, arch: str = "llama", embedding_type: str = "f16") -> list[str]:
    """llama-quantize arguments that give every planned unit its GGML type: one
    `--tensor-type 'REGEX=TYPE'` per (role, type), the regex anchored on the blocks that take
    the type; embeddings and head at `embedding_type`. Every option must export
    (`gguf_refusal`); raises MixqError naming the units that do not."""
    from mixq.errors import MixqError

    bad = {n: (o, plan.shapes[n], why) for n, o in plan.options.items()
           if (why := gguf_refusal(o, plan.shapes[n])) is not None}
    if bad:
        raise MixqError(refusal_message(bad))
    n_blocks = 1 + max((_block_of(n) for n in plan.options), default=0)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    whole: list[tuple[str, str]] = []
    for unit, opt in plan.options.items():
        name = tensor_name(unit, n_blocks, arch)
        ggml = ggml_type_of(opt.fmt).lower()
        if name.startswith("blk."):
            block, role = name.split(".", 2)[1:]
            groups[(role, ggml)].append(int(block))
        else:
            whole.append((name, ggml))
    args = []
    for (role, ggml), blocks in sorted(groups.items()):
        alt = "|".join(str(b) for b in sorted(blocks))
        args += ["--tensor-type", f"^blk\\.({alt})\\.{role.replace('.', chr(92) + '.')}$={ggml}"]
    for name, ggml in sorted(whole):
        args += ["--tensor-type", f"^{name.replace('.', chr(92) + '.')}$={ggml}"]
    return ["--token-embedding-type", embedding_type, "--output-tensor-type", embedding_type, *args]


def base_type(plan) -> str:
    """The most frequent GGML type of a plan (llama-quantize's positional type: overrides only
    apply over a quantized base type)."""
    counts: dict[str, int] = defaultdict(int)
    for opt in plan.options.values():
        t = ggml_type_of(parse_option(opt).fmt)
        if t is not None and t not in ("F16", "BF16", "F32"):
            counts[t] += 1
    return max(sorted(counts), key=lambda t: counts[t]) if counts else "Q8_0"


def _block_of(unit: str) -> int:
    for part in unit.split("."):
        if part.isdigit():
            return int(part)
    return 0
