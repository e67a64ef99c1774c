"""The forward with DefT's patch + halo staging (issue 15): a hand-scheduled TIR kernel on tensor cores.

``deft_tvm.compute.forward``'s convolution as a GEMM ``[out_channels] x [positions]`` reduced over
``(in_channels, kernel taps)``, fused as in ``cuda_tensorcore``, but the samples come from a patch of the
input in shared memory instead of gathers from L2 (DefT, ASPLOS'23, section 4: "the input region a tile
samples is loaded once"; its halo from the offset statistics, ``tuning.stats.halo_coverage``):

* a thread block owns one output tile (``tile_h x tile_w`` positions of one image) and ``o_tile`` output
  channels; per chunk of ``chunk`` input channels it copies the tile's receptive field plus ``halo`` px on
  each side (the *patch*, channels last, zeros outside the image) into shared memory in 16-byte runs;
* per kernel tap each thread takes (position, 16 bytes of channels) pairs: the position's sampling point
  (computed once per block into a static table ``[tap][position]``: y, x, mask), its four corners read
  16 bytes at a time from the patch, or from global memory for a corner outside the patch but inside the
  image (offsets larger than the halo), or from a zero run outside the image; it interpolates in float32,
  multiplies by the mask and stores the column ``[position][channel]`` in the spec's dtype; the tap's
  weights ``[o_tile][chunk]`` are copied beside it. Columns and weights are double-buffered by tap, one
  barrier per tap;
* each warp multiplies its ``m_tiles`` m16 (output channels) x ``n_tiles`` n8 (positions) tiles with
  ``mma.sync`` (``cuda_mma``: float16, bfloat16 m16n8k16, float32 on TF32 m16n8k8), float32 sums in
  registers, and writes ``output[n, o, y, x]`` (+ bias, cast to the spec's dtype).

Applies to one-group layers with one offset group, channels last (``layout="NHWC"``: the op's tensor-core
layout), input channels in multiples of ``chunk`` and output channels of ``o_tile`` (``supports``). NaN
sampling points give NaN (torchvision's result), points outside the image zero; every read is in bounds
whatever the offsets.
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from deft_tvm.compute.sampling import index_extents
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda_mma import c_element, mma_shape

SHARED_BYTES = 48 * 1024  # static shared memory per block
RUN_BYTES = 16  # a thread's loads and stores of channels: one 16-byte access
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Blocks per SM the kernel is launched for (``__launch_bounds__``): up to 168 registers per thread of 128.
RESIDENT_BLOCKS = 3
ROW_PAD_BYTES = 16  # shared operand rows are padded by 16 bytes: conflict-free fragment loads
_CONVERT = {  # (packed pair type, pair -> float2, two floats -> pair) per dtype of 2 bytes
    "float16": ("__half2", "__half22float2", "__floats2half2_rn"),
    "bfloat16": ("__nv_bfloat162", "__bfloat1622float2", "__floats2bfloat162_rn"),
}


@dataclasses.dataclass(frozen=True)
class PatchTiling:
    """A block's output tile (px), halo (px), output channels and channels per stage, and its warps
    along output channels x positions."""

    tile_h: int = 8
    tile_w: int = 16
    halo: int = 2
    o_tile: int = 64
    chunk: int = 16
    warps_o: int = 2
    warps_p: int = 2

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

    def shared_bytes(self, spec: DeformConvSpec) -> int:
        """Patch (and one zero run), double-buffered columns and weights, the sampling-point table."""
        item = DTYPE_BYTES[spec.dtype]
        rows, cols = self.patch(spec)
        row = self.chunk * item + ROW_PAD_BYTES
        return ((rows * cols + 1) * self.chunk * item + 2 * (self.positions + self.o_tile) * row
                + 3 * 4 * spec.kernel_h * spec.kernel_w * self.positions)

    @classmethod
    def for_spec(cls, spec: DeformConvSpec, halo: int = 2) -> "PatchTiling":
        """The default: 64 output channels, 32 bytes of channels per stage, 8 x 16 tiles, or 8 x 8
        where their patch would not fit (strided layers)."""
        tilings = [cls(tile_h=8, tile_w=w, halo=halo, chunk=32 // DTYPE_BYTES[spec.dtype]) for w in (16, 8)]
        return next((t for t in tilings if t.shared_bytes(spec) <= SHARED_BYTES), tilings[0])


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
    if tiling.positions % (8 * tiling.warps_p):
        return f"{tiling.positions} positions per tile are not a multiple of 8 x {tiling.warps_p} warps"
    if tiling.shared_bytes(spec) > SHARED_BYTES:
        return f"{tiling.shared_bytes(spec)} bytes of shared memory, more than {SHARED_BYTES}"
    return None


def _device_call(name: str, parameters: str, body: str, *args):
    source = f"__device__ __forceinline__ void {name}({parameters}) {{ {body} }}\n"
    return T.cuda.func_call(name, *args, source_code=source)


def _copy_run(destination, source):
    return _device_call("deft_copy_run16", "void* d, const void* s",
                        "*reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);", destination, source)


def _zero_run(destination):
    return _device_call("deft_zero_run16", "void* d", "*reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);",
                        destination)


def _interpolate_run(dtype: str, destination, in_patch, patch_runs, global_runs, weights):
    """One 16-byte run of the column: ``sum_k weights[k] * corner_k[i]`` per element, in float32, then
    rounded to ``dtype``; corner ``k``'s 16-byte run is ``patch_runs[k]`` (shared memory) where
    ``in_patch[k]``, else ``global_runs[k]``."""
    name = f"deft_interpolate_run_{dtype}"
    parameters = ("void* d, " + ", ".join(f"int in{k}, const void* s{k}, const void* g{k}" for k in range(4))
                  + ", float w0, float w1, float w2, float w3")
    pick = " ".join(f"const void* p{k} = in{k} ? s{k} : g{k};" for k in range(4))
    if dtype == "float32":
        body = (pick + " const float4 a = *reinterpret_cast<const float4*>(p0), b = *reinterpret_cast<const float4*>(p1), "
                "c = *reinterpret_cast<const float4*>(p2), e = *reinterpret_cast<const float4*>(p3); "
                "*reinterpret_cast<float4*>(d) = make_float4("
                "w0 * a.x + w1 * b.x + w2 * c.x + w3 * e.x, w0 * a.y + w1 * b.y + w2 * c.y + w3 * e.y, "
                "w0 * a.z + w1 * b.z + w2 * c.z + w3 * e.z, w0 * a.w + w1 * b.w + w2 * c.w + w3 * e.w);")
    else:
        pair, to_float, from_float = _CONVERT[dtype]
        body = (pick + f" const void* p[4] = {{p0, p1, p2, p3}}; const float w[4] = {{w0, w1, w2, w3}}; "
                f"float r[8] = {{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}}; "
                f"_Pragma(\"unroll\") for (int k = 0; k < 4; ++k) {{ "
                f"const uint4 u = *reinterpret_cast<const uint4*>(p[k]); "
                f"const {pair}* h = reinterpret_cast<const {pair}*>(&u); "
                f"_Pragma(\"unroll\") for (int i = 0; i < 4; ++i) {{ const float2 f = {to_float}(h[i]); "
                f"r[2 * i] += w[k] * f.x; r[2 * i + 1] += w[k] * f.y; }} }} "
                f"uint4 o; {pair}* q = reinterpret_cast<{pair}*>(&o); "
                f"_Pragma(\"unroll\") for (int i = 0; i < 4; ++i) q[i] = {from_float}(r[2 * i], r[2 * i + 1]); "
                f"*reinterpret_cast<uint4*>(d) = o;")
    corners = [arg for k in range(4) for arg in (in_patch[k], patch_runs[k], global_runs[k])]
    return _device_call(name, parameters, body, destination, *corners, *weights)


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
    a_elements, b_elements = mma.a_elements, mma.b_elements
    tiles_y, tiles_x, o_tiles = -(-oh // th), -(-ow // tw), o_ch // o_tile
    blocks = n * tiles_y * tiles_x * o_tiles
    chunks = c // chunk
    has_mask, has_bias = spec.has_mask, spec.has_bias
    zero_run = rows * cols * chunk  # the patch's last run: zeros, read by corners outside the image
    n_, c_, h_, w_ = index_extents(spec, n, c, h, w)
    zero, one, outside = tirx.const(0, acc), tirx.const(1, acc), tirx.const(-2, acc)

    @T.macro
    def body(block, thread, input, offset, mask, weight, bias, output):
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
        lane_g = thread % 32 // 4
        lane_t = thread % 4

        point_y = T.alloc_buffer((taps * p,), acc, scope="shared")
        point_x = T.alloc_buffer((taps * p,), acc, scope="shared")
        point_m = T.alloc_buffer((taps * p,), acc, scope="shared")
        patch = T.alloc_buffer((zero_run + chunk,), dtype, scope="shared")
        columns = T.alloc_buffer((2 * p * row,), dtype, scope="shared")
        weights = T.alloc_buffer((2 * o_tile * row,), dtype, scope="shared")
        sums = T.alloc_buffer((m_tiles * n_tiles * 4,), acc, scope="local")
        a_frag = T.alloc_buffer((m_tiles * a_elements,), dtype, scope="local")
        b_frag = T.alloc_buffer((b_elements,), dtype, scope="local")
        corner = T.alloc_buffer((4,), "int32", scope="local")  # element index into patch, or -1: global
        corner_weight = T.alloc_buffer((4,), acc, scope="local")
        corner_pixel = T.alloc_buffer((4,), "int32", scope="local")  # yi * w + xi for the global path
        for i in T.unroll(m_tiles * n_tiles * 4):
            sums[i] = zero
        for i in range((taps * p + threads - 1) // threads):  # the block's sampling points
            e = i * threads + thread
            if e < taps * p:
                t = e // p
                oy = tile_y * th + e % p // tw
                ox = tile_x * tw + e % p % tw
                point_y[e] = outside
                point_x[e] = outside
                point_m[e] = zero
                if oy < oh and ox < ow:
                    point_y[e] = T.Cast(acc, oy * sh - pad_h + t // kw * dh) + T.Cast(acc, offset[b, 2 * t, oy, ox])
                    point_x[e] = T.Cast(acc, ox * sw - pad_w + t % kw * dw) + T.Cast(acc, offset[b, 2 * t + 1, oy, ox])
                    point_m[e] = one
                    if has_mask:
                        point_m[e] = T.Cast(acc, mask[b, t, oy, ox])
        for ci in range(chunks):
            c0 = ci * chunk
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
            T.tvm_storage_sync("shared")
            for t in range(taps):
                buf = t % 2
                for i in range((o_tile * runs + threads - 1) // threads):  # the tap's weights
                    e = i * threads + thread
                    if e < o_tile * runs:
                        T.evaluate(_copy_run(T.address_of(weights[(buf * o_tile + e // runs) * row + e % runs * run]),
                                             T.address_of(weight[o0 + e // runs, t // kw, t % kw,
                                                                 c0 + e % runs * run])))
                for i in range((p * runs + threads - 1) // threads):  # the tap's columns
                    e = i * threads + thread
                    if e < p * runs:
                        pl = e % p
                        r = e // p
                        y = point_y[t * p + pl]
                        x = point_x[t * p + pl]
                        for k in T.unroll(4):
                            corner[k] = zero_run
                            corner_weight[k] = zero
                            corner_pixel[k] = 0
                        if y <= T.float32(-1) or y >= T.Cast(acc, h) or x <= T.float32(-1) or x >= T.Cast(acc, w):
                            corner_weight[0] = zero  # outside: no sample, even if NaN
                        elif T.isnan(y) or T.isnan(x):
                            corner_weight[0] = T.float32("nan")
                        else:
                            y_low = T.Cast("int32", T.floor(y))
                            x_low = T.Cast("int32", T.floor(x))
                            ly = y - T.Cast(acc, y_low)
                            lx = x - T.Cast(acc, x_low)
                            for k in T.unroll(4):
                                yi = y_low + k // 2
                                xi = x_low + k % 2
                                corner_weight[k] = point_m[t * p + pl] * T.Select(k // 2 == 1, ly, one - ly) * T.Select(
                                    k % 2 == 1, lx, one - lx)
                                if yi >= 0 and yi < h and xi >= 0 and xi < w:
                                    if (yi - patch_y >= 0 and yi - patch_y < rows and xi - patch_x >= 0
                                            and xi - patch_x < cols):
                                        corner[k] = ((yi - patch_y) * cols + xi - patch_x) * chunk
                                    else:
                                        corner[k] = -1
                                        corner_pixel[k] = yi * w + xi
                        T.evaluate(_interpolate_run(
                            dtype, T.address_of(columns[(buf * p + pl) * row + r * run]),
                            [T.Cast("int32", corner[k] >= 0) for k in range(4)],
                            [T.address_of(patch[T.max(corner[k], 0) + r * run]) for k in range(4)],
                            [T.address_of(input[b, corner_pixel[k] // w, corner_pixel[k] % w, c0 + r * run])
                             for k in range(4)],
                            [corner_weight[k] for k in range(4)]))
                T.tvm_storage_sync("shared")
                for ks in T.unroll(k_steps):
                    for m in T.unroll(m_tiles):
                        for i in T.unroll(a_elements):
                            ro, cq = T.meta_var(mma.a_element(i, lane_g, lane_t))
                            a_frag[m * a_elements + i] = weights[(buf * o_tile + (wo * m_tiles + m) * 16 + ro) * row
                                                                 + ks * mma.k + cq]
                    for nt in T.unroll(n_tiles):
                        for i in T.unroll(b_elements):
                            kq, cn = T.meta_var(mma.b_element(i, lane_g, lane_t))
                            b_frag[i] = columns[(buf * p + (wp * n_tiles + nt) * 8 + cn) * row + ks * mma.k + kq]
                        for m in T.unroll(m_tiles):
                            T.evaluate(mma.sync(a_frag, m * a_elements, b_frag, 0, sums, (m * n_tiles + nt) * 4))
        for m in T.unroll(m_tiles):
            for nt in T.unroll(n_tiles):
                for i in T.unroll(4):
                    ro, cn = T.meta_var(c_element(i, lane_g, lane_t))
                    o = o0 + (wo * m_tiles + m) * 16 + ro
                    pl = (wp * n_tiles + nt) * 8 + cn
                    oy = tile_y * th + pl // tw
                    ox = tile_x * tw + pl % tw
                    if oy < oh and ox < ow:
                        if has_bias:
                            output[b, o, oy, ox] = T.Cast(dtype, sums[(m * n_tiles + nt) * 4 + i]
                                                          + T.Cast(acc, bias[o]))
                        else:
                            output[b, o, oy, ox] = T.Cast(dtype, sums[(m * n_tiles + nt) * 4 + i])

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
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", RESIDENT_BLOCKS):
                    body(block, thread, input, offset, mask, weight, bias, output)

    names = ("mask",) * (not has_mask) + ("bias",) * (not has_bias)
    return tirx.PrimFunc([v for v in forward.params if v.name not in names], forward.body, forward.ret_type,
                         forward.attrs)


def patch_forward_module(spec: DeformConvSpec, tiling: PatchTiling | None = None):
    """The IRModule of ``spec``'s patch-staged forward kernel (``forward``), by default on
    ``PatchTiling.for_spec``; raises ValueError where ``supports`` says why not."""
    import tvm

    return tvm.IRModule({"forward": patch_forward_primfunc(spec, tiling or PatchTiling.for_spec(spec))})
