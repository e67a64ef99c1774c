"""The forward with DefT's patch + halo staging (issue 15): a hand-scheduled TIR kernel on tensor cores.

``deft_tvm.compute.forward``'s convolution as a GEMM ``[out_channels] x [positions]`` reduced over
``(in_channels, kernel taps)``, fused as in ``cuda_tensorcore``, but the samples come from a patch
of the input in shared memory instead of gathers from L2 (DefT, ASPLOS'23, section 4: "the input
region a tile samples is loaded once"; its halo from the offset statistics,
``tuning.stats.halo_coverage``):

* a thread block owns one output tile (``tile_h x tile_w`` positions of one image) and ``o_tile``
  output channels. It first tabulates its sampling points ``[tap][position]``: per corner a byte
  offset into the patch (a corner outside the image: the patch's zero run; inside the image but
  outside the patch: one of ``overflow`` slots while they last, else the global path) and its weight
  (bilinear x mask; NaN for a NaN point, zero outside the image, as torchvision's
  ``bilinear_interpolate``);
* per chunk of ``chunk`` input channels it copies the tile's receptive field plus ``halo`` px on
  each side (the *patch*, channels last, zeros outside the image), the overflow slots' pixels and
  every tap's weights ``[tap][o_tile][chunk]`` into shared memory in 16-byte ``cp.async`` runs;
* then every tap's columns ``[tap][position][chunk]``: each thread takes (tap, position, 16 bytes of
  channels) triples, blends the four corners' 16-byte runs from shared memory (packed float16 /
  bfloat16 multiply-adds, float32 for TF32) and adds the rare global-path corners (``__ldg``);
* then each warp multiplies its ``m_tiles`` m16 (output channels) x ``n_tiles`` n8 (positions) tiles
  with ``mma.sync`` (``cuda_mma``: float16, bfloat16 m16n8k16, float32 on TF32 m16n8k8), operands
  loaded by ``ldmatrix``, float32 sums in registers: three barriers per chunk; at the end it writes
  ``output[n, o, y, x]`` (+ bias, cast to the spec's dtype).

With ``columns="registers"`` no columns are staged: per tap each warp interpolates its positions'
B fragments straight into the mma's registers (each lane the two 4-byte words of channels the
fragment layout gives it, from the same table entry and in the same order of corners, so the same
values) and multiplies them: no columns buffer and two barriers per chunk (the staging's), at the
cost of 4-byte instead of 16-byte shared-memory reads, repeated by each warp along output channels.

With ``k_splits`` > 1 (split-K, for wide layers on small maps) the channel chunks are split over that
many blocks per tile: each writes its float32 sums to TVM's device workspace and a second kernel
adds the splits in order with the bias (no atomics: deterministic).

Applies to one-group layers with one offset group, channels last (``layout="NHWC"``: the op's
tensor-core layout), input channels in multiples of ``chunk`` and output channels of ``o_tile``
(``supports``). NaN sampling points give NaN, points outside the image zero; every read is in bounds
whatever the offsets. Past 48 KB a block's shared memory is one dynamic buffer (up to
``DYNAMIC_SHARED_BYTES``). Not yet called by the op: ``tools/patch_forward_bench.py`` measures it."""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from deft_tvm.compute.sampling import index_extents
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda_backward_fused import (
    DTYPE_BYTES,
    DYNAMIC_SHARED_BYTES,
    SHARED_BYTES,
    SM_SHARED_BYTES,
    device_call,
    without_parameters,
)
from deft_tvm.schedules.cuda_mma import c_element, mma_shape

# The default tiling's budget: two blocks in an sm_90 SM, 1 KB of it reserved per block.
BLOCK_SHARED_BYTES = SM_SHARED_BYTES // 2 - 1024
RUN_BYTES = 16  # a thread's loads and stores of channels: one 16-byte access
# Threads per SM the kernel is launched for (``__launch_bounds__``, in whole blocks, at least one): up to
# 168 registers per thread.
RESIDENT_THREADS = 384
ROW_PAD_BYTES = 16  # shared operand rows are padded by 16 bytes: conflict-free fragment loads
SUM_THREADS = 256  # threads per block of split-K's sum of the partial sums
TABLE_BYTES = 32  # a sampling point's four corner offsets (int32) and weights (float32)
COLUMNS = ("shared", "registers")  # PatchTiling.columns
FRAGMENT_WORD_BYTES = 16  # a lane's two 4-byte words of a B fragment lie 16 bytes apart (cuda_mma)
# per dtype of 2 bytes: the packed pair type, one float -> both halves of a pair
_PAIRS = {"float16": ("__half2", "__float2half2_rn"), "bfloat16": ("__nv_bfloat162", "__float2bfloat162_rn")}


