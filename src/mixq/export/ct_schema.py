"""What a compressed-tensors directory can hold: the scheme of each mixq option, or why not.

compressed-tensors (the format vLLM, SGLang and transformers load) describes a quantized model
by `config_groups`: each group is one scheme (weight bits, type, symmetry, granularity and the
on-disk `format`) with the layers it targets. mixq maps an option onto a scheme only when the
runtime's dequantization gives exactly mixq's weights:

| mixq option | compressed-tensors scheme | runtime scheme (vLLM) |
| --- | --- | --- |
| `int4:gN`, `int8:gN`, `int4:ch`, `int8:ch` (sym) | `pack-quantized`, int, symmetric, group N / channel | WNA16 |
| `int4:gN:asym`, `int4:ch:asym` | `pack-quantized`, int, asymmetric (packed zero points) | WNA16 with zero points |
| `fp8_e4m3:ch` | `float-quantized`, float 8, channel | W8A16 FP8 |
| `nvfp4` | `nvfp4-pack-quantized`, float 4, tensor_group 16 | W4A16 FP4 |
| `bf16`, `fp16`, `fp32` | not quantized: in `ignore` | unquantized |

Symmetric INT: compressed-tensors dequantizes `q * scale` with q in [-2^(k-1), 2^(k-1) - 1]
and packs q + 2^(k-1) as an unsigned k-bit field. mixq's symmetric INT is `(code - 2^(k-1)) *
scale` with a *signed* scale that puts the largest-magnitude weight on -2^(k-1): so q = code -
2^(k-1), the stored field is mixq's code itself, and the scale is mixq's (negative where the
group's extreme is positive; every dequantization is a plain product, so the sign is kept).
Asymmetric: `(q - zp) * scale` with q = code - 2^(k-1), zp = zero - 2^(k-1), i.e. `(code -
zero) * scale`. FP8: the E4M3 bit patterns are torch's float8_e4m3fn. NVFP4: E2M1 nibbles,
E4M3 block scales, and compressed-tensors' global scale is the reciprocal of mixq's tensor
scale (`weight_scale / weight_global_scale`).

What is refused, with the reason: other bit widths and element types (vLLM's WNA16 takes 4 and
8 bits; its Marlin kernels take zero points at 4 bits only), per-tensor INT, a group size
that does not divide the input size, MX formats (not written yet), online transforms
(`+rotate`, `+smooth`, `+lowrank`: the runtime has no place for them; `--rotate-residual`
folds a rotation into the weights instead), quantized embeddings, heads and fused experts.
Fused projections share one scheme in vLLM (q/k/v -> qkv_proj, gate/up -> gate_up_proj: the
first shard's scheme is used for all), so `mixq plan --target compressed-tensors` ties them,
and an export checks it. vLLM also keeps one NVFP4 global scale per fused layer (the largest
shard's), while mixq's NVFP4 has a tensor scale per unit, so NVFP4 is offered to the fused
shards only when those scales agree (the planner does not offer it there).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixq.errors import ExportError
from mixq.formats import PER_CHANNEL, PER_TENSOR, GridFormat, IntFormat, MXFormat, NVFP4Format, PlainFormat
from mixq.option import Option, parse_option

TARGET = "compressed-tensors"
PACKED = "pack-quantized"
FLOAT8 = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
MIXED = "mixed-precision"

# roles that vLLM fuses into one layer, and the tie rule (mixq.planner.TIE_RULES) for them
FUSED_ROLES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
TARGET_TIES = ("qkv", "gate_up")

WNA16_BITS = (4, 8)
ZERO_POINT_BITS = (4,)


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors weight scheme (a `config_groups` entry without its targets).

    format: the group's on-disk format (`pack-quantized`, `float-quantized`,
    `nvfp4-pack-quantized`); num_bits, type ("int" | "float"), symmetric, strategy
    ("group" | "channel" | "tensor_group") and group_size (None for channel) as
    compressed-tensors' `QuantizationArgs` names them."""

    format: str
    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None = None

    def weights_args(self) -> dict:
        """The group's `weights` entry, with only the fields every compressed-tensors release
        reads (its `QuantizationArgs` forbids unknown keys)."""
        return {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
                "group_size": self.group_size, "strategy": self.strategy, "dynamic": False, "actorder": None}

    def describe(self) -> str:
        gran = f"group {self.group_size}" if self.group_size else self.strategy
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.type}{self.num_bits} {sym} {gran} ({self.format})"


