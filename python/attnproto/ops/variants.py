"""Attention variants (Prototype 7) as compile-time policies: what a call asks for, checked once.

A variant has two halves:

* :class:`Variant` — the compile-time part (hashable; in :class:`~attnproto.ops.problem.ProblemSpec`
  and in every kernel's constants): which RoPE pairing and where its cos/sin come from, which
  ALiBi slopes, whether a sliding window and a logit soft cap are applied. Each field becomes
  one kernel constant (:meth:`Variant.constants`): ROPE, ROPE_TABLE, ALIBI, WINDOW, SOFTCAP.
* :class:`VariantValues` — the run-time values (the window length, the cap, theta, the RoPE
  position offset) that go into AttentionParams, and the device buffers (cos/sin tables,
  caller slopes) passed as kernel arguments.

Semantics are those of :func:`attnproto.ref.attention` (the FP64 reference): scores are
scaled, soft-capped (cap * tanh(s / cap)), biased by ALiBi (-slope_h |pos_q - pos_k|) and
masked (causal, then the left window: query at position p sees keys j > p - window). RoPE
rotates Q row i at position rope_offset + i + Nkv - Nq and K row j at rope_offset + j.

A family says which features it takes (:attr:`Family.variant_features`); a call asking for
another is refused with the argument's name and the reason (AC-5.5), and the kernels
``static_assert`` the combinations they cannot build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .. import ref as _ref
from .. import validate as _v

__all__ = [
    "BASE",
    "FEATURES",
    "VARIANT_SPECIALISATIONS",
    "Variant",
    "VariantValues",
    "buffer_args",
    "check_variant",
    "rope_tables",
]

#: RoPE pairing -> ROPE constant (0: no RoPE).
ROPE_CODES = {None: 0, "half": 1, "interleaved": 2}
#: Where the cos/sin of RoPE come from -> ROPE_TABLE constant.
ROPE_SOURCES = {"computed": 0, "table": 1}
#: ALiBi slopes -> ALIBI constant (0: no ALiBi).
ALIBI_CODES = {None: 0, "standard": 1, "slopes": 2}
#: The feature names families list in ``variant_features``.
FEATURES = ("rope_half", "rope_interleaved", "rope_table", "rope_computed",
            "alibi_standard", "alibi_slopes", "window", "softcap")
#: The keyword arguments of the front door that describe a variant.
KEYWORDS = ("rope", "rope_theta", "rope_offset", "rope_table", "alibi", "alibi_max_bias",
            "window", "softcap")
#: Window lengths are 32-bit in AttentionParams (and positions are 32-bit in the kernels).
MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class Variant:
    """The compile-time part of a variant (the base kernel: every field at its default)."""

    rope: Optional[str] = None        # None, "half" (Llama / NeoX) or "interleaved" (GPT-J)
    rope_source: str = "computed"     # "computed" in the kernel or "table" ([max_pos, D/2] cos/sin)
    alibi: Optional[str] = None       # None, "standard" (2^(-max_bias (h+1) / Hq)) or "slopes" (given)
    window: bool = False              # a left sliding window (its length is a run-time value)
    softcap: bool = False             # a logit soft cap (its value is a run-time value)

    @property
    def is_base(self) -> bool:
        return self == BASE

    def features(self) -> Tuple[str, ...]:
        """The feature names this variant needs (see :data:`FEATURES`)."""
        out = []
        if self.rope is not None:
            out += [f"rope_{self.rope}", f"rope_{self.rope_source}"]
        if self.alibi is not None:
            out.append(f"alibi_{self.alibi}")
        if self.window:
            out.append("window")
        if self.softcap:
            out.append("softcap")
        return tuple(out)

    def constants(self) -> Dict[str, int]:
        """The kernel constants (every CUDA flash kernel takes all five)."""
        return {"ROPE": ROPE_CODES[self.rope],
                "ROPE_TABLE": ROPE_SOURCES[self.rope_source] if self.rope is not None else 0,
                "ALIBI": ALIBI_CODES[self.alibi], "WINDOW": int(self.window), "SOFTCAP": int(self.softcap)}

    @property
    def label(self) -> str:
        """e.g. "base", "rope-half-table+alibi+window"."""
        parts = []
        if self.rope is not None:
            parts.append(f"rope-{self.rope}-{self.rope_source}")
        if self.alibi is not None:
            parts.append("alibi" if self.alibi == "standard" else "alibi-slopes")
        if self.window:
            parts.append("window")
        if self.softcap:
            parts.append("softcap")
        return "+".join(parts) or "base"


BASE = Variant()

#: The variants every CUDA flash family NVRTC-compiles in CI (its ``specialisations()``): each
#: feature alone, Gemma 2 (rotate-half RoPE + window + soft cap) and everything at once (both
#: cos/sin sources and both slope sources between the two). Llama's variant is rotate-half RoPE
#: alone: its causal mask and GQA are not variant constants (the families compile it causal).
VARIANT_SPECIALISATIONS: Tuple[Variant, ...] = (
    Variant(rope="half"),
    Variant(rope="interleaved"),
    Variant(rope="half", rope_source="table"),
    Variant(rope="interleaved", rope_source="table"),
    Variant(alibi="standard"),
    Variant(alibi="slopes"),
    Variant(window=True),
    Variant(softcap=True),
    Variant(rope="half", window=True, softcap=True),
    Variant(rope="half", rope_source="table", alibi="slopes", window=True, softcap=True),
    Variant(rope="interleaved", alibi="standard", window=True, softcap=True),
)


@dataclass(frozen=True)
class VariantValues:
    """Run-time values of a variant: AttentionParams fields and the buffers the kernel reads."""

    rope_theta: float = _ref.DEFAULT_ROPE_THETA
    rope_offset: int = 0
    rope_cos: Any = None          # float32 [rope_table_len, D/2] (ROPE_TABLE) on q's device
    rope_sin: Any = None
    alibi_max_bias: float = _ref.DEFAULT_ALIBI_MAX_BIAS
    alibi_slopes: Any = None      # float32 [Hq] (ALIBI = slopes) on q's device
    window: int = 0               # 0: no window
    softcap: float = 0.0          # 0: no cap

    @property
    def rope_table_len(self) -> int:
        return 0 if self.rope_cos is None else int(self.rope_cos.shape[0])

    def params(self) -> Dict[str, Any]:
        """The AttentionParams fields of these values (attnproto.params.make_params keywords)."""
        return dict(rope_theta=self.rope_theta, rope_offset=self.rope_offset,
                    rope_table_len=self.rope_table_len, alibi_max_bias=self.alibi_max_bias,
                    window=self.window, softcap=self.softcap)

    def host_kwargs(self, variant: Variant) -> Dict[str, Any]:
        """Keyword arguments of :func:`attnproto.ref.attention` / :func:`attnproto.cpu.flash_forward`."""
        return dict(rope=variant.rope or False, rope_theta=self.rope_theta, rope_offset=self.rope_offset,
                    alibi=variant.alibi is not None, alibi_max_bias=self.alibi_max_bias,
                    alibi_slopes=self.alibi_slopes if variant.alibi == "slopes" else None,
                    window=self.window or None, softcap=self.softcap or None)


#: Index of the ALiBi slopes in :func:`buffer_args` (the paged decode kernel takes that one alone).
BUFFER_ALIBI_SLOPES = 2


def buffer_args(values: Optional[VariantValues]) -> list:
    """The variant buffer arguments the CUDA flash kernels take last: rope_cos, rope_sin,
    alibi_slopes (null pointers where the variant reads none; all null for None)."""
    import numpy as np  # noqa: PLC0415

    null = np.uint64(0)
    if values is None:
        return [null, null, null]
    return [null if x is None else x for x in (values.rope_cos, values.rope_sin, values.alibi_slopes)]


def _check_buffer(x: Any, name: str, shape: Tuple[int, ...], q: Any, location: str) -> None:
    info = _v.tensor_info(x, name)
    if info.dtype != "float32":
        raise TypeError(f"{name}: expected float32, got {info.dtype}")
    if tuple(info.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(info.shape)}")
    if location == "cuda":
        if getattr(x, "device", None) != getattr(q, "device", None):
            raise ValueError(f"{name}: on {getattr(x, 'device', 'the host')}, q is on {q.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (strides {tuple(x.stride())})")


def check_variant(q: Any, shape: _v.AttentionShape, location: str, *, rope: Any = None,
                  rope_theta: Any = _ref.DEFAULT_ROPE_THETA, rope_offset: Any = 0, rope_table: Any = None,
                  alibi: Any = False, alibi_max_bias: Any = _ref.DEFAULT_ALIBI_MAX_BIAS,
                  window: Any = None, softcap: Any = None) -> Tuple[Variant, VariantValues]:
    """The (Variant, VariantValues) of a call; TypeError/ValueError naming the argument.

    ``rope``: None/False, True or "half", "interleaved". ``rope_table``: None (cos/sin computed in
    the kernel) or (cos, sin), float32 [L, D/2] on q's device with L >= rope_offset + Nkv
    (:func:`rope_tables` builds them). ``alibi``: False, True (standard slopes from
    ``alibi_max_bias``) or the slopes, float32 [Hq] on q's device. ``window``: None or a positive
    int. ``softcap``: None or a positive float.
    """
    style = _ref.rope_style(rope)
    values: Dict[str, Any] = {}
    rope_source = "computed"
    if style is None:
        if rope_table is not None:
            raise ValueError("rope_table: given without rope (pass rope='half' or 'interleaved')")
    else:
        if shape.head_dim % 2:
            raise ValueError(f"rope: RoPE needs an even head_dim, got {shape.head_dim}")
        values["rope_theta"] = _v.check_real(rope_theta, "rope_theta", positive=True)
        offset = _v.check_nonnegative_int(rope_offset, "rope_offset")
        if offset + shape.seq_kv > MAX_WINDOW:
            raise ValueError(f"rope_offset: positions up to {offset + shape.seq_kv} exceed {MAX_WINDOW}")
        if offset + shape.seq_kv - shape.seq_q < 0:
            raise ValueError(f"rope_offset: query 0 would sit at position {offset + shape.seq_kv - shape.seq_q} "
                             f"(< 0): with Nq = {shape.seq_q} > Nkv = {shape.seq_kv} give rope_offset >= "
                             f"{shape.seq_q - shape.seq_kv}")
        values["rope_offset"] = offset
        if rope_table is not None:
            if not isinstance(rope_table, (tuple, list)) or len(rope_table) != 2:
                raise TypeError(f"rope_table: expected (cos, sin), got {type(rope_table).__name__}")
            cos, sin = rope_table
            cos_shape = tuple(_v.tensor_info(cos, "rope_table[0]").shape)
            rows = int(cos_shape[0]) if cos_shape else 0
            for x, name in ((cos, "rope_table[0]"), (sin, "rope_table[1]")):
                _check_buffer(x, name, (rows, shape.head_dim // 2), q, location)
            if rows < offset + shape.seq_kv:
                raise ValueError(f"rope_table: {rows} positions, the call needs {offset + shape.seq_kv} "
                                 f"(rope_offset {offset} + Nkv {shape.seq_kv})")
            values["rope_cos"], values["rope_sin"] = cos, sin
            rope_source = "table"
    alibi_mode = None
    if alibi is True:
        alibi_mode = "standard"
        values["alibi_max_bias"] = _v.check_real(alibi_max_bias, "alibi_max_bias")
    elif alibi is not False and alibi is not None:
        _check_buffer(alibi, "alibi", (shape.num_heads,), q, location)
        alibi_mode = "slopes"
        values["alibi_slopes"] = alibi
    if window is not None:
        w = _v.check_positive_int(window, "window")
        if w > MAX_WINDOW:
            raise ValueError(f"window: {w} exceeds {MAX_WINDOW}")
        # A window of Nkv or more hides no key (every query position is < Nkv); the clamp keeps the
        # kernels' 32-bit position - window arithmetic far from overflow.
        values["window"] = min(w, max(1, shape.seq_kv))
    if softcap is not None:
        values["softcap"] = _v.check_real(softcap, "softcap", positive=True)
    variant = Variant(rope=style, rope_source=rope_source, alibi=alibi_mode, window=window is not None,
                      softcap=softcap is not None)
    return variant, VariantValues(**values)


def rope_tables(max_pos: int, head_dim: int, theta: float = _ref.DEFAULT_ROPE_THETA, *, device: Any = "cuda"):
    """(cos, sin) float32 [max_pos, D/2] torch tensors: cos[p, i] = cos(p theta^(-2i/D)), computed in
    float64 and rounded once (what the ROPE_TABLE kernels read)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    max_pos = _v.check_positive_int(max_pos, "max_pos")
    angle = np.arange(max_pos, dtype=np.float64)[:, None] * _ref.rope_frequencies(head_dim, theta)[None, :]
    return (torch.from_numpy(np.cos(angle).astype(np.float32)).to(device),
            torch.from_numpy(np.sin(angle).astype(np.float32)).to(device))