@dataclasses.dataclass(frozen=True)
class PatchTiling:
    """A block's output tile (px), halo (px), output channels and channels per stage, its warps
    along output channels x positions, and its overflow slots: pixels outside the patch that its
    samples' corners take (inside the image), staged beside the patch while they last."""

    tile_h: int = 8
    tile_w: int = 16
    halo: int = 2
    o_tile: int = 64
    chunk: int = 16
    warps_o: int = 2
    warps_p: int = 2
    overflow: int = 128
    columns: str = "shared"  # where the columns are interpolated: "shared" (every tap's) or "registers"
    k_splits: int = 1  # blocks the channel chunks are split over (split-K: float32 partial sums, then their sum)

    @property
    def threads(self) -> int:
        return 32 * self.warps_o * self.warps_p

    @property
    def positions(self) -> int:
        return self.tile_h * self.tile_w

    def patch(self, spec: DeformConvSpec) -> tuple[int, int]:
        """(rows, columns) of the patch: the tile's receptive field plus the halo on each side and one
        more row / column for the bilinear high corner (``DataTiling.patch``'s, whose coverage
        ``tuning.stats.halo_coverage`` tabulates)."""
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        return ((self.tile_h - 1) * sh + (spec.kernel_h - 1) * dh + 2 * self.halo + 2,
                (self.tile_w - 1) * sw + (spec.kernel_w - 1) * dw + 2 * self.halo + 2)

    def regions(self, spec: DeformConvSpec) -> dict[str, int]:
        """Byte offsets of the block's shared-memory regions, in order, and its size (``"end"``): the
        sampling-point table (``TABLE_BYTES`` per tap and position), the overflow slots' pixels and
        their count, the patch with its zero run and overflow slots, every tap's weights, every
        tap's columns (none with ``columns="registers"``); each a multiple of 16 bytes."""
        item = DTYPE_BYTES[spec.dtype]
        rows, cols = self.patch(spec)
        row = self.chunk * item + ROW_PAD_BYTES
        taps = spec.kernel_h * spec.kernel_w
        sizes = {"table": TABLE_BYTES * taps * self.positions, "slot_pixels": 4 * self.overflow + 16,
                 "patch": (rows * cols + 1 + self.overflow) * self.chunk * item, "weights": taps * self.o_tile * row,
                 "columns": taps * self.positions * row if self.columns == "shared" else 0}
        offsets, end = {}, 0
        for name, size in sizes.items():
            offsets[name], end = end, end + size
        return {**offsets, "end": end}

    def shared_bytes(self, spec: DeformConvSpec) -> int:
        """The block's shared memory (``regions``)."""
        return self.regions(spec)["end"]

    def dynamic(self, spec: DeformConvSpec) -> bool:
        """Whether the block's shared memory is one dynamic buffer (past 48 KB)."""
        return self.shared_bytes(spec) > SHARED_BYTES

    @classmethod
    def for_spec(cls, spec: DeformConvSpec, halo: int = 2, columns: str = "shared") -> "PatchTiling":
        """The default: 64 output channels, 32 bytes of channels per stage, 8 x 16 tiles, or 8 x 8
        where two blocks of 8 x 16 would not fit an SM (``BLOCK_SHARED_BYTES``); 2 x 2 warps, with
        ``columns="registers"`` 8 x 8 tiles on 1 x 4 (each position's fragments interpolated by
        one warp, two n8 tiles per warp: four spill on 8 x 16)."""
        if columns == "registers":
            return cls(tile_h=8, tile_w=8, halo=halo, chunk=32 // DTYPE_BYTES[spec.dtype], warps_o=1, warps_p=4,
                       columns=columns)
        tilings = [cls(tile_h=8, tile_w=w, halo=halo, chunk=32 // DTYPE_BYTES[spec.dtype]) for w in (16, 8)]
        return next((t for t in tilings if t.shared_bytes(spec) <= BLOCK_SHARED_BYTES), tilings[-1])


def supports(spec: DeformConvSpec, tiling: PatchTiling) -> str | None:
    """Why ``tiling`` cannot run ``spec`` (None where it can)."""
    mma = mma_shape(spec)
    if mma is None:
        return f"{spec.dtype}{' on TF32' * spec.tf32} has no tensor-core mma here (float16, bfloat16, TF32)"
    if spec.groups != 1 or spec.offset_groups != 1:
        return f"groups {spec.groups}, offset groups {spec.offset_groups}: one of each is supported"
    if spec.layout != "NHWC":
        return f"layout {spec.layout}: the patch is staged channels last (NHWC)"
    item = DTYPE_BYTES[spec.dtype]
    if tiling.chunk % mma.k or tiling.chunk * item % RUN_BYTES or spec.in_channels % tiling.chunk:
        return (f"chunk {tiling.chunk} must be a multiple of the mma depth {mma.k} and of {RUN_BYTES} bytes and "
                f"divide the {spec.in_channels} input channels")
    if tiling.o_tile % (16 * tiling.warps_o) or spec.out_channels % tiling.o_tile:
        return (f"o_tile {tiling.o_tile} must be a multiple of 16 x {tiling.warps_o} warps and divide the "
                f"{spec.out_channels} output channels")
    if tiling.positions % (16 * tiling.warps_p):  # ldmatrix.x4 loads the n8 tiles of B in pairs
        return f"{tiling.positions} positions per tile are not a multiple of 16 x {tiling.warps_p} warps"
    if tiling.columns not in COLUMNS:
        return f"columns {tiling.columns!r}: one of {', '.join(COLUMNS)}"
    if tiling.k_splits < 1 or spec.in_channels // tiling.chunk % tiling.k_splits:
        return (f"k_splits {tiling.k_splits} must divide the {spec.in_channels // tiling.chunk} chunks of "
                f"{tiling.chunk} channels")
    if tiling.overflow % 4:
        return f"{tiling.overflow} overflow slots are not a multiple of 4 (16-byte regions)"
    if tiling.shared_bytes(spec) > DYNAMIC_SHARED_BYTES:
        return f"{tiling.shared_bytes(spec)} bytes of shared memory, more than {DYNAMIC_SHARED_BYTES}"
    return None


def _copy_run(destination, source):
    """An asynchronous 16-byte copy from global to shared memory (``cp.async.cg``; ``_copies_done``
    waits for a thread's copies)."""
    return device_call("deft_copy_run16_async", "void* d, const void* s",
                       'asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n" :: '
                       '"r"(static_cast<unsigned>(__cvta_generic_to_shared(d))), "l"(s) : "memory");',
                       destination, source)


def _copies_done():
    return device_call("deft_copies_done", "", 'asm volatile("cp.async.wait_all;\\n" ::: "memory");')


def _zero_run(destination):
    return device_call("deft_zero_run16", "void* d", "*reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);",
                       destination)


def _accumulate(dtype: str, first: bool, words: int) -> str:
    """C statements adding ``w * u`` to ``o`` (``words`` 4-byte words: ``float2`` / ``float4`` for
    float32, else ``uint2`` / ``uint4`` of packed pairs: ``__hmul2`` / ``__hfma2``, the weight rounded
    to the type, as torchvision interpolates in the input's type) for the corner's words ``u`` (same
    type) and weight ``w`` (float); ``first``: ``o = w * u``."""
    if dtype == "float32":
        return " ".join(f"o.{c} = {'' if first else f'o.{c} + '}w * u.{c};" for c in "xyzw"[:words])
    pair, splat = _PAIRS[dtype]
    step = "__hmul2(wp, h[i])" if first else "__hfma2(wp, h[i], q[i])"
    return (f"{{ const {pair}* h = reinterpret_cast<const {pair}*>(&u); {pair}* q = reinterpret_cast<{pair}*>(&o); "
            f"const {pair} wp = {splat}(w); _Pragma(\"unroll\") for (int i = 0; i < {words}; ++i) q[i] = {step}; }}")


def _blend(dtype: str, words: int, name: str, destination, corners, weights, source, zero_run: int, image,
           pixel_bytes: int):
    """The inline function ``name`` that blends ``words`` 4-byte words of a column (4: one 16-byte
    run; 2: a lane's two words of a B fragment, ``FRAGMENT_WORD_BYTES`` apart, ``cuda_mma``) from its
    sampling point's table entry: four corner offsets at ``corners`` (int32, shared memory: a byte
    offset from ``source`` into the patch, its zero run or an overflow slot, or ``-(pixel + 1)`` for a
    corner on the global path) and their weights at ``weights`` (float32). The shared-memory corners
    are blended first (a global one read as the zero run, ``zero_run`` bytes on), then the global ones
    added, read ``pixel_bytes`` apart from ``image`` (the image's first pixel at these channels)."""
    vector = ("float" if dtype == "float32" else "uint") + str(words)
    word = "float" if dtype == "float32" else "unsigned"

    def load(at: str, get: str) -> str:
        if words == 4:
            return f"const {vector} u = {get}(reinterpret_cast<const {vector}*>({at}));"
        return (f"{vector} u; u.x = {get}(reinterpret_cast<const {word}*>({at})); "
                f"u.y = {get}(reinterpret_cast<const {word}*>({at} + {FRAGMENT_WORD_BYTES}));")

    store = (f"*reinterpret_cast<{vector}*>(d) = o;" if words == 4 else  # a fragment: local, 4-byte aligned
             f"{word}* out = static_cast<{word}*>(d); out[0] = o.x; out[1] = o.y;")
    parameters = ("void* d, const void* corners, const void* weights, const void* s, int zero_run, const void* g, "
                  "int pixel_bytes")
    body = (f"const int4 c4 = *reinterpret_cast<const int4*>(corners); "
            f"const float4 w4 = *reinterpret_cast<const float4*>(weights); "
            f"const int c[4] = {{c4.x, c4.y, c4.z, c4.w}}; const float ws[4] = {{w4.x, w4.y, w4.z, w4.w}}; "
            f"const char* patch = static_cast<const char*>(s); {vector} o; "
            + " ".join(f"{{ const float w = ws[{k}]; const char* q = patch + (c[{k}] < 0 ? zero_run : c[{k}]); "
                       f"{load('q', '*')} {_accumulate(dtype, k == 0, words)} }}" for k in range(4))
            + f" if ((c[0] | c[1] | c[2] | c[3]) < 0) {{ const char* image = static_cast<const char*>(g); "
            f"_Pragma(\"unroll\") for (int k = 0; k < 4; ++k) if (c[k] < 0) {{ const float w = ws[k]; "
            f"const char* q = image + static_cast<long long>(-(c[k] + 1)) * pixel_bytes; "
            f"{load('q', '__ldg')} {_accumulate(dtype, False, words)} }} }} {store}")
    return device_call(name, parameters, body, destination, corners, weights, source, zero_run, image, pixel_bytes)


def _interpolate_run(dtype: str, destination, corners, weights, patch_run, zero_run: int, global_run,
                     pixel_bytes: int):
    """One 16-byte run of a column into shared memory at ``destination`` (``_blend``)."""
    return _blend(dtype, 4, f"deft_interpolate_run_{dtype}", destination, corners, weights, patch_run, zero_run,
                  global_run, pixel_bytes)


def _interpolate_fragment(dtype: str, destination, corners, weights, patch_word, zero_run: int, global_word,
                          pixel_bytes: int):
    """A lane's share of a column's B fragment (its two 4-byte words of channels: a float16 /
    bfloat16 pair or a float32 each) into ``destination`` (local), from the sampling point's table
    entry as ``_interpolate_run`` reads it (``_blend``): the same corners in the same order and
    arithmetic, so the same values as the shared columns hold."""
    return _blend(dtype, 2, f"deft_interpolate_fragment_{dtype}", destination, corners, weights, patch_word,
                  zero_run, global_word, pixel_bytes)


def _load_matrices(fragment, row):
    """``ldmatrix.x4``: four 8 x 8 matrices of 16-bit elements (or 8 x 4 of 32-bit ones) into the four
    32-bit registers at ``fragment`` (local), lane ``l`` giving the address of row ``l % 8`` of matrix
    ``l // 8`` (shared memory, 16-byte aligned; PTX ISA 8.x, section 9.7.14.5.15)."""
    return device_call("deft_ldmatrix_x4", "void* fragment, const void* row",
                       "unsigned* r = reinterpret_cast<unsigned*>(fragment); "
                       'asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n" '
                       ': "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) '
                       ': "r"(static_cast<unsigned>(__cvta_generic_to_shared(row))));', fragment, row)


def patch_forward_primfunc(spec: DeformConvSpec, tiling: PatchTiling):
    """The kernel ``forward(input [N, H, W, C], offset, mask?, weight [O, kh, kw, C], bias?, output
    [N, O, out_h, out_w])`` (the spec's dtype, channels-last input and weight as the op passes them for
    ``layout="NHWC"``). Raises ValueError where ``supports`` says why not."""
    reason = supports(spec, tiling)
    if reason:
        raise ValueError(f"{tiling} cannot run {spec.key()}: {reason}")
    dtype, acc = spec.dtype, "float32"
    mma = mma_shape(spec)
    n, c, h, w = spec.input_shape
    o_ch, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    kh, kw = spec.kernel_h, spec.kernel_w
    taps = kh * kw
    (sh, sw), (pad_h, pad_w), (dh, dw) = spec.stride, spec.padding, spec.dilation
    th, tw, halo, o_tile, chunk = tiling.tile_h, tiling.tile_w, tiling.halo, tiling.o_tile, tiling.chunk
    threads, p = tiling.threads, tiling.positions
    rows, cols = tiling.patch(spec)
    item = DTYPE_BYTES[dtype]
    run = RUN_BYTES // item  # elements per 16-byte run
    runs = chunk // run  # runs per pixel of a chunk
    row = chunk + ROW_PAD_BYTES // item  # operand rows in shared memory (elements)
    m_tiles = o_tile // (16 * tiling.warps_o)
    n_tiles = p // (8 * tiling.warps_p)
    k_steps = chunk // mma.k
    half = mma.k // 2  # operand elements per 16-byte ldmatrix row
    a_elements, b_elements = mma.a_elements, mma.b_elements
    tiles_y, tiles_x, o_tiles = -(-oh // th), -(-ow // tw), o_ch // o_tile
    blocks = n * tiles_y * tiles_x * o_tiles
    chunks = c // chunk
    has_mask, has_bias = spec.has_mask, spec.has_bias
    zero_run = rows * cols * chunk  # the patch's last run: zeros, read by corners outside the image
    n_, c_, h_, w_ = index_extents(spec, n, c, h, w)
    scope = "shared.dyn" if tiling.dynamic(spec) else "shared"
    regions = tiling.regions(spec)
    overflow = tiling.overflow
    first_slot = rows * cols + 1  # the patch's pixels, its zero run, then the overflow slots
    zero, one = tirx.const(0, acc), tirx.const(1, acc)
    in_registers = tiling.columns == "registers"
    k_splits = tiling.k_splits
    outputs = n * o_ch * oh * ow
    word = 4 // item  # elements per 4-byte word of a B fragment

    @T.macro
    def load_weight_fragments(t, ks, wo, lane, weights, a_frag):  # the A operands of tap t, k step ks
        for m in T.unroll(m_tiles):
            T.evaluate(_load_matrices(
                T.address_of(a_frag[m * a_elements]),
                T.address_of(weights[(t * o_tile + (wo * m_tiles + m) * 16 + lane % 8 + lane // 8 % 2 * 8) * row
                                     + ks * mma.k + lane // 16 * half])))

    @T.macro
    def multiply_from_columns(b, thread, wo, wp, lane, c0, input, corner_offsets, corner_weights, patch, weights,
                              smem, sums, a_frag, b_frag):
        columns = T.decl_buffer((taps * p * row,), dtype, data=smem.data, scope=scope,
                                elem_offset=regions["columns"] // item)
        for i in T.unroll((taps * p * runs + threads - 1) // threads):  # every tap's columns
            e = i * threads + thread
            if e < taps * p * runs:
                t = e // (p * runs)
                pl = e % p
                r = e // p % runs
                T.evaluate(_interpolate_run(
                    dtype, T.address_of(columns[(t * p + pl) * row + r * run]),
                    T.address_of(corner_offsets[(t * p + pl) * 4]),
                    T.address_of(corner_weights[(t * p + pl) * 4]),
                    T.address_of(patch[r * run]), zero_run * item, T.address_of(input[b, 0, 0, c0 + r * run]),
                    c * item))
        T.tvm_storage_sync("shared")
        for t in range(taps):
            for ks in T.unroll(k_steps):
                load_weight_fragments(t, ks, wo, lane, weights, a_frag)
                for nt in T.unroll(n_tiles // 2):
                    T.evaluate(_load_matrices(
                        T.address_of(b_frag[0]),
                        T.address_of(columns[(t * p + (wp * n_tiles + 2 * nt) * 8 + lane % 8 + lane // 16 * 8)
                                             * row + ks * mma.k + lane // 8 % 2 * half])))
                    for j in T.unroll(2):
                        for m in T.unroll(m_tiles):
                            T.evaluate(mma.sync(a_frag, m * a_elements, b_frag, j * b_elements, sums,
                                                (m * n_tiles + 2 * nt + j) * 4))

    @T.macro
    def multiply_from_patch(b, lane_g, lane_t, wo, wp, lane, c0, input, corner_offsets, corner_weights, patch,
                            weights, sums, a_frag, b_frag):
        for t in range(taps):
            for ks in T.unroll(k_steps):
                load_weight_fragments(t, ks, wo, lane, weights, a_frag)
                for nt in T.unroll(n_tiles):
                    pl = (wp * n_tiles + nt) * 8 + lane_g
                    T.evaluate(_interpolate_fragment(
                        dtype, T.address_of(b_frag[0]), T.address_of(corner_offsets[(t * p + pl) * 4]),
                        T.address_of(corner_weights[(t * p + pl) * 4]), T.address_of(patch[ks * mma.k + lane_t * word]),
                        zero_run * item, T.address_of(input[b, 0, 0, c0 + ks * mma.k + lane_t * word]), c * item))
                    for m in T.unroll(m_tiles):
                        T.evaluate(mma.sync(a_frag, m * a_elements, b_frag, 0, sums, (m * n_tiles + nt) * 4))

    @T.macro
    def body(block_split, thread, input, offset, mask, weight, bias, output, partials):
        # a tile's splits in neighbouring blocks (its patch pixels shared in L2); nothing to split: as before
        split = T.meta_var(block_split % k_splits if k_splits > 1 else 0)
        block = T.meta_var(block_split // k_splits if k_splits > 1 else block_split)
        ot = block % o_tiles
        tile_x = block // o_tiles % tiles_x
        tile_y = block // (o_tiles * tiles_x) % tiles_y
        b = block // (o_tiles * tiles_x * tiles_y)
        o0 = ot * o_tile
        patch_y = tile_y * th * sh - pad_h - halo
        patch_x = tile_x * tw * sw - pad_w - halo
        warp = thread // 32
        wo = warp // tiling.warps_p
        wp = warp % tiling.warps_p
        lane = thread % 32
        lane_g = lane // 4
        lane_t = thread % 4

        # one shared buffer (one dynamic allocation past 48 KB), its regions 16-byte aligned: the
        # sampling-point table (per tap and position: four corner offsets, four weights; see
        # _interpolate_run), the patch, every tap's weights, the columns
        smem = T.alloc_buffer((regions["end"],), "uint8", scope=scope)
        corner_offsets = T.decl_buffer((taps * p * 4,), "int32", data=smem.data, scope=scope,
                                       elem_offset=regions["table"] // 4)
        corner_weights = T.decl_buffer((taps * p * 4,), acc, data=smem.data, scope=scope,
                                       elem_offset=regions["table"] // 4 + taps * p * 4)
        slot_pixels = T.decl_buffer((overflow + 4,), "int32", data=smem.data, scope=scope,
                                    elem_offset=regions["slot_pixels"] // 4)  # the last 4: the slots taken
        patch = T.decl_buffer(((first_slot + overflow) * chunk,), dtype, data=smem.data, scope=scope,
                              elem_offset=regions["patch"] // item)
        weights = T.decl_buffer((taps * o_tile * row,), dtype, data=smem.data, scope=scope,
                                elem_offset=regions["weights"] // item)
        sums = T.alloc_buffer((m_tiles * n_tiles * 4,), acc, scope="local")
        a_frag = T.alloc_buffer((m_tiles * a_elements,), dtype, scope="local")
        b_frag = T.alloc_buffer((2 * b_elements,), dtype, scope="local")  # two n8 tiles
        for i in T.unroll(m_tiles * n_tiles * 4):
            sums[i] = zero
        if thread == 0:
            slot_pixels[overflow] = 0
        T.tvm_storage_sync("shared")
        for i in range((taps * p + threads - 1) // threads):  # the block's sampling points
            e = i * threads + thread
            if e < taps * p:
                t = e // p
                oy = tile_y * th + e % p // tw
                ox = tile_x * tw + e % p % tw
                for k in T.unroll(4):  # no sample: the zero run
                    corner_offsets[e * 4 + k] = zero_run * item
                    corner_weights[e * 4 + k] = zero
                if oy < oh and ox < ow:
                    y = T.Cast(acc, oy * sh - pad_h + t // kw * dh) + T.Cast(acc, offset[b, 2 * t, oy, ox])
                    x = T.Cast(acc, ox * sw - pad_w + t % kw * dw) + T.Cast(acc, offset[b, 2 * t + 1, oy, ox])
                    m_ = one
                    if has_mask:
                        m_ = T.Cast(acc, mask[b, t, oy, ox])
                    # as torchvision's bilinear_interpolate: outside (-1, h) x (-1, w) in either coordinate
                    # no sample (zero weights, even if the other is NaN), else NaN gives NaN. An integer
                    # flag: the simplifier may negate float comparisons, which NaN does not survive
                    outside = (T.Cast("int32", y <= T.float32(-1)) + T.Cast("int32", y >= T.Cast(acc, h))
                               + T.Cast("int32", x <= T.float32(-1)) + T.Cast("int32", x >= T.Cast(acc, w)))
                    if outside == 0 and (T.isnan(y) or T.isnan(x)):
                        for k in T.unroll(4):
                            corner_weights[e * 4 + k] = T.float32("nan")
                    elif outside == 0:
                        y_low = T.Cast("int32", T.floor(y))
                        x_low = T.Cast("int32", T.floor(x))
                        ly = y - T.Cast(acc, y_low)
                        lx = x - T.Cast(acc, x_low)
                        for k in T.unroll(4):
                            yi = y_low + k // 2
                            xi = x_low + k % 2
                            corner_weights[e * 4 + k] = m_ * T.Select(k // 2 == 1, ly, one - ly) * T.Select(
                                k % 2 == 1, lx, one - lx)
                            if yi >= 0 and yi < h and xi >= 0 and xi < w:
                                if (yi - patch_y >= 0 and yi - patch_y < rows and xi - patch_x >= 0
                                        and xi - patch_x < cols):
                                    corner_offsets[e * 4 + k] = ((yi - patch_y) * cols + xi - patch_x) * chunk * item
                                else:  # an overflow slot while they last, else the global path
                                    slot = T.cuda.atomic_add(T.address_of(slot_pixels[overflow]), 1)
                                    if slot < overflow:
                                        slot_pixels[slot] = yi * w + xi
                                        corner_offsets[e * 4 + k] = (first_slot + slot) * chunk * item
                                    else:
                                        corner_offsets[e * 4 + k] = -(yi * w + xi + 1)
        for ci in range(chunks // k_splits):
            c0 = (split * (chunks // k_splits) + ci) * chunk
            T.tvm_storage_sync("shared")
            for i in range((rows * cols * runs + threads - 1) // threads):  # the patch, zeros outside the image
                e = i * threads + thread
                if e < rows * cols * runs:
                    yy = patch_y + e // runs // cols
                    xx = patch_x + e // runs % cols
                    if yy >= 0 and yy < h and xx >= 0 and xx < w:
                        T.evaluate(_copy_run(T.address_of(patch[e * run]),
                                             T.address_of(input[b, yy, xx, c0 + e % runs * run])))
                    else:
                        T.evaluate(_zero_run(T.address_of(patch[e * run])))
            if thread < runs:
                T.evaluate(_zero_run(T.address_of(patch[zero_run + thread * run])))
            taken = T.min(slot_pixels[overflow], overflow)
            for i in range((overflow * runs + threads - 1) // threads):  # the overflow slots taken
                e = i * threads + thread
                if e < taken * runs:
                    pixel = slot_pixels[e // runs]
                    T.evaluate(_copy_run(T.address_of(patch[(first_slot + e // runs) * chunk + e % runs * run]),
                                         T.address_of(input[b, pixel // w, pixel % w, c0 + e % runs * run])))
            for i in range((taps * o_tile * runs + threads - 1) // threads):  # every tap's weights
                e = i * threads + thread
                if e < taps * o_tile * runs:
                    t = e // (o_tile * runs)
                    o = e // runs % o_tile
                    T.evaluate(_copy_run(T.address_of(weights[(t * o_tile + o) * row + e % runs * run]),
                                         T.address_of(weight[o0 + o, t // kw, t % kw, c0 + e % runs * run])))
            T.evaluate(_copies_done())
            T.tvm_storage_sync("shared")
            if in_registers:
                multiply_from_patch(b, lane_g, lane_t, wo, wp, lane, c0, input, corner_offsets, corner_weights,
                                    patch, weights, sums, a_frag, b_frag)
            else:
                multiply_from_columns(b, thread, wo, wp, lane, c0, input, corner_offsets, corner_weights, patch,
                                      weights, smem, sums, a_frag, b_frag)

        for m in T.unroll(m_tiles):
            for nt in T.unroll(n_tiles):
                for i in T.unroll(4):
                    ro, cn = T.meta_var(c_element(i, lane_g, lane_t))
                    o = o0 + (wo * m_tiles + m) * 16 + ro
                    pl = (wp * n_tiles + nt) * 8 + cn
                    oy = tile_y * th + pl // tw
                    ox = tile_x * tw + pl % tw
                    if oy < oh and ox < ow:
                        if k_splits > 1:
                            partials[(((split * n + b) * o_ch + o) * oh + oy) * ow + ox] = sums[
                                (m * n_tiles + nt) * 4 + i]
                        elif has_bias:
                            output[b, o, oy, ox] = T.Cast(dtype, sums[(m * n_tiles + nt) * 4 + i]
                                                          + T.Cast(acc, bias[o]))
                        else:
                            output[b, o, oy, ox] = T.Cast(dtype, sums[(m * n_tiles + nt) * 4 + i])

    @T.macro
    def sum_splits(e, partials, bias, output):  # output element e: its splits added in order, bias, cast
        o = e // (oh * ow) % o_ch
        total = T.alloc_buffer((1,), acc, scope="local")
        total[0] = partials[e]
        for s in range(1, k_splits):
            total[0] = total[0] + partials[s * n * o_ch * oh * ow + e]
        if has_bias:
            total[0] = total[0] + T.Cast(acc, bias[o])
        output[e // (o_ch * oh * ow), o, e // ow % oh, e % ow] = T.Cast(dtype, total[0])

    @T.prim_func
    def forward(
        input: T.Buffer((n_, h_, w_, c_), dtype),
        offset: T.Buffer(spec.offset_shape, dtype),
        mask: T.Buffer(spec.mask_shape, dtype),
        weight: T.Buffer((o_ch, kh, kw, c), dtype),
        bias: T.Buffer((o_ch,), dtype),
        output: T.Buffer(spec.output_shape, dtype),
    ):
        T.func_attr({"global_symbol": "forward", "tirx.noalias": True})
        partials = T.alloc_buffer((k_splits * outputs if k_splits > 1 else 1,), acc)  # TVM's device workspace
        for block in T.thread_binding(blocks * k_splits, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", max(1, RESIDENT_THREADS // threads)):
                    body(block, thread, input, offset, mask, weight, bias, output, partials)
        if k_splits > 1:  # a second kernel
            for block in T.thread_binding((outputs + SUM_THREADS - 1) // SUM_THREADS, thread="blockIdx.x"):
                for thread in T.thread_binding(SUM_THREADS, thread="threadIdx.x"):
                    if block * SUM_THREADS + thread < outputs:
                        sum_splits(block * SUM_THREADS + thread, partials, bias, output)

    return without_parameters(forward, ("mask",) * (not has_mask) + ("bias",) * (not has_bias))


def patch_forward_module(spec: DeformConvSpec, tiling: PatchTiling | None = None):
    """The IRModule of ``spec``'s patch-staged forward kernel (``forward``), by default on
    ``PatchTiling.for_spec``; raises ValueError where ``supports`` says why not."""
    import tvm

    return tvm.IRModule({"forward": patch_forward_primfunc(spec, tiling or PatchTiling.for_spec(spec))})