def scheme_for(option: Option | str, shape: tuple[int, int], *, kind: str = "linear", role: str = "",
               transposed: bool = False) -> CTScheme | None:
    """The compressed-tensors scheme of a unit of `shape` (out, in) under `option`, None for a
    float option (the layer is listed in `ignore`); raises ExportError with the reason."""
    opt = parse_option(option)
    fmt = opt.fmt
    if isinstance(fmt, PlainFormat):
        return None
    if kind != "linear" or transposed:
        raise ExportError(f"compressed-tensors runtimes quantize Linear layers only (this unit is a {kind}"
                          + (", stored transposed" if transposed else "") + ")")
    if role == "lm_head":
        raise ExportError("vLLM keeps the head in float under compressed-tensors: quantize without --include-head")
    if opt.transforms:
        raise ExportError(f"{'+'.join(opt.transforms)} needs an online transform at run time, which compressed-"
                          "tensors cannot express (fold a residual rotation into the weights with "
                          "--rotate-residual instead)")
    in_dim = int(shape[1])
    if isinstance(fmt, IntFormat):
        k, g = fmt.code_bits, fmt.group_size
        if k not in WNA16_BITS:
            raise ExportError(f"int{k}: compressed-tensors' pack-quantized runtimes (vLLM WNA16) take "
                              f"{' or '.join(map(str, WNA16_BITS))} bits (nearest: int4 / int8)")
        if g == PER_TENSOR:
            raise ExportError("per-tensor INT is not a WNA16 scheme: use :ch or :gN")
        if g > 0 and in_dim % g:
            raise ExportError(f"group {g} does not divide the input size {in_dim} (compressed-tensors needs whole "
                              "groups)")
        if fmt.asym and k not in ZERO_POINT_BITS:
            raise ExportError(f"asymmetric int{k}: vLLM's kernels take zero points at 4 bits only (use int{k} "
                              "symmetric)")
        return CTScheme(PACKED, k, "int", not fmt.asym, "channel" if g == PER_CHANNEL else "group",
                        None if g == PER_CHANNEL else g)
    if isinstance(fmt, GridFormat):
        if fmt.element == "fp8_e4m3" and fmt.group_size == PER_CHANNEL:
            return CTScheme(FLOAT8, 8, "float", True, "channel")
        raise ExportError(f"{fmt}: compressed-tensors' FP8 runtimes take E4M3 with a scale per channel "
                          "(fp8_e4m3:ch); other scaled float grids have no scheme")
    if isinstance(fmt, NVFP4Format):
        if in_dim % 16:
            raise ExportError(f"nvfp4 needs an input size that is a multiple of 16, got {in_dim}")
        return CTScheme(NVFP4, 4, "float", True, "tensor_group", 16)
    if isinstance(fmt, MXFormat):
        raise ExportError(f"{fmt}: MX formats are not written to compressed-tensors yet (int4/int8, fp8_e4m3:ch "
                          "and nvfp4 are)")
    raise ExportError(f"{fmt}: no compressed-tensors scheme")


def unsupported_reason(option: Option | str, shape: tuple[int, int], *, kind: str = "linear", role: str = "",
                       transposed: bool = False, planning: bool = False) -> str | None:
    """Why `option` cannot be exported for a unit (None when it can). With `planning`, NVFP4
    on a fused shard is refused too: its tensor scale would have to equal its siblings'."""
    try:
        scheme = scheme_for(option, shape, kind=kind, role=role, transposed=transposed)
    except ExportError as e:
        return str(e)
    if planning and scheme is not None and scheme.format == NVFP4 and role in FUSED_ROLES:
        return ("nvfp4 on a fused projection: vLLM keeps one global scale per fused layer, mixq's NVFP4 has a "
                "tensor scale per unit")
    return None


def restrict_rows(rows: list[tuple[str, str, int, float]], units: list[dict],
                  keep: dict[str, str] | None = None) -> tuple[list[tuple[str, str, int, float]], dict[str, list[str]]]:
    """The sensitivity rows (unit, option, bits, error) compressed-tensors can hold, and
    {option: [reason]} of what was dropped. Raises ExportError naming the units left with no
    candidate (and the reasons of their candidates) or pinned by `keep` to an option the
    format cannot hold."""
    from mixq.planner import expand_pattern

    info = {u["name"]: u for u in units}

    def reason(name: str, option: str) -> str | None:
        u = info[name]
        return unsupported_reason(option, tuple(u["shape"]), kind=u.get("kind", "linear"), role=u.get("role", ""),
                                  planning=True)

    kept, dropped = [], {}
    for row in rows:
        why = reason(row[0], row[1])
        if why is None:
            kept.append(row)
        else:
            dropped.setdefault(row[1], [])
            if why not in dropped[row[1]]:
                dropped[row[1]].append(why)
    names = [u["name"] for u in units]
    bad_pins = []
    for pattern, opt in (keep or {}).items():
        for name in expand_pattern(pattern, names):
            why = reason(name, str(parse_option(opt)))
            if why:
                bad_pins.append(f"{name}={opt} ({why})")
    if bad_pins:
        raise ExportError(f"--keep pins {len(bad_pins)} unit(s) to options compressed-tensors cannot hold: "
                          + "; ".join(bad_pins[:4]) + (" ..." if len(bad_pins) > 4 else ""))
    pinned = {n for p in (keep or {}) for n in expand_pattern(p, names)}
    left = {r[0] for r in kept}
    stuck = [n for n in names if n not in left and n not in pinned]
    if stuck:
        reasons = sorted({f"{o}: {w[0]}" for o, w in dropped.items()})
        raise ExportError(f"{len(stuck)} unit(s) have no candidate compressed-tensors can hold ({', '.join(stuck[:4])}"
                          f"{' ...' if len(stuck) > 4 else ''}); the dropped candidates: " + "; ".join(reasons[:4])
                          + ". Analyse with int4/int8 groups that divide the input size, fp8_e4m3:ch or nvfp4")
    return kept, dropped
